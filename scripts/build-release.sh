#!/usr/bin/env bash
# The release mxc-vm and, beside it, mxc-vmm (the VMM process of each microVM), both
# linked static-pie: no dynamic loader and no shared libraries to map each time one
# starts (under kvm_pvm a restored VMM reaches its setup ~0.8 ms sooner, `mxc-vm bench
# boot --snapshot --until first-entry`, and `run --backend process` ends ~0.3-0.5 ms
# sooner, `mxc-vm bench exec`). Name lookups then use glibc's built-in `files` and `dns`
# sources only (what /etc/nsswitch.conf names beyond them is not loaded). A plain
# `cargo build` makes dynamic binaries, which work the same.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p host-cli
for bin in mxc-vm mxc-vmm; do
  cargo rustc --release --locked -p host-cli --bin "$bin" -- -C target-feature=+crt-static
done
