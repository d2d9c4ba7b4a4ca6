#!/usr/bin/env bash
# The release mxc-vm and, beside it, mxc-vmm (the VMM process of each microVM) linked
# static-pie: no dynamic loader and no shared libraries to map each time a VM starts (the
# restored VMM reaches its setup ~0.8 ms sooner under kvm_pvm; `mxc-vm bench boot
# --snapshot --until first-entry`). A plain `cargo build` makes a dynamic mxc-vmm, which
# works the same.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p host-cli
cargo rustc --release --locked -p host-cli --bin mxc-vmm -- -C target-feature=+crt-static
