#!/bin/sh
# Install the compiled .mod files of the Fortran library into
# <includedir>/$1 (meson has no built-in rule for module files).
set -eu
dest="${DESTDIR:-}${MESON_INSTALL_PREFIX}/include/$1"
mkdir -p "$dest"
find "$MESON_BUILD_ROOT" -name 'pykd*.mod' -path '*pykd*' -exec cp {} "$dest" \;
