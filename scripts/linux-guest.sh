#!/usr/bin/env bash
# linux-guest.sh: provide a real Linux guest (kernel + busybox initramfs) for Ember tests.
#
# Fetches Debian's stock cloud kernel once per machine, extracts the uncompressed ELF
# vmlinux (for the PVH entry) from its bzImage, builds a small busybox initramfs whose
# /init prints a marker line, signals Ember's boot-done port and powers off, and caches it all
# under ${EMBER_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember/linux}/<kernel version>/.
#
# stdout: KEY=path lines (absolute paths, shell-quoted, safe for eval):
#   KERNEL_BZIMAGE=... KERNEL_VMLINUX=... INITRAMFS=... KERNEL_CONFIG=...
#   BUSYBOX=... (Debian's static busybox, for tests that build their own initramfs)
# stderr: progress log. Exit status non-zero with one "error:" line on any failure.
#
# Environment:
#   EMBER_LINUX_CACHE    cache root (default above)
#   EMBER_LINUX_REFRESH  if non-empty, ignore the "latest" pointer and ask apt for the
#                        current kernel (a version already cached is reused, not refetched)
#
# A run that finds a complete cache makes no network access and no apt call.
set -Eeuo pipefail

# Bump when the cache layout or the initramfs contents change: older caches are rebuilt.
readonly FORMAT=4
readonly META_PKG=linux-image-cloud-amd64
readonly BUSYBOX_PKG=busybox-static
readonly PROG=linux-guest.sh

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    trap - ERR
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}
trap 'die "unexpected failure (line $LINENO): $BASH_COMMAND"' ERR

if [[ -z "${EMBER_LINUX_CACHE:-}" && -z "${XDG_CACHE_HOME:-}" && -z "${HOME:-}" ]]; then
    die "cannot choose a cache directory: set EMBER_LINUX_CACHE (or XDG_CACHE_HOME or HOME)"
fi
CACHE_ROOT="${EMBER_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember/linux}"
case "$CACHE_ROOT" in
    /*) ;;
    *) CACHE_ROOT="$PWD/$CACHE_ROOT" ;;
esac
CACHE_ROOT="${CACHE_ROOT%/}"

# ---------------------------------------------------------------------------------------
# Cache look-up (no apt, no network)

# cache_complete DIR: DIR holds a finished cache of the current FORMAT.
cache_complete() {
    local dir=$1 f
    for f in bzImage vmlinux initramfs.cpio config busybox VERSION; do
        [[ -s "$dir/$f" ]] || return 1
    done
    grep -qx "FORMAT=$FORMAT" "$dir/VERSION" || return 1
    [[ "$(head -c 4 "$dir/vmlinux" | od -An -c | tr -d ' \n')" == '177ELF' ]] || return 1
}

print_paths() {
    local dir=$1
    printf 'KERNEL_BZIMAGE=%q\n' "$dir/bzImage"
    printf 'KERNEL_VMLINUX=%q\n' "$dir/vmlinux"
    printf 'INITRAMFS=%q\n' "$dir/initramfs.cpio"
    printf 'KERNEL_CONFIG=%q\n' "$dir/config"
    printf 'BUSYBOX=%q\n' "$dir/busybox"
}

# try_latest: print the paths of the cache named by $CACHE_ROOT/latest and exit, if complete.
try_latest() {
    local ver
    [[ -f "$CACHE_ROOT/latest" ]] || return 0
    ver=$(head -n 1 "$CACHE_ROOT/latest")
    [[ -n "$ver" && "$ver" != */* && "$ver" != .* ]] || return 0
    if cache_complete "$CACHE_ROOT/$ver"; then
        log "using cached Linux $ver from $CACHE_ROOT/$ver"
        print_paths "$CACHE_ROOT/$ver"
        exit 0
    fi
}

if [[ -z "${EMBER_LINUX_REFRESH:-}" ]]; then
    try_latest
fi

# ---------------------------------------------------------------------------------------
# Cold path: build the cache.

mkdir -p "$CACHE_ROOT" || die "cannot create cache directory $CACHE_ROOT"

# Serialise builders on this machine; re-check once we hold the lock (another run may
# just have finished the same work).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_ROOT/.lock" || die "cannot open lock file $CACHE_ROOT/.lock"
    if ! flock -n 9; then
        log "another run is building the cache; waiting for it"
        flock 9 || die "cannot lock $CACHE_ROOT/.lock"
    fi
    if [[ -z "${EMBER_LINUX_REFRESH:-}" ]]; then
        try_latest
    fi
    # Left-overs of runs that were killed before their EXIT trap could clean up.
    rm -rf "$CACHE_ROOT"/.tmp.* "$CACHE_ROOT"/.old.*
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian (bookworm, amd64) host with apt"
for tool in dpkg dpkg-deb apt-cache tar grep od head tail mktemp; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' not found"
done
arch=$(dpkg --print-architecture) || die "dpkg --print-architecture failed"
[[ "$arch" == amd64 ]] || die "host architecture is '$arch'; this script fetches Debian amd64 packages and needs an amd64 host"

