#!/usr/bin/env bash
# Fetches the kernel of the nested hardware-KVM test lane (tests/hwkvm/run.sh): the
# versioned package that Debian's metapackage linux-image-amd64 depends on, downloaded
# with `apt-get download` and unpacked with `dpkg-deb -x` into
# ${XDG_CACHE_HOME:-$HOME/.cache}/mxc-vm/hwkvm/<package>_<version>/ -- nothing is
# installed into /boot. Idempotent: no download when that version is already unpacked;
# without package lists or registry it falls back to the newest kernel already there.
# Prints the unpacked directory (boot/vmlinuz-*, lib/modules/<release>/) on stdout.
set -euo pipefail

meta=linux-image-amd64
cache="${XDG_CACHE_HOME:-$HOME/.cache}/mxc-vm/hwkvm"
mkdir -p "$cache"
say() { echo "hwkvm: $*" >&2; }

# The newest complete unpacked kernel already in the cache, if any.
newest_cached() {
  local d best=""
  for d in "$cache"/linux-image-*/; do
    [ -e "$d.complete" ] || continue
    best="${d%/}"
  done
  [ -n "$best" ] && printf '%s\n' "$best"
}

# The versioned package the metapackage depends on, e.g. linux-image-6.1.0-57-amd64.
resolve() {
  apt-cache depends "$meta" 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

pkg="$(resolve || true)"
if [ -z "$pkg" ]; then
  if cached="$(newest_cached)"; then
    say "no package lists for $meta; using the cached $(basename "$cached")"
    printf '%s\n' "$cached"
    exit 0
  fi
  say "no package lists for $meta: apt-get update"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  pkg="$(resolve || true)"
  [ -n "$pkg" ] || { say "cannot resolve the package $meta depends on"; exit 1; }
fi
ver="$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" { print $2; exit }')"
if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
  say "no candidate version of $pkg"; exit 1
fi

dest="$cache/${pkg}_${ver}"
if [ -e "$dest/.complete" ]; then
  printf '%s\n' "$dest"
  exit 0
fi

say "downloading $pkg $ver (for $meta) into $cache"
tmp="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# Its output only on failure (as root it warns that the _apt user cannot write here).
if ! out="$(cd "$tmp" && apt-get download -q "$pkg=$ver" 2>&1)"; then
  printf '%s\n' "$out" >&2
  say "apt-get download $pkg=$ver failed"
  exit 1
fi
deb="$(ls "$tmp"/*.deb)"
dpkg-deb -x "$deb" "$tmp/root"
ls "$tmp"/root/boot/vmlinuz-* >/dev/null
rm -f "$deb"
rm -rf "$dest"
mv "$tmp/root" "$dest"
touch "$dest/.complete"
# Older kernels are superseded by this one.
for d in "$cache"/linux-image-*/; do
  [ "${d%/}" = "$dest" ] || rm -rf "${d%/}"
done
say "unpacked $pkg $ver into $dest"
printf '%s\n' "$dest"
