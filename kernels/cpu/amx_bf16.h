// MXFP4 x bf16 activations on AMX tiles (AMX-TILE + AMX-BF16), for any number of rows M.
//
// The w4a8 / w4a16 kernels (gemm_body.h) decode every weight block once per 4 activation rows, so
// their cost grows with M. Here each 32-element block is decoded once per call into 32 exact bf16
// values (an E2M1 value times a power of two is a bf16 number), and TDPBF16PS multiplies a 16-row
// weight tile with up to 16 activation rows at a time, fp32 accumulation. Cost: the weight decode
// (memory-bound) plus one tile product per 16 features x 32 K x 16 rows.
//
//   A tile (16 features x 32 K, bf16):  the decoded block of 16 consecutive weight rows (1 KB)
//   B tile (16 K-pairs x w rows):       activations, VNNI pairs: B[p][t] = (x[t][2p], x[t][2p+1])
//   C tile (16 features x w rows, fp32)
//
// Decode of one block (16 bytes, element 2i in the low nibble of byte i, scale byte e):
// VPMOVZXBD widens byte i to dword i, (d | d << 12) & 0x000F000F puts element 2i in word 2i and
// element 2i+1 in word 2i+1, and VPERMW looks each word up in the block's scaled table: row e of
// kScaledTables holds bf16(E2M1[c] * 2^(e-127)) for the 16 codes (rounded to nearest even, which
// is exact for e in 1..252; 255 is NaN), so applying the scale costs one table load.
// Numerics: y = fp32 sums of exact products bf16(x) * W; the twin is
// reference.mxfp4_matmul_bf16_act_torch. Each output depends on its own activation row only.

