#!/usr/bin/env bash
# The test command: formatting, lints, then every test of the workspace: unit,
# integration, and end to end on every backend (process, bubblewrap, microVM on
# /dev/kvm). Needs root for the network-namespace tests, and the packages of
# scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# No import cycles between the modules of a crate; API docs without a warning.
python3 scripts/check-cycles.py
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
# The fuzz targets (the frame decoders, the policy parser, vsock packets, the virtqueue
# walk, FUSE requests through the fs policy filter, the proxy's HTTP and ClientHello
# parsers) are built with coverage instrumentation and each runs a fixed number of
# inputs from its committed seeds (scripts/fuzz.sh; `scripts/fuzz.sh TARGET [SECONDS]`
# is a longer run).
scripts/fuzz.sh --ci
# The Windows Hypervisor Platform backend: vmm compiled and linted for Windows (no
# Windows machine runs it). Without the target the step says so and is skipped.
if rustup target list --installed 2>/dev/null | grep -qx x86_64-pc-windows-gnu; then
  cargo clippy --locked -p vmm --lib --target x86_64-pc-windows-gnu -- -D warnings
else
  echo "test.sh: SKIPPED the Windows (WHP) build: the x86_64-pc-windows-gnu target is not" \
    "installed (scripts/install-deps.sh adds it: rustup target add x86_64-pc-windows-gnu)" >&2
fi
# The guest image the microVM tests boot (kernel cached after the first build).
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --profile release-guest --locked -p guest-agent --target x86_64-unknown-linux-gnu
export MXC_VM_GUEST_AGENT="$PWD/target/x86_64-unknown-linux-gnu/release-guest/guest-agent"
cargo build --locked -p host-cli
./target/debug/mxc-vm image build
# The microVM end-to-end tests again on hardware-style KVM: QEMU-emulated AMD SVM in a
# nested host (tests/hwkvm/). Both runs happen; either failing fails the script.
hwkvm_rc=0
tests/hwkvm/run.sh || hwkvm_rc=$?
cargo test --workspace --locked
# The SDKs against a real `mxc-vm serve` (target/debug/mxc-vm, built above).
python3 -m unittest discover -s sdk/python/tests
node --test sdk/typescript/test/sdk.test.js
if [ "$hwkvm_rc" -ne 0 ]; then
  # Again here, at the end, what the lane said (a CI log shows its tail).
  if [ -s target/hwkvm/summary.txt ]; then
    echo "test.sh: ---- the nested hardware-KVM lane's summary (target/hwkvm/summary.txt) ----" >&2
    cat target/hwkvm/summary.txt >&2
  fi
  echo "test.sh: the nested hardware-KVM lane failed (exit $hwkvm_rc): see 'hwkvm:' lines above" >&2
  exit "$hwkvm_rc"
fi
