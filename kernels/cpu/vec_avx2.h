// AVX2 vector layer for gemm_body.h: one weight vector holds G = 2 MXFP4 blocks (32 bytes).
// Included inside `#pragma GCC target("avx2,fma")`; see mxfp4_cpu.cpp.

constexpr int G = 2;  // 32-element blocks per weight vector
using VI = __m256i;
// Activation rows per pass over a weight row: each has its own accumulator register, and every
// weight block is decoded once per pass (so fewer passes at larger M).
constexpr int kTileRowsMax = 4;
using VF = __m256;

static inline VI load_i(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
static inline VF load_f(const float* p) { return _mm256_loadu_ps(p); }
static inline VF zero_f() { return _mm256_setzero_ps(); }
static inline VF fmadd(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
static inline VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
static inline VF to_float(VI v) { return _mm256_cvtepi32_ps(v); }
static inline VI sub_i32(VI a, VI b) { return _mm256_sub_epi32(a, b); }

static inline VI broadcast_table(const int8_t* table16) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table16)));
}
static inline VI low_nibbles(VI v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
static inline VI high_nibbles(VI v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
static inline VI lookup(VI table, VI nibbles) { return _mm256_shuffle_epi8(table, nibbles); }

// Sum over 4 consecutive bytes of u8 * s8 products: int32 lane i covers bytes 4i..4i+3 of both vectors.
static inline VI dot_u8s8(VI w_even, VI w_odd, const int8_t* x) {
  const VI ones = _mm256_set1_epi16(1);
  VI even = _mm256_maddubs_epi16(w_even, load_i(x));  // <= 2 * 24 * 127, no int16 saturation
  VI odd = _mm256_maddubs_epi16(w_odd, load_i(x + 32));
  return _mm256_madd_epi16(_mm256_add_epi16(even, odd), ones);
}

// s8 [blk0 e0..15 | blk1 e0..15] -> int16 [blk0 e0..7 | blk1 e0..7] and [blk0 e8..15 | blk1 e8..15].
static inline void widen_s8(VI s8, VI& first, VI& second) {
  VI q = _mm256_permute4x64_epi64(s8, 0xD8);  // qwords 0,2,1,3
  first = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
  second = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
}

static inline VI dot_s16(const VI* w, const int16_t* x) {
  VI s = _mm256_madd_epi16(w[0], load_i(x));
  s = _mm256_add_epi32(s, _mm256_madd_epi16(w[1], load_i(x + 16)));
  s = _mm256_add_epi32(s, _mm256_madd_epi16(w[2], load_i(x + 32)));
  return _mm256_add_epi32(s, _mm256_madd_epi16(w[3], load_i(x + 48)));
}

// G E8M0 bytes -> 2^(byte - 127) as fp32, each repeated over its block's 4 lanes; byte 0 reads as 0.
static inline VF block_scales(const uint8_t* s) {
  uint16_t two;
  std::memcpy(&two, s, 2);
  const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
  __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(two), spread);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu8_epi32(bytes), 23));
}

static inline float hsum(VF v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
