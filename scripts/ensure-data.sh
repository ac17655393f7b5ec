#!/usr/bin/env bash
# Make sure the built-in data sets are available, installing their Debian packages when
# the files are missing and apt can be used; otherwise say how to get them.
#   Fashion-MNIST (dataset-fashion-mnist): required; missing -> exit 1.
#   UCI Shuttle (r-cran-mlbench, Shuttle.rda): optional; missing -> a warning only, so a
#   machine that only runs Fashion-MNIST scenarios still sets up.
set -euo pipefail

# How to run apt: "" as root, "sudo -n" with passwordless sudo, "none" otherwise.
apt_prefix() {
  if ! command -v apt-get >/dev/null 2>&1; then echo none
  elif [ "$(id -u)" -eq 0 ]; then echo ""
  elif sudo -n true 2>/dev/null; then echo "sudo -n"
  else echo none; fi
}

apt_updated=no
apt_install() { # PACKAGE: install it quietly, without recommends; fails like apt-get
  local sudo
  sudo="$(apt_prefix)"
  [ "$sudo" != none ] || return 1
  if [ "$apt_updated" = no ]; then
    $sudo apt-get update -qq >/dev/null
    apt_updated=yes
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$1" >/dev/null
}

# ---- Fashion-MNIST (required) ------------------------------------------------------
fashion_dir="${FEDGE_DATA_DIR:-/usr/share/datasets/fashion-mnist}"
have_fashion() {
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$fashion_dir/$f.gz" ] || [ -f "$fashion_dir/$f" ] || return 1
  done
}
fashion_ok=yes
if ! have_fashion; then
  if [ "$fashion_dir" = /usr/share/datasets/fashion-mnist ] && [ "$(apt_prefix)" != none ]; then
    echo "fedge: installing Fashion-MNIST (Debian package dataset-fashion-mnist)..." >&2
    apt_install dataset-fashion-mnist || true
  fi
  have_fashion || fashion_ok=no
fi

# ---- UCI Shuttle (optional) --------------------------------------------------------
shuttle_dir="${FEDGE_SHUTTLE_DIR:-/usr/lib/R/site-library/mlbench/data}"
if [ ! -f "$shuttle_dir/Shuttle.rda" ]; then
  if [ "$shuttle_dir" = /usr/lib/R/site-library/mlbench/data ] && [ "$(apt_prefix)" != none ]; then
    echo "fedge: installing UCI Shuttle (Debian package r-cran-mlbench)..." >&2
    apt_install r-cran-mlbench || true
  fi
  if [ ! -f "$shuttle_dir/Shuttle.rda" ]; then
    cat >&2 <<MSG
fedge: warning: UCI Shuttle not found ($shuttle_dir/Shuttle.rda); the "shuttle" data set
  will be unavailable (Fashion-MNIST scenarios are not affected).
  Debian/Ubuntu: sudo apt-get install r-cran-mlbench
  Elsewhere: put Shuttle.rda from the data/ folder of the CRAN package mlbench
  (cran.r-project.org/package=mlbench) in a directory and set FEDGE_SHUTTLE_DIR to it.
MSG
  fi
fi

if [ "$fashion_ok" = no ]; then
  cat >&2 <<MSG
fedge: Fashion-MNIST not found in $fashion_dir.
  Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist
  Elsewhere: put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
  t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from github.com/zalandoresearch/fashion-mnist
  (folder data/fashion) in a directory and set FEDGE_DATA_DIR to it.
MSG
  exit 1
fi
