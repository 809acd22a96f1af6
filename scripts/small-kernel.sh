#!/usr/bin/env bash
# small-kernel.sh: build Ember's small Linux kernel for fast tests, once per machine.
#
# Builds Linux from Debian's linux-source-6.1 package with the Kconfig fragment
# guests/linux/small-kernel.config (applied on top of `make tinyconfig` with
# scripts/kconfig/merge_config.sh, then `make olddefconfig`), checks that every option the
# fragment sets really is set that way in the final .config, and caches the uncompressed
# ELF vmlinux (booted through its PVH note), the .config and a VERSION file under
#   ${EMBER_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember/linux}/small/<key>/
# where <key> is <source package version>-<hash of the fragment and this build recipe>.
#
# stdout: KEY=path lines (absolute paths, shell-quoted, safe for eval):
#   SMALL_KERNEL_VMLINUX=... SMALL_KERNEL_CONFIG=... SMALL_KERNEL_VERSION_FILE=...
# stderr: progress log. Exit status non-zero with one "error:" line on any failure.
#
# Environment:
#   EMBER_LINUX_CACHE            cache root (default above; linux-guest.sh uses the same root)
#   EMBER_SMALL_KERNEL_FRAGMENT  the config fragment (default: guests/linux/small-kernel.config
#                                of the checkout this script is in); its hash is in the key
#   EMBER_LINUX_REFRESH          if non-empty, ask apt for the current linux-source-6.1
#                                version instead of reusing the newest cached build of this
#                                fragment (a version already cached is reused, not rebuilt)
#   EMBER_SMALL_KERNEL_JOBS      parallel make jobs (default: nproc)
#
# A run that finds a complete cache for the fragment makes no network access and no apt
# call. A cold run installs the build dependencies with apt-get (as root; `apt-get update`
# only if an install or download fails), downloads the source package, builds in a
# temporary directory inside the cache root that is removed at the end, and renames the
# result into place atomically. Nothing is written to the repository.
set -Eeuo pipefail

# Bump when the build recipe (base config, make flags, cached files) changes: it is part of
# the cache key, so older caches are simply not used any more.
readonly FORMAT=1
readonly BASE_CONFIG=tinyconfig
readonly SRC_PKG=linux-source-6.1
readonly PROG=small-kernel.sh
# Build dependencies, as Debian package names (checked with dpkg-query, installed if missing).
readonly BUILD_DEPS=(make gcc libc6-dev binutils bc bison flex libelf-dev xz-utils perl)

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    trap - ERR
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}
trap 'die "unexpected failure (line $LINENO): $BASH_COMMAND"' ERR

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd) || die "cannot find the script's directory"
FRAGMENT="${EMBER_SMALL_KERNEL_FRAGMENT:-$SCRIPT_DIR/../guests/linux/small-kernel.config}"
[[ -f "$FRAGMENT" && -r "$FRAGMENT" ]] || die "config fragment $FRAGMENT not found (set EMBER_SMALL_KERNEL_FRAGMENT)"
FRAGMENT=$(cd "$(dirname "$FRAGMENT")" && pwd)/$(basename "$FRAGMENT")

if [[ -z "${EMBER_LINUX_CACHE:-}" && -z "${XDG_CACHE_HOME:-}" && -z "${HOME:-}" ]]; then
    die "cannot choose a cache directory: set EMBER_LINUX_CACHE (or XDG_CACHE_HOME or HOME)"
