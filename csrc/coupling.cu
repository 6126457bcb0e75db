// coupling.cu: affine coupling (RealNVP, Dinh et al. 2017; Glow, Kingma & Dhariwal 2018) and
// additive coupling (NICE, Dinh et al. 2015): the elementwise laws and the per-sample log-det.
//
// The same maths as fastflow/kernels/reference/coupling.py and the numba kernels:
//   affine forward  y = s * x + t,            logabsdet[b] =  sum log s
//   affine inverse  x = (y - t) * (1/s),      logabsdet[b] = -sum log s
//   s from the raw scale h by a law: kind 0 "exp"       s = exp(h)
//                                    kind 1 "softclamp" s = exp(c * tanh(h / c))
//                                    kind 2 "sigmoid"   s = sigmoid(h + 2), 1/s = 1 + exp(-(h+2))
//   additive        y = x + t (inverse x = y - t), log-det 0 (the op fills it).
//
// Every input is a strided (B, M, N) view (a channel half of an image, an interleaved column
// of a conditioner output; a (B, F) matrix is (B, 1, F)), addressed by its own three element
// strides, so nothing is copied; outputs are contiguous (B, M, N). float32 arithmetic,
// float32/float16/bfloat16 storage, 64-bit indices.
//
// A group of `row_threads` threads (32: one warp, or FF_BLOCK: the whole block, for long rows)
// takes one sample at a time, so the log-det is a register sum plus a shuffle/shared-memory
// reduction within the group: deterministic, no atomics. The elementwise backward uses the
// same layout (it needs the sample's grad of the log-det).
//
// Entry points (extern "C", S in f32/f16/bf16; each tensor followed by its strides s0, s1, s2):
//   affine_fwd_S(x,xs.., t,ts.., h,hs.., out, lad, B, M, N, kind, clamp, inverse, row_threads)
//   affine_bwd_S(go,gos.., gl,gls0, x,xs.., t,ts.., h,hs.., gx, gh, B, M, N, kind, clamp, inverse, row_threads)
//   additive_fwd_S(x,xs.., t,ts.., out, B, M, N, inverse, row_threads)

#include "fastflow.cuh"

