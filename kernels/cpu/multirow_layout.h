// The multi-row kernel's weight layout (multirow.h): the repack from canonical MXFP4 bytes, done once
// when the draft is built, and the exact dequantization of a range of feature tiles, which the
// large-M path (prefill and vLLM's profile runs) feeds to one GEMM. Included in the AVX2 region of
// mxfp4_cpu.cpp; every CPU the library runs on has AVX2.

namespace mr_layout {

constexpr int kTile = 16, kBlock = 32, kTileCodes = 256;

// Canonical (packed [N][nb*16], scales [N][nb]) -> codes [ceil(N/16)][nb][256], tile_scales
// [ceil(N/16)][nb][16]. Chunk c byte 4f+i: element 8c+i of feature f (low nibble), 8c+4+i (high).
// Padding features are code 0 with scale byte 0.
static void repack(const uint8_t* packed, const uint8_t* scales, int64_t n, int64_t nb, int64_t t_begin,
                   int64_t t_end, uint8_t* codes, uint8_t* tile_scales) {
  for (int64_t t = t_begin; t < t_end; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* dst = codes + (t * nb + b) * kTileCodes;
      for (int f = 0; f < kTile; ++f) {
        const int64_t row = t * kTile + f;
        const uint8_t* src = packed + row * nb * 16 + b * 16;  // byte p: elements 2p (low), 2p+1 (high)
        auto code = [&](int e) -> uint8_t { return row < n ? (src[e / 2] >> (4 * (e & 1))) & 0x0F : 0; };
        for (int c = 0; c < 4; ++c)
          for (int i = 0; i < 4; ++i)
            dst[c * 64 + 4 * f + i] = static_cast<uint8_t>(code(8 * c + i) | (code(8 * c + 4 + i) << 4));
        tile_scales[(t * nb + b) * kTile + f] = row < n ? scales[row * nb + b] : 0;
      }
    }
}

static const int8_t kCodeToS8[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};  // 2 * E2M1

// E8M0 byte -> 2^(byte - 127) / 2 (the table holds 2 * E2M1), NaN for 255: the format's values
// (vllm_specqd/mxfp4.py), byte 0 included (2^-128, an fp32 subnormal, exact).
static inline float half_scale(uint8_t byte) {
  // Bytes 0 and 1 give fp32 subnormals (2^-128, 2^-127); 255 is NaN.
  const uint32_t bits = byte <= 1 ? 0x00200000u << byte : byte == 255 ? 0x7FC00000u : static_cast<uint32_t>(byte - 1) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Features [16 t_begin, min(n, 16 t_end)) as rows of out [rows][k] (fp32 or bf16), row 0 = feature
// 16 t_begin. Exact: 2 * E2M1 has at most 2 significant bits, so its product with a power of two is
// an fp32 and a bf16 number (up to overflow, as in the format module), and bf16 takes its top bits.
template <typename T>
static void dequant_tiles(const uint8_t* codes, const uint8_t* tile_scales, int64_t n, int64_t k, int64_t t0,
                          int64_t t_begin, int64_t t_end, T* out) {
  const int64_t nb = (k + kBlock - 1) / kBlock;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kCodeToS8)));
  alignas(32) int8_t w8[kTile][kBlock];
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int features = static_cast<int>(std::min<int64_t>(kTile, n - t * kTile));
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* src = codes + (t * nb + b) * kTileCodes;
      for (int c = 0; c < 4; ++c)
        for (int h = 0; h < 2; ++h) {  // features 8h..8h+7
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c * 64 + h * 32));
          const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(v, mask));
          const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
          // Per 128-bit lane: [lo f, hi f, lo f+1, hi f+1] = features f, f+1 with elements 8c..8c+7 in order.
          const __m256i a = _mm256_unpacklo_epi32(lo, hi);  // features 8h + {0, 1 | 4, 5}
          const __m256i d = _mm256_unpackhi_epi32(lo, hi);  // features 8h + {2, 3 | 6, 7}
          alignas(32) int64_t q[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(q), a);
          _mm256_store_si256(reinterpret_cast<__m256i*>(q + 4), d);
          static constexpr int kFeature[8] = {0, 1, 4, 5, 2, 3, 6, 7};
          for (int j = 0; j < 8; ++j) std::memcpy(&w8[8 * h + kFeature[j]][8 * c], &q[j], 8);
        }
      const int64_t cols = std::min<int64_t>(kBlock, k - b * kBlock);
      for (int f = 0; f < features; ++f) {
        const float s = half_scale(tile_scales[(t * nb + b) * kTile + f]);
        T* row = out + ((t - t0) * kTile + f) * k + b * kBlock;
        if constexpr (std::is_same<T, float>::value) {
          for (int64_t i = 0; i < cols; ++i) row[i] = static_cast<float>(w8[f][i]) * s;
        } else {
          for (int64_t i = 0; i < cols; ++i) {
            uint32_t bits;
            const float v = static_cast<float>(w8[f][i]) * s;
            std::memcpy(&bits, &v, 4);
            row[i].x = static_cast<uint16_t>(bits >> 16);  // exact: the low half is zero (NaN stays NaN)
          }
        }
      }
    }
  }
}

}  // namespace mr_layout