# Scratch space lives in the cache root (same file system, and a run killed with SIGKILL
# leaves only .tmp.* entries there, which the next run removes).
WORK=$(mktemp -d "$CACHE_ROOT/.tmp.work.XXXXXX") || die "cannot create a temporary directory in $CACHE_ROOT"
STAGE=""
cleanup() {
    rm -rf "$WORK"
    if [[ -n "$STAGE" ]]; then rm -rf "$STAGE"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Let apt's _apt user write downloads here (avoids the "unsandboxed as root" notice).
chmod 755 "$WORK"
APT_LOG="$WORK/apt.log"
: >"$APT_LOG"
APT_UPDATED=0

# apt_update_once: run apt-get update at most once per run.
apt_update_once() {
    ((APT_UPDATED == 0)) || return 1
    APT_UPDATED=1
    if [[ $EUID -ne 0 ]]; then
        log "apt-get update needs root; not running it"
        return 1
    fi
    log "running apt-get update"
    apt-get update >>"$APT_LOG" 2>&1
}

apt_fail() {
    local what=$1
    if [[ -s "$APT_LOG" ]]; then
        log "last apt output:"
        tail -n 8 "$APT_LOG" | sed 's/^/    /' >&2
    fi
    die "$what (no network, no Debian package source, or stale package lists? try: apt-get update)"
}

# apt_download PKG...: download .debs into $WORK/debs; apt-get update once on failure.
apt_download() {
    mkdir -p "$WORK/debs"
    chmod 755 "$WORK/debs"
    log "apt-get download $*"
    if (cd "$WORK/debs" && apt-get download "$@") >>"$APT_LOG" 2>&1; then
        return 0
    fi
    if apt_update_once && (cd "$WORK/debs" && apt-get download "$@") >>"$APT_LOG" 2>&1; then
        return 0
    fi
    apt_fail "cannot download package(s) $*"
}

# need_tool CMD PKG: make sure CMD exists, installing Debian package PKG if needed.
need_tool() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    [[ $EUID -eq 0 ]] || die "'$cmd' is missing and installing it needs root: apt-get install $pkg"
    log "installing $pkg (for $cmd)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >>"$APT_LOG" 2>&1; then
        if ! { apt_update_once && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >>"$APT_LOG" 2>&1; }; then
            apt_fail "cannot install $pkg"
        fi
    fi
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' still missing after installing $pkg"
}

need_tool lz4 lz4
need_tool cpio cpio

