// MXFP4 x int8 activations for CPUs without AMX: every weight block is decoded once per call and
// reused by every activation row, so the cost grows with the rows only by the per-row multiply work.
//
// mxfp4_cpu.cpp includes this file once per ISA inside that ISA's `#pragma GCC target` region and
// namespace, with SPECQD_MR_BITS 512 (AVX-512, X512 intrinsics: native or SIMDe) or 256 (AVX2) and
// SPECQD_VNNI 0/1. The weight layout is the same for every ISA (repack below, done once at load):
//
//   codes [N_pad/16][K_pad/32][256]: per tile of 16 output features and 32-element block, 4 chunks
//         of 64 bytes; chunk c byte 4f+i holds feature f's code of element 8c+i in its low nibble
//         and of element 8c+4+i in its high nibble.
//   scales [N_pad/16][K_pad/32][16]: the 16 features' E8M0 bytes of that block.
//
// So a 64-byte load, `& 0x0F` / `>> 4 & 0x0F` and a PSHUFB table give two vectors of u8 weights
// 2 * E2M1 + 12 (0..24) in "feature-major VNNI-4" order: dword lane f = 4 consecutive k of feature
// f. Per activation row, VPDPBUSD with the row's 4 int8 bytes broadcast accumulates 16 features x 4
// k at once, 8 instructions per block (AVX-512 BW / AVX2: VPMADDUBSW, int16 sums of 4, VPMADDWD).
// The AVX2 path reads each 64-byte chunk as two 32-byte halves of 8 features.
//
// Numerics, identical on every ISA and for every M, tiling and row position (batch invariance):
//   dot   = sum_k q_k (w_k + 12) - 12 sum_k q_k = sum_k q_k w_k        exact in int32 (|dot| <= 48768)
//   acc   = fma(fl(float(dot) * sx), sw, acc), blocks in order, acc0 = 0   sx = amax/127/2, sw = 2^(e-127)
//   y     = fl(acc + bias), rounded once to y's dtype
// where q = rint(x * 127 / amax) per 32-block of the row. E8M0 byte 0 reads as 0 and 255 as inf (the
// exponent-field trick, as in gemm_body.h). Twin: reference.mxfp4_matmul_multirow_torch (bit-exact).

namespace mr {

constexpr int kTile = 16;  // output features per tile
constexpr int kBlock = 32;
constexpr int kTileCodes = 256;  // code bytes per tile and block
// 2 * E2M1 + 12: unsigned, as VPDPBUSD / VPMADDUBSW want their first operand.
static const int8_t kCodeToU8[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

#if SPECQD_MR_BITS == 512
constexpr int kLanes = 16;
using MI = T512i;
using MF = T512;
static inline MI mi_load(const void* p) { return X512(loadu_si512)(p); }
static inline MI mi_zero() { return X512(setzero_si512)(); }
static inline MI mi_set1_32(int32_t v) { return X512(set1_epi32)(v); }
static inline MI mi_set1_16(int16_t v) { return X512(set1_epi16)(v); }
static inline MI mi_set1_8(int8_t v) { return X512(set1_epi8)(v); }
static inline MI mi_table(const int8_t* t16) {
  return X512(broadcast_i32x4)(X128(loadu_si128)(reinterpret_cast<const T128i*>(t16)));
}
static inline MI mi_and(MI a, MI b) { return X512(and_si512)(a, b); }
static inline MI mi_srl4(MI a) { return X512(srli_epi16)(a, 4); }
static inline MI mi_shuffle(MI table, MI idx) { return X512(shuffle_epi8)(table, idx); }
static inline MI mi_add32(MI a, MI b) { return X512(add_epi32)(a, b); }
static inline MI mi_add16(MI a, MI b) { return X512(add_epi16)(a, b); }
static inline MI mi_maddubs(MI u8, MI s8) { return X512(maddubs_epi16)(u8, s8); }
static inline MI mi_madd16(MI a, MI b) { return X512(madd_epi16)(a, b); }
#if SPECQD_VNNI
static inline MI mi_dpbusd(MI acc, MI u8, MI s8) { return X512(dpbusd_epi32)(acc, u8, s8); }
#endif
static inline MF mf_zero() { return X512(setzero_ps)(); }
static inline MF mf_set1(float v) { return X512(set1_ps)(v); }
static inline MF mf_cvt(MI v) { return X512(cvtepi32_ps)(v); }
static inline MF mf_mul(MF a, MF b) { return X512(mul_ps)(a, b); }
static inline MF mf_fmadd(MF a, MF b, MF c) { return X512(fmadd_ps)(a, b, c); }
static inline void mf_store(float* p, MF v) { X512(storeu_ps)(p, v); }
// kLanes E8M0 bytes -> 2^(byte - 127) as fp32 (byte 0 -> 0, 255 -> inf).
static inline MF mf_scales(const uint8_t* s) {
  return X512(castsi512_ps)(X512(slli_epi32)(X512(cvtepu8_epi32)(X128(loadu_si128)(reinterpret_cast<const T128i*>(s))), 23));
}
#else
constexpr int kLanes = 8;
using MI = __m256i;
using MF = __m256;
static inline MI mi_load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
static inline MI mi_zero() { return _mm256_setzero_si256(); }
static inline MI mi_set1_32(int32_t v) { return _mm256_set1_epi32(v); }
static inline MI mi_set1_16(int16_t v) { return _mm256_set1_epi16(v); }
static inline MI mi_set1_8(int8_t v) { return _mm256_set1_epi8(v); }
static inline MI mi_table(const int8_t* t16) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t16)));
}
static inline MI mi_and(MI a, MI b) { return _mm256_and_si256(a, b); }
static inline MI mi_srl4(MI a) { return _mm256_srli_epi16(a, 4); }
static inline MI mi_shuffle(MI table, MI idx) { return _mm256_shuffle_epi8(table, idx); }
static inline MI mi_add32(MI a, MI b) { return _mm256_add_epi32(a, b); }
static inline MI mi_add16(MI a, MI b) { return _mm256_add_epi16(a, b); }
static inline MI mi_maddubs(MI u8, MI s8) { return _mm256_maddubs_epi16(u8, s8); }
static inline MI mi_madd16(MI a, MI b) { return _mm256_madd_epi16(a, b); }
static inline MF mf_zero() { return _mm256_setzero_ps(); }
static inline MF mf_set1(float v) { return _mm256_set1_ps(v); }
static inline MF mf_cvt(MI v) { return _mm256_cvtepi32_ps(v); }
static inline MF mf_mul(MF a, MF b) { return _mm256_mul_ps(a, b); }
static inline MF mf_fmadd(MF a, MF b, MF c) { return _mm256_fmadd_ps(a, b, c); }
static inline void mf_store(float* p, MF v) { _mm256_storeu_ps(p, v); }
static inline MF mf_scales(const uint8_t* s) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))), 23));
}
#endif
constexpr int kHalves = kTile / kLanes;  // vectors per tile: 1 (AVX-512) or 2 (AVX2)
#ifndef SPECQD_MR_GROUPS
#define SPECQD_MR_GROUPS 0
#endif
// Weight vectors of a block decoded at once: all 8 with 32 zmm registers, 4 at a time with 16 ymm
// (on Zen 4 the same speed as 8 at a time, with fewer spills).
constexpr int kGroups = SPECQD_MR_GROUPS ? SPECQD_MR_GROUPS : (kLanes == 16 ? 1 : 2);

