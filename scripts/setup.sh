#!/usr/bin/env bash
# Installs what qemu-executor and its tests need on a Debian 12 machine
# (as root): qemu with a matching qemu-img, the tools that build the test
# guest, and the wasm target policies compile to. Idempotent and quick when
# everything is there.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

packages=()
# qemu-system-x86 and qemu-utils come from the same source package: install
# them together, or apt removes a newer qemu-utils to satisfy the other.
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null; then
    packages+=(qemu-system-x86 qemu-utils)
fi
command -v xorriso >/dev/null || packages+=(xorriso)
command -v cpio >/dev/null || packages+=(cpio)
command -v curl >/dev/null || packages+=(curl)
# nomad-proto compiles the Nomad plugin protocol with protoc.
command -v protoc >/dev/null || packages+=(protobuf-compiler)
[ -e /usr/lib/ISOLINUX/isolinux.bin ] || packages+=(isolinux)
[ -e /usr/lib/syslinux/modules/bios/ldlinux.c32 ] || packages+=(syslinux-common)

if [ ${#packages[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { log "need root to install: ${packages[*]}"; exit 1; }
    log "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${packages[@]}" >/dev/null
fi

# The agent runs qemu as this unprivileged user (`[agent] user`).
if [ "$(id -u)" = 0 ] && ! id qemu-executor >/dev/null 2>&1; then
    log "creating the system user qemu-executor"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin qemu-executor
fi

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    log "adding the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi
log "ready: $(qemu-system-x86_64 -version | head -n1)"
