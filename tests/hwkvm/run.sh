#!/usr/bin/env bash
# The nested hardware-KVM test lane: runs the microVM end-to-end test executables on a
# hardware-style /dev/kvm -- Debian's kernel in QEMU's TCG with an emulated AMD SVM CPU,
# kvm_amd loaded -- on machines without VMX/SVM. See tests/hwkvm/README.md.
#
#   tests/hwkvm/run.sh [TEST-TARGET...] [-- LIBTEST-ARGS...]
#
# TEST-TARGET: microvm, microvm_fs, microvm_net, microvm_boot_failures, microvm_snapshot, bench_boot,
# hwkvm (default: all of them that exist). LIBTEST-ARGS go to every selected executable
# (a name filter, --exact, ...).
# Environment: MXC_VM_HWKVM_TIMEOUT (overall limit, default 40m),
# MXC_VM_HWKVM_BINARY_TIMEOUT (per test executable, default 15m), MXC_VM_HWKVM_SMP,
# MXC_VM_HWKVM_MEM (QEMU -smp/-m, default 1 and 4G), MXC_VM_HWKVM_BENCH (0: no boot
# benchmark, 1: with any run), MXC_VM_HWKVM_BENCH_RUNS (default 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
# What went wrong goes to target/hwkvm/summary.txt too: scripts/test.sh prints it again at
# the end of a failed run (a CI log shows its tail). A failed step says which.
summary="$repo/target/hwkvm/summary.txt"
mkdir -p "$repo/target/hwkvm"
rm -f "$summary"
trap 'rc=$?; echo "hwkvm: run.sh stopped at line $LINENO (exit $rc): $BASH_COMMAND" | tee -a "$summary" >&2' ERR

if ! command -v qemu-system-x86_64 >/dev/null; then
  if [ -n "${CI:-}" ]; then
    echo "hwkvm: qemu-system-x86_64 is missing (install qemu-system-x86: scripts/install-deps.sh)" | tee -a "$summary" >&2
    exit 1
  fi
  echo "hwkvm: skipped: no QEMU"
  exit 0
fi

# The microVM test targets (tests/tests/<name>.rs), those that exist.
all=()
for t in microvm microvm_fs microvm_net microvm_boot_failures microvm_snapshot bench_boot hwkvm; do
  [ -f "tests/tests/$t.rs" ] && all+=("$t")
done
targets=()
libtest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; libtest=("$@"); break ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *)
      known=0
      for t in "${all[@]}"; do [ "$t" = "$1" ] && known=1; done
      [ $known = 1 ] || { echo "hwkvm: unknown test target '$1' (one of: ${all[*]})" >&2; exit 2; }
      targets+=("$1"); shift ;;
  esac
done
# The boot benchmark against QEMU (mxc-vm bench boot --vs-qemu, release build) runs
# after the tests of a full run; MXC_VM_HWKVM_BENCH=0 leaves it out, =1 adds it to any.
bench=()
if { [ ${#targets[@]} -eq 0 ] && [ "${MXC_VM_HWKVM_BENCH:-}" != 0 ]; } || [ "${MXC_VM_HWKVM_BENCH:-}" = 1 ]; then
  bench=(--bench "$repo/target/release/mxc-vm" --bench-runs "${MXC_VM_HWKVM_BENCH_RUNS:-5}")
fi
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

kernel_dir="$(tests/hwkvm/fetch-kernel.sh)"

# What the tests inside need, built here: the guest agent and guest image (as
# scripts/test.sh does; the cached image is found through 9p at the same path inside),
# the mxc-vm binary next to the test executables, and the test executables.
if [ -z "${MXC_VM_GUEST_AGENT:-}" ]; then
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --profile release-guest --locked -p guest-agent --target x86_64-unknown-linux-gnu
  export MXC_VM_GUEST_AGENT="$repo/target/x86_64-unknown-linux-gnu/release-guest/guest-agent"
fi
cargo build --locked -p host-cli
[ ${#bench[@]} -eq 0 ] || ./scripts/build-release.sh
./target/debug/mxc-vm image build
# The image cache directory inside is the one found here (HOME there is /root).
if [ -z "${MXC_VM_CACHE_DIR:-}" ]; then
  if [ -n "${XDG_CACHE_HOME:-}" ] && [ "${XDG_CACHE_HOME#/}" != "$XDG_CACHE_HOME" ]; then
    cache="$XDG_CACHE_HOME/mxc-vm"
  else
    cache="$HOME/.cache/mxc-vm"
  fi
  [ "$cache" = /root/.cache/mxc-vm ] || export MXC_VM_CACHE_DIR="$cache"
fi

# --workspace, not -p tests: the same executables (same features) as scripts/test.sh's
# `cargo test --workspace` runs, built once. The first call shows compile errors.
cargo test --locked --workspace --no-run
cargo test --locked --workspace --no-run --message-format=json > target/hwkvm/cargo.json
# A nested host whose own kernel stalls (QEMU's TCG, not a test: lane.py exits 75) gets
# one more try from the start; a second stall, like any failure, fails the lane.
for attempt in 1 2; do
  rc=0
  python3 tests/hwkvm/lane.py --kernel-dir "$kernel_dir" --repo "$repo" --out "$repo/target/hwkvm" \
    --cargo-json target/hwkvm/cargo.json --targets "${targets[*]}" --limit "${MXC_VM_HWKVM_TIMEOUT:-40m}" \
    --binary-limit "${MXC_VM_HWKVM_BINARY_TIMEOUT:-15m}" "${bench[@]}" \
    --smp "${MXC_VM_HWKVM_SMP:-1}" --mem "${MXC_VM_HWKVM_MEM:-4G}" -- "${libtest[@]}" || rc=$?
  [ "$rc" -eq 75 ] && [ "$attempt" -eq 1 ] || break
  echo "hwkvm: the nested host stalled (an emulation fault of QEMU's TCG); running the lane once more"
  cp "$summary" "$repo/target/hwkvm/summary-attempt1.txt" 2>/dev/null || true
done
[ "$rc" -ne 75 ] || rc=1
exit "$rc"
