#!/usr/bin/env bash
# Debian packages mxc-vm needs to build, test and run every backend.
set -euo pipefail
pkgs=(
  bubblewrap          # the bubblewrap backend
  busybox-static      # the shell and tools inside the microVM guest
  debootstrap         # the optional Debian rootfs for guests (mxc-vm image build --rootfs)
  linux-source-6.1    # the guest kernel source (mxc-vm image build)
  flex bison bc libelf-dev libssl-dev make gcc cpio xz-utils  # kernel build
  python3 iproute2 curl openssl  # used by the tests
  g++                 # libFuzzer, built for the protocol fuzz target (proto/fuzz)
  nodejs              # the TypeScript SDK's tests (sdk/typescript, Node >= 18)
  qemu-system-x86     # the nested hardware-KVM test lane (tests/hwkvm/)
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
# The Debian kernel the nested hardware-KVM test lane boots (downloaded, not installed).
"$(dirname "$0")/../tests/hwkvm/fetch-kernel.sh" >/dev/null
# The Rust target the WHP backend is compiled for (scripts/test.sh says when it is absent).
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx x86_64-pc-windows-gnu; then
  rustup target add x86_64-pc-windows-gnu \
    || echo "install-deps: could not add the x86_64-pc-windows-gnu target; the Windows build will be skipped" >&2
fi