namespace fastflow {
namespace coupling {

// (log s, s, 1/s, d log s / d h) of a raw scale h.
struct Scale {
  float logs, s, inv_s, d;
};

FF_HD Scale scale_terms(float h, int kind, float clamp) {
  if (kind == 0) return {h, expf(h), expf(-h), 1.0f};
  if (kind == 1) {
    const float u = tanhf(h / clamp);
    const float logs = clamp * u;
    return {logs, expf(logs), expf(-logs), 1.0f - u * u};
  }
  // sigmoid(z), z = h + 2, with each quantity in the form that neither overflows nor cancels.
  const float z = h + 2.0f;
  const float e = expf(-fabsf(z));
  const float d = 1.0f + e;
  if (z >= 0.0f) return {-log1pf(e), 1.0f / d, 1.0f + e, e / d};
  return {z - log1pf(e), e / d, 1.0f + expf(-z), 1.0f / d};  // NaN z lands here: NaN throughout
}

// Element (b, m, j) of a strided view.
FF_HD i64 at(i64 b, i64 m, i64 j, i64 s0, i64 s1, i64 s2) { return b * s0 + m * s1 + j * s2; }

// Affine forward/inverse of one element: writes out[o], returns log s (unsigned).
template <typename T>
FF_HD float affine_elem(float x, float t, float h, int kind, float clamp, int inverse, T* out, i64 o) {
  const Scale sc = scale_terms(h, kind, clamp);
  store(out, o, inverse ? (x - t) * sc.inv_s : x * sc.s + t);
  return sc.logs;
}

// Affine backward of one element given the sample's grad of the log-det gl.
template <typename T>
FF_HD void affine_bwd_elem(float g, float gl, float x, float t, float h, int kind, float clamp, int inverse, T* gx,
                           T* gh, i64 o) {
  const Scale sc = scale_terms(h, kind, clamp);
  if (inverse) {
    // out = (x - t)/s: d out/dx = 1/s, d out/dh = -out (log s)', d lad/dh = -(log s)'.
    const float xi = (x - t) * sc.inv_s;
    store(gx, o, g * sc.inv_s);
    store(gh, o, -(g * xi + gl) * sc.d);
  } else {
    // y = s x + t: dy/dx = s, dy/dh = x s (log s)', d lad/dh = (log s)'.
    store(gx, o, g * sc.s);
    store(gh, o, (g * x * sc.s + gl) * sc.d);
  }
}

// Sum of v over a group of `rt` threads (32 or blockDim.x); the result is valid in the group's
// first thread. Every thread of the group must call it (rows are uniform over a group).
__device__ __forceinline__ float group_sum(float v, int rt, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (rt == 32) return v;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads();  // the previous row's reads of smem are done
  if (lane == 0) smem[w] = v;
  __syncthreads();
  float r = 0.0f;
  if (w == 0) {
    r = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) r += __shfl_down_sync(0xffffffffu, r, o);
  }
  return r;
}

// The row loop shared by every kernel: group g of the block takes samples b = first, first +
// stride, ...; its threads take the row's elements e = lane, lane + rt, ... (m, j) = divmod(e, N).
#define FF_ROWS_BEGIN(B, M, N, rt)                                                              \
  const int groups = static_cast<int>(blockDim.x) / (rt);                                       \
  const int lane = static_cast<int>(threadIdx.x) % (rt);                                        \
  const i64 F = (M) * (N);                                                                      \
  for (i64 b = static_cast<i64>(blockIdx.x) * groups + threadIdx.x / (rt); b < (B);             \
       b += static_cast<i64>(gridDim.x) * groups) {
#define FF_ELEMS_BEGIN(M, N, rt)                                      \
  for (i64 e = lane; e < F; e += (rt)) {                              \
    const i64 m = (M) == 1 ? 0 : e / (N);                             \
    const i64 j = e - m * (N);
#define FF_ELEMS_END }
#define FF_ROWS_END }

template <typename T>
__device__ __forceinline__ void affine_fwd(const T* x, i64 xs0, i64 xs1, i64 xs2, const T* t, i64 ts0, i64 ts1,
                                           i64 ts2, const T* h, i64 hs0, i64 hs1, i64 hs2, T* out, T* lad, i64 B,
                                           i64 M, i64 N, int kind, float clamp, int inverse, int rt) {
  __shared__ float smem[FF_BLOCK / 32];
  FF_ROWS_BEGIN(B, M, N, rt)
  float acc = 0.0f;
  FF_ELEMS_BEGIN(M, N, rt)
  acc += affine_elem(load(x, at(b, m, j, xs0, xs1, xs2)), load(t, at(b, m, j, ts0, ts1, ts2)),
                     load(h, at(b, m, j, hs0, hs1, hs2)), kind, clamp, inverse, out, b * F + e);
  FF_ELEMS_END
  const float total = group_sum(acc, rt, smem);
  if (lane == 0) store(lad, b, inverse ? -total : total);
  FF_ROWS_END
}

template <typename T>
__device__ __forceinline__ void affine_bwd(const T* go, i64 gs0, i64 gs1, i64 gs2, const T* gl, i64 gls0, const T* x,
                                           i64 xs0, i64 xs1, i64 xs2, const T* t, i64 ts0, i64 ts1, i64 ts2,
                                           const T* h, i64 hs0, i64 hs1, i64 hs2, T* gx, T* gh, i64 B, i64 M, i64 N,
                                           int kind, float clamp, int inverse, int rt) {
  FF_ROWS_BEGIN(B, M, N, rt)
  const float g_lad = load(gl, b * gls0);
  FF_ELEMS_BEGIN(M, N, rt)
  // The shift is read only by the inverse (the forward's gradients do not depend on it).
  const float tv = inverse ? load(t, at(b, m, j, ts0, ts1, ts2)) : 0.0f;
  affine_bwd_elem(load(go, at(b, m, j, gs0, gs1, gs2)), g_lad, load(x, at(b, m, j, xs0, xs1, xs2)), tv,
                  load(h, at(b, m, j, hs0, hs1, hs2)), kind, clamp, inverse, gx, gh, b * F + e);
  FF_ELEMS_END
  FF_ROWS_END
}

template <typename T>
__device__ __forceinline__ void additive_fwd(const T* x, i64 xs0, i64 xs1, i64 xs2, const T* t, i64 ts0, i64 ts1,
                                             i64 ts2, T* out, i64 B, i64 M, i64 N, int inverse, int rt) {
  FF_ROWS_BEGIN(B, M, N, rt)
  FF_ELEMS_BEGIN(M, N, rt)
  const float xv = load(x, at(b, m, j, xs0, xs1, xs2));
  const float tv = load(t, at(b, m, j, ts0, ts1, ts2));
  store(out, b * F + e, inverse ? xv - tv : xv + tv);
  FF_ELEMS_END
  FF_ROWS_END
}

}  // namespace coupling
}  // namespace fastflow

#define FF_I64 fastflow::i64
#define FF_COUPLING_ENTRY_POINTS(S, T)                                                                              \
  extern "C" __global__ void __launch_bounds__(FF_BLOCK)                                                            \
      affine_fwd_##S(const T* x, FF_I64 xs0, FF_I64 xs1, FF_I64 xs2, const T* t, FF_I64 ts0, FF_I64 ts1,            \
                     FF_I64 ts2, const T* h, FF_I64 hs0, FF_I64 hs1, FF_I64 hs2, T* out, T* lad, FF_I64 B, FF_I64 M, \
                     FF_I64 N, int kind, float clamp, int inverse, int row_threads) {                               \
    fastflow::coupling::affine_fwd<T>(x, xs0, xs1, xs2, t, ts0, ts1, ts2, h, hs0, hs1, hs2, out, lad, B, M, N, kind, \
                                      clamp, inverse, row_threads);                                                 \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(FF_BLOCK)                                                            \
      affine_bwd_##S(const T* go, FF_I64 gs0, FF_I64 gs1, FF_I64 gs2, const T* gl, FF_I64 gls0, const T* x,          \
                     FF_I64 xs0, FF_I64 xs1, FF_I64 xs2, const T* t, FF_I64 ts0, FF_I64 ts1, FF_I64 ts2, const T* h, \
                     FF_I64 hs0, FF_I64 hs1, FF_I64 hs2, T* gx, T* gh, FF_I64 B, FF_I64 M, FF_I64 N, int kind,       \
                     float clamp, int inverse, int row_threads) {                                                   \
    fastflow::coupling::affine_bwd<T>(go, gs0, gs1, gs2, gl, gls0, x, xs0, xs1, xs2, t, ts0, ts1, ts2, h, hs0, hs1,  \
                                      hs2, gx, gh, B, M, N, kind, clamp, inverse, row_threads);                     \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(FF_BLOCK)                                                            \
      additive_fwd_##S(const T* x, FF_I64 xs0, FF_I64 xs1, FF_I64 xs2, const T* t, FF_I64 ts0, FF_I64 ts1,          \
                       FF_I64 ts2, T* out, FF_I64 B, FF_I64 M, FF_I64 N, int inverse, int row_threads) {            \
    fastflow::coupling::additive_fwd<T>(x, xs0, xs1, xs2, t, ts0, ts1, ts2, out, B, M, N, inverse, row_threads);    \
  }

FF_COUPLING_ENTRY_POINTS(f32, float)
FF_COUPLING_ENTRY_POINTS(f16, fastflow::f16)
FF_COUPLING_ENTRY_POINTS(bf16, fastflow::bf16)

