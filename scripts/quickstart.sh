#!/usr/bin/env bash
# On a fresh Debian machine: install what mxc-vm needs, build everything, then run a
# command in each kind of sandbox this host supports.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
M=./target/release/mxc-vm
$M backends
$M run --backend process -- /bin/echo "hello from the process sandbox"
# The main job: boot a microVM with our own VMM and kernel, run a command in it.
# (Under a nested, emulated KVM such as our CI machines' kvm_pvm, the boot takes minutes.)
$M run --backend microvm -- /bin/echo hello