#ifndef SPECQD_MR_ROWS
#define SPECQD_MR_ROWS 0
#endif
// Activation rows per pass over a tile: every block is decoded once per pass. Measured on Zen 4:
// 16 on AVX-512 (M=16 about 10% faster than two passes of 8), 4 on AVX2 (2 and 3: slower).
constexpr int kRowsMax = SPECQD_MR_ROWS ? SPECQD_MR_ROWS : (kLanes == 16 ? 16 : 4);
#ifndef SPECQD_MR_PREFETCH
#define SPECQD_MR_PREFETCH 2048
#endif
// Software prefetch distance along a tile's code stream, in bytes (8 blocks; 1024 measured the same
// on Zen 4, 4096 slower); past the end of a tile it fetches the next one, and never faults.
constexpr int64_t kPrefetchBytes = SPECQD_MR_PREFETCH;

using QuantRows = MultirowRows;  // mxfp4_cpu.cpp

// init + sum_k q_k (w_k + 12) over 16 elements of a block: 4 weight vectors w[j] (k = 4j..4j+3 of
// the 16 per dword lane) against the row's 16 int8 activations xk.
static inline MI dot16(const MI* w, const int8_t* xk, MI init) {
  MI x[4];
  for (int j = 0; j < 4; ++j) {
    int32_t four;
    std::memcpy(&four, xk + 4 * j, 4);
    x[j] = mi_set1_32(four);
  }
#if SPECQD_VNNI
  for (int j = 0; j < 4; ++j) init = mi_dpbusd(init, w[j], x[j]);
  return init;
#else
  // A VPMADDUBSW pair sum is at most 2 * 24 * 127 = 6096 in magnitude, so four of them (24384)
  // add up in int16 without overflow; VPMADDWD by ones then widens to int32.
  const MI s = mi_add16(mi_add16(mi_maddubs(w[0], x[0]), mi_maddubs(w[1], x[1])),
                        mi_add16(mi_maddubs(w[2], x[2]), mi_maddubs(w[3], x[3])));
  return mi_add32(init, mi_madd16(s, mi_set1_16(1)));
#endif
}