fi
CACHE_ROOT="${EMBER_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember/linux}"
case "$CACHE_ROOT" in
    /*) ;;
    *) CACHE_ROOT="$PWD/$CACHE_ROOT" ;;
esac
CACHE_ROOT="${CACHE_ROOT%/}"
SMALL_ROOT="$CACHE_ROOT/small"

for tool in sha256sum head grep sed sort od tr; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' not found"
done

# The recipe hash: this script's FORMAT and base config plus the fragment's exact bytes.
HASH=$({
    printf 'FORMAT=%s\nBASE=%s\n' "$FORMAT" "$BASE_CONFIG"
    cat "$FRAGMENT"
} | sha256sum | cut -c1-16) || die "cannot hash $FRAGMENT"
FRAGMENT_SHA256=$(sha256sum <"$FRAGMENT" | cut -d' ' -f1) || die "cannot hash $FRAGMENT"

# ---------------------------------------------------------------------------------------
# Cache look-up (no apt, no network)

# cache_complete DIR: DIR holds a finished build of this recipe.
cache_complete() {
    local dir=$1 f
    for f in vmlinux config VERSION; do
        [[ -s "$dir/$f" ]] || return 1
    done
    grep -qx "FORMAT=$FORMAT" "$dir/VERSION" || return 1
    grep -qx "RECIPE_HASH=$HASH" "$dir/VERSION" || return 1
    [[ "$(head -c 4 "$dir/vmlinux" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]] || return 1
}

print_paths() {
    local dir=$1
    printf 'SMALL_KERNEL_VMLINUX=%q\n' "$dir/vmlinux"
    printf 'SMALL_KERNEL_CONFIG=%q\n' "$dir/config"
    printf 'SMALL_KERNEL_VERSION_FILE=%q\n' "$dir/VERSION"
}

# try_cached: print the paths of the newest complete build of this recipe and exit.
try_cached() {
    local d best=""
    [[ -d "$SMALL_ROOT" ]] || return 0
    while IFS= read -r d; do
        if cache_complete "$SMALL_ROOT/$d"; then best=$d; fi
    done < <(find "$SMALL_ROOT" -mindepth 1 -maxdepth 1 -type d -name "*-$HASH" ! -name '.*' \
        -printf '%f\n' 2>/dev/null | sort -V)
    if [[ -n "$best" ]]; then
        log "using cached small kernel $best from $SMALL_ROOT/$best"
        print_paths "$SMALL_ROOT/$best"
        exit 0
    fi
}

if [[ -z "${EMBER_LINUX_REFRESH:-}" ]]; then
    try_cached
fi

# ---------------------------------------------------------------------------------------
# Cold path: build.

mkdir -p "$SMALL_ROOT" || die "cannot create cache directory $SMALL_ROOT"

# Serialise builders on this machine; re-check once we hold the lock (another run may
# just have built the same thing).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$SMALL_ROOT/.lock" || die "cannot open lock file $SMALL_ROOT/.lock"
    if ! flock -n 9; then
        log "another run is building a small kernel; waiting for it"
        flock 9 || die "cannot lock $SMALL_ROOT/.lock"
    fi
    if [[ -z "${EMBER_LINUX_REFRESH:-}" ]]; then
        try_cached
    fi
    # Left-overs of runs that were killed before their EXIT trap could clean up.
    rm -rf "$SMALL_ROOT"/.tmp.* "$SMALL_ROOT"/.old.*
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian (bookworm, amd64) host with apt"
for tool in dpkg dpkg-deb dpkg-query apt-cache tar mktemp df nproc find; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' not found"
done
arch=$(dpkg --print-architecture) || die "dpkg --print-architecture failed"
[[ "$arch" == amd64 ]] || die "host architecture is '$arch'; this script builds an x86-64 kernel and needs an amd64 host"

# The unpacked source and the objects need about 2 GiB; ask for some margin.
avail_kib=$(df -Pk "$SMALL_ROOT" | awk 'NR == 2 { print $4 }') || avail_kib=""
if [[ "$avail_kib" =~ ^[0-9]+$ ]] && ((avail_kib < 3 * 1024 * 1024)); then
    die "only $((avail_kib / 1024)) MiB free in $SMALL_ROOT; building the kernel needs about 3 GiB (set EMBER_LINUX_CACHE elsewhere)"
fi

# Scratch space (download, source tree, objects) lives in the cache root: same file system
# as the final rename, and a run killed with SIGKILL leaves only .tmp.* entries there, which
# the next run removes.
WORK=$(mktemp -d "$SMALL_ROOT/.tmp.build.XXXXXX") || die "cannot create a temporary directory in $SMALL_ROOT"
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
START=$SECONDS

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

# --- 1. Build dependencies ----------------------------------------------------------------
missing=()
for pkg in "${BUILD_DEPS[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]} > 0)); then
    [[ $EUID -eq 0 ]] || die "missing build dependencies and installing them needs root: apt-get install ${missing[*]}"
    log "installing build dependencies: ${missing[*]}"
    install_deps() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1
    }
    if ! install_deps; then
        if ! { apt_update_once && install_deps; }; then
            apt_fail "cannot install ${missing[*]}"
        fi
    fi
fi
for tool in make gcc ld bc bison flex perl xz readelf; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' still missing after installing the build dependencies"
done

# --- 2. The source package -----------------------------------------------------------------
# sanitize VERSION: a Debian version as a file-name component (epochs' ':' become '_').
sanitize() { printf '%s' "$1" | tr -c 'A-Za-z0-9.+~-' '_'; }

if [[ -n "${EMBER_LINUX_REFRESH:-}" ]]; then
    # Ask apt which version it would download; if that one is cached, no download.
    cand=$(apt-cache policy "$SRC_PKG" 2>>"$APT_LOG" | awk '$1 == "Candidate:" { print $2 }' || true)
    if [[ -n "$cand" && "$cand" != "(none)" ]] && cache_complete "$SMALL_ROOT/$(sanitize "$cand")-$HASH"; then
        log "$SRC_PKG $cand with this config is already cached"
        FINAL="$SMALL_ROOT/$(sanitize "$cand")-$HASH"
        ln -sfn "$(basename "$FINAL")" "$SMALL_ROOT/.current.$$"
        mv -Tf "$SMALL_ROOT/.current.$$" "$SMALL_ROOT/current"
        print_paths "$FINAL"
        exit 0
    fi
fi

mkdir -p "$WORK/debs"
chmod 755 "$WORK/debs"
log "apt-get download $SRC_PKG"
download() { (cd "$WORK/debs" && apt-get download "$SRC_PKG") >>"$APT_LOG" 2>&1; }
if ! download; then
    if ! { apt_update_once && download; }; then
        apt_fail "cannot download $SRC_PKG"
    fi
fi
shopt -s nullglob
debs=("$WORK/debs/${SRC_PKG}"_*.deb)
shopt -u nullglob
((${#debs[@]} == 1)) || die "expected one $SRC_PKG .deb after download, found ${#debs[@]}"
SRC_VERSION=$(dpkg-deb -f "${debs[0]}" Version) || die "cannot read the control file of ${debs[0]##*/}"
KEY="$(sanitize "$SRC_VERSION")-$HASH"
FINAL="$SMALL_ROOT/$KEY"
log "$SRC_PKG $SRC_VERSION; cache key $KEY"

