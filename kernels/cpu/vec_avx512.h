// AVX-512 vector layer for gemm_body.h: one weight vector holds G = 4 MXFP4 blocks (64 bytes),
// one block per 128-bit lane. SPECQD_VNNI selects VPDPBUSD / VPDPWSSD over the AVX512BW sequences.
// X512 / X256 / X128 and the T* types name either the native intrinsics or SIMDe's emulation of
// them (SPECQD_EMULATE_AVX512), so the same code is tested on CPUs without AVX-512.

constexpr int G = 4;
using VI = T512i;
// Activation rows per pass over a weight row: each has its own accumulator register, and every
// weight block is decoded once per pass (so fewer passes at larger M).
constexpr int kTileRowsMax = 8;
using VF = T512;

static inline VI load_i(const void* p) { return X512(loadu_si512)(p); }
static inline VF load_f(const float* p) { return X512(loadu_ps)(p); }
static inline VF zero_f() { return X512(setzero_ps)(); }
static inline VF fmadd(VF a, VF b, VF c) { return X512(fmadd_ps)(a, b, c); }
static inline VF mul(VF a, VF b) { return X512(mul_ps)(a, b); }
static inline VF to_float(VI v) { return X512(cvtepi32_ps)(v); }
static inline VI sub_i32(VI a, VI b) { return X512(sub_epi32)(a, b); }

static inline VI broadcast_table(const int8_t* table16) { return X512(broadcast_i32x4)(X128(loadu_si128)(reinterpret_cast<const T128i*>(table16))); }
static inline VI low_nibbles(VI v) { return X512(and_si512)(v, X512(set1_epi8)(0x0F)); }
static inline VI high_nibbles(VI v) { return X512(and_si512)(X512(srli_epi16)(v, 4), X512(set1_epi8)(0x0F)); }
static inline VI lookup(VI table, VI nibbles) { return X512(shuffle_epi8)(table, nibbles); }

static inline VI dot_u8s8(VI w_even, VI w_odd, const int8_t* x) {
#if SPECQD_VNNI
  VI acc = X512(dpbusd_epi32)(X512(setzero_si512)(), w_even, load_i(x));
  return X512(dpbusd_epi32)(acc, w_odd, load_i(x + 64));
#else
  VI even = X512(maddubs_epi16)(w_even, load_i(x));
  VI odd = X512(maddubs_epi16)(w_odd, load_i(x + 64));
  return X512(madd_epi16)(X512(add_epi16)(even, odd), X512(set1_epi16)(1));
#endif
}

// s8 [blk j e0..15 per lane j] -> int16 [blk j e0..7 per lane j] and [blk j e8..15 per lane j].
static inline void widen_s8(VI s8, VI& first, VI& second) {
  VI q = X512(permutexvar_epi64)(X512(setr_epi64)(0, 2, 4, 6, 1, 3, 5, 7), s8);
  first = X512(cvtepi8_epi16)(X512(castsi512_si256)(q));
  second = X512(cvtepi8_epi16)(X512(extracti64x4_epi64)(q, 1));
}

static inline VI dot_s16(const VI* w, const int16_t* x) {
#if SPECQD_VNNI
  VI s = X512(dpwssd_epi32)(X512(setzero_si512)(), w[0], load_i(x));
  s = X512(dpwssd_epi32)(s, w[1], load_i(x + 32));
  s = X512(dpwssd_epi32)(s, w[2], load_i(x + 64));
  return X512(dpwssd_epi32)(s, w[3], load_i(x + 96));
#else
  VI s = X512(madd_epi16)(w[0], load_i(x));
  s = X512(add_epi32)(s, X512(madd_epi16)(w[1], load_i(x + 32)));
  s = X512(add_epi32)(s, X512(madd_epi16)(w[2], load_i(x + 64)));
  return X512(add_epi32)(s, X512(madd_epi16)(w[3], load_i(x + 96)));
#endif
}

static inline VF block_scales(const uint8_t* s) {
  uint32_t four;
  std::memcpy(&four, s, 4);
  const T128i spread = X128(setr_epi8)(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  T128i bytes = X128(shuffle_epi8)(X128(cvtsi32_si128)(static_cast<int>(four)), spread);
  return X512(castsi512_ps)(X512(slli_epi32)(X512(cvtepu8_epi32)(bytes), 23));
}

static inline float hsum(VF v) { return X512(reduce_add_ps)(v); }
