// The MXFP4 x dynamic-int-activation GEMM, written once over a vector layer (vec_avx2.h or
// vec_avx512.h) that defines G, VI, VF and a dozen primitives. mxfp4_cpu.cpp includes this file
// once per ISA, inside that ISA's `#pragma GCC target` region and namespace.
//
// Weights are the canonical MXFP4 bytes (docs/CONTRACTS.md): row n, block b is 16 bytes whose low
// nibbles are elements 0,2,..,30 and high nibbles 1,3,..,31. One vector load takes G consecutive
// blocks of a row; masking and shifting give the even and the odd elements, and a 16-entry byte
// table (PSHUFB) turns codes into small integers: 2 * E2M1 + 12 in 0..24 for the int8 path (unsigned,
// as VPMADDUBSW / VPDPBUSD want), 2 * E2M1 in -12..12 for the int16 path.
//
// Activations are quantized per 32-element block, symmetrically, to int8 (qmax 127) or int16
// (qmax 32767), and stored in the matching order (QuantizedRows): evens then odds of each group.
// With the +12 offset the int8 dot is sum((w + 12) x) = sum(w x) + 12 sum(x); the 12 sum(x) term
// depends only on the activation block, so it is precomputed once per call (`offsets`).
// A block's integer dot is exact in int32; it turns into fp32 once, times sw * sx.

struct QuantizedRows {
  int64_t groups;      // G-block groups per row (tail padded with zero blocks)
  const int8_t* q8;    // [M][groups][2][16G]   int8 path
  const int16_t* q16;  // [M][groups][4][8G]    int16 path
  const int32_t* offsets;  // [M][groups][4G]   12 * sum(q) of block j in lane 4j, int8 path
  const float* scales;     // [M][groups][4G]   activation scale / 2 of block j in lanes 4j..4j+3
};

constexpr int LANES = 4 * G;  // int32 / fp32 lanes per vector
#ifndef SPECQD_PREFETCH_ROWS
#define SPECQD_PREFETCH_ROWS 16
#endif
// The hardware prefetcher alone leaves DRAM half idle here: fetch the rows a few tiles ahead.
// Reading past the last row only prefetches (never faults).
constexpr int64_t kPrefetchRows = SPECQD_PREFETCH_ROWS;

