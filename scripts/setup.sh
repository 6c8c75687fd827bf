#!/usr/bin/env bash
# Installs what qemu-executor and its tests need on a Debian 12 machine
# (as root): qemu with a qemu-img of the same version, the tools that build
# the test guest, protoc, and the wasm target policies compile to.
# Idempotent, and quick when everything is there.
#
#   scripts/setup.sh          install what is missing
#   scripts/setup.sh --plan   print the `apt-get install` arguments it would
#                             use, one per line (nothing when nothing is
#                             missing), and change nothing
#
# What is installed is read from dpkg's database, never from PATH, so the
# plan can be computed for another machine's state: with
# SETUP_DPKG_ADMINDIR=DIR (a directory holding a `status` file) the plan is
# made as if DIR were /var/lib/dpkg. tests/tests/setup_plan.rs resolves the
# plan against the recorded state of a new machine that way.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

plan_only=false
case "${1:-}" in
    --plan) plan_only=true ;;
    "") ;;
    *) log "usage: $0 [--plan]"; exit 2 ;;
esac
admindir=${SETUP_DPKG_ADMINDIR:-/var/lib/dpkg}

# The installed version of a package, or nothing.
installed() {
    { dpkg-query --admindir="$admindir" -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null || true; } |
        awk '$1 == "ii" { print $2 }'
}

# The version apt would install of a package, or nothing.
candidate() {
    { apt-cache policy "$1" 2>/dev/null || true; } | awk '/Candidate:/ && $2 != "(none)" { print $2 }'
}

qemu_plan() {
    # qemu-system-x86_64 writes through overlays that qemu-img made, so both
    # must come from one qemu. A new machine of ours ships a backported
    # qemu-utils (10.x) without qemu-system, while apt offers only
    # bookworm's 7.2: asking for both unpinned is refused (the newer
    # qemu-utils Breaks the older qemu-system-common), and asking for
    # qemu-system-x86 alone removes qemu-utils. So pin both to the version
    # apt can install, downgrading qemu-utils where needed.
    local system utils want
    system=$(installed qemu-system-x86)
    utils=$(installed qemu-utils)
    if [ -n "$system" ] && [ "$system" = "$utils" ]; then
        return
    fi
    want=$(candidate qemu-system-x86)
    if [ -z "$want" ]; then
        log "apt offers no qemu-system-x86: run apt-get update, or check the sources"
        exit 1
    fi
    echo "qemu-system-x86=$want"
    echo "qemu-utils=$want"
    # Installed packages built from the same qemu must follow, or apt keeps
    # the pair apart.
    local extra
    for extra in qemu-block-extra qemu-system-common qemu-system-data qemu-system-gui \
        qemu-system-modules-opengl qemu-system-modules-spice; do
        if [ -n "$(installed "$extra")" ] && [ -n "$(candidate "$extra")" ]; then
            echo "$extra=$(candidate "$extra")"
        fi
    done
}

plan() {
    qemu_plan
    local pkg
    # Guest building (xorriso, cpio, isolinux, syslinux-common), downloads
    # in the demo (curl), and protoc for nomad-proto with the well-known
    # types it imports (libprotobuf-dev: only a recommendation of
    # protobuf-compiler, and recommendations are not installed).
    for pkg in xorriso cpio curl protobuf-compiler libprotobuf-dev isolinux syslinux-common; do
        [ -n "$(installed "$pkg")" ] || echo "$pkg"
    done
}

# apt-cache needs lists; a new machine may have none yet.
lists_fresh() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

if $plan_only; then
    lists_fresh || { log "no apt lists: run apt-get update first"; exit 1; }
    plan
    exit 0
fi

root=true
[ "$(id -u)" = 0 ] || root=false
if ! lists_fresh; then
    $root || { log "need root to run apt-get update"; exit 1; }
    log "apt-get update (no package lists yet)"
    apt-get update -qq
fi
planned=$(plan)
mapfile -t packages <<<"$planned"
[ -n "$planned" ] || packages=()

if [ ${#packages[@]} -gt 0 ]; then
    $root || { log "need root to install: ${packages[*]}"; exit 1; }
    log "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Re-plan against fresh lists: the candidate version may have moved.
    planned=$(plan)
    mapfile -t packages <<<"$planned"
    apt-get install -y -qq --no-install-recommends --allow-downgrades "${packages[@]}" >/dev/null
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

system=$(qemu-system-x86_64 -version | head -n1)
img=$(qemu-img --version | head -n1)
if [ "${system#QEMU emulator version }" != "${img#qemu-img version }" ]; then
    log "qemu-system-x86_64 and qemu-img differ: $system / $img"
    exit 1
fi
log "ready: $system"
