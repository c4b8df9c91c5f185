// Host+device scalar building blocks of every kernel: parameter storage types, rsqrt, the
// moving average, ReLU and exp. Plain C++ (no torch headers); every function is host+device
// under nvcc, and the CPU backends, the CUDA kernels and the emulated CUDA backend all call
// these same functions.
//
// Float32 throughout. Both backends are compiled without floating-point contraction
// (-ffp-contract=off, nvcc -fmad=false), so the only fused multiply-adds are the ones written
// here and in the headers that build on this one.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Always inlined: the CPU backend calls these inside `omp simd` loops over lanes, which
// vectorize only when the calls are inlined.
#if defined(__CUDACC__)
#define LOPT_HD __host__ __device__ __forceinline__
#elif defined(LOPT_CUDA_EMULATION)
#define LOPT_HD inline  // see LOPT_UNROLL_ALL below
#elif defined(__GNUC__)
#define LOPT_HD inline __attribute__((always_inline))
#else
#define LOPT_HD inline
#endif

// Full unrolling on the device, so that small per-element arrays stay in registers.
#if defined(__CUDA_ARCH__)
#define LOPT_UNROLL _Pragma("unroll")
#else
#define LOPT_UNROLL
#endif

// Full unrolling everywhere: the MLPs' loops, whose per-output values stay in registers (one
// vector register per quantity on the CPU) only when every index is a constant.
#if defined(__CUDA_ARCH__)
#define LOPT_UNROLL_ALL _Pragma("unroll")
#elif defined(__CUDACC__)
#define LOPT_UNROLL_ALL  // nvcc's host pass: the MLPs run on the device only
#elif defined(LOPT_CUDA_EMULATION)
// The emulated CUDA build neither forces inlining nor unrolls: its kernels' speed is not the
// point, and forcing both made velo_cuda.cu take 41 s to compile instead of 1.5 s (every
// mutation control rebuilds it). Neither changes a result: no contraction, no reassociation.
#define LOPT_UNROLL_ALL
#elif defined(__GNUC__) && !defined(__clang__)
#define LOPT_UNROLL_ALL _Pragma("GCC unroll 32")
#else
#define LOPT_UNROLL_ALL
#endif

namespace lopt {

constexpr float kSafeRsqrtFloor = 1e-9f;

// ---------------------------------------------------------------------------------------
// Parameter and gradient storage: float32, bfloat16 or float16 (state is always float32).
// Conversions are exact widenings on load and round-to-nearest-even on store, bit for bit
// what torch's `.float()` and `copy_` do (NaN stores as torch's canonical quiet NaN).

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

LOPT_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

LOPT_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

LOPT_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

LOPT_HD uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

LOPT_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu;
  uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return bits_float(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return bits_float(sign);
    e = 113;  // subnormal: shift the leading one into the implicit position
    while (!(m & 0x400u)) {
      m <<= 1;
      --e;
    }
    return bits_float(sign | (e << 23) | ((m & 0x3FFu) << 13));
  }
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
}

LOPT_HD uint16_t float_to_fp16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half or zero
    if (a <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25 rounds to 0
    const int shift = 126 - static_cast<int>(a >> 23);  // 14 .. 24
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = (a >> 13) - (112u << 10);
  const uint32_t rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry rounds up the exponent
  return static_cast<uint16_t>(sign | r);
}

LOPT_HD float load_value(const void* base, DType dt, int64_t i) {
  if (dt == DType::kFloat32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  return dt == DType::kBFloat16 ? bf16_to_float(h) : fp16_to_float(h);
}

LOPT_HD void store_value(void* base, DType dt, int64_t i, float v) {
  if (dt == DType::kFloat32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = dt == DType::kBFloat16 ? float_to_bf16(v) : float_to_fp16(v);
  }
}

// ---------------------------------------------------------------------------------------
// Arithmetic.

LOPT_HD float rsqrt_ieee(float x) { return 1.0f / sqrtf(x); }

// max(x, floor) that lets NaN through, as jnp.maximum and torch.clamp_min do (fmaxf would
// return the floor for NaN).
LOPT_HD float max_nan(float x, float floor) { return x < floor ? floor : x; }

LOPT_HD float safe_rsqrt(float x) { return rsqrt_ieee(max_nan(x, kSafeRsqrtFloor)); }

// Moving average fma(decay, v, (1 - decay) * x), as XLA compiles upstream's
// `c*v + (1-c)*x` under jit (the caller passes increment = (1 - decay) * x).
LOPT_HD float ema(float decay, float v, float increment) { return fmaf(decay, v, increment); }

// ReLU that lets NaN through, as upstream's max(x, 0) and torch.relu do.
LOPT_HD float relu(float v) { return v < 0.0f ? 0.0f : v; }

// The operations of the values the MLPs run on (lane values): here `float`, one element (the
// CUDA kernels, one element per thread); the CPU backends' 16-lane vectors overload them
// (cpu_lanes.h), so that one MLP source serves both.
LOPT_HD float lane_fma(float a, float b, float c) { return fmaf(a, b, c); }
LOPT_HD float lane_add(float a, float b) { return a + b; }
LOPT_HD float lane_mul(float a, float b) { return a * b; }
LOPT_HD float lane_relu(float v) { return relu(v); }
template <typename V>
LOPT_HD V lane_splat(float x);
template <>
LOPT_HD float lane_splat<float>(float x) { return x; }

// The exp of every kernel, on the host and on the device alike (so that the backends agree bit
// for bit; the device's expf and the host's differ in the last bit for some inputs). Straight-
// line float arithmetic, so that the CPU's lane loops vectorize it (a call to expf does not): x = n ln2 + r with n = rint(x / ln2) and ln2 split in two (Cody-Waite),
// e^r by its degree-7 Taylor polynomial on |r| <= ln2 / 2, then two exact scalings by powers
// of two. Within 0.94 ulp of the exact value on every normal result (checked exhaustively over
// a seventh of all floats); +-inf and NaN map as expf's do, results below 2^-126 may differ
// from expf's in the last subnormal bit.
LOPT_HD float exp_poly(float x) {
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  const float n = rintf(xc * 1.44269504088896341f);
  float r = fmaf(n, -0.693145751953125f, xc);
  r = fmaf(n, -1.428606765330187e-06f, r);
  float q = 1.0f / 5040.0f;
  q = fmaf(q, r, 1.0f / 720.0f);
  q = fmaf(q, r, 1.0f / 120.0f);
  q = fmaf(q, r, 1.0f / 24.0f);
  q = fmaf(q, r, 1.0f / 6.0f);
  q = fmaf(q, r, 0.5f);
  q = fmaf(q, r, 1.0f);
  q = fmaf(q, r, 1.0f);
  const int ni = xc == xc ? static_cast<int>(n) : 0;  // |n| <= 150: 2^n as two normal factors
  const int n1 = ni / 2, n2 = ni - n1;
  return q * bits_float(static_cast<uint32_t>(n1 + 127) << 23)
         * bits_float(static_cast<uint32_t>(n2 + 127) << 23);
}

}  // namespace lopt