namespace amx {

constexpr int kTileRows = 16;  // features per A tile, K-pairs per B tile
constexpr int kAccumulators = 4;  // C tiles: feature tiles x token tiles <= 4
constexpr int kMaxTokenTiles = 4;  // up to 64 activation rows per weight decode
// Tile registers: 0-3 accumulators, 4-5 weight tiles (alternating, so one can load while the other
// multiplies), 6 full-width activation tiles, 7 the group's last (possibly narrower) one.
constexpr int kTileA0 = 4, kTileBFull = 6, kTileBLast = 7;

// GCC's tile intrinsics paste their tile arguments into the asm text, so they must be literal
// numbers: these switches turn a run-time tile index into the literal one.
#define SPECQD_TILE_CASE_DP(c, a, b) \
  case (c) * 16 + ((a) - 4) * 4 + ((b) - 6): \
    _tile_dpbf16ps(c, a, b);         \
    break;
#define SPECQD_TILE_CASES_DP(c)                                                                                  \
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

static inline void tile_load(int t, const void* p, int stride) {
  memory_barrier();
  switch (t) {
    case 4: _tile_loadd(4, p, stride); break;
    case 5: _tile_loadd(5, p, stride); break;
    case 6: _tile_loadd(6, p, stride); break;
    case 7: _tile_loadd(7, p, stride); break;
  }
}

static inline void tile_store_zero(int t, void* p, int stride, bool zero) {
  switch (t) {
    case 0: if (zero) _tile_zero(0); else _tile_stored(0, p, stride); break;
    case 1: if (zero) _tile_zero(1); else _tile_stored(1, p, stride); break;
    case 2: if (zero) _tile_zero(2); else _tile_stored(2, p, stride); break;
    case 3: if (zero) _tile_zero(3); else _tile_stored(3, p, stride); break;
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

// kScaledTables[e][c]: bf16 bits of E2M1[c] * 2^(e - 127); 32 words per row for VPERMW (codes < 16).
alignas(64) static uint16_t kScaledTables[256][32];

static void init_scaled_tables() {
  static const float kE2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  for (int e = 0; e < 256; ++e)
    for (int c = 0; c < 32; ++c) {
      const float v = e == 255 ? NAN : std::ldexp(kE2M1[c & 15], e - 127);
      kScaledTables[e][c] = c10::BFloat16(v).x;
    }
}

static inline __m512i decode_block(const uint8_t* codes, uint8_t scale) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  const __m512i words = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
  return _mm512_permutexvar_epi16(words, _mm512_load_si512(kScaledTables[scale]));
}

// Activation rows [t0, t0 + w) into VNNI B tiles: pack + kb * 16 * w dwords holds block kb.
template <typename T>
static void pack_rows(const T* x, int64_t k, int64_t nblocks, int64_t t0, int w, uint32_t* pack) {
  for (int t = 0; t < w; ++t) {
    const T* row = x + (t0 + t) * k;
    for (int64_t kb = 0; kb < nblocks; ++kb) {
      uint32_t* tile = pack + kb * kTileRows * w;
      for (int p = 0; p < kTileRows; ++p) {
        const int64_t c = kb * 32 + 2 * p;
        const c10::BFloat16 lo = c < k ? c10::BFloat16(static_cast<float>(row[c])) : c10::BFloat16(0.0f);
        const c10::BFloat16 hi = c + 1 < k ? c10::BFloat16(static_cast<float>(row[c + 1])) : c10::BFloat16(0.0f);
        tile[p * w + t] = static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
      }
    }
  }
}

template <>
inline void pack_rows<c10::BFloat16>(const c10::BFloat16* x, int64_t k, int64_t nblocks, int64_t t0, int w,
                                     uint32_t* pack) {
  const int64_t full = k / 32;
  for (int t = 0; t < w; ++t) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(x + (t0 + t) * k);
    for (int64_t kb = 0; kb < full; ++kb) {
      uint32_t* tile = pack + kb * kTileRows * w + t;
      if (k % 2 == 0) {
        for (int p = 0; p < kTileRows; ++p) tile[p * w] = row[kb * 16 + p];
      } else {  // odd K: rows are not dword aligned
        const uint16_t* r16 = reinterpret_cast<const uint16_t*>(x + (t0 + t) * k) + kb * 32;
        for (int p = 0; p < kTileRows; ++p) tile[p * w] = r16[2 * p] | (static_cast<uint32_t>(r16[2 * p + 1]) << 16);
      }
    }
    if (full < nblocks) {
      const uint16_t* r16 = reinterpret_cast<const uint16_t*>(x + (t0 + t) * k);
      uint32_t* tile = pack + full * kTileRows * w + t;
      for (int p = 0; p < kTileRows; ++p) {
        const int64_t c = full * 32 + 2 * p;
        const uint32_t lo = c < k ? r16[c] : 0u, hi = c + 1 < k ? r16[c + 1] : 0u;
        tile[p * w] = lo | (hi << 16);
      }
    }
  }
}

// One group of up to kMaxTokenTiles activation tiles (widths[i] rows each, packed back to back)
// and how many 16-feature tiles share a pass over the weights with it.
struct TokenGroup {
  int64_t t0;
  int tiles;
  int feature_tiles;  // kAccumulators / tiles: independent accumulators keep TDPBF16PS busy
  int widths[kMaxTokenTiles];
  const uint32_t* packs[kMaxTokenTiles];

  int b_register(int t) const { return t == tiles - 1 ? kTileBLast : kTileBFull; }
  int c_register(int f, int t) const { return f * tiles + t; }
};

static void configure(const TokenGroup& g) {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int f = 0; f < g.feature_tiles; ++f)
    for (int t = 0; t < g.tiles; ++t) {
      cfg.rows[g.c_register(f, t)] = kTileRows;
      cfg.colsb[g.c_register(f, t)] = static_cast<uint16_t>(g.widths[t] * 4);
    }
  for (int r : {kTileA0, kTileA0 + 1, kTileBFull}) {
    cfg.rows[r] = kTileRows;
    cfg.colsb[r] = 64;
  }
  cfg.rows[kTileBLast] = kTileRows;
  cfg.colsb[kTileBLast] = static_cast<uint16_t>(g.widths[g.tiles - 1] * 4);
  memory_barrier();
  _tile_loadconfig(&cfg);
  memory_barrier();
}

