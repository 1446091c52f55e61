#!/usr/bin/env bash
# Build (once) an arm64 Debian root filesystem holding only what a board needs to run splitc
# pieces: Python, and aarch64 wheels of apache-tvm, apache-tvm-ffi, pyzmq and numpy in a venv
# (and cloudpickle, which TVM's RPC server needs for the tune agent).
# The `arm` test suite runs aarch64 workers in it under qemu-user. Needs root, Debian's
# qemu-user-static, binfmt-support and debootstrap (installed here if missing), ~1 GB of disk
# and a few minutes. Cached: a second run only checks.
#   scripts/arm-rootfs.sh [ROOT]     (default: .cache/arm64-root)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-${SPLITC_ARM_ROOT:-.cache/arm64-root}}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# v2: cloudpickle for the tune agent (TVM's RPC server needs it)
if [ -f "$ROOT/.splitc-ready-v2" ]; then echo "$ROOT ready"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "error: building the arm64 root filesystem needs root" >&2; exit 2; }

missing=()
for pkg in qemu-user-static binfmt-support debootstrap; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true

if [ ! -x "$ROOT/usr/bin/python3" ]; then
  mkdir -p "$ROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv \
    bookworm "$ROOT" "$MIRROR"
fi

wheels="$ROOT/opt/wheels"
mkdir -p "$wheels"
# Bookworm's python is 3.11; the wheels are manylinux_2_28 aarch64 (glibc 2.36 here).
.venv/bin/python -m pip download -q --dest "$wheels" --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
  --platform manylinux2014_aarch64 --python-version 3.11 --implementation cp \
  apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 pyzmq numpy ml_dtypes typing_extensions \
  cloudpickle

chroot "$ROOT" /usr/bin/python3 -m venv /opt/venv
chroot "$ROOT" /opt/venv/bin/python -m pip install -q --no-index --find-links /opt/wheels \
  apache-tvm apache-tvm-ffi pyzmq numpy cloudpickle
touch "$ROOT/.splitc-ready-v2"
echo "$ROOT ready"