// Rows [m0, m0 + R) against one tile (features [n0, n0 + 16) clipped to n). `codes` / `scales`
// point at the tile's block 0. Per block and vector half, the 8 weight vectors are decoded in
// kGroups groups (chunk pairs) and each group is applied to every row before the next is decoded:
// with 16 ymm registers (AVX2) only 4 weight vectors and R int32 dots are live besides the
// accumulators.
template <int R>
static void tile_rows(const uint8_t* codes, const uint8_t* scales, const QuantRows& xq, int64_t m0, int64_t n0,
                      int64_t n, const OutputRows& out) {
  const int64_t nb = xq.nblocks;
  const MI mask = mi_set1_8(0x0F);
  const MI table = mi_table(kCodeToU8);
  MF acc[kHalves][R];
  for (int h = 0; h < kHalves; ++h)
    for (int r = 0; r < R; ++r) acc[h][r] = mf_zero();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* cb = codes + b * kTileCodes;
    for (int line = 0; line < kTileCodes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(cb + kPrefetchBytes + line), _MM_HINT_T0);
    if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(scales + b * kTile + kPrefetchBytes / 16), _MM_HINT_T0);
    for (int h = 0; h < kHalves; ++h) {
      MI dot[R];
      for (int g = 0; g < kGroups; ++g) {
        constexpr int kChunks = 4 / kGroups;
        MI w[2 * kChunks];
        for (int cc = 0; cc < kChunks; ++cc) {
          const MI v = mi_load(cb + (g * kChunks + cc) * 64 + h * kLanes * 4);
          w[2 * cc] = mi_shuffle(table, mi_and(v, mask));
          w[2 * cc + 1] = mi_shuffle(table, mi_and(mi_srl4(v), mask));
        }
        for (int r = 0; r < R; ++r) {
          const int64_t at = (m0 + r) * nb + b;
          const int8_t* xk = xq.q + at * kBlock + g * kChunks * 8;
          // With 8 vectors, two independent chains of 4 (integer sums are exact in any order).
          MI part = dot16(w, xk, g == 0 ? mi_set1_32(xq.off[at]) : dot[r]);
          for (int q = 1; q < kChunks / 2; ++q) part = mi_add32(part, dot16(w + 4 * q, xk + 16 * q, mi_zero()));
          dot[r] = part;
        }
      }
      const MF sw = mf_scales(scales + b * kTile + h * kLanes);
      for (int r = 0; r < R; ++r) {
        const int64_t at = (m0 + r) * nb + b;
        acc[h][r] = mf_fmadd(mf_mul(mf_cvt(dot[r]), mf_set1(xq.sx[at])), sw, acc[h][r]);
      }
    }
  }
  const int cols = static_cast<int>(std::min<int64_t>(kTile, n - n0));
  alignas(64) float buf[kTile];
  for (int r = 0; r < R; ++r) {
    for (int h = 0; h < kHalves; ++h) mf_store(buf + h * kLanes, acc[h][r]);
    for (int f = 0; f < cols; ++f) out.store(m0 + r, n0 + f, buf[f]);
  }
}

// The last `rest` (< kRowsMax) rows as one pass of exactly that many.
template <int R>
static void tile_rest(int rest, const uint8_t* codes, const uint8_t* scales, const QuantRows& xq, int64_t m0,
                      int64_t n0, int64_t n, const OutputRows& out) {
  if constexpr (R >= 1) {
    if (rest == R) return tile_rows<R>(codes, scales, xq, m0, n0, n, out);
    return tile_rest<R - 1>(rest, codes, scales, xq, m0, n0, n, out);
  }
}

// Entry point of this ISA: tiles [t_begin, t_end) for all m rows.
static void gemm_tiles(const uint8_t* codes, const uint8_t* scales, const QuantRows& xq, int64_t m, int64_t n,
                       int64_t t_begin, int64_t t_end, const OutputRows& out) {
  const int64_t nb = xq.nblocks;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* ct = codes + t * nb * kTileCodes;
    const uint8_t* st = scales + t * nb * kTile;
    int64_t m0 = 0;
    for (; m0 + kRowsMax <= m; m0 += kRowsMax) tile_rows<kRowsMax>(ct, st, xq, m0, t * kTile, n, out);
    if (m > m0) tile_rest<kRowsMax - 1>(static_cast<int>(m - m0), ct, st, xq, m0, t * kTile, n, out);
  }
}

// Rows of x into MultirowRows order, the same fp32 operations as reference.quantize_activations_torch:
// inv = 127 / amax, q = rint(x * inv), scale = amax / 127 (times 1/2: the table holds 2 * E2M1).
template <typename T>
static void quantize_rows(const T* x, int64_t m, int64_t k, int64_t nb, int8_t* q, int32_t* off, float* sx) {
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const T* xb = x + r * k + b * kBlock;
      const int64_t valid = std::min<int64_t>(kBlock, k - b * kBlock);
      float v[kBlock];
      for (int i = 0; i < kBlock; ++i) v[i] = i < valid ? static_cast<float>(xb[i]) : 0.0f;
      float amax = 0.0f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* qb = q + (r * nb + b) * kBlock;
      int32_t sum = 0;
      for (int i = 0; i < kBlock; ++i) {
        const int32_t qi = static_cast<int32_t>(__builtin_rintf(v[i] * inv));
        qb[i] = static_cast<int8_t>(qi);
        sum += qi;
      }
      off[r * nb + b] = -12 * sum;
      sx[r * nb + b] = amax > 0.0f ? amax / 127.0f * 0.5f : 0.0f;
    }
  }
}

}  // namespace mr