// Features [n0, n0 + 16 * g.feature_tiles) (those below n_end) for the group's rows.
static void gemm_features(const uint8_t* packed, const uint8_t* scales, int64_t nblocks, int64_t n0, int64_t n_end,
                          const TokenGroup& g, const OutputRows& out) {
  const int64_t w_stride = nblocks * 16;
  alignas(64) uint16_t a_tiles[kAccumulators][kTileRows][32];
  alignas(64) float c_buf[kTileRows * 16];
  int rows[kAccumulators];
  for (int f = 0; f < g.feature_tiles; ++f) {
    rows[f] = static_cast<int>(std::clamp<int64_t>(n_end - n0 - f * kTileRows, 0, kTileRows));
    if (rows[f] < kTileRows) std::memset(a_tiles[f], 0, sizeof(a_tiles[f]));
    for (int t = 0; t < g.tiles; ++t) tile_store_zero(g.c_register(f, t), nullptr, 0, true);
  }
  // Two activation registers: with at most two token tiles both stay loaded for every feature tile.
  const bool reload_b = g.tiles > 2;
  for (int64_t kb = 0; kb < nblocks; ++kb) {
    if (!reload_b)
      for (int t = 0; t < g.tiles; ++t) tile_load(g.b_register(t), g.packs[t] + kb * kTileRows * g.widths[t], g.widths[t] * 4);
    for (int f = 0; f < g.feature_tiles; ++f) {
      const int64_t row0 = n0 + f * kTileRows;
      for (int r = 0; r < rows[f]; ++r) {
        const uint8_t* wr = packed + (row0 + r) * w_stride + kb * 16;
        if ((kb & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + 256), _MM_HINT_T0);
        _mm512_store_si512(a_tiles[f][r], decode_block(wr, scales[(row0 + r) * nblocks + kb]));
      }
      const int a = kTileA0 + (f & 1);
      tile_load(a, a_tiles[f], 64);
      for (int t = 0; t < g.tiles; ++t) {
        if (reload_b) tile_load(g.b_register(t), g.packs[t] + kb * kTileRows * g.widths[t], g.widths[t] * 4);
        tile_multiply(g.c_register(f, t), a, g.b_register(t));
      }
    }
  }
  for (int f = 0; f < g.feature_tiles; ++f) {
    int64_t t0 = g.t0;
    for (int t = 0; t < g.tiles; ++t) {
      const int w = g.widths[t];
      tile_store_zero(g.c_register(f, t), c_buf, w * 4, false);
      for (int i = 0; i < w; ++i)
        for (int r = 0; r < rows[f]; ++r) out.store(t0 + i, n0 + f * kTileRows + r, c_buf[r * w + i]);
      t0 += w;
    }
  }
}

// Splits M rows into groups of up to kMaxTokenTiles x 16, packs each group's activations once, and
// runs every feature chunk over it. `parallel` splits features over threads.
template <typename T, typename Parallel>
static void gemm(const T* x, int64_t m, int64_t k, const uint8_t* packed, const uint8_t* scales, int64_t n,
                 const OutputRows& out, std::vector<uint32_t>& pack_buf, Parallel parallel) {
  const int64_t nblocks = (k + 31) / 32;
  const int64_t group_rows = static_cast<int64_t>(kMaxTokenTiles) * kTileRows;
  for (int64_t g0 = 0; g0 < m; g0 += group_rows) {
    TokenGroup g{};
    g.t0 = g0;
    const int64_t rows = std::min(group_rows, m - g0);
    g.tiles = static_cast<int>((rows + kTileRows - 1) / kTileRows);
    g.feature_tiles = kAccumulators / g.tiles;
    pack_buf.resize(static_cast<size_t>(rows * nblocks * kTileRows));
    int64_t offset = 0;
    for (int i = 0; i < g.tiles; ++i) {
      g.widths[i] = static_cast<int>(std::min<int64_t>(kTileRows, rows - i * kTileRows));
      g.packs[i] = pack_buf.data() + offset;
      pack_rows<T>(x, k, nblocks, g0 + i * kTileRows, g.widths[i], pack_buf.data() + offset);
      offset += nblocks * kTileRows * g.widths[i];
    }
    parallel(kTileRows * g.feature_tiles, [&](int64_t n_begin, int64_t n_end) {
      configure(g);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows * g.feature_tiles)
        gemm_features(packed, scales, nblocks, n0, n_end, g, out);
      _tile_release();
    });
  }
}

}  // namespace amx
