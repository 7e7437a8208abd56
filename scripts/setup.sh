#!/usr/bin/env bash
# Prepare this machine (Debian 12, as root) to build, test and benchmark pyvhost:
# Debian packages for the real frontends (DPDK testpmd, QEMU), the project venv,
# 2 MiB hugepages, and the test guest (scripts/build-guest.sh).
#
# Idempotent and quick on a machine it has already prepared. Logs go to stderr.
# Environment:
#   PYVHOST_HUGEPAGES   number of 2 MiB pages to reserve (default 1024; 0 skips)
#   PYVHOST_SKIP_APT=1  do not touch Debian packages (for machines set up otherwise)
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO_ROOT/.venv
HUGEPAGES_WANTED=${PYVHOST_HUGEPAGES:-1024}
HUGEPAGE_MOUNT=/dev/hugepages

# dpdk pulls its PMDs (librte-net-vhost23, librte-net-virtio23, mempool drivers)
# in as Recommends, so packages are installed with recommends on purpose.
DEBIAN_PACKAGES=(
    dpdk dpdk-dev                 # dpdk-testpmd with vhost and virtio-user PMDs
    qemu-system-x86               # QEMU 7.2 as a vhost-user frontend (TCG)
    busybox-static cpio gzip      # the test guest's initramfs
    kmod xz-utils zstd            # depmod and module decompression for the guest
    iproute2 iputils-ping tcpdump # network namespaces and traffic checks
    procps util-linux             # mount, nproc, taskset
    fio                           # pyvhost bench blk: host storage ceiling
)

log() { echo "setup: $*" >&2; }
die() { log "error: $*"; exit 1; }

APT_UPDATED=0
apt_update_once() {
    (( APT_UPDATED )) && return 0
    log "apt-get update"
    apt-get update -qq >&2
    APT_UPDATED=1
}

missing_debian_packages() {
    local pkg
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
            echo "$pkg"
        fi
    done
}

install_debian_packages() {
    [[ ${PYVHOST_SKIP_APT:-0} == 1 ]] && { log "PYVHOST_SKIP_APT=1: not checking Debian packages"; return 0; }
    local missing
    missing=$(missing_debian_packages)
    [[ -z $missing ]] && return 0
    [[ $(id -u) == 0 ]] || die "must run as root to install: $(echo $missing)"
    log "installing: $(echo $missing)"
    export DEBIAN_FRONTEND=noninteractive
    # Lists may be absent or stale on a fresh machine: update once, then install.
    apt_update_once
    # shellcheck disable=SC2086
    apt-get install -y -qq $missing >/dev/null
}

find_python311() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null \
           && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_python311() {
    local py
    if py=$(find_python311); then echo "$py"; return 0; fi
    log "no Python 3.11 with venv found; installing Debian's python3"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-dev >/dev/null
    py=$(find_python311) || die "no Python 3.11 available"
    echo "$py"
}

venv_is_usable() {
    [[ -x $VENV/bin/python ]] \
        && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null
}

# The install is current when pyproject.toml has not changed since the last
# install, the venv imports pyvhost from this work tree, and the test tools
# (pytest, mypy: tests/test_typecheck.py runs the type checker) are there.
install_stamp() { sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1; }

venv_install_is_current() {
    local stamp_file=$VENV/.pyvhost-install-stamp
    [[ -f $stamp_file && $(cat "$stamp_file") == "$(install_stamp)" ]] || return 1
    (cd / && "$VENV/bin/python" -c 'import mypy, pytest, pyvhost; print(pyvhost.__file__)') 2>/dev/null \
        | grep -q "^$REPO_ROOT/pyvhost/"
}

setup_venv() {
    local py
    if ! venv_is_usable; then
        py=$(ensure_python311)
        log "creating $VENV with $py"
        rm -rf "$VENV"
        "$py" -m venv "$VENV"
    fi
    if venv_install_is_current; then return 0; fi
    log "pip install -e '.[test,bench]'"
    # pip and setuptools are chatty even with -q; show their output only on failure.
    local pip_log
    pip_log=$(mktemp)
    if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            -e "$REPO_ROOT[test,bench]" >"$pip_log" 2>&1; then
        cat "$pip_log" >&2; rm -f "$pip_log"
        die "pip install failed"
    fi
    rm -f "$pip_log"
    install_stamp >"$VENV/.pyvhost-install-stamp"
}

# Hugepages are an optimisation: testpmd falls back to --no-huge without them.
setup_hugepages() {
    (( HUGEPAGES_WANTED > 0 )) || return 0
    local nr_file=/proc/sys/vm/nr_hugepages have
    have=$(cat "$nr_file" 2>/dev/null || echo 0)
    if (( have < HUGEPAGES_WANTED )); then
        echo "$HUGEPAGES_WANTED" >"$nr_file" 2>/dev/null || true
        have=$(cat "$nr_file" 2>/dev/null || echo 0)
        if (( have < HUGEPAGES_WANTED )); then
            log "notice: kernel gave $have of $HUGEPAGES_WANTED 2 MiB hugepages; tests fall back to --no-huge if too few"
        else
            log "reserved $have 2 MiB hugepages"
        fi
    fi
    if ! awk -v m="$HUGEPAGE_MOUNT" '$2 == m && $3 == "hugetlbfs" {found=1} END {exit !found}' /proc/mounts; then
        mkdir -p "$HUGEPAGE_MOUNT"
        if mount -t hugetlbfs -o pagesize=2M nodev "$HUGEPAGE_MOUNT" 2>/dev/null; then
            log "mounted hugetlbfs at $HUGEPAGE_MOUNT"
        else
            log "notice: cannot mount hugetlbfs at $HUGEPAGE_MOUNT; tests use --no-huge"
        fi
    fi
}

main() {
    install_debian_packages
    setup_venv
    setup_hugepages
    bash "$REPO_ROOT/scripts/build-guest.sh"
}

main "$@"
