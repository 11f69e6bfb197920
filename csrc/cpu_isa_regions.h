// Regions of code compiled for one x86 instruction set inside a file compiled for baseline x86-64
// (see cpu_kernels.cpp). Every function defined between FASTPPO_TARGET_PUSH_<ISA> and
// FASTPPO_TARGET_POP gets that instruction set: GCC through `#pragma GCC target`, clang through
// `#pragma clang attribute` (clang ignores GCC's pragma while still defining __GNUC__).
//
// FASTPPO_ISA_GUARD_<ISA> defines a function that calls an intrinsic of that instruction set: a
// compiler that did not apply the region fails to compile it, so a build either has real
// per-instruction-set copies or none (CMake probes this with cmake/isa_regions_probe.cpp before
// enabling the copies), and build_info() never names an instruction set the code was not built for.
#pragma once

#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#include <immintrin.h>

#if defined(__clang__)
#define FASTPPO_TARGET_PUSH_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
// (_Pragma takes one string literal, so these lines stay long.)
#define FASTPPO_TARGET_PUSH_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512vl,avx512bw,avx512dq,avx2,fma\"))), apply_to = function)")
#define FASTPPO_TARGET_POP _Pragma("clang attribute pop")
#else
#define FASTPPO_TARGET_PUSH_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define FASTPPO_TARGET_PUSH_AVX512 \
  _Pragma("GCC push_options")      \
      _Pragma("GCC target(\"avx512f,avx512vl,avx512bw,avx512dq,avx2,fma\", \"prefer-vector-width=512\")")
#define FASTPPO_TARGET_POP _Pragma("GCC pop_options")
#endif

#define FASTPPO_ISA_GUARD_AVX2 \
  __m256 isa_guard(__m256 a) { return _mm256_fmadd_ps(a, a, a); }
#define FASTPPO_ISA_GUARD_AVX512                                                                   \
  __m512d isa_guard(__m512d a, __m512i b) {                                                        \
    /* avx512f, avx512dq (cvtepi64) and avx512bw (movepi8) */                                      \
    return _mm512_add_pd(a, _mm512_cvtepi64_pd(_mm512_maskz_mov_epi64(_mm512_movepi8_mask(b) & 0xff, b))); \
  }
#endif
