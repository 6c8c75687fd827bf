#!/usr/bin/env bash
# Build the tiny bootable Linux test guests used by the qemu-executor tests.
#
# Usage: tests/guest/build-guest.sh [OUT_DIR]
#
#   OUT_DIR defaults to ${QE_GUEST_DIR:-/var/cache/qemu-executor-tests/guest}.
#
# Produces two BIOS-bootable (El Torito / isolinux) ISO images in OUT_DIR:
#
#   guest.iso           "cooperative": powers off when the ACPI power button is
#                       pressed (QMP system_powerdown)
#   guest-stubborn.iso  "stubborn": ignores the ACPI power button
#
# Everything comes from Debian packages (linux-image-amd64 -> the real
# linux-image-*-amd64 package, busybox-static, isolinux, syslinux-common),
# fetched with `apt-get download` into OUT_DIR/debs and unpacked with
# `dpkg-deb -x`; nothing is installed on the host except missing build tools
# (xorriso, cpio).
#
# Guest behaviour (both variants), on the serial console (console=ttyS0):
#   - loads e1000, evdev and button (plus their modules.dep dependencies)
#   - eth0 = 10.0.2.15/24, default gateway 10.0.2.2 (qemu user networking)
#   - busybox httpd on :8080 serving /www (index.html contains
#     "qemu-executor test guest" and the variant name) and on :8081 serving a
#     page containing "second port"
#   - prints "qe-guest: ready" once eth0 is up and both servers answer
#   - cooperative only: on the power button prints
#     "qe-guest: power button, powering off" and runs `poweroff -f`
#
# The script prints the absolute paths of the two ISOs on stdout (cooperative
# first, one per line); all progress goes to stderr. It is idempotent: a stamp
# (sha256 of this script + the resolved package versions) makes a rerun exit
# at once when nothing changed (without even asking apt when apt's lists are
# unchanged too). Downloaded .debs are cached in OUT_DIR/debs. Images are
# built in a temporary directory
# inside OUT_DIR and renamed into place, so an interrupted build never leaves
# a half-written ISO behind.

set -euo pipefail

