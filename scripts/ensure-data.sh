#!/usr/bin/env bash
# Make sure Fashion-MNIST is available: install Debian's dataset-fashion-mnist when
# the files are missing and apt can be used; otherwise say how to get them.
set -euo pipefail
dir="${FEDGE_DATA_DIR:-/usr/share/datasets/fashion-mnist}"
have_all() {
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$dir/$f.gz" ] || [ -f "$dir/$f" ] || return 1
  done
}
if have_all; then
  exit 0
fi
if [ "$dir" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  if [ "$sudo" != none ]; then
    echo "fedge: installing Fashion-MNIST (Debian package dataset-fashion-mnist)..." >&2
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
    have_all && exit 0
  fi
fi
cat >&2 <<MSG
fedge: Fashion-MNIST not found in $dir.
  Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist
  Elsewhere: put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
  t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from github.com/zalandoresearch/fashion-mnist
  (folder data/fashion) in a directory and set FEDGE_DATA_DIR to it.
MSG
exit 1
