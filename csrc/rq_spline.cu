// rq_spline.cu: rational-quadratic spline with linear tails (Durkan et al., "Neural Spline
// Flows", NeurIPS 2019): fused forward/inverse and fused backward.
//
// The same maths as fastflow/kernels/triton/spline.py (and the float64 numba kernels), element
// for element: softmax widths/heights with a floor, knots by cumulative sum (ends pinned to
// +-bound), interior slopes min_derivative + softplus, boundary slopes 1, identity outside.
//
// One thread per element, float32 arithmetic, float32/float16/bfloat16 storage. Nothing of
// size K is kept per thread: a row's softmax is recomputed in each pass over it (max, sum,
// then a cumulative pass that finds the bin), so any K up to the op's limit runs without local
// memory. Rows are contiguous: x (n,), uw/uh (n, K), ud (n, K-1); all indices are 64-bit.
//
// Entry points (extern "C", S in f32/f16/bf16):
//   rq_spline_fwd_S(x, uw, uh, ud, out, lad, n, K, bound, mbw, mbh, md, inverse)
//   rq_spline_bwd_S(g_out, g_lad, x, uw, uh, ud, g_x, g_uw, g_uh, g_ud, n, K, bound, mbw, mbh, md, inverse)

#include "fastflow.cuh"