PROG=${0##*/}
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

[ $# -le 1 ] || die "usage: $PROG [OUT_DIR]"
OUT_DIR=${1:-${QE_GUEST_DIR:-/var/cache/qemu-executor-tests/guest}}
mkdir -p "$OUT_DIR" || die "cannot create output directory $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd -P)
DEB_DIR=$OUT_DIR/debs
COOP_ISO=$OUT_DIR/guest.iso
STUB_ISO=$OUT_DIR/guest-stubborn.iso
STAMP=$OUT_DIR/.stamp

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")

# Modules the guest needs (dependencies are added from modules.dep).
GUEST_MODULES=(e1000 evdev button)
# Kernel command line. "quiet" keeps the kernel log off the serial console
# (it is the slow part under TCG); /init writes its markers to /dev/console.
KERNEL_CMDLINE="console=ttyS0 quiet"

command -v apt-cache >/dev/null || die "apt-cache not found (a Debian host is required)"

# ---------------------------------------------------------------- resolution
report() { printf '%s\n%s\n' "$COOP_ISO" "$STUB_ISO"; }

# Quick check, no apt at all: the script and apt's configuration and package
# lists are unchanged since the last successful build (so the resolved
# versions cannot have changed either).
SCRIPT_SUM=$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)
QUICK_STAMP=$OUT_DIR/.stamp-quick
WANT_QUICK=$(
    echo "script $SCRIPT_SUM"
    find /etc/apt /var/lib/apt/lists -maxdepth 2 -name lock -prune -o -type f -printf '%p %s %T@\n' 2>/dev/null |
        LC_ALL=C sort | sha256sum | cut -d' ' -f1
)
if [ -f "$COOP_ISO" ] && [ -f "$STUB_ISO" ] && [ -f "$QUICK_STAMP" ] &&
    [ "$(cat "$QUICK_STAMP")" = "$WANT_QUICK" ]; then
    log "up to date ($(grep -m1 '^linux-image-' "$STAMP" 2>/dev/null || true))"
    report
    exit 0
fi

# One apt-cache call (apt's binary cache is often disabled in containers, so
# every call parses all package lists): candidate versions of the helper
# packages and the Depends of the kernel metapackage.
APT_INFO=$(apt-cache show --no-all-versions linux-image-amd64 busybox-static isolinux syslinux-common 2>/dev/null |
    awk '/^Package: /{p=$2} /^Version: /{print "V", p, $2} /^Depends: /{sub(/^Depends: /,""); print "D", p, $0}') ||
    true
pkg_version() { # candidate version of a package, or die
    local v
    v=$(awk -v p="$1" '$1 == "V" && $2 == p {print $3; exit}' <<<"$APT_INFO")
    if [ -z "$v" ]; then
        v=$(apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
    fi
    [ -n "$v" ] || die "package $1 is unknown to apt (run apt-get update?)"
    printf '%s\n' "$v"
}

# linux-image-amd64 depends on the real package, e.g.
# "linux-image-6.1.0-56-amd64 (= 6.1.192-2)".
KDEP=$(awk '$1 == "D" && $2 == "linux-image-amd64" {$1 = $2 = ""; print; exit}' <<<"$APT_INFO" |
    tr ',' '\n' | grep -E '^ *linux-image-[0-9][^ ]*-amd64' | head -n1 || true)
KERNEL_PKG=$(sed -n 's/^ *\(linux-image-[0-9][^ ]*-amd64\).*/\1/p' <<<"$KDEP")
[ -n "$KERNEL_PKG" ] || die "cannot resolve the kernel package behind linux-image-amd64 (apt-get update?)"
KERNEL_VER=$(sed -n 's/.*(= *\([^ )]*\)).*/\1/p' <<<"$KDEP")
[ -n "$KERNEL_VER" ] || KERNEL_VER=$(pkg_version "$KERNEL_PKG")
KREL=${KERNEL_PKG#linux-image-}
PACKAGES=("$KERNEL_PKG" busybox-static isolinux syslinux-common)
declare -A PKGVER=([$KERNEL_PKG]=$KERNEL_VER)
for p in busybox-static isolinux syslinux-common; do PKGVER[$p]=$(pkg_version "$p"); done

WANT_STAMP=$(
    printf 'script %s\n' "$SCRIPT_SUM"
    for p in "${PACKAGES[@]}"; do printf '%s %s\n' "$p" "${PKGVER[$p]}"; done
)

up_to_date() {
    [ -f "$COOP_ISO" ] && [ -f "$STUB_ISO" ] && [ -f "$STAMP" ] &&
        [ "$(cat "$STAMP")" = "$WANT_STAMP" ]
}

write_quick_stamp() { printf '%s\n' "$WANT_QUICK" >"$QUICK_STAMP.tmp.$$" && mv -f "$QUICK_STAMP.tmp.$$" "$QUICK_STAMP"; }

if up_to_date; then
    write_quick_stamp
    log "up to date ($KERNEL_PKG $KERNEL_VER)"
    report
    exit 0
fi

# Serialize concurrent builds into the same OUT_DIR, then check again.
exec 9>"$OUT_DIR/.lock"
if command -v flock >/dev/null; then
    flock 9 || die "cannot lock $OUT_DIR/.lock"
    if up_to_date; then
        log "up to date ($KERNEL_PKG $KERNEL_VER), built concurrently"
        report
        exit 0
    fi
fi

# ------------------------------------------------------------------ host tools
need_pkgs=()
command -v xorriso >/dev/null || need_pkgs+=(xorriso)
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v gzip >/dev/null || need_pkgs+=(gzip)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing missing host tools: ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2 ||
        die "apt-get install ${need_pkgs[*]} failed"
fi
command -v dpkg-deb >/dev/null || die "dpkg-deb not found"

# ------------------------------------------------------------------- work dir
WORK=$(mktemp -d "$OUT_DIR/.build.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ------------------------------------------------------------- download debs
mkdir -p "$DEB_DIR"
# fetch_deb PKG -> prints the path of the cached, checksum-verified .deb
fetch_deb() {
    local pkg=$1 line url file sum
    # --print-uris skips files present in the cwd, so ask from an empty dir.
    mkdir -p "$WORK/uris"
    line=$(cd "$WORK/uris" && apt-get download --print-uris "$pkg" 2>/dev/null | head -n1) ||
        die "apt-get download --print-uris $pkg failed"
    [ -n "$line" ] || die "apt cannot download $pkg"
    # 'URL' FILENAME SIZE SHA256:HEX
    read -r url file _ sum <<<"$line"
    sum=${sum#SHA256:}
    if [ -f "$DEB_DIR/$file" ] && [ "${#sum}" -eq 64 ] &&
        echo "$sum  $DEB_DIR/$file" | sha256sum -c --status; then
        log "cached $file"
    else
        log "downloading $pkg ($file)"
        rm -f "$DEB_DIR/$file"
        (cd "$WORK/uris" && apt-get -o APT::Sandbox::User=root -q download "$pkg" >&2) ||
            die "apt-get download $pkg failed"
        [ -f "$WORK/uris/$file" ] || die "apt-get download $pkg did not produce $file"
        if [ "${#sum}" -eq 64 ]; then
            echo "$sum  $WORK/uris/$file" | sha256sum -c --status ||
                die "checksum mismatch for $file"
        fi
        mv -f "$WORK/uris/$file" "$DEB_DIR/$file"
    fi
    printf '%s\n' "$DEB_DIR/$file"
}

declare -A DEB
for p in "${PACKAGES[@]}"; do DEB[$p]=$(fetch_deb "$p=${PKGVER[$p]}"); done
# Drop stale cached debs (older versions) of our packages.
keep=" ${DEB[*]} "
for f in "$DEB_DIR"/*.deb; do
    [ -e "$f" ] || continue
    case $keep in *" $f "*) ;; *) log "removing stale $(basename "$f")"; rm -f "$f" ;; esac
done

# ---------------------------------------------------------------- unpack debs
log "unpacking debs"
UNPACK=$WORK/unpack
for p in "${PACKAGES[@]}"; do
    mkdir -p "$UNPACK/$p"
    dpkg-deb -x "${DEB[$p]}" "$UNPACK/$p" || die "dpkg-deb -x ${DEB[$p]} failed"
done
KROOT=$UNPACK/$KERNEL_PKG
VMLINUZ=$KROOT/boot/vmlinuz-$KREL
MODDIR=$KROOT/lib/modules/$KREL
[ -f "$VMLINUZ" ] || die "kernel image boot/vmlinuz-$KREL not found in $KERNEL_PKG"
[ -d "$MODDIR" ] || die "lib/modules/$KREL not found in $KERNEL_PKG"
BUSYBOX=$UNPACK/busybox-static/bin/busybox
[ -x "$BUSYBOX" ] || die "bin/busybox not found in busybox-static"
ISOLINUX_BIN=$UNPACK/isolinux/usr/lib/ISOLINUX/isolinux.bin
ISOHDPFX=$UNPACK/isolinux/usr/lib/ISOLINUX/isohdpfx.bin
LDLINUX=$UNPACK/syslinux-common/usr/lib/syslinux/modules/bios/ldlinux.c32
for f in "$ISOLINUX_BIN" "$ISOHDPFX" "$LDLINUX"; do
    [ -f "$f" ] || die "${f#"$UNPACK"/} not found in the isolinux/syslinux-common packages"
done

# ------------------------------------------------------------ kernel modules
# Debian's kernel package does not ship modules.dep (postinst runs depmod),
# so generate it with the packaged busybox depmod when it is missing.
if [ ! -f "$MODDIR/modules.dep" ]; then
    log "generating modules.dep for $KREL"
    "$BUSYBOX" depmod -b "$KROOT" "$KREL" || die "depmod failed for $KREL"
fi
[ -f "$MODDIR/modules.dep" ] || die "no modules.dep for $KREL"

declare -A MODPATH=() MODDEPS=() SEEN=()
while IFS= read -r line; do
    path=${line%%:*}
    name=${path##*/}
    name=${name%%.ko*}
    name=${name//-/_}
    MODPATH[$name]=$path
    MODDEPS[$name]=${line#*:}
done <"$MODDIR/modules.dep"

LOAD_ORDER=()
add_module() { # depth-first: dependencies before the module itself
    local name=${1//-/_} dep depname
    [ -z "${SEEN[$name]:-}" ] || return 0
    SEEN[$name]=1
    if [ -z "${MODPATH[$name]:-}" ]; then
        if grep -q "/${1}\.ko" "$MODDIR/modules.builtin" 2>/dev/null ||
            grep -q "/${name}\.ko" "$MODDIR/modules.builtin" 2>/dev/null; then
            log "module $1 is built into the kernel"
            return 0
        fi
        die "module $1 not found in $MODDIR/modules.dep"
    fi
    for dep in ${MODDEPS[$name]}; do
        depname=${dep##*/}
        add_module "${depname%%.ko*}"
    done
    LOAD_ORDER+=("${MODPATH[$name]}")
}
for m in "${GUEST_MODULES[@]}"; do add_module "$m"; done
log "modules (load order): ${LOAD_ORDER[*]:-none}"

# ---------------------------------------------------------------- initramfs
ROOTFS=$WORK/rootfs
mkdir -p "$ROOTFS"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,www,www2,lib/modules/"$KREL"}
cp "$BUSYBOX" "$ROOTFS/bin/busybox"
chmod 0755 "$ROOTFS/bin/busybox"
# Applet symlinks, created at build time (busybox-static runs on the host).
while IFS= read -r applet; do
    applet=${applet#/}
    [ "$applet" != bin/busybox ] || continue
    [ -e "$ROOTFS/$applet" ] || [ -L "$ROOTFS/$applet" ] || ln -s /bin/busybox "$ROOTFS/$applet"
done < <("$BUSYBOX" --list-full)
[ -L "$ROOTFS/bin/sh" ] || die "busybox has no sh applet"

: >"$ROOTFS/etc/qe-modules"
for rel in "${LOAD_ORDER[@]}"; do
    src=$MODDIR/$rel
    dst=$ROOTFS/lib/modules/$KREL/${rel%.ko*}.ko
    mkdir -p "$(dirname "$dst")"
    case $rel in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" >"$dst" || die "cannot decompress $rel" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" || die "cannot decompress $rel" ;;
    *.ko.zst)
        command -v zstd >/dev/null || {
            log "installing zstd"
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends zstd >&2 ||
                die "apt-get install zstd failed"
        }
        zstd -qdc "$src" >"$dst" || die "cannot decompress $rel"
        ;;
    *) die "unknown module format: $rel" ;;
    esac
    printf '%s\n' "/lib/modules/$KREL/${rel%.ko*}.ko" >>"$ROOTFS/etc/qe-modules"
done

printf '<html><body><p>second port</p></body></html>\n' >"$ROOTFS/www2/index.html"

cat >"$ROOTFS/init" <<'EOF'
#!/bin/sh
# qemu-executor test guest init (busybox sh, PID 1)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
VARIANT=$(cat /etc/qe-variant)
say() { echo "qe-guest: $*" >/dev/console; }
say "init started, variant $VARIANT"

uptime_cs() { # uptime in centiseconds
    read -r up _ </proc/uptime
    up=${up%.*}${up#*.}
    while [ "${up#0}" != "$up" ]; do up=${up#0}; done
    echo "${up:-0}"
}

while read -r mod; do
    insmod "$mod" || say "insmod $mod failed"
done </etc/qe-modules
modules_loaded=$(uptime_cs)

# Power button: the ACPI button driver registers an input device named
# "Power Button"; evdev exposes it as /dev/input/eventN. A blocking read on it
# returns as soon as the button is pressed.
power_button_devices() {
    for ev in /sys/class/input/event*; do
        [ -e "$ev/device/name" ] || continue
        [ "$(cat "$ev/device/name")" = "Power Button" ] && echo "/dev/input/${ev##*/}"
    done
}
if [ "$VARIANT" = cooperative ]; then
    devs=$(power_button_devices)
    [ -n "$devs" ] || say "no power button input device found"
    for dev in $devs; do
        (
            dd if="$dev" of=/dev/null bs=4096 count=1 2>/dev/null
            say "power button, powering off"
            poweroff -f
        ) &
    done
fi

mkdir -p /www
{
    echo "<html><body><pre>"
    echo "qemu-executor test guest"
    echo "variant: $VARIANT"
    echo "</pre></body></html>"
} >/www/index.html
httpd -p 8080 -h /www
httpd -p 8081 -h /www2

ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
ip addr add 10.0.2.15/24 dev eth0
# qemu's e1000 finishes PHY autonegotiation 500 ms after the driver probed it.
# If eth0 is brought up before that, the driver's first link check fails and
# the next one only comes 2 s later; waiting out the rest of the 500 ms makes
# the link come up at once.
wait_cs=$((modules_loaded + 60 - $(uptime_cs)))
[ "$wait_cs" -le 0 ] || sleep "$((wait_cs / 100)).$(printf '%02d' $((wait_cs % 100)))"
ip link set eth0 up
ip route add default via 10.0.2.2

# Wait until the kernel really transmits on eth0 (operstate "up").
n=0
while [ "$(cat /sys/class/net/eth0/operstate 2>/dev/null)" != up ]; do
    n=$((n + 1))
    [ $n -lt 100 ] || { say "eth0 link not up after 5 s"; break; }
    sleep 0.05
done
# The first packet exchange with qemu's user-mode network takes ~0.9 s; do it
# here so that "ready" means a request from the host is answered at once.
ping -c 1 -W 2 10.0.2.2 >/dev/null 2>&1 || say "no answer from gateway 10.0.2.2"
n=0
until wget -q -O /dev/null http://127.0.0.1:8080/ && wget -q -O /dev/null http://127.0.0.1:8081/; do
    n=$((n + 1))
    [ $n -lt 100 ] || { say "httpd not answering after 10 s"; break; }
    sleep 0.1
done
say "ready"

# PID 1 must never exit.
while :; do sleep 3600; done
EOF
chmod 0755 "$ROOTFS/init"

build_initrd() { # VARIANT OUTPUT
    printf '%s\n' "$1" >"$ROOTFS/etc/qe-variant"
    (cd "$ROOTFS" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
        gzip -9n >"$2" || die "cannot create initramfs for $1"
}

# ---------------------------------------------------------------------- ISOs
build_iso() { # VARIANT OUTPUT
    local variant=$1 out=$2 iso=$WORK/iso-$1
    mkdir -p "$iso/isolinux"
    cp "$ISOLINUX_BIN" "$LDLINUX" "$iso/isolinux/"
    cp "$VMLINUZ" "$iso/isolinux/vmlinuz"
    build_initrd "$variant" "$iso/isolinux/initrd.gz"
    cat >"$iso/isolinux/isolinux.cfg" <<EOF
# qemu-executor test guest ($variant); boot at once, no prompt
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL /isolinux/vmlinuz
  INITRD /isolinux/initrd.gz
  APPEND $KERNEL_CMDLINE
EOF
    xorriso -as mkisofs -quiet -o "$out" -V "QE_GUEST" \
        -isohybrid-mbr "$ISOHDPFX" \
        -c isolinux/boot.cat -b isolinux/isolinux.bin \
        -no-emul-boot -boot-load-size 4 -boot-info-table \
        "$iso" >&2 || die "xorriso failed for $variant"
}

log "building ISOs ($KERNEL_PKG $KERNEL_VER)"
build_iso cooperative "$WORK/guest.iso"
build_iso stubborn "$WORK/guest-stubborn.iso"

# Atomic install: rename within OUT_DIR, stamp last.
rm -f "$STAMP" "$QUICK_STAMP"
mv -f "$WORK/guest.iso" "$COOP_ISO"
mv -f "$WORK/guest-stubborn.iso" "$STUB_ISO"
printf '%s\n' "$WANT_STAMP" >"$WORK/stamp"
mv -f "$WORK/stamp" "$STAMP"
write_quick_stamp
log "done: $(du -h "$COOP_ISO" | cut -f1) $COOP_ISO, $(du -h "$STUB_ISO" | cut -f1) $STUB_ISO"
report
