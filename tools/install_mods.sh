#!/bin/sh
# Install the compiled .mod files of the Fortran library into $2/$1, i.e.
# <includedir>/pykd (meson has no built-in rule for module files).
# Only the library's own object directories (libpykd*.p) are searched, so
# modules of the test programs never end up installed. A .mod file is
# specific to the compiler (and its major version) that wrote it.
set -eu
dest="${DESTDIR:-}$2/$1"
mkdir -p "$dest"
pattern="$MESON_BUILD_ROOT/lib$1*.p/*.mod"
if [ -z "$(find "$MESON_BUILD_ROOT" -maxdepth 2 -path "$pattern")" ]; then
  echo "install_mods.sh: no .mod files match $pattern" >&2
  exit 1
fi
find "$MESON_BUILD_ROOT" -maxdepth 2 -path "$pattern" -exec cp {} "$dest/" \;
