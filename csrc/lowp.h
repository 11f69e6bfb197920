// bfloat16 and float16 storage on the CPU: the 16 bits as they lie in memory (torch.bfloat16's and
// torch.float16's layout, numpy's float16's), widened to float for the arithmetic and rounded back
// to nearest-even on the way out. The conversions are integer operations and selects only, no
// branch and no conversion instruction (baseline x86-64 has none for half precision), so the loops
// over such data vectorize on every instruction set: a bfloat16 load is a 16-bit shift. CUDA code
// uses cuda_bf16.h / cuda_fp16.h instead; these types are the same bits.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastppo {

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

namespace lowp_detail {
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
}  // namespace lowp_detail

// The element type a storage type is computed in: float for the 16-bit types, itself otherwise.
template <typename T>
struct AccumulateAs {
  using type = T;
};
template <>
struct AccumulateAs<bf16_t> {
  using type = float;
};
template <>
struct AccumulateAs<f16_t> {
  using type = float;
};
template <typename T>
using acc_t = typename AccumulateAs<T>::type;

// Storage -> accumulation type. Exact for every bit pattern (NaN stays NaN, subnormals included).
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(bf16_t x) { return lowp_detail::float_of(static_cast<uint32_t>(x.bits) << 16); }
inline float widen(f16_t x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t em = x.bits & 0x7fffu;  // exponent and mantissa
  // Normal: rebias the exponent (15 -> 127). Subnormal: mantissa * 2^-24, by an int -> float
  // conversion (exact; no float subnormal is involved, so flush-to-zero modes do not touch it).
  // inf and NaN: all-ones exponent, the mantissa kept (a NaN stays a NaN).
  const float normal = lowp_detail::float_of((em << 13) + ((127u - 15u) << 23));
  const float subnormal = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;  // 2^-24
  const float special = lowp_detail::float_of((em << 13) | 0x7f800000u);
  const float magnitude = em >= 0x7c00u ? special : (em < 0x0400u ? subnormal : normal);
  return lowp_detail::float_of(lowp_detail::bits_of(magnitude) | sign);
}

// Accumulation type -> storage, rounded to nearest, ties to even (as torch's casts round).
template <typename T>
inline T narrow(acc_t<T> x);
template <>
inline float narrow<float>(float x) {
  return x;
}
template <>
inline double narrow<double>(double x) {
  return x;
}
template <>
inline bf16_t narrow<bf16_t>(float x) {
  const uint32_t u = lowp_detail::bits_of(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // a carry into the exponent is right
  return bf16_t{static_cast<uint16_t>(x != x ? 0x7fc0u : rounded)};
}
template <>
inline f16_t narrow<f16_t>(float x) {
  const uint32_t u = lowp_detail::bits_of(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal results: rebias (127 -> 15) and round the 13 dropped bits; a carry into the exponent is
  // right, up to inf from 65520 (0x477ff000) on. Subnormal results (|x| < 2^-14): adding 0.5 puts
  // x's bits at 2^-24 resolution in the low mantissa of the sum, rounded by the addition itself.
  const uint32_t normal = ((a - ((127u - 15u) << 23)) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t subnormal = lowp_detail::bits_of(lowp_detail::float_of(a) + 0.5f) - 0x3f000000u;
  const uint32_t magnitude = a > 0x7f800000u    ? 0x7e00u  // NaN
                             : a >= 0x477ff000u ? 0x7c00u  // inf, and what rounds to it
                             : a < 0x38800000u  ? subnormal
                                                : normal;
  return f16_t{static_cast<uint16_t>(magnitude | sign)};
}

}  // namespace fastppo
