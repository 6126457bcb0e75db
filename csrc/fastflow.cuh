// fastflow.cuh: helpers shared by the csrc/ kernels.
//
// Self-contained on purpose: no <cuda_fp16.h>/<cuda_bf16.h>/<cstdint>, so that the same text
// compiles with nvcc (ahead of time, setup.py) and with NVRTC through CuPy (at run time) whether
// or not the CUDA toolkit headers are installed. The run-time loader pastes this file into each
// .cu in place of its #include line, so CuPy's kernel cache (keyed on the source text) sees
// every change to it.
//
// Storage types are float, half and bfloat16; arithmetic is always float32.
#pragma once

namespace fastflow {

typedef long long i64;

// 16-bit storage as raw bits: layout-compatible with torch.float16 / torch.bfloat16.
struct f16 {
  unsigned short bits;
};
struct bf16 {
  unsigned short bits;
};

// Every helper is __host__ __device__: the kernels' per-element functions compile for the host
// too, which is how tests/ops/test_cuda_build.py checks their maths on a machine without a GPU.
#define FF_HD __host__ __device__ __forceinline__

FF_HD float as_float(unsigned int u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FF_HD unsigned int as_uint(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  unsigned int u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// ----------------------------------------------------------------------------- loads / stores

FF_HD float half_to_float(unsigned short h) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));  // exact widening (every half is a float)
  return f;
#else
  const unsigned int sign = static_cast<unsigned int>(h & 0x8000u) << 16;
  const unsigned int e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return as_float(sign | 0x7f800000u | (m << 13));
  if (e == 0u) {
    const float f = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -f : f;
  }
  return as_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

FF_HD unsigned short float_to_half(float v) {
#ifdef __CUDA_ARCH__
  unsigned short h;
  // Round to nearest even, overflow to inf, NaN stays NaN: what torch's .half() does.
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
#else
  unsigned int u = as_uint(v);
  const unsigned short sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;             // NaN
  if (u >= 0x47800000u) return sign | 0x7c00u;            // >= 2^16: inf
  if (u >= 0x38800000u) {                                 // normal half
    const unsigned int mant = u & 0x7fffffu;
    unsigned int h = (((u >> 23) - 112u) << 10) | (mant >> 13);
    const unsigned int rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may reach inf: correct
    return sign | static_cast<unsigned short>(h);
  }
  if (u < 0x33000000u) return sign;                       // below half the smallest subnormal
  const unsigned int mant = (u & 0x7fffffu) | 0x800000u;  // subnormal half: units of 2^-24
  const unsigned int shift = 126u - (u >> 23);             // 14..24
  unsigned int h = mant >> shift;
  const unsigned int rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return sign | static_cast<unsigned short>(h);
#endif
}

FF_HD float load(const float* p, i64 i) { return p[i]; }
FF_HD float load(const f16* p, i64 i) { return half_to_float(p[i].bits); }
// bfloat16 is the upper half of a float32: widening is a shift.
FF_HD float load(const bf16* p, i64 i) { return as_float(static_cast<unsigned int>(p[i].bits) << 16); }

FF_HD void store(float* p, i64 i, float v) { p[i] = v; }
FF_HD void store(f16* p, i64 i, float v) { p[i].bits = float_to_half(v); }
FF_HD void store(bf16* p, i64 i, float v) {
  const unsigned int u = as_uint(v);
  // NaN -> the canonical quiet NaN torch produces; otherwise round to nearest, ties to even
  // (overflow rounds to inf correctly).
  p[i].bits = (u & 0x7fffffffu) > 0x7f800000u ? static_cast<unsigned short>(0x7fc0u)
                                               : static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ----------------------------------------------------------------------------- maths

// log(1 + exp(z)) without overflow; NaN in, NaN out.
FF_HD float softplus(float z) { return fmaxf(z, 0.0f) + log1pf(expf(-fabsf(z))); }

// 1 / (1 + exp(-z)) without overflow in either tail; NaN in, NaN out.
FF_HD float sigmoid(float z) {
  float e = expf(-fabsf(z));
  return z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

// log(sigmoid(z)) = -softplus(-z), accurate in both tails.
FF_HD float log_sigmoid(float z) { return -softplus(-z); }

// ----------------------------------------------------------------------------- indexing

// Grid-stride loop over [0, n) in 64-bit indices: any n, any grid size.
#define FF_GRID_STRIDE(i, n)                                                              \
  for (::fastflow::i64 i = static_cast<::fastflow::i64>(blockIdx.x) * blockDim.x + threadIdx.x; \
       i < (n); i += static_cast<::fastflow::i64>(blockDim.x) * gridDim.x)

// Threads per block of every launch (the Python launchers use the same number).
#define FF_BLOCK 256

}  // namespace fastflow
