#!/usr/bin/env bash
# Install what smolvm needs on a Debian/Ubuntu host, skipping what is already there.
set -euo pipefail
pkgs=(qemu-system-x86 busybox-static musl-tools patch bzip2 debian-archive-keyring linux-source-6.1 make gcc flex bison bc libelf-dev libssl-dev
      xz-utils cpio nftables e2fsprogs iproute2 procps python3-venv python3-dev qemu-utils mmdebstrap openssh-client slirp4netns
      ca-certificates perl)
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
updated=""
# Twice: an install can remove a package that conflicts with it (this image's backported
# qemu-utils goes when Debian 12's qemu-system-x86 comes), and the second pass puts back the
# version that fits.
for pass in 1 2; do
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || break
  echo "prereqs: installing ${missing[*]}"
  [ -n "$updated" ] || { $SUDO apt-get update -qq; updated=1; }
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done
# The guest agent is built for musl where rustup can add that target; where it cannot (no
# toolchain download on this machine), the Makefile builds it for glibc, linked statically.
if ! command -v rustup >/dev/null; then
  echo "prereqs: rustup is missing: install Rust with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi
if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl ||
    echo "prereqs: the x86_64-unknown-linux-musl Rust target could not be added; the guest agent will be built for glibc, linked statically (a larger binary)" >&2
fi
# `make lint` (part of `make test`): a toolchain of rustup's minimal profile has neither.
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
# The vsock transport's device server (vhost-user), for SMOLVM_AGENT_TRANSPORT=vsock and its
# tests: QEMU cannot offer vsock without /dev/vhost-vsock otherwise. About 45 s to build once.
VHOST_VSOCK_VERSION=0.3.0
if ! "${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock" --version 2>/dev/null | grep -q " $VHOST_VSOCK_VERSION"; then
  cargo install --locked --quiet vhost-device-vsock --version "$VHOST_VSOCK_VERSION"
fi