if cache_complete "$FINAL"; then
    # Already built (e.g. EMBER_LINUX_REFRESH and apt-cache gave no candidate).
    log "small kernel $KEY is already cached"
else
    tarball=$(dpkg-deb -c "${debs[0]}" | awk '{ print $NF }' |
        grep -E '^\./usr/src/linux-source-[0-9.]+\.tar\.xz$' | head -n 1 || true)
    [[ -n "$tarball" ]] || die "${debs[0]##*/} holds no usr/src/linux-source-*.tar.xz"
    log "unpacking ${tarball#./} from ${debs[0]##*/}"
    mkdir -p "$WORK/src"
    if ! dpkg-deb --fsys-tarfile "${debs[0]}" | tar -xOf - "$tarball" | tar -xJf - -C "$WORK/src"; then
        die "cannot unpack ${tarball#./} from ${debs[0]##*/}"
    fi
    rm -f "${debs[0]}"
    shopt -s nullglob
    tops=("$WORK/src"/*/)
    shopt -u nullglob
    ((${#tops[@]} == 1)) || die "expected one top-level directory in ${tarball##*/}, found ${#tops[@]}"
    KSRC=${tops[0]%/}
    [[ -f "$KSRC/Makefile" && -x "$KSRC/scripts/kconfig/merge_config.sh" ]] ||
        die "${tarball##*/} does not look like a Linux source tree (no Makefile or scripts/kconfig/merge_config.sh)"

    # Variables for every make call: LOCALVERSION set (even empty) keeps setlocalversion
    # from appending "+" when the cache happens to sit inside a git checkout; fixed
    # user and host names make the banner independent of the build machine.
    MAKE_VARS=(LOCALVERSION= KBUILD_BUILD_USER=ember KBUILD_BUILD_HOST=ember)
    BUILD_LOG="$WORK/build.log"
    : >"$BUILD_LOG"
    # run_make WHAT ARGS...: make in the source tree, output to the build log.
    run_make() {
        local what=$1
        shift
        if ! make -C "$KSRC" "${MAKE_VARS[@]}" "$@" >>"$BUILD_LOG" 2>&1; then
            log "last lines of the build log:"
            tail -n 25 "$BUILD_LOG" | sed 's/^/    /' >&2
            cp "$BUILD_LOG" "$SMALL_ROOT/build-failed.log" 2>/dev/null &&
                log "full log: $SMALL_ROOT/build-failed.log"
            die "$what failed"
        fi
    }

    # --- 3. Configuration ------------------------------------------------------------------
    log "configuring: make $BASE_CONFIG + ${FRAGMENT} + make olddefconfig"
    run_make "make $BASE_CONFIG" "$BASE_CONFIG"
    if ! (cd "$KSRC" && scripts/kconfig/merge_config.sh -m .config "$FRAGMENT") >>"$BUILD_LOG" 2>&1; then
        tail -n 10 "$BUILD_LOG" | sed 's/^/    /' >&2
        die "merge_config.sh failed on $FRAGMENT"
    fi
    run_make "make olddefconfig" olddefconfig

    # Kconfig drops options whose dependencies are not met without a word: check that each
    # assignment of the fragment is in the final .config, and each "is not set" is not =y/=m.
    bad=()
    while IFS= read -r line; do
        if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym=${BASH_REMATCH[1]}
            if ! grep -qxF -- "$line" "$KSRC/.config"; then
                final=$(grep -E "^($sym=|# $sym is not set)" "$KSRC/.config" | head -n 1 || true)
                bad+=("$line (final .config: ${final:-absent})")
            fi
        elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym=${BASH_REMATCH[1]}
            if final=$(grep -E "^$sym=[ym]$" "$KSRC/.config"); then
                bad+=("$sym not set (final .config: $final)")
            fi
        fi
    done <"$FRAGMENT"
    if ((${#bad[@]} > 0)); then
        for b in "${bad[@]}"; do log "did not stick: $b"; done
        die "${#bad[@]} option(s) of $(basename "$FRAGMENT") did not stick (unmet dependencies?): ${bad[*]%% (*}"
    fi
    log "all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set$)' "$FRAGMENT") options of the fragment are in the final .config"

    # --- 4. Build ----------------------------------------------------------------------------
    jobs=${EMBER_SMALL_KERNEL_JOBS:-$(nproc)}
    [[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "EMBER_SMALL_KERNEL_JOBS must be a positive number, not '$jobs'"
    build_start=$SECONDS
    log "building vmlinux with make -j$jobs (several minutes; log in $BUILD_LOG while it runs)"
    run_make "the kernel build (make -j$jobs vmlinux)" -j"$jobs" vmlinux
    build_secs=$((SECONDS - build_start))
    release=$(make -s -C "$KSRC" "${MAKE_VARS[@]}" kernelrelease 2>>"$BUILD_LOG") ||
        die "make kernelrelease failed"

    vmlinux="$KSRC/vmlinux"
    [[ -s "$vmlinux" ]] || die "the build finished without a vmlinux"
    readelf -h "$vmlinux" 2>/dev/null | grep 'Class:[[:space:]]*ELF64' >/dev/null || die "vmlinux is not a 64-bit ELF file"
    readelf -h "$vmlinux" 2>/dev/null | grep 'Machine:[[:space:]]*Advanced Micro Devices X86-64' >/dev/null ||
        die "vmlinux is not an x86-64 ELF file"
    # XEN_ELFNOTE_PHYS32_ENTRY (type 18): the PVH entry point Ember uses.
    readelf -n "$vmlinux" 2>/dev/null | grep -E '^ *Xen +0x[0-9a-f]+[[:space:]]+.*\(0x00000012\)' >/dev/null ||
        die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): is CONFIG_PVH=y?"

    # --- 5. Finish: copy what is needed, VERSION, then an atomic rename into place --------
    STAGE=$(mktemp -d "$SMALL_ROOT/.tmp.$KEY.XXXXXX") || die "cannot create a staging directory in $SMALL_ROOT"
    cp "$vmlinux" "$STAGE/vmlinux"
    cp "$KSRC/.config" "$STAGE/config"
    cp "$FRAGMENT" "$STAGE/fragment.config"
    {
        echo "FORMAT=$FORMAT"
        echo "RECIPE_HASH=$HASH"
        echo "KERNEL_RELEASE=$release"
        echo "SOURCE_PACKAGE=$SRC_PKG"
        echo "SOURCE_PACKAGE_VERSION=$SRC_VERSION"
        echo "BASE_CONFIG=$BASE_CONFIG"
        echo "FRAGMENT_SHA256=$FRAGMENT_SHA256"
        echo "COMPILER=$(gcc --version | head -n 1)"
        echo "MAKE_JOBS=$jobs"
        echo "BUILD_SECONDS=$build_secs"
        echo "VMLINUX_BYTES=$(stat -c %s "$vmlinux")"
        echo "BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$STAGE/VERSION"
    chmod 644 "$STAGE"/*
    chmod 755 "$STAGE"
    cache_complete "$STAGE" || die "internal error: staged cache in $STAGE is incomplete"

    if [[ -e "$FINAL" ]]; then
        # An incomplete cache of this key: move it aside first.
        old=$(mktemp -d "$SMALL_ROOT/.old.$KEY.XXXXXX")
        mv -T "$FINAL" "$old/dir" || die "cannot move the old cache $FINAL aside"
        mv -T "$STAGE" "$FINAL" || die "cannot move the new cache into $FINAL"
        rm -rf "$old"
    else
        mv -T "$STAGE" "$FINAL" || die "cannot move the new cache into $FINAL"
    fi
    STAGE=""
    rm -f "$SMALL_ROOT/build-failed.log"
    log "built Linux $release (vmlinux $(stat -c %s "$FINAL/vmlinux") bytes) in $((SECONDS - START)) s" \
        "(compile $build_secs s); cached in $FINAL"
fi

# A pointer to the newest build, replaced atomically (for people; the script globs).
ln -sfn "$KEY" "$SMALL_ROOT/.current.$$"
mv -Tf "$SMALL_ROOT/.current.$$" "$SMALL_ROOT/current"

print_paths "$FINAL"
