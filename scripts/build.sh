#!/usr/bin/env bash
# Build mxc-vm, the static guest agent and the guest image (kernel + initramfs, cached
# in ~/.cache/mxc-vm; the kernel build takes ~5-10 minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-release.sh
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --profile release-guest --locked -p guest-agent --target x86_64-unknown-linux-gnu
./target/release/mxc-vm image build \
  --agent target/x86_64-unknown-linux-gnu/release-guest/guest-agent