static const int8_t kCodeToU8[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
static const int8_t kCodeToS8[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// One row of activations, x[0..k), into int8 or int16 blocks in kernel order.
template <typename T>
static void quantize_row(const T* x, int64_t k, int64_t groups, int bits, int8_t* q8, int16_t* q16, int32_t* offsets,
                         float* scales) {
  const float qmax = bits == 8 ? 127.0f : 32767.0f;
  for (int64_t g = 0; g < groups; ++g) {
    for (int j = 0; j < G; ++j) {
      const int64_t base = (g * G + j) * 32;
      float v[32];
      for (int i = 0; i < 32; ++i) v[i] = base + i < k ? static_cast<float>(x[base + i]) : 0.0f;
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
      // Same fp32 operations as the torch twin (reference.py): inv = qmax / amax, q = rint(x * inv).
      const float inv = amax > 0.0f ? qmax / amax : 0.0f;
      int32_t q[32];
      int32_t sum = 0;
      for (int i = 0; i < 32; ++i) {
        q[i] = static_cast<int32_t>(__builtin_rintf(v[i] * inv));
        sum += q[i];
      }
      const float scale = amax > 0.0f ? amax / qmax * 0.5f : 0.0f;  // 0.5: the tables hold 2 * E2M1
      for (int l = 0; l < 4; ++l) scales[(g * G + j) * 4 + l] = scale;
      if (bits == 8) {
        int8_t* even = q8 + g * 32 * G + j * 16;
        int8_t* odd = even + 16 * G;
        for (int i = 0; i < 16; ++i) {
          even[i] = static_cast<int8_t>(q[2 * i]);
          odd[i] = static_cast<int8_t>(q[2 * i + 1]);
        }
        int32_t* off = offsets + (g * G + j) * 4;
        off[0] = 12 * sum;
        off[1] = off[2] = off[3] = 0;
      } else {
        int16_t* vecs = q16 + g * 32 * G;  // 4 vectors of 8G: evens 0-7, evens 8-15, odds 0-7, odds 8-15
        for (int i = 0; i < 8; ++i) {
          vecs[0 * 8 * G + j * 8 + i] = static_cast<int16_t>(q[2 * i]);
          vecs[1 * 8 * G + j * 8 + i] = static_cast<int16_t>(q[2 * (i + 8)]);
          vecs[2 * 8 * G + j * 8 + i] = static_cast<int16_t>(q[2 * i + 1]);
          vecs[3 * 8 * G + j * 8 + i] = static_cast<int16_t>(q[2 * (i + 8) + 1]);
        }
      }
    }
  }
}

// R weight rows x MB activation rows, int8 activations. `w`/`s` point at row 0 of the tile;
// `full` groups are read in place, then `tail_w`/`tail_s` (zero-padded copies) if has_tail.
template <int R, int MB>
static void tile_i8(const uint8_t* w, const uint8_t* s, int64_t w_stride, int64_t s_stride, int64_t full, bool has_tail,
                    const uint8_t* tail_w, const uint8_t* tail_s, const QuantizedRows& xq, int64_t m0, int64_t n0,
                    const OutputRows& out) {
  const VI table = broadcast_table(kCodeToU8);
  VF acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = zero_f();
  const int64_t total = full + (has_tail ? 1 : 0);
  for (int64_t g = 0; g < total; ++g) {
    const bool tail = g == full;
    for (int r = 0; r < R; ++r) {
      const uint8_t* wp = tail ? tail_w + r * 16 * G : w + r * w_stride + g * 16 * G;
      const uint8_t* sp = tail ? tail_s + r * G : s + r * s_stride + g * G;
      _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchRows * w_stride), _MM_HINT_T0);
      const VI v = load_i(wp);
      const VI even = lookup(table, low_nibbles(v));
      const VI odd = lookup(table, high_nibbles(v));
      const VF sw = block_scales(sp);
      for (int i = 0; i < MB; ++i) {
        const int64_t at = (m0 + i) * xq.groups + g;
        const VI dot = sub_i32(dot_u8s8(even, odd, xq.q8 + at * 32 * G), load_i(xq.offsets + at * LANES));
        acc[r][i] = fmadd(to_float(dot), mul(sw, load_f(xq.scales + at * LANES)), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) out.store(m0 + i, n0 + r, hsum(acc[r][i]));
}

// Same with int16 activations: 2 * E2M1 widened to int16, VPMADDWD / VPDPWSSD.
template <int R, int MB>
static void tile_i16(const uint8_t* w, const uint8_t* s, int64_t w_stride, int64_t s_stride, int64_t full,
                     bool has_tail, const uint8_t* tail_w, const uint8_t* tail_s, const QuantizedRows& xq, int64_t m0,
                     int64_t n0, const OutputRows& out) {
  const VI table = broadcast_table(kCodeToS8);
  VF acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = zero_f();
  const int64_t total = full + (has_tail ? 1 : 0);
  for (int64_t g = 0; g < total; ++g) {
    const bool tail = g == full;
    for (int r = 0; r < R; ++r) {
      const uint8_t* wp = tail ? tail_w + r * 16 * G : w + r * w_stride + g * 16 * G;
      const uint8_t* sp = tail ? tail_s + r * G : s + r * s_stride + g * G;
      _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchRows * w_stride), _MM_HINT_T0);
      const VI v = load_i(wp);
      VI w16[4];
      widen_s8(lookup(table, low_nibbles(v)), w16[0], w16[1]);
      widen_s8(lookup(table, high_nibbles(v)), w16[2], w16[3]);
      const VF sw = block_scales(sp);
      for (int i = 0; i < MB; ++i) {
        const int64_t at = (m0 + i) * xq.groups + g;
        const VI dot = dot_s16(w16, xq.q16 + at * 32 * G);
        acc[r][i] = fmadd(to_float(dot), mul(sw, load_f(xq.scales + at * LANES)), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MB; ++i) out.store(m0 + i, n0 + r, hsum(acc[r][i]));
}

template <int R, int MB>
static void run_tile(int bits, const uint8_t* w, const uint8_t* s, int64_t w_stride, int64_t s_stride, int64_t full,
                     bool has_tail, const uint8_t* tail_w, const uint8_t* tail_s, const QuantizedRows& xq, int64_t m0,
                     int64_t n0, const OutputRows& out) {
  if (bits == 8)
    tile_i8<R, MB>(w, s, w_stride, s_stride, full, has_tail, tail_w, tail_s, xq, m0, n0, out);
  else
    tile_i16<R, MB>(w, s, w_stride, s_stride, full, has_tail, tail_w, tail_s, xq, m0, n0, out);
}

// The last `rest` (< kTileRowsMax) activation rows, as one tile of exactly that many.
template <int R, int MB>
static void run_rest(int rest, int bits, const uint8_t* w, const uint8_t* s, int64_t w_stride, int64_t s_stride,
                     int64_t full, bool has_tail, const uint8_t* tail_w, const uint8_t* tail_s, const QuantizedRows& xq,
                     int64_t m0, int64_t n0, const OutputRows& out) {
  if constexpr (MB >= 1) {
    if (rest == MB)
      return run_tile<R, MB>(bits, w, s, w_stride, s_stride, full, has_tail, tail_w, tail_s, xq, m0, n0, out);
    return run_rest<R, MB - 1>(rest, bits, w, s, w_stride, s_stride, full, has_tail, tail_w, tail_s, xq, m0, n0, out);
  }
}

// All M activation rows against weight rows [n0, n0 + R).
template <int R>
static void rows_all_m(int bits, const uint8_t* packed, const uint8_t* scales, int64_t w_stride, int64_t nblocks,
                       int64_t n0, const QuantizedRows& xq, int64_t m, const OutputRows& out) {
  const int64_t full = nblocks / G;
  const int64_t tail_blocks = nblocks % G;
  alignas(64) uint8_t tail_w[R * 16 * G];
  alignas(64) uint8_t tail_s[R * G];
  if (tail_blocks) {
    std::memset(tail_w, 0, sizeof(tail_w));
    std::memset(tail_s, 0, sizeof(tail_s));
    for (int r = 0; r < R; ++r) {
      std::memcpy(tail_w + r * 16 * G, packed + (n0 + r) * w_stride + full * 16 * G, tail_blocks * 16);
      std::memcpy(tail_s + r * G, scales + (n0 + r) * nblocks + full * G, tail_blocks);
    }
  }
  const uint8_t* w = packed + n0 * w_stride;
  const uint8_t* s = scales + n0 * nblocks;
  const bool has_tail = tail_blocks != 0;
  int64_t m0 = 0;
  for (; m0 + kTileRowsMax <= m; m0 += kTileRowsMax)
    run_tile<R, kTileRowsMax>(bits, w, s, w_stride, nblocks, full, has_tail, tail_w, tail_s, xq, m0, n0, out);
  if (m > m0) run_rest<R, kTileRowsMax - 1>(static_cast<int>(m - m0), bits, w, s, w_stride, nblocks, full, has_tail,
                                            tail_w, tail_s, xq, m0, n0, out);
}

// Entry point of this ISA: rows [n_begin, n_end) of every output row m.
static void gemm_rows(int bits, const uint8_t* packed, const uint8_t* scales, int64_t nblocks, int64_t n_begin,
                      int64_t n_end, const QuantizedRows& xq, int64_t m, const OutputRows& out) {
  const int64_t w_stride = nblocks * 16;
  int64_t n = n_begin;
  // One weight row per tile and up to 4 activation rows per pass over it measured fastest on Zen 3
  // (AVX2) for M = 1..16, except int16 at M = 1 where two rows hide the widening's latency.
  if (bits == 16 && m == 1)
    for (; n + 2 <= n_end; n += 2) rows_all_m<2>(bits, packed, scales, w_stride, nblocks, n, xq, m, out);
  for (; n < n_end; ++n) rows_all_m<1>(bits, packed, scales, w_stride, nblocks, n, xq, m, out);
}

static int64_t groups_for(int64_t nblocks) { return (nblocks + G - 1) / G; }

template <typename T>
static void quantize_rows(const T* x, int64_t m, int64_t k, int64_t groups, int bits, int8_t* q8, int16_t* q16,
                          int32_t* offsets, float* scales) {
  for (int64_t i = 0; i < m; ++i)
    quantize_row<T>(x + i * k, k, groups, bits, q8 ? q8 + i * groups * 32 * G : nullptr,
                    q16 ? q16 + i * groups * 32 * G : nullptr, offsets ? offsets + i * groups * LANES : nullptr,
                    scales + i * groups * LANES);
}
