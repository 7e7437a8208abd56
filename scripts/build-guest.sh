#!/usr/bin/env bash
# Build the test guest: a Debian kernel plus a busybox initramfs that loads the
# virtio PCI, virtio-net, virtio-blk and virtio-rng modules and gives a root shell
# on ttyS0 (/dev/hwrng appears on devtmpfs once virtio_rng binds a device).
#
#   outputs: .cache/guest/vmlinuz, .cache/guest/initramfs.cpio.gz
#   needs:   apt (for `apt-get download`), dpkg, depmod (kmod), busybox-static, cpio, gzip
#
# Idempotent: does nothing when both outputs exist and are newer than this script.
# The kernel package is only unpacked into a temporary folder, never installed.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${PYVHOST_GUEST_DIR:-$REPO_ROOT/.cache/guest}
SCRIPT_PATH="$REPO_ROOT/scripts/build-guest.sh"
BUSYBOX=${BUSYBOX:-/bin/busybox}
# Top-level modules the guest needs; their dependencies are added from modules.dep.
# Names as the kernel spells them ("_"); the files may use "-" (virtio-rng.ko).
# A module built into the kernel (modules.builtin, e.g. rng_core: CONFIG_HW_RANDOM=y in
# Debian 12) is skipped, so listing one is harmless if a later kernel makes it built-in.
WANTED_MODULES=(virtio_pci virtio_net virtio_blk rng_core virtio_rng)

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

outputs_up_to_date() {
    [[ -s $OUT_DIR/vmlinuz && -s $OUT_DIR/initramfs.cpio.gz \
       && $OUT_DIR/vmlinuz -nt $SCRIPT_PATH && $OUT_DIR/initramfs.cpio.gz -nt $SCRIPT_PATH ]]
}

# The versioned image package that the linux-image-amd64 metapackage points at.
kernel_package_name() {
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
          | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
    if [[ -z $pkg ]]; then
        # Package lists may never have been fetched on a fresh machine.
        log "apt lists lack linux-image-amd64; running apt-get update"
        apt-get update -qq >&2
        pkg=$(apt-cache depends linux-image-amd64 \
              | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
    fi
    [[ -n $pkg ]] || die "cannot resolve the package behind linux-image-amd64"
    echo "$pkg"
}

# Regex for a module's file name: the kernel treats "-" and "_" in module names alike.
module_file_regex() {
    local name=${1//[-_]/[-_]}
    echo "(^|/)${name}\.ko(\.xz|\.zst|\.gz)?:"
}

# True if the module is built into the kernel (listed in modules.builtin).
module_builtin() {
    local moddir=$1 name=${2//[-_]/[-_]}
    [[ -f $moddir/modules.builtin ]] \
        && grep -qE "(^|/)${name}\.ko$" "$moddir/modules.builtin"
}

# Print module names (without .ko, "-" as "_") in load order: dependencies first, each
# once. modules.dep lines look like "kernel/a/b.ko: kernel/c.ko kernel/d.ko".
resolve_load_order() {
    local moddir=$1; shift
    local -A seen=()
    local order=()
    visit() {
        local name=${1//-/_} line path deps dep
        [[ -n ${seen[$name]:-} ]] && return 0
        seen[$name]=1
        if ! line=$(grep -E "$(module_file_regex "$name")" "$moddir/modules.dep" | head -n1); then
            if module_builtin "$moddir" "$name"; then
                log "module $name is built into the kernel; nothing to load"
                return 0
            fi
            die "module $name not in modules.dep"
        fi
        deps=${line#*:}
        for dep in $deps; do
            dep=${dep##*/}; dep=${dep%%.ko*}
            visit "$dep"
        done
        order+=("$name")
    }
    local m
    for m in "$@"; do visit "$m"; done
    printf '%s\n' "${order[@]}"
}

# Copy one module into the initramfs, decompressed (busybox insmod loads plain .ko only).
copy_module() {
    local moddir=$1 name=$2 dest=$3 src
    src=$(grep -E "$(module_file_regex "$name")" "$moddir/modules.dep" | head -n1 | cut -d: -f1)
    src=$moddir/$src
    case $src in
        *.ko.xz)  xz -dc "$src" >"$dest/$name.ko" ;;
        *.ko.zst) zstd -qdc "$src" >"$dest/$name.ko" ;;
        *.ko.gz)  gzip -dc "$src" >"$dest/$name.ko" ;;
        *.ko)     cp "$src" "$dest/$name.ko" ;;
    esac
}

write_init() {
    cat >"$1" <<'EOF'
#!/bin/sh
# pyvhost test guest init: mount, load virtio modules, root shell on the console.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/modules.order); do
    insmod "/lib/modules/$m.ko" || echo "pyvhost-guest: insmod $m failed"
done
ip link set lo up
hostname pyvhost-guest
# Keep kernel messages off the console so they do not interleave with command
# output read by the test harness (dmesg still has them; panics still print).
dmesg -n 1
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root PS1='# '
echo "pyvhost-guest: ready"
# setsid + cttyhack give the shell a controlling tty (job control, Ctrl-C).
exec setsid cttyhack sh -l
EOF
    chmod 755 "$1"
}

build_initramfs() {
    local moddir=$1 root=$2 out=$3 applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc,lib/modules}
    cp "$BUSYBOX" "$root/bin/busybox"
    # The kernel opens /dev/console for init before anything is mounted.
    mknod -m 600 "$root/dev/console" c 5 1
    for applet in $("$BUSYBOX" --list-full); do
        [[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
    done
    local order
    order=$(resolve_load_order "$moddir" "${WANTED_MODULES[@]}")
    local m
    for m in $order; do copy_module "$moddir" "$m" "$root/lib/modules"; done
    echo "$order" >"$root/etc/modules.order"
    log "modules: $(echo $order)"
    write_init "$root/init"
    (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -9 >"$out.tmp"
    mv "$out.tmp" "$out"
}

main() {
    if outputs_up_to_date; then
        log "up to date: $OUT_DIR"
        return 0
    fi
    [[ -x $BUSYBOX ]] || die "$BUSYBOX missing (apt-get install busybox-static)"
    if ldd "$BUSYBOX" >/dev/null 2>&1; then
        die "$BUSYBOX is dynamically linked; install busybox-static"
    fi
    mkdir -p "$OUT_DIR"
    # Global, not local: the EXIT trap runs after main has returned.
    WORK=$(mktemp -d "$OUT_DIR/work.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    local work=$WORK

    local pkg
    pkg=$(kernel_package_name)
    log "downloading $pkg"
    # apt drops to its _apt user for downloads; let it write there (else it warns).
    mkdir "$work/dl"
    chmod 755 "$work"
    chown _apt "$work/dl" 2>/dev/null || true
    (cd "$work/dl" && apt-get download -qq "$pkg" >&2)
    dpkg -x "$work"/dl/"$pkg"_*.deb "$work/pkg"

    local kver moddir
    kver=$(ls "$work/pkg/lib/modules" | head -n1)
    moddir=$work/pkg/lib/modules/$kver
    # The package ships no modules.dep (the installer makes it); build it here.
    depmod -b "$work/pkg" "$kver"

    build_initramfs "$moddir" "$work/initramfs" "$OUT_DIR/initramfs.cpio.gz"
    cp "$work/pkg/boot/vmlinuz-$kver" "$OUT_DIR/vmlinuz.tmp"
    mv "$OUT_DIR/vmlinuz.tmp" "$OUT_DIR/vmlinuz"
    echo "$kver" >"$OUT_DIR/kernel-version"
    log "built $OUT_DIR (kernel $kver)"
}

main "$@"