namespace fastflow {
namespace spline {

// softmax statistics of one row: p_j = exp(u_j - m) / tot.
struct Softmax {
  float m;
  float tot;
};

template <typename T>
FF_HD Softmax row_softmax(const T* u, int K) {
  float m = load(u, 0);
  for (int j = 1; j < K; ++j) m = fmaxf(m, load(u, j));
  float tot = 0.0f;
  for (int j = 0; j < K; ++j) tot += expf(load(u, j) - m);
  return {m, tot};
}

// A bin of one axis: its index, left and right knots, and the softmax mass before it
// (sum_{j<idx} p_j) and through it (sum_{j<=idx} p_j), which the backward needs.
struct Bin {
  int idx;
  float lo, hi;
  float plo, phi;
};

// Walk the knots of one axis. With want < 0, find the bin of v: the number of interior knots
// <= v (a value on a knot takes the bin to its right; the upper bound takes the last bin).
// Knots are non-decreasing, so that count is where the walk first sees a knot above v. With
// want >= 0, stop at bin `want` (the other axis's bin). Bin j spans [right_{j-1}, right_j]
// with right_{-1} = -bound and right_{K-1} = bound: each knot is computed once and shared by
// the two bins beside it, so no value falls between bins.
template <typename T>
FF_HD Bin walk(const T* u, int K, Softmax sm, float bound, float min_size, float v, int want) {
  const float scale = 1.0f - min_size * K;
  float cum = 0.0f, psum = 0.0f, left = -bound;
  for (int j = 0; j < K; ++j) {
    const float p = expf(load(u, j) - sm.m) / sm.tot;
    cum += min_size + scale * p;
    const float right = (j == K - 1) ? bound : 2.0f * bound * cum - bound;
    const bool stop = want >= 0 ? (j == want) : (j == K - 1 || !(v >= right));
    if (stop) return {j, left, right, psum, psum + p};
    psum += p;
    left = right;
  }
  return {K - 1, left, bound, psum, psum};  // not reached: j == K - 1 always stops
}

// Everything both directions need about one inside element.
struct Local {
  Softmax sw, sh;
  Bin bw, bh;
  float xk, wk, yk, hk, s, dk, dk1, zl, zh, theta;
  bool lm, hm;  // the bin has an interior knot on its left / right (its slope is learned)
};

template <typename T>
FF_HD Local locate(const T* rw, const T* rh, const T* rd, int K, float v, bool inverse,
                                        float bound, float mbw, float mbh, float md) {
  Local L;
  L.sw = row_softmax(rw, K);
  L.sh = row_softmax(rh, K);
  if (inverse) {
    L.bh = walk(rh, K, L.sh, bound, mbh, v, -1);
    L.bw = walk(rw, K, L.sw, bound, mbw, v, L.bh.idx);
  } else {
    L.bw = walk(rw, K, L.sw, bound, mbw, v, -1);
    L.bh = walk(rh, K, L.sh, bound, mbh, v, L.bw.idx);
  }
  const int idx = L.bw.idx;
  L.xk = L.bw.lo;
  L.wk = L.bw.hi - L.bw.lo;
  L.yk = L.bh.lo;
  L.hk = L.bh.hi - L.bh.lo;
  L.s = L.hk / L.wk;
  L.lm = idx >= 1;
  L.hm = idx + 1 <= K - 1;
  L.zl = L.lm ? load(rd, idx - 1) : 0.0f;
  L.zh = L.hm ? load(rd, idx) : 0.0f;
  L.dk = L.lm ? md + softplus(L.zl) : 1.0f;
  L.dk1 = L.hm ? md + softplus(L.zh) : 1.0f;
  if (inverse) {
    // Root in [0, 1] of the bin's quadratic in the cancellation-free form 2c / (-b - sqrt(D));
    // a discriminant rounded below zero is clamped to 0, and the root to the bin (the map is
    // only monotone on [0, 1]) -- float32 arithmetic needs both.
    const float dy = v - L.yk;
    const float sum_d = L.dk + L.dk1 - 2.0f * L.s;
    const float qa = L.hk * (L.s - L.dk) + dy * sum_d;
    const float qb = L.hk * L.dk - dy * sum_d;
    const float qc = -L.s * dy;
    const float disc = fmaxf(qb * qb - 4.0f * qa * qc, 0.0f);
    L.theta = fminf(fmaxf((2.0f * qc) / (-qb - sqrtf(disc)), 0.0f), 1.0f);
  } else {
    L.theta = (v - L.xk) / L.wk;
  }
  return L;
}

// Element i of the forward (inverse when `inverse`); the kernels below loop it grid-stride.
template <typename T>
FF_HD void fwd_elem(i64 i, const T* __restrict__ x, const T* __restrict__ uw, const T* __restrict__ uh,
                    const T* __restrict__ ud, T* __restrict__ out, T* __restrict__ lad, i64 K64, float bound,
                    float mbw, float mbh, float md, int inverse) {
  const int K = static_cast<int>(K64);
  const float v = load(x, i);
  if (!(v >= -bound && v <= bound)) {  // linear tails; NaN lands here and stays NaN in both
    store(out, i, v);
    store(lad, i, v != v ? v : 0.0f);
    return;
  }
  const Local L = locate(uw + i * K64, uh + i * K64, ud + i * (K64 - 1), K, v, inverse != 0, bound, mbw, mbh, md);
  const float th = L.theta;
  const float t = th * (1.0f - th);
  const float den = L.s + (L.dk + L.dk1 - 2.0f * L.s) * t;
  const float num = L.s * L.s * (L.dk1 * th * th + 2.0f * L.s * t + L.dk * (1.0f - th) * (1.0f - th));
  const float ld = logf(num) - 2.0f * logf(den);
  if (inverse) {
    store(out, i, L.xk + th * L.wk);
    store(lad, i, -ld);
  } else {
    store(out, i, L.yk + L.hk * (L.s * th * th + L.dk * t) / den);
    store(lad, i, ld);
  }
}

// d/d(raw sizes) of knot-position gradients g_lo (knot idx) and g_hi (knot idx+1), written to
// g[0..K). Knot j (0 < j < K) is 2*bound*sum_{i<j} size_i - bound with size = min_size +
// (1 - min_size*K) * softmax(u); the end knots are constants. Through the softmax:
// g_j = p_j * (gp_j - sum_i p_i gp_i) with gp_j = glo*[j < idx] + ghi*[j <= idx].
template <typename T>
FF_HD void knot_grads(const T* u, T* g, int K, Softmax sm, const Bin& b, float g_lo, float g_hi,
                                           float bound, float min_size) {
  const float scale = 2.0f * bound * (1.0f - min_size * K);
  const float glo = b.idx >= 1 ? g_lo * scale : 0.0f;
  const float ghi = b.idx + 1 <= K - 1 ? g_hi * scale : 0.0f;
  const float dot = glo * b.plo + ghi * b.phi;
  for (int j = 0; j < K; ++j) {
    const float p = expf(load(u, j) - sm.m) / sm.tot;
    const float gp = (j < b.idx ? glo : 0.0f) + (j <= b.idx ? ghi : 0.0f);
    store(g, j, p * (gp - dot));
  }
}

// Element i of the fused backward: gradients of x and of row i of uw, uh, ud.
template <typename T>
FF_HD void bwd_elem(i64 i, const T* __restrict__ g_out, const T* __restrict__ g_lad, const T* __restrict__ x,
                    const T* __restrict__ uw, const T* __restrict__ uh, const T* __restrict__ ud,
                    T* __restrict__ g_x, T* __restrict__ g_uw, T* __restrict__ g_uh, T* __restrict__ g_ud, i64 K64,
                    float bound, float mbw, float mbh, float md, int inverse) {
  const int K = static_cast<int>(K64);
  const float v = load(x, i);
  const float go = load(g_out, i);
  const float gl = load(g_lad, i);
  T* guw = g_uw + i * K64;
  T* guh = g_uh + i * K64;
  T* gud = g_ud + i * (K64 - 1);
  if (!(v >= -bound && v <= bound)) {  // identity: the parameters get nothing
    store(g_x, i, go);
    for (int j = 0; j < K; ++j) {
      store(guw, j, 0.0f);
      store(guh, j, 0.0f);
    }
    for (int j = 0; j < K - 1; ++j) store(gud, j, 0.0f);
    return;
  }
  const T* rw = uw + i * K64;
  const T* rh = uh + i * K64;
  const Local L = locate(rw, rh, ud + i * (K64 - 1), K, v, inverse != 0, bound, mbw, mbh, md);
  const float th = L.theta, s = L.s, hk = L.hk, wk = L.wk, dk = L.dk, dk1 = L.dk1;
  // Partials of y = yk + hk*N/den and lad = log(s^2 M) - 2 log(den) in the local variables
  // (theta, s, hk, yk, dk, dk1), holding the others fixed.
  const float tt = th * (1.0f - th);
  const float omt = 1.0f - th;
  const float om2 = 1.0f - 2.0f * th;
  const float sd = dk + dk1 - 2.0f * s;
  const float den = s + sd * tt;
  const float nn = s * th * th + dk * tt;
  const float mm = dk1 * th * th + 2.0f * s * tt + dk * omt * omt;
  const float iden = 1.0f / den;
  const float iden2 = iden * iden;
  const float im = 1.0f / mm;
  const float dy_dth = hk * ((2.0f * s * th + dk * om2) * den - nn * sd * om2) * iden2;
  const float dy_ds = hk * (th * th * den - nn * (1.0f - 2.0f * tt)) * iden2;
  const float dy_dhk = nn * iden;
  const float dy_ddk = hk * tt * (den - nn) * iden2;
  const float dy_ddk1 = -hk * nn * tt * iden2;
  const float dl_dth = (2.0f * dk1 * th + 2.0f * s * om2 - 2.0f * dk * omt) * im - 2.0f * sd * om2 * iden;
  const float dl_ds = 2.0f / s + 2.0f * tt * im - 2.0f * (1.0f - 2.0f * tt) * iden;
  const float dl_ddk = omt * omt * im - 2.0f * tt * iden;
  const float dl_ddk1 = th * th * im - 2.0f * tt * iden;
  float a, b, gx;
  if (inverse) {
    // Implicit function theorem: dx/dy = 1/f', dx/dp = -(df/dp)/f'; the log-det is -lad.
    gx = (go - gl * dl_dth / wk) * wk / dy_dth;
    a = -gx;
    b = -gl;
  } else {
    a = go;
    b = gl;
    gx = (a * dy_dth + b * dl_dth) / wk;
  }
  store(g_x, i, gx);
  const float g_th = a * dy_dth + b * dl_dth;
  const float g_s = a * dy_ds + b * dl_ds;
  // theta = (x - xk)/wk and s = hk/wk; xk, wk, yk, hk come from the knots.
  const float g_wk = -(g_th * th + g_s * s) / wk;
  const float g_hk = a * dy_dhk + g_s / wk;
  knot_grads(rw, guw, K, L.sw, L.bw, -g_th / wk - g_wk, g_wk, bound, mbw);
  knot_grads(rh, guh, K, L.sh, L.bh, a - g_hk, g_hk, bound, mbh);
  const float g_dk = L.lm ? (a * dy_ddk + b * dl_ddk) * sigmoid(L.zl) : 0.0f;
  const float g_dk1 = L.hm ? (a * dy_ddk1 + b * dl_ddk1) * sigmoid(L.zh) : 0.0f;
  const int idx = L.bw.idx;
  for (int j = 0; j < K - 1; ++j) store(gud, j, j == idx - 1 ? g_dk : (j == idx ? g_dk1 : 0.0f));
}

}  // namespace spline
}  // namespace fastflow

