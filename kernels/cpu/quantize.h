// Direct cast to MXFP4 (scale rules floor / rceil / mse), bit-identical to vllm_specqd/mxfp4.py.
// Plain C++ the compiler vectorizes; included in the AVX2 region of mxfp4_cpu.cpp (start-up work).

namespace quant {

enum class ScaleRule { floor, rceil, mse };

constexpr int kExpMin = -127, kExpMax = 127, kBias = 127;
constexpr float kValues[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
// Midpoints between magnitudes; at a tie RNE keeps the even code: move up with ">" after an even
// code, with ">=" after an odd one (mxfp4.py _MIDPOINTS_TIE_UP).
constexpr float kMid[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
constexpr bool kTieUp[7] = {false, true, false, true, false, true, false};

inline float exp2_exact(int e) {  // 2^e for e in [-127, 127], 2^-127 as the fp32 subnormal
  const int biased = e + kBias;
  uint32_t bits = biased > 0 ? static_cast<uint32_t>(biased) << 23 : 1u << 22;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline int clamp_exp(int e) { return std::min(kExpMax, std::max(kExpMin, e)); }

inline uint8_t magnitude_code(float m) {
  uint8_t code = 0;
  for (int i = 0; i < 7; ++i) code += kTieUp[i] ? (m >= kMid[i]) : (m > kMid[i]);
  return code;
}

// One block of 32 fp32 values -> 16 packed bytes + 1 E8M0 byte.
inline void quantize_block(const float* v, ScaleRule rule, uint8_t* packed, uint8_t* scale) {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(v[i]));
  int e2;
  const float mantissa = std::frexp(amax, &e2);  // amax = mantissa * 2^e2, mantissa in [0.5, 1)
  const int floor_exp = amax == 0.0f ? kExpMin : e2 - 1 - 2;
  int exp = clamp_exp(floor_exp);
  if (rule == ScaleRule::rceil) {
    exp = clamp_exp(floor_exp + (mantissa > 0.75f ? 1 : 0));
  } else if (rule == ScaleRule::mse) {
    // Errors in units of the clamped FLOOR scale, summed in float64: exact for bf16 weights, so
    // the choice does not depend on summation order (mxfp4.py _mse_exponents does the same).
    const int unit_exp = exp;
    const float unit = exp2_exact(unit_exp);
    float scaled[32];
    for (int i = 0; i < 32; ++i) scaled[i] = std::fabs(v[i]) / unit;
    double best_err = -1.0;
    for (int delta : {0, -1, 1}) {
      const int cand = clamp_exp(floor_exp + delta);
      const float step = exp2_exact(cand - unit_exp);
      double err = 0.0;
      for (int i = 0; i < 32; ++i) {
        const float rounded = kValues[magnitude_code(scaled[i] / step)] * step;
        const double d = static_cast<double>(rounded) - static_cast<double>(scaled[i]);
        err += d * d;
      }
      if (best_err < 0.0 || err < best_err) {
        best_err = err;
        exp = cand;
      }
    }
  }
  const float x = exp2_exact(exp);
  uint8_t codes[32];
  for (int i = 0; i < 32; ++i) {
    const float s = v[i] / x;
    const uint8_t c = magnitude_code(std::fabs(s));
    codes[i] = c | ((s < 0.0f && c != 0) ? 8 : 0);
  }
  for (int i = 0; i < 16; ++i) packed[i] = codes[2 * i] | (codes[2 * i + 1] << 4);
  *scale = static_cast<uint8_t>(exp + kBias);
}

template <typename T>
void quantize_rows(const T* w, int64_t rows, int64_t k, ScaleRule rule, uint8_t* packed, uint8_t* scales) {
  const int64_t blocks = (k + 31) / 32;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      float v[32];
      for (int i = 0; i < 32; ++i) {
        const int64_t col = b * 32 + i;
        v[i] = col < k ? static_cast<float>(w[r * k + col]) : 0.0f;
      }
      quantize_block(v, rule, packed + (r * blocks + b) * 16, scales + r * blocks + b);
    }
  }
}

}  // namespace quant
