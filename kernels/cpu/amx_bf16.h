// MXFP4 x bf16 activations on AMX tiles (AMX-TILE + AMX-BF16), for any number of rows M.
//
// The w4a8 / w4a16 kernels (gemm_body.h) spend vector work per activation row, so their cost grows
// with M. Here every 32-element block is decoded once per call into exact bf16 values (an E2M1
// value times a power of two is a bf16 number) and TDPBF16PS does the per-row work:
//
//   A tile (m rows x 32 K, bf16):           activation rows, read in place (or from a padded copy)
//   B tile (16 K-pairs x 16 features):      the decoded block, VNNI pairs (W[f][2p], W[f][2p+1])
//   C tile (m rows x 16 features, fp32):    accumulates over K; rows of y come out in place
//
// Repacked layout (amx_repack, once at load): per 16-feature tile and block, 256 code bytes whose
// row p holds byte p of the 16 features' canonical 16-byte blocks (so row p decodes straight into
// B's row p), then the 16 features' scale bytes: [N_pad/16][K_pad/32][272], read sequentially.
//
// Decode of B row p: VPMOVZXBD widens byte f to dword f; (d | d << 12) & 0x000F000F puts W[f][2p]
// in word 2f and W[f][2p+1] in word 2f+1; VPERMW maps codes to bf16 E2M1; a masked VPADDW adds
// feature f's (e - 127) to the exponent field of its nonzero values. That is exact while the
// result stays a normal bf16 (scale bytes 2..252); a block step with any other scale byte is
// decoded through fp32 instead (exact rounding, NaN for 255). Numerics: y = fp32 sums of exact
// products bf16(x) * W, one row at a time; twin: reference.mxfp4_matmul_bf16_act_torch.

namespace amx {

constexpr int kTileRows = 16;  // rows of every tile; features per B tile
constexpr int kStepBytes = 16 * 16 + 16;  // codes of one block of 16 features, then their scales
constexpr int kAccumulators = 4;  // C tiles: row tiles x feature tiles <= 4
// Tile registers: 0-3 accumulators, 4-5 activation tiles, 6-7 weight tiles (alternating).
// GCC's tile intrinsics paste their tile arguments into the asm text, so the switches below turn
// a run-time tile index into a literal one.
constexpr int kTileA0 = 4, kTileB0 = 6;

#define SPECQD_TILE_CASE_DP(c, a, b)           \
  case (c) * 16 + ((a) - 4) * 4 + ((b) - 6): \
    _tile_dpbf16ps(c, a, b);                   \
    break;
#define SPECQD_TILE_CASES_DP(c) \
  SPECQD_TILE_CASE_DP(c, 4, 6) SPECQD_TILE_CASE_DP(c, 4, 7) SPECQD_TILE_CASE_DP(c, 5, 6) SPECQD_TILE_CASE_DP(c, 5, 7)
static inline void tile_multiply(int c, int a, int b) {  // c += a * b
  switch (c * 16 + (a - 4) * 4 + (b - 6)) {
    SPECQD_TILE_CASES_DP(0) SPECQD_TILE_CASES_DP(1) SPECQD_TILE_CASES_DP(2) SPECQD_TILE_CASES_DP(3)
  }
}
#undef SPECQD_TILE_CASES_DP
#undef SPECQD_TILE_CASE_DP

// GCC's tile load/store asm has no memory clobber: without these barriers the compiler may move the
// stores that fill a tile's buffer past its load, or the reads of a stored tile before the store.
static inline void memory_barrier() { asm volatile("" ::: "memory"); }

static inline void tile_load(int t, const void* p, int64_t stride) {
  memory_barrier();
  switch (t) {
    case 4: _tile_loadd(4, p, stride); break;
    case 5: _tile_loadd(5, p, stride); break;
    case 6: _tile_loadd(6, p, stride); break;
    case 7: _tile_loadd(7, p, stride); break;
  }
}

static inline void tile_zero(int t) {
  switch (t) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    case 3: _tile_zero(3); break;
  }
}

