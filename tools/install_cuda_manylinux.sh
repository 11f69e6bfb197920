#!/usr/bin/env bash
# Installs nvcc and the CUDA runtime into a manylinux_2_28 container (AlmaLinux 8) from NVIDIA's rpm
# repository: cibuildwheel's before-all runs it once per container ([tool.cibuildwheel.linux] in
# pyproject.toml). Nothing installed here ships in the wheel: the module links the CUDA runtime
# statically and opens the driver at run time.
#
# usage: bash tools/install_cuda_manylinux.sh      (FASTPPO_CUDA_VERSION=12.9 by default)
set -euo pipefail
version=${FASTPPO_CUDA_VERSION:-12.9}
dashed=${version//./-}

# Only what the build uses: nvcc, the runtime's headers and static library, and CCCL's headers
# (cuda_fp16.h and cuda_bf16.h include them). No driver: the container has no GPU.
dnf install -y dnf-plugins-core
dnf config-manager --add-repo https://developer.download.nvidia.com/compute/cuda/repos/rhel8/x86_64/cuda-rhel8.repo
dnf install -y --setopt=install_weak_deps=False "cuda-nvcc-$dashed" "cuda-cudart-devel-$dashed" "cuda-cccl-$dashed"
dnf clean all

nvcc=/usr/local/cuda-$version/bin/nvcc
"$nvcc" --version
# The host compiler nvcc will use must be one it accepts, or the build would quietly go CPU-only
# (the wheel's test then fails): say which it is.
"${CXX:-c++}" --version | head -n 1
