// bf16-weight x bf16-activation GEMM for few rows (the target's verification pass: M = K+1 tokens),
// y = x @ W.T + bias, with W the layer's own [N, K] bf16 weight (no repacking, no extra memory).
// AVX2 + FMA; included in the avx2 namespace of mxfp4_cpu.cpp.
//
// Why: on CPUs without AVX-512 BF16, vLLM's oneDNN declines bf16 and falls back to torch, whose bf16
// GEMM costs about 6x as much at M=8 as at M=1. Here a weight vector is loaded and widened to fp32
// once per tile of up to 4 activation rows, so M=8 costs about one weight read plus 8 FMAs per element.
//
// Batch invariance: y[m, n] is the same fp32 sum in the same order whatever M and the tiling are
// (8 lanes over k in steps of 8, a fixed lane reduction, the scalar k tail, then bias, one bf16
// rounding), so a token's logits do not depend on how many tokens share its pass.

#ifndef SPECQD_BF16_NB
#define SPECQD_BF16_NB 2
#endif

namespace bf16 {

static inline __m256 widen8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

#ifndef SPECQD_BF16_PREFETCH_ROWS
#define SPECQD_BF16_PREFETCH_ROWS 8
#endif
// As in gemm_body.h: the hardware prefetcher alone leaves DRAM idle, so fetch rows ahead, one line
// (32 bf16) per row per step; reading past the last row only prefetches (never faults).
constexpr int64_t kBf16PrefetchRows = SPECQD_BF16_PREFETCH_ROWS;

// Rows [m0, m0 + MB) x features [n0, n0 + NB); x is fp32 [M, k] (widened once per call).
template <int MB, int NB>
static inline void tile(const float* x, const c10::BFloat16* w, int64_t k, int64_t m0, int64_t n0,
                        const OutputRows& out) {
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t k8 = k / 8 * 8;
  for (int64_t kk = 0; kk < k8; kk += 8) {
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) {
      const c10::BFloat16* wr = w + (n0 + j) * k + kk;
      if ((kk & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + kBf16PrefetchRows * k), _MM_HINT_T0);
      wv[j] = widen8(wr);
    }
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + (m0 + i) * k + kk);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < NB; ++j) {
      float v = hsum(acc[i][j]);  // vec_avx2.h
      const c10::BFloat16* wr = w + (n0 + j) * k;
      const float* xr = x + (m0 + i) * k;
      for (int64_t kk = k8; kk < k; ++kk) v = std::fmaf(xr[kk], static_cast<float>(wr[kk]), v);
      out.store(m0 + i, n0 + j, v);
    }
  }
}

// Features [n_begin, n_end) for all m rows: 4-row activation tiles reuse each widened weight vector.
template <int NB>
static void rows_for_features(const float* x, const c10::BFloat16* w, int64_t m, int64_t k, int64_t n_begin,
                              int64_t n_end, const OutputRows& out) {
  for (int64_t n = n_begin; n < n_end; n += NB) {
    if (n + NB > n_end) {  // feature tail: one at a time
      for (int64_t t = n; t < n_end; ++t) rows_for_features<1>(x, w, m, k, t, t + 1, out);
      return;
    }
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) tile<4, NB>(x, w, k, i, n, out);
    switch (m - i) {
      case 3:
        tile<3, NB>(x, w, k, i, n, out);
        break;
      case 2:
        tile<2, NB>(x, w, k, i, n, out);
        break;
      case 1:
        tile<1, NB>(x, w, k, i, n, out);
        break;
      default:
        break;
    }
  }
}

static void gemm(const float* x, const c10::BFloat16* w, int64_t m, int64_t k, int64_t n_begin, int64_t n_end,
                 const OutputRows& out) {
  rows_for_features<SPECQD_BF16_NB>(x, w, m, k, n_begin, n_end, out);
}

}  // namespace bf16