static inline void tile_store(int t, void* p, int64_t stride) {
  switch (t) {
    case 0: _tile_stored(0, p, stride); break;
    case 1: _tile_stored(1, p, stride); break;
    case 2: _tile_stored(2, p, stride); break;
    case 3: _tile_stored(3, p, stride); break;
  }
  memory_barrier();
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

alignas(64) static const uint16_t kE2M1Bf16[32] = {
    0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,  // 0 .5 1 1.5 2 3 4 6
    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0,  // their negatives
};

// Decodes one repacked step (16 features x 32 K) into the B tile `dst` [16][32] bf16.
static inline void decode_step(const uint8_t* step, uint16_t* dst) {
  const uint8_t* s16 = step + 256;
  const __m128i scale_bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s16));
  const __mmask16 out_of_range = _mm_cmplt_epu8_mask(scale_bytes, _mm_set1_epi8(2)) |
                                 _mm_cmpgt_epu8_mask(scale_bytes, _mm_set1_epi8(static_cast<char>(252)));
  if (__builtin_expect(out_of_range != 0, 0)) {
    for (int p = 0; p < kTileRows; ++p)
      for (int f = 0; f < 16; ++f) {
        const uint8_t byte = step[p * 16 + f];
        for (int half = 0; half < 2; ++half) {
          const int code = half ? byte >> 4 : byte & 15;
          const float e2m1 = static_cast<float>(c10::BFloat16(kE2M1Bf16[code], c10::BFloat16::from_bits()));
          const float v = s16[f] == 255 ? NAN : std::ldexp(e2m1, s16[f] - 127);
          dst[p * 32 + 2 * f + half] = c10::BFloat16(v).x;
        }
      }
    return;
  }
  const __m512i table = _mm512_load_si512(kE2M1Bf16);
  const __m512i e = _mm512_cvtepu8_epi32(scale_bytes);
  const __m512i shift = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(127)), 7);
  const __m512i delta = _mm512_or_si512(_mm512_and_si512(shift, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(shift, 16));
  const __m512i nibbles = _mm512_set1_epi32(0x000F000F);
  const __m512i magnitude = _mm512_set1_epi32(0x00070007);
  for (int p = 0; p < kTileRows; ++p) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(step + p * 16)));
    const __m512i codes = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), nibbles, 0xA8);  // (a | b) & c
    const __m512i values = _mm512_permutexvar_epi16(codes, table);
    const __mmask32 nonzero = _mm512_test_epi16_mask(codes, magnitude);
    _mm512_store_si512(dst + p * 32, _mm512_mask_add_epi16(values, nonzero, values, delta));
  }
}

// Rows [t0, t0 + rows) of x into bf16 [rows][K_pad], zero padded (only where x cannot be read in place).
template <typename T>
static void copy_rows(const T* x, int64_t k, int64_t k_pad, int64_t t0, int64_t rows, uint16_t* dst) {
  for (int64_t t = 0; t < rows; ++t) {
    const T* row = x + (t0 + t) * k;
    uint16_t* out = dst + t * k_pad;
    for (int64_t c = 0; c < k; ++c) out[c] = c10::BFloat16(static_cast<float>(row[c])).x;
    for (int64_t c = k; c < k_pad; ++c) out[c] = 0;
  }
}

// A group: up to kAccumulators row tiles of at most 16 rows, times feature_tiles = 4 / row_tiles.
struct Group {
  const uint16_t* a;  // bf16 [rows][a_stride / 2]: x itself or its padded copy
  int64_t a_stride;   // bytes
  int64_t t0;
  int row_tiles, feature_tiles;
  int rows[kAccumulators];

  int c_register(int f, int t) const { return f * row_tiles + t; }
  // With up to two row tiles each has its own register; with more, the full ones share the first
  // and the last (possibly shorter) one has the second.
  int a_register(int t) const { return row_tiles <= 2 ? kTileA0 + t : kTileA0 + (t == row_tiles - 1); }
};

static void configure(const Group& g) {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int f = 0; f < g.feature_tiles; ++f)
    for (int t = 0; t < g.row_tiles; ++t) {
      cfg.rows[g.c_register(f, t)] = static_cast<uint8_t>(g.rows[t]);
      cfg.colsb[g.c_register(f, t)] = 64;
    }
  cfg.rows[kTileA0] = static_cast<uint8_t>(g.rows[0]);
  cfg.rows[kTileA0 + 1] = static_cast<uint8_t>(g.rows[g.row_tiles - 1]);
  for (int i = 0; i < 2; ++i) {
    cfg.colsb[kTileA0 + i] = 64;
    cfg.rows[kTileB0 + i] = kTileRows;
    cfg.colsb[kTileB0 + i] = 64;
  }
  memory_barrier();
  _tile_loadconfig(&cfg);
  memory_barrier();
}