# --- 1. The kernel package ---------------------------------------------------------------
apt_download "$META_PKG"
shopt -s nullglob
metas=("$WORK/debs/${META_PKG}"_*.deb)
shopt -u nullglob
((${#metas[@]} == 1)) || die "expected one ${META_PKG} .deb after download, found ${#metas[@]}"
depends=$(dpkg-deb -f "${metas[0]}" Depends) || die "cannot read the control file of ${metas[0]##*/}"
kpkg=$(grep -oE 'linux-image-[0-9][0-9A-Za-z.+~-]*-cloud-amd64' <<<"$depends" | head -n 1 || true)
if [[ -z "$kpkg" ]]; then
    # Fall back to apt's view of the dependency.
    kpkg=$(apt-cache depends "$META_PKG" 2>>"$APT_LOG" |
        grep -oE 'linux-image-[0-9][0-9A-Za-z.+~-]*-cloud-amd64' | head -n 1 || true)
fi
[[ -n "$kpkg" ]] || die "cannot find the versioned kernel package in ${META_PKG}'s dependencies ('$depends')"
KVER=${kpkg#linux-image-}
log "current cloud kernel: $kpkg"

if cache_complete "$CACHE_ROOT/$KVER"; then
    # Already built (e.g. EMBER_LINUX_REFRESH with no newer kernel): just point at it.
    log "Linux $KVER is already cached"
    FINAL="$CACHE_ROOT/$KVER"
else
    apt_download "$kpkg" "$BUSYBOX_PKG"
    shopt -s nullglob
    kdebs=("$WORK/debs/${kpkg}"_*.deb)
    bdebs=("$WORK/debs/${BUSYBOX_PKG}"_*.deb)
    shopt -u nullglob
    ((${#kdebs[@]} == 1)) || die "expected one $kpkg .deb after download, found ${#kdebs[@]}"
    ((${#bdebs[@]} == 1)) || die "expected one $BUSYBOX_PKG .deb after download, found ${#bdebs[@]}"
    kpkg_version=$(dpkg-deb -f "${kdebs[0]}" Version) || die "cannot read ${kdebs[0]##*/}"
    bb_version=$(dpkg-deb -f "${bdebs[0]}" Version) || die "cannot read ${bdebs[0]##*/}"

    STAGE=$(mktemp -d "$CACHE_ROOT/.tmp.$KVER.XXXXXX") || die "cannot create a staging directory in $CACHE_ROOT"

    # Only /boot is needed: unpacking the modules too (like dpkg -x) would cost time and disk.
    log "unpacking /boot of ${kdebs[0]##*/}"
    mkdir -p "$WORK/kernel"
    if ! dpkg-deb --fsys-tarfile "${kdebs[0]}" | tar -xf - -C "$WORK/kernel" --wildcards './boot/*'; then
        die "cannot unpack /boot from ${kdebs[0]##*/}"
    fi
    for f in vmlinuz config; do
        [[ -s "$WORK/kernel/boot/$f-$KVER" ]] || die "${kdebs[0]##*/} has no boot/$f-$KVER"
    done
    cp "$WORK/kernel/boot/vmlinuz-$KVER" "$STAGE/bzImage"
    cp "$WORK/kernel/boot/config-$KVER" "$STAGE/config"
    grep -qx 'CONFIG_PVH=y' "$STAGE/config" || log "warning: this kernel lacks CONFIG_PVH=y (no PVH entry in vmlinux)"

    # --- 2. vmlinux out of the bzImage (as the kernel's scripts/extract-vmlinux does) -----
    # is_elf64 FILE: FILE starts with \x7fELF, is ELFCLASS64 and EM_X86_64.
    is_elf64() {
        [[ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]] &&
            [[ "$(od -An -tx1 -j 4 -N 1 "$1" | tr -d ' \n')" == 02 ]] &&
            [[ "$(od -An -tx1 -j 18 -N 2 "$1" | tr -d ' \n')" == 3e00 ]]
    }
    log "extracting vmlinux (LZ4 legacy payload) from bzImage"
    # LZ4 legacy frame magic 0x184C2102, little-endian: 02 21 4c 18 (= "\002!L\030").
    magic=$(printf '\002!L\030')
    mapfile -t offsets < <(LC_ALL=C grep -obUaF -e "$magic" "$STAGE/bzImage" | cut -d: -f1 || true)
    ((${#offsets[@]} > 0)) || die "no LZ4 payload (magic 02 21 4c 18) in the bzImage: is this kernel not LZ4-compressed?"
    found=""
    for off in "${offsets[@]}"; do
        # lz4 complains about the data after the payload (the appended size): expected.
        tail -c "+$((off + 1))" "$STAGE/bzImage" | lz4 -dc >"$STAGE/vmlinux" 2>>"$WORK/lz4.log" || true
        if [[ -s "$STAGE/vmlinux" ]] && is_elf64 "$STAGE/vmlinux"; then
            found=$off
            break
        fi
    done
    [[ -n "$found" ]] || die "LZ4 payload found at offset(s) ${offsets[*]} but none decompressed to a 64-bit x86-64 ELF"
    if command -v readelf >/dev/null 2>&1; then
        readelf -h "$STAGE/vmlinux" >/dev/null 2>&1 || die "readelf rejects the extracted vmlinux"
        # XEN_ELFNOTE_PHYS32_ENTRY (18) is the PVH entry point.
        if readelf -n "$STAGE/vmlinux" 2>/dev/null | grep -E '^ *Xen +0x[0-9a-f]+[[:space:]]+.*\(0x00000012\)' >/dev/null; then
            log "vmlinux has the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
        else
            log "warning: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) found in vmlinux"
        fi
    fi
    # The file runs past the ELF section headers: the kernel appends its relocation table
    # (vmlinux.relocs) before compressing. ELF loaders go by the program headers: harmless.
    log "vmlinux: LZ4 payload at offset $found, $(stat -c %s "$STAGE/vmlinux") bytes"

    # --- 3. busybox initramfs ----------------------------------------------------------
    log "building the busybox initramfs"
    mkdir -p "$WORK/busybox"
    dpkg -x "${bdebs[0]}" "$WORK/busybox" || die "cannot unpack ${bdebs[0]##*/}"
    bb="$WORK/busybox/bin/busybox"
    [[ -x "$bb" ]] || die "${bdebs[0]##*/} has no executable bin/busybox"
    root="$WORK/root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc}
    cp "$bb" "$root/bin/busybox"
    cp "$bb" "$STAGE/busybox"
    chmod 755 "$root/bin/busybox"
    # One link per applet, at its usual place (e.g. sbin/reboot), made here so the guest
    # does not spend emulated kernel time on `busybox --install`.
    if applets=$("$bb" --list-full 2>/dev/null) && [[ -n "$applets" ]]; then
        while IFS= read -r a; do
            [[ -n "$a" && "$a" != bin/busybox && "$a" != */../* ]] || continue
            mkdir -p "$root/$(dirname "$a")"
            [[ -e "$root/$a" || -L "$root/$a" ]] || ln -s /bin/busybox "$root/$a"
        done <<<"$applets"
    else
        # Could not run the host copy: link the applets /init uses.
        for a in sh mount echo uname nproc grep printf dd sync cat sleep setsid cttyhack; do
            ln -sf busybox "$root/bin/$a"
        done
        for a in reboot poweroff; do ln -sf ../bin/busybox "$root/sbin/$a"; done
    fi
    ln -sf busybox "$root/bin/sh"
    cat >"$root/init" <<'EOF'
#!/bin/sh
# Ember test guest init (from scripts/linux-guest.sh).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
if [ -c /dev/console ]; then
    exec </dev/console >/dev/console 2>&1
fi
cpus=$(nproc 2>/dev/null || grep -c '^processor' /proc/cpuinfo)
echo "EMBER-INIT-OK: Linux $(uname -r) reached init with $cpus CPUs"
# Ember's boot-done device: byte 123 to I/O port 0xf5 (245).
printf '\173' | dd of=/dev/port bs=1 seek=245 count=1 conv=notrunc 2>/dev/null
# `ember.shell` on the kernel command line: a shell on the console, with job control.
if grep -qw ember.shell /proc/cmdline; then
    echo "EMBER: shell on the console; 'exit' powers the VM off"
    setsid cttyhack sh -l
fi
sync
# ACPI power-off (S5), which ends the Ember VMM with status 0.
poweroff -f
while :; do sleep 1; done
EOF
    chmod 755 "$root/init"
    # Reproducible archive: fixed owner and mtimes, sorted names.
    find "$root" -exec touch -h -d @0 {} + 2>/dev/null || true
    if ! (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc -R 0:0 --reproducible --quiet >"$STAGE/initramfs.cpio"); then
        die "cpio failed to build the initramfs"
    fi
    [[ "$(head -c 6 "$STAGE/initramfs.cpio")" == 070701 ]] || die "the initramfs is not a newc cpio archive"

    # --- 4. Finish: VERSION, then an atomic rename into place ----------------------------
    {
        echo "FORMAT=$FORMAT"
        echo "KERNEL_RELEASE=$KVER"
        echo "KERNEL_PACKAGE=$kpkg"
        echo "KERNEL_PACKAGE_VERSION=$kpkg_version"
        echo "BUSYBOX_PACKAGE_VERSION=$bb_version"
        echo "LZ4_PAYLOAD_OFFSET=$found"
        echo "BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$STAGE/VERSION"
    chmod 644 "$STAGE"/*
    chmod 755 "$STAGE" "$STAGE/busybox"
    cache_complete "$STAGE" || die "internal error: staged cache in $STAGE is incomplete"

    FINAL="$CACHE_ROOT/$KVER"
    if [[ -e "$FINAL" ]]; then
        # An incomplete or older-FORMAT cache of this version: move it aside first.
        old=$(mktemp -d "$CACHE_ROOT/.old.$KVER.XXXXXX")
        mv -T "$FINAL" "$old/dir" || die "cannot move the old cache $FINAL aside"
        mv -T "$STAGE" "$FINAL" || die "cannot move the new cache into $FINAL"
        rm -rf "$old"
    else
        mv -T "$STAGE" "$FINAL" || die "cannot move the new cache into $FINAL"
    fi
    STAGE=""
    log "cached Linux $KVER in $FINAL"
fi

# Pointers to the newest cache, each replaced atomically.
printf '%s\n' "$KVER" >"$CACHE_ROOT/.latest.$$"
mv -f "$CACHE_ROOT/.latest.$$" "$CACHE_ROOT/latest"
ln -sfn "$KVER" "$CACHE_ROOT/.current.$$"
mv -Tf "$CACHE_ROOT/.current.$$" "$CACHE_ROOT/current"

print_paths "$FINAL"
