#!/usr/bin/env bash
# Builds and runs Ember's fuzz targets, one at a time.
#
#   fuzz/run.sh smoke            replay the corpus (cargo test), build every target,
#                                run each for SMOKE_SECONDS (default 10)
#   fuzz/run.sh long [seconds]   the same, each target for [seconds] (default 600)
#   fuzz/run.sh list             the targets
#   TARGETS="bus serial" fuzz/run.sh ...   only these targets
#
# Exits non-zero if a corpus file fails, a build fails, or any target crashes, hangs
# (-timeout=10), leaks, or goes over its memory limits (-rss_limit_mb=2048,
# -malloc_limit_mb=1024). Crashing inputs are left in fuzz/artifacts/<target>/.
#
# Toolchain: cargo-fuzz needs nightly-only flags. A nightly toolchain is used when
# `rustup toolchain list` shows one; otherwise the default (stable) toolchain with
# RUSTC_BOOTSTRAP=1. cargo-fuzz is installed from crates.io when missing.
#
# New inputs the fuzzer finds go to a scratch corpus (FUZZ_WORK_DIR, default a
# temporary directory), never into fuzz/corpus/: the committed corpus stays the small
# seed corpus. Keep FUZZ_WORK_DIR across runs to keep what the fuzzer learned.
set -euo pipefail

FUZZ_DIR="$(cd "$(dirname "$0")" && pwd)"
cd "$FUZZ_DIR"
# The fuzz crate has its own target directory (fuzz/target).
unset CARGO_TARGET_DIR

mode="${1:-smoke}"
case "$mode" in
  smoke) seconds="${SMOKE_SECONDS:-10}" ;;
  long) seconds="${2:-600}" ;;
  list) sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v '^ember-fuzz$'; exit 0 ;;
  *) echo "usage: $0 smoke | long [seconds] | list" >&2; exit 2 ;;
esac

all_targets=$(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | grep -v '^ember-fuzz$')
targets="${TARGETS:-$all_targets}"

# Toolchain selection.
fuzz_cargo=(cargo)
if command -v rustup >/dev/null 2>&1 && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz_cargo=(cargo +nightly)
  echo "fuzz: using the nightly toolchain ($(rustup run nightly rustc --version))"
else
  export RUSTC_BOOTSTRAP=1
  echo "fuzz: no nightly toolchain; using $(rustc --version) with RUSTC_BOOTSTRAP=1"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

start=$(date +%s)

echo "=== fuzz: replaying the corpus and regressions (cargo test) ==="
cargo test --manifest-path "$FUZZ_DIR/Cargo.toml"

echo "=== fuzz: building all targets ==="
"${fuzz_cargo[@]}" fuzz build

work="${FUZZ_WORK_DIR:-}"
if [ -z "$work" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi

failed=()
for target in $targets; do
  echo "=== fuzz: $target for ${seconds}s ==="
  mkdir -p "$work/$target" "$FUZZ_DIR/artifacts/$target"
  seeds=("$FUZZ_DIR/corpus/$target")
  [ -d "$FUZZ_DIR/regressions/$target" ] && seeds+=("$FUZZ_DIR/regressions/$target")
  log="$work/$target.log"
  # The first corpus directory receives new inputs; the others are only read.
  if "${fuzz_cargo[@]}" fuzz run "$target" "$work/$target" "${seeds[@]}" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
      -print_final_stats=1 >"$log" 2>&1; then
    grep -E 'DONE|stat::number_of_executed_units|stat::average_exec_per_sec' "$log" \
      | sed "s/^/  $target: /" || true
  else
    failed+=("$target")
    tail -n 60 "$log"
    echo "!!! fuzz: $target failed; see fuzz/artifacts/$target/" >&2
  fi
done

echo "=== fuzz: $mode done in $(( $(date +%s) - start ))s ==="
if [ "${#failed[@]}" -ne 0 ]; then
  echo "!!! fuzz: failing targets: ${failed[*]}" >&2
  exit 1
fi