// Features [16 * ft0, 16 * (ft0 + g.feature_tiles)) for the group's rows (feature tiles < n_tiles).
static void gemm_step_tiles(const uint8_t* repacked, int64_t nblocks, int64_t ft0, int64_t n_tiles, int64_t n,
                            const Group& g, const OutputRows& out) {
  alignas(64) uint16_t b_tiles[2][kTileRows * 32];
  alignas(64) float c_buf[kTileRows * 16];
  const int f_count = static_cast<int>(std::min<int64_t>(g.feature_tiles, n_tiles - ft0));
  for (int f = 0; f < f_count; ++f)
    for (int t = 0; t < g.row_tiles; ++t) tile_zero(g.c_register(f, t));
  // A tiles stay loaded across feature tiles when there is one row tile or two; else reloaded.
  const bool reload_a = g.row_tiles > 2;
  for (int64_t kb = 0; kb < nblocks; ++kb) {
    const uint16_t* a_block = g.a + kb * 32;
    if (!reload_a)
      for (int t = 0; t < g.row_tiles; ++t)
        tile_load(g.a_register(t), a_block + t * kTileRows * (g.a_stride / 2), g.a_stride);
    for (int f = 0; f < f_count; ++f) {
      const uint8_t* step = repacked + ((ft0 + f) * nblocks + kb) * kStepBytes;
      _mm_prefetch(reinterpret_cast<const char*>(step + 8 * kStepBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(step + 8 * kStepBytes + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(step + 8 * kStepBytes + 128), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(step + 8 * kStepBytes + 192), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(step + 8 * kStepBytes + 256), _MM_HINT_T0);
      const int b = kTileB0 + (f & 1);
      decode_step(step, b_tiles[f & 1]);
      tile_load(b, b_tiles[f & 1], 64);
      for (int t = 0; t < g.row_tiles; ++t) {
        const int a = g.a_register(t);
        if (reload_a) tile_load(a, a_block + t * kTileRows * (g.a_stride / 2), g.a_stride);
        tile_multiply(g.c_register(f, t), a, b);
      }
    }
  }
  for (int f = 0; f < f_count; ++f) {
    const int64_t n0 = (ft0 + f) * 16;
    const int cols = static_cast<int>(std::min<int64_t>(16, n - n0));
    int64_t t0 = g.t0;
    for (int t = 0; t < g.row_tiles; ++t) {
      tile_store(g.c_register(f, t), c_buf, 64);
      for (int i = 0; i < g.rows[t]; ++i)
        for (int c = 0; c < cols; ++c) out.store(t0 + i, n0 + c, c_buf[i * 16 + c]);
      t0 += g.rows[t];
    }
  }
}

// y = x @ W.T (+ bias) for M rows. Rows go in groups of up to 64; each group's activations are read
// in place when x is bf16 with K a multiple of 32, else from a bf16 copy padded to K_pad.
// `parallel(chunk, body)` splits feature tiles [0, n_tiles) over threads in multiples of `chunk`.
template <typename T, typename Parallel>
static void gemm(const T* x, int64_t m, int64_t k, const uint8_t* repacked, int64_t n, const OutputRows& out,
                 std::vector<uint16_t>& copy_buf, Parallel parallel) {
  const int64_t nblocks = (k + 31) / 32, k_pad = nblocks * 32;
  const int64_t n_tiles = (n + 15) / 16;
  const bool in_place = std::is_same<T, c10::BFloat16>::value && k == k_pad;
  const int64_t group_rows = static_cast<int64_t>(kAccumulators) * kTileRows;
  for (int64_t g0 = 0; g0 < m; g0 += group_rows) {
    const int64_t rows = std::min(group_rows, m - g0);
    Group g{};
    g.t0 = g0;
    g.row_tiles = static_cast<int>((rows + kTileRows - 1) / kTileRows);
    g.feature_tiles = kAccumulators / g.row_tiles;
    for (int t = 0; t < g.row_tiles; ++t) g.rows[t] = static_cast<int>(std::min<int64_t>(kTileRows, rows - t * kTileRows));
    if (in_place) {
      g.a = reinterpret_cast<const uint16_t*>(x + g0 * k);
      g.a_stride = k * 2;
    } else {
      copy_buf.resize(static_cast<size_t>(rows * k_pad));
      copy_rows<T>(x, k, k_pad, g0, rows, copy_buf.data());
      g.a = copy_buf.data();
      g.a_stride = k_pad * 2;
    }
    parallel(g.feature_tiles, n_tiles, [&](int64_t ft_begin, int64_t ft_end) {
      configure(g);
      for (int64_t ft = ft_begin; ft < ft_end; ft += g.feature_tiles)
        gemm_step_tiles(repacked, nblocks, ft, ft_end, n, g, out);
      _tile_release();
    });
  }
}

// Canonical MXFP4 (packed [N][K_pad/2], scales [N][K_pad/32]) -> [ceil(N/16)][K_pad/32][272]; padding
// features are code 0 with scale byte 127.
static void repack(const uint8_t* packed, const uint8_t* scales, int64_t n, int64_t nblocks, uint8_t* dst) {
  const int64_t n_tiles = (n + 15) / 16;
  for (int64_t ft = 0; ft < n_tiles; ++ft)
    for (int64_t kb = 0; kb < nblocks; ++kb) {
      uint8_t* step = dst + (ft * nblocks + kb) * kStepBytes;
      for (int f = 0; f < 16; ++f) {
        const int64_t row = ft * 16 + f;
        for (int p = 0; p < 16; ++p) step[p * 16 + f] = row < n ? packed[row * nblocks * 16 + kb * 16 + p] : 0;
        step[256 + f] = row < n ? scales[row * nblocks + kb] : 127;
      }
    }
}

}  // namespace amx