#define FF_RQ_SPLINE_ENTRY_POINTS(S, T)                                                                           \
  extern "C" __global__ void __launch_bounds__(FF_BLOCK)                                                          \
      rq_spline_fwd_##S(const T* x, const T* uw, const T* uh, const T* ud, T* out, T* lad, fastflow::i64 n,       \
                        fastflow::i64 K, float bound, float mbw, float mbh, float md, int inverse) {              \
    FF_GRID_STRIDE(i, n) fastflow::spline::fwd_elem<T>(i, x, uw, uh, ud, out, lad, K, bound, mbw, mbh, md, inverse); \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(FF_BLOCK)                                                          \
      rq_spline_bwd_##S(const T* g_out, const T* g_lad, const T* x, const T* uw, const T* uh, const T* ud,        \
                        T* g_x, T* g_uw, T* g_uh, T* g_ud, fastflow::i64 n, fastflow::i64 K, float bound,         \
                        float mbw, float mbh, float md, int inverse) {                                           \
    FF_GRID_STRIDE(i, n)                                                                                          \
    fastflow::spline::bwd_elem<T>(i, g_out, g_lad, x, uw, uh, ud, g_x, g_uw, g_uh, g_ud, K, bound, mbw, mbh, md,  \
                                  inverse);                                                                       \
  }

FF_RQ_SPLINE_ENTRY_POINTS(f32, float)
FF_RQ_SPLINE_ENTRY_POINTS(f16, fastflow::f16)
FF_RQ_SPLINE_ENTRY_POINTS(bf16, fastflow::bf16)
