#!/usr/bin/env bash
# The fuzz targets (cargo-fuzz layout, libfuzzer-sys), built on stable Rust with
# libFuzzer's coverage instrumentation: the flags cargo-fuzz passes, with --target so
# that they stay off build scripts and proc macros. Binaries, corpora and crash inputs
# live under target/fuzz/.
#
#   scripts/fuzz.sh --ci               build every target, run each for a fixed number of
#                                      inputs from its committed seeds, with a fixed seed
#                                      (scripts/test.sh does this)
#   scripts/fuzz.sh TARGET [SECONDS]   a longer run of one target (default 600 s), its
#                                      corpus kept in target/fuzz/corpus/TARGET between
#                                      runs; a crash input lands in target/fuzz/artifacts/
#   scripts/fuzz.sh TARGET FILE...     run the given inputs once (a crash, to debug it)
#
# `cargo +nightly fuzz run TARGET` in the target's crate (proto/fuzz, policy/fuzz,
# vmm/fuzz, sandbox/fuzz) works too.
set -euo pipefail
cd "$(dirname "$0")/.."

# crate, target, inputs run in CI (sized so that every run takes a few seconds).
TARGETS=(
  "proto decode 20000"
  "policy parse 20000"
  "vmm vsock_packet 20000"
  "vmm virtqueue 600"
  "vmm fuse_request 250"
  "sandbox http_request 20000"
  "sandbox tls_client_hello 20000"
)
TRIPLE=x86_64-unknown-linux-gnu
BIN=target/fuzz/$TRIPLE/debug
FLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
FLAGS+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
FLAGS+=" -Cllvm-args=-sanitizer-coverage-pc-table"
FLAGS+=" -Cllvm-args=-sanitizer-coverage-trace-compares"

build() {
  RUSTFLAGS="$FLAGS" cargo build --locked --manifest-path "$1/fuzz/Cargo.toml" \
    --target-dir target/fuzz --target "$TRIPLE"
}

# The committed seeds of a target: <crate>/fuzz/seeds/<target>/, or <crate>/fuzz/seeds/.
seeds() {
  if [ -d "$1/fuzz/seeds/$2" ]; then
    echo "$1/fuzz/seeds/$2"
  elif [ -d "$1/fuzz/seeds" ]; then
    echo "$1/fuzz/seeds"
  fi
}

crate_of() {
  local entry
  for entry in "${TARGETS[@]}"; do
    set -- $entry
    if [ "$2" = "$TARGET" ]; then
      echo "$1"
      return
    fi
  done
  echo "fuzz.sh: no target $TARGET (targets: $(printf '%s ' "${TARGETS[@]}" | awk '{for (i = 2; i <= NF; i += 3) printf "%s ", $i}'))" >&2
  exit 2
}

if [ "${1:-}" = "--ci" ]; then
  built=""
  for entry in "${TARGETS[@]}"; do
    set -- $entry
    case " $built " in *" $1 "*) ;; *) build "$1"; built+=" $1" ;; esac
  done
  for entry in "${TARGETS[@]}"; do
    set -- $entry
    crate=$1 target=$2 runs=$3
    corpus=target/fuzz/ci/$target
    rm -rf "$corpus" && mkdir -p "$corpus" target/fuzz/artifacts
    src=$(seeds "$crate" "$target")
    if [ -n "$src" ]; then
      find "$src" -maxdepth 1 -type f -exec cp {} "$corpus/" \;
    fi
    log=target/fuzz/ci/$target.log
    start=$(date +%s)
    if ! "$BIN/$target" "$corpus" -runs="$runs" -max_len=4096 -seed=1 -timeout=60 \
      -artifact_prefix=target/fuzz/artifacts/"$target"- >"$log" 2>&1; then
      tail -n 60 "$log" >&2
      echo "fuzz.sh: $target failed; the input is in target/fuzz/artifacts/" >&2
      exit 1
    fi
    echo "fuzz: $target: $(grep -E 'DONE' "$log" | tail -1) ($(($(date +%s) - start)) s)"
  done
  exit 0
fi

TARGET=${1:?usage: scripts/fuzz.sh --ci | TARGET [SECONDS] | TARGET FILE...}
shift
crate=$(crate_of)
build "$crate"
mkdir -p target/fuzz/artifacts
if [ $# -gt 0 ] && [ -e "$1" ]; then
  exec "$BIN/$TARGET" "$@"
fi
corpus=target/fuzz/corpus/$TARGET
mkdir -p "$corpus"
src=$(seeds "$crate" "$TARGET")
[ -z "$src" ] || find "$src" -maxdepth 1 -type f -exec cp -n {} "$corpus/" \;
exec "$BIN/$TARGET" "$corpus" -max_total_time="${1:-600}" -max_len=4096 -timeout=60 \
  -artifact_prefix=target/fuzz/artifacts/"$TARGET"-
