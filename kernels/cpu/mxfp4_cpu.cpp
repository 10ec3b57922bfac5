// Native x86 MXFP4 weight-only linear for CPUs: y = x @ W.T (+ bias), W in canonical MXFP4 bytes.
//
// Registered as torch ops in the `specqd` namespace (see kernels/cpu_ops.py for the Python side):
//   specqd::mxfp4_linear(x[M,K] fp32|bf16, packed[N,Kp/2] u8, scales[N,Kp/32] u8, bias[N]?, act_bits, isa) -> y[M,N]
//   specqd::amx_repack(packed, scales) -> u8 [ceil(N/16), Kp/32, 272]   the AMX kernel's weight layout
//   specqd::mxfp4_linear_amx(x[M,K] fp32|bf16, repacked, N, bias?) -> y[M,N]   AMX tiles, bf16 activations (amx_bf16.h)
//   specqd::amx_available() -> bool    AMX-TILE + AMX-BF16 present and granted by the kernel
//   specqd::bf16_linear(x[M,K] bf16, w[N,K] bf16, bias[N]?) -> y[M,N] bf16   few-row bf16 GEMM (bf16_gemm.h)
//   specqd::multirow_repack(packed, scales) -> (u8 [ceil(N/16), Kp/32, 256], u8 [ceil(N/16), Kp/32, 16])
//   specqd::mxfp4_linear_multirow(x[M,K] fp32|bf16, codes, tile_scales, N, bias?, isa, large_m) -> y[M,N]
//                                      weights decoded once per call for all rows (multirow.h); rows
//                                      above large_m: exact dequantize + one GEMM (at::linear)
//   specqd::multirow_dequant(codes, tile_scales, N, K, dtype) -> W[N,K]   the exact dequantization
//   specqd::cpu_isas() -> str          ISAs this CPU can run, best first
//   specqd::resolve_isa(name) -> str   the ISA "auto" (or a name) resolves to, honouring VLLM_SPECQD_CPU_ISA
//   specqd::stream_read(buf u8) -> int reads every byte once with vector loads (bandwidth ceiling)
//
// One source, one binary, run-time ISA choice: each ISA's code is compiled inside its own
// `#pragma GCC target` region, so the library runs on any x86-64 and picks the best path it may.
// Design and numbers: benchmarks/README.md; numerics: kernels/reference.py (the torch twin).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cpuid.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#ifdef SPECQD_EMULATE_AVX512
#include <simde/x86/avx512.h>
#define X512(f) simde_mm512_##f
#define X128(f) simde_mm_##f
using T512i = simde__m512i;
using T512 = simde__m512;
using T128i = simde__m128i;
// SIMDe 0.7.4 (Debian 12) lacks these three; build them from its 256-bit halves.
static inline simde__m512 specqd_emu_cvtepi32_ps(simde__m512i a) {
  simde__m256 lo = simde_mm256_cvtepi32_ps(simde_mm512_castsi512_si256(a));
  simde__m256 hi = simde_mm256_cvtepi32_ps(simde_mm512_extracti64x4_epi64(a, 1));
  return simde_mm512_insertf32x8(simde_mm512_castps256_ps512(lo), hi, 1);
}
static inline simde__m512i specqd_emu_cvtepu8_epi32(simde__m128i a) {
  simde__m256i lo = simde_mm256_cvtepu8_epi32(a);
  simde__m256i hi = simde_mm256_cvtepu8_epi32(simde_mm_srli_si128(a, 8));
  return simde_mm512_inserti64x4(simde_mm512_castsi256_si512(lo), hi, 1);
}
static inline float specqd_emu_reduce_add_ps(simde__m512 a) {
  simde__m256 hi = simde_mm256_castsi256_ps(simde_mm512_extracti64x4_epi64(simde_mm512_castps_si512(a), 1));
  simde__m256 s8 = simde_mm256_add_ps(simde_mm512_castps512_ps256(a), hi);
  simde__m128 s4 = simde_mm_add_ps(simde_mm256_castps256_ps128(s8), simde_mm256_extractf128_ps(s8, 1));
  float v[4];
  simde_mm_storeu_ps(v, s4);
  return (v[0] + v[2]) + (v[1] + v[3]);
}
#define simde_mm512_cvtepi32_ps specqd_emu_cvtepi32_ps
#define simde_mm512_cvtepu8_epi32 specqd_emu_cvtepu8_epi32
#define simde_mm512_reduce_add_ps specqd_emu_reduce_add_ps
#else
#define X512(f) _mm512_##f
#define X128(f) _mm_##f
using T512i = __m512i;
using T512 = __m512;
using T128i = __m128i;
#endif

// int8 activations of the multi-row kernel (multirow.h), quantized per 32-element block.
struct MultirowRows {
  const int8_t* q;     // [M][nblocks * 32]  int8, natural K order, zero-padded to K_pad
  const int32_t* off;  // [M][nblocks]       -12 * sum(q) of the block
  const float* sx;     // [M][nblocks]       amax / 127 / 2 (0 for an all-zero block)
  int64_t nblocks;
};

// Where a GEMM writes: y[m, n] = acc + bias[n], stored as fp32 or bf16 (round to nearest even).
struct OutputRows {
  void* data;
  bool bf16;
  int64_t stride;
  const void* bias;  // nullptr, fp32 or bf16 [N]
  bool bias_bf16;

  inline void store(int64_t m, int64_t n, float v) const {
    if (bias) v += bias_bf16 ? static_cast<float>(static_cast<const c10::BFloat16*>(bias)[n]) : static_cast<const float*>(bias)[n];
    if (bf16)
      static_cast<c10::BFloat16*>(data)[m * stride + n] = c10::BFloat16(v);
    else
      static_cast<float*>(data)[m * stride + n] = v;
  }
};

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "vec_avx2.h"
#include "gemm_body.h"
#include "quantize.h"
#include "bf16_gemm.h"
#define SPECQD_MR_BITS 256
#include "multirow.h"
#undef SPECQD_MR_BITS
#include "multirow_layout.h"
}  // namespace avx2
#pragma GCC pop_options

// GCC does not expand macros inside `#pragma GCC target`, hence the spelled-out variants. The
// emulated build compiles the AVX-512 code for AVX2 (SIMDe provides the 512-bit intrinsics).
#pragma GCC push_options
#ifdef SPECQD_EMULATE_AVX512
#pragma GCC target("avx2,fma")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif
namespace avx512bw {
#define SPECQD_VNNI 0
#include "vec_avx512.h"
#include "gemm_body.h"
#define SPECQD_MR_BITS 512
#include "multirow.h"
#undef SPECQD_MR_BITS
#undef SPECQD_VNNI
}  // namespace avx512bw
#pragma GCC pop_options

#pragma GCC push_options
#ifdef SPECQD_EMULATE_AVX512
#pragma GCC target("avx2,fma")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")
#endif
namespace avx512vnni {
#define SPECQD_VNNI 1
#include "vec_avx512.h"
#include "gemm_body.h"
#define SPECQD_MR_BITS 512
#include "multirow.h"
#undef SPECQD_MR_BITS
#undef SPECQD_VNNI
}  // namespace avx512vnni
#pragma GCC pop_options

// AMX cannot be emulated, so the SIMDe test build leaves it out.
#ifndef SPECQD_EMULATE_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,amx-tile,amx-bf16")
#include "amx_bf16.h"
#pragma GCC pop_options
#endif

namespace {

enum class Isa { avx2, avx512bw, avx512vnni };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2:
      return "avx2";
    case Isa::avx512bw:
      return "avx512bw";
    case Isa::avx512vnni:
      return "avx512vnni";
  }
  return "?";
}

bool cpu_has(Isa isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#ifdef SPECQD_EMULATE_AVX512
  return avx2;  // SIMDe runs the AVX-512 code on AVX2
#else
  const bool bw = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case Isa::avx2:
      return avx2;
    case Isa::avx512bw:
      return bw;
    case Isa::avx512vnni:
      return bw && __builtin_cpu_supports("avx512vnni");
  }
  return false;
#endif
}

Isa parse_isa(const std::string& name) {
  std::string want = name;
  if (want.empty() || want == "auto") {
    const char* env = std::getenv("VLLM_SPECQD_CPU_ISA");
    want = env && *env ? env : "auto";
  }
  if (want == "auto") {
    for (Isa isa : {Isa::avx512vnni, Isa::avx512bw, Isa::avx2})
      if (cpu_has(isa)) return isa;
    TORCH_CHECK(false, "specqd::mxfp4_linear needs an x86-64 CPU with AVX2 and FMA");
  }
  // "avx512" means the best AVX-512 flavour this CPU has.
  if (want == "avx512") want = cpu_has(Isa::avx512vnni) ? "avx512vnni" : "avx512bw";
  for (Isa isa : {Isa::avx2, Isa::avx512bw, Isa::avx512vnni}) {
    if (want == isa_name(isa)) {
      TORCH_CHECK(cpu_has(isa), "specqd::mxfp4_linear: ISA '", want, "' is not supported by this CPU");
      return isa;
    }
  }
  TORCH_CHECK(false, "specqd::mxfp4_linear: unknown ISA '", want,
              "' (VLLM_SPECQD_CPU_ISA / isa=): use auto, avx2, avx512, avx512bw or avx512vnni");
}

int blocks_per_group(Isa isa) { return isa == Isa::avx2 ? 2 : 4; }

template <typename T>
void quantize_any(Isa isa, const T* x, int64_t m, int64_t k, int64_t groups, int bits, int8_t* q8, int16_t* q16,
                  int32_t* offsets, float* scales) {
  switch (isa) {
    case Isa::avx2:
      return avx2::quantize_rows<T>(x, m, k, groups, bits, q8, q16, offsets, scales);
    case Isa::avx512bw:
      return avx512bw::quantize_rows<T>(x, m, k, groups, bits, q8, q16, offsets, scales);
    case Isa::avx512vnni:
      return avx512vnni::quantize_rows<T>(x, m, k, groups, bits, q8, q16, offsets, scales);
  }
}

void gemm_any(Isa isa, int bits, const uint8_t* packed, const uint8_t* scales, int64_t nblocks, int64_t n_begin,
              int64_t n_end, int64_t groups, const int8_t* q8, const int16_t* q16, const int32_t* offsets,
              const float* act_scales, int64_t m, const OutputRows& out) {
  switch (isa) {
    case Isa::avx2: {
      avx2::QuantizedRows xq{groups, q8, q16, offsets, act_scales};
      return avx2::gemm_rows(bits, packed, scales, nblocks, n_begin, n_end, xq, m, out);
    }
    case Isa::avx512bw: {
      avx512bw::QuantizedRows xq{groups, q8, q16, offsets, act_scales};
      return avx512bw::gemm_rows(bits, packed, scales, nblocks, n_begin, n_end, xq, m, out);
    }
    case Isa::avx512vnni: {
      avx512vnni::QuantizedRows xq{groups, q8, q16, offsets, act_scales};
      return avx512vnni::gemm_rows(bits, packed, scales, nblocks, n_begin, n_end, xq, m, out);
    }
  }
}

// Per-thread scratch for the quantized activations: no allocation per call after the first.
template <typename T>
T* scratch(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

struct LinearShape {
  int64_t m, k, n, nblocks;
};

LinearShape check_linear_inputs(const char* who, const at::Tensor& x, const at::Tensor& packed,
                                const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu(), who,
              ": all tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), who, ": x must be a contiguous [M, K] tensor, got ", x.sizes(),
              x.is_contiguous() ? "" : " (non-contiguous)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, who,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t nblocks = (k + 31) / 32;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) == nblocks * 16 &&
                  packed.is_contiguous(),
              who, ": packed must be contiguous uint8 [N, ", nblocks * 16, "] for K=", k, ", got ",
              packed.scalar_type(), " ", packed.sizes());
  const int64_t n = packed.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.dim() == 2 && scales.size(0) == n &&
                  scales.size(1) == nblocks && scales.is_contiguous(),
              who, ": scales must be contiguous uint8 [", n, ", ", nblocks, "], got ", scales.scalar_type(), " ",
              scales.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16),
                who, ": bias must be a contiguous float32 or bfloat16 [", n, "] tensor, got ", bias->scalar_type(),
                " ", bias->sizes());
  }
  return {m, k, n, nblocks};
}

OutputRows output_rows(at::Tensor& y, const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  const bool bias_bf16 = bias.has_value() && bias->scalar_type() == at::kBFloat16;
  return {y.data_ptr(), x.scalar_type() == at::kBFloat16, y.size(1), bias.has_value() ? bias->data_ptr() : nullptr,
          bias_bf16};
}

at::Tensor mxfp4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& bias, int64_t act_bits, const std::string& isa_arg) {
  const LinearShape shape = check_linear_inputs("specqd::mxfp4_linear", x, packed, scales, bias);
  const int64_t m = shape.m, k = shape.k, n = shape.n, nblocks = shape.nblocks;
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "specqd::mxfp4_linear: act_bits must be 8 or 16, got ", act_bits);
  const Isa isa = parse_isa(isa_arg);
  const int64_t groups = (nblocks + blocks_per_group(isa) - 1) / blocks_per_group(isa);
  const int64_t lanes = 4 * blocks_per_group(isa);
  const int64_t group_elems = 32 * blocks_per_group(isa);

  thread_local std::vector<int8_t> q8_buf;
  thread_local std::vector<int16_t> q16_buf;
  thread_local std::vector<int32_t> offset_buf;
  thread_local std::vector<float> scale_buf;
  const size_t rows_groups = static_cast<size_t>(m * groups);
  int8_t* q8 = act_bits == 8 ? scratch(q8_buf, rows_groups * group_elems) : nullptr;
  int16_t* q16 = act_bits == 16 ? scratch(q16_buf, rows_groups * group_elems) : nullptr;
  int32_t* off = act_bits == 8 ? scratch(offset_buf, rows_groups * lanes) : nullptr;
  float* sx = scratch(scale_buf, rows_groups * lanes);
  if (x.scalar_type() == at::kFloat)
    quantize_any<float>(isa, x.data_ptr<float>(), m, k, groups, act_bits, q8, q16, off, sx);
  else
    quantize_any<c10::BFloat16>(isa, x.data_ptr<c10::BFloat16>(), m, k, groups, act_bits, q8, q16, off, sx);

  at::Tensor y = at::empty({m, n}, x.options());
  const OutputRows out = output_rows(y, x, bias);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  // Work is split over output features in whole 16-row chunks, so every thread streams whole rows.
  constexpr int64_t kChunk = 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    gemm_any(isa, static_cast<int>(act_bits), w, s, nblocks, c0 * kChunk, std::min(n, c1 * kChunk), groups, q8, q16,
             off, sx, m, out);
  });
  return y;
}

// The kernel must grant AMX tile data to the process once (Linux arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_available() {
#ifdef SPECQD_EMULATE_AVX512
  return false;
#else
  static const bool available = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = edx & (1u << 24), bf16 = edx & (1u << 22);
    if (!tile || !bf16 || !cpu_has(Isa::avx512bw)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return available;
#endif
}

at::Tensor amx_repack(const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2 &&
                  packed.is_contiguous() && packed.size(1) % 16 == 0,
              "specqd::amx_repack: packed must be contiguous uint8 [N, K_pad/2] on the CPU, got ", packed.sizes());
  const int64_t n = packed.size(0), nblocks = packed.size(1) / 16;
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kByte && scales.is_contiguous() &&
                  scales.dim() == 2 && scales.size(0) == n && scales.size(1) == nblocks,
              "specqd::amx_repack: scales must be contiguous uint8 [", n, ", ", nblocks, "], got ", scales.sizes());
  at::Tensor out = at::empty({(n + 15) / 16, nblocks, 272}, packed.options());
#ifndef SPECQD_EMULATE_AVX512
  amx::repack(packed.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), n, nblocks, out.data_ptr<uint8_t>());
#endif
  return out;
}

at::Tensor mxfp4_linear_amx(const at::Tensor& x, const at::Tensor& repacked, int64_t n,
                            const c10::optional<at::Tensor>& bias) {
  const char* who = "specqd::mxfp4_linear_amx";
  TORCH_CHECK(amx_available(), who, ": this CPU (or its kernel) does not provide AMX-BF16");
  TORCH_CHECK(x.device().is_cpu() && repacked.device().is_cpu(), who, ": all tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              who, ": x must be a contiguous float32 or bfloat16 [M, K] tensor, got ", x.scalar_type(), " ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1), nblocks = (k + 31) / 32;
  TORCH_CHECK(repacked.scalar_type() == at::kByte && repacked.is_contiguous() && repacked.dim() == 3 &&
                  repacked.size(0) == (n + 15) / 16 && repacked.size(1) == nblocks && repacked.size(2) == 272,
              who, ": repacked must be amx_repack's uint8 [", (n + 15) / 16, ", ", nblocks, ", 272] for N=", n,
              " and K=", k, ", got ", repacked.scalar_type(), " ", repacked.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16),
                who, ": bias must be a contiguous float32 or bfloat16 [", n, "] tensor, got ", bias->scalar_type(),
                " ", bias->sizes());
  }
  at::Tensor y = at::empty({m, n}, x.options());
#ifndef SPECQD_EMULATE_AVX512
  const OutputRows out = output_rows(y, x, bias);
  // Feature tiles are split over threads in multiples of `chunk` (the tiles one pass shares).
  auto parallel = [&](int64_t chunk, int64_t tiles, auto&& body) {
    at::parallel_for(0, (tiles + chunk - 1) / chunk, 1,
                     [&](int64_t c0, int64_t c1) { body(c0 * chunk, std::min(tiles, c1 * chunk)); });
  };
  thread_local std::vector<uint16_t> copy_buf;
  const uint8_t* w = repacked.data_ptr<uint8_t>();
  if (x.scalar_type() == at::kFloat)
    amx::gemm<float>(x.data_ptr<float>(), m, k, w, n, out, copy_buf, parallel);
  else
    amx::gemm<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), m, k, w, n, out, copy_buf, parallel);
#endif
  return y;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "specqd::bf16_linear: all tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "specqd::bf16_linear: x must be a contiguous bfloat16 [M, K] tensor, got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16 && w.size(1) == k,
              "specqd::bf16_linear: w must be a contiguous bfloat16 [N, ", k, "] tensor, got ", w.scalar_type(), " ",
              w.sizes());
  const int64_t n = w.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16),
                "specqd::bf16_linear: bias must be a contiguous float32 or bfloat16 [", n, "] tensor, got ",
                bias->scalar_type(), " ", bias->sizes());
  }
  TORCH_CHECK(cpu_has(Isa::avx2), "specqd::bf16_linear needs an x86-64 CPU with AVX2 and FMA");
  thread_local std::vector<float> x_buf;
  float* xf = scratch(x_buf, static_cast<size_t>(m * k));
  const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < m * k; ++i) xf[i] = static_cast<float>(xb[i]);
  at::Tensor y = at::empty({m, n}, x.options());
  const bool bias_bf16 = bias.has_value() && bias->scalar_type() == at::kBFloat16;
  const OutputRows out{y.data_ptr(), true, n, bias.has_value() ? bias->data_ptr() : nullptr, bias_bf16};
  const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
  constexpr int64_t kChunk = 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    avx2::bf16::gemm(xf, wp, m, k, c0 * kChunk, std::min(n, c1 * kChunk), out);
  });
  return y;
}

// ---------------------------------------------------------------------------- multi-row kernel

void multirow_any(Isa isa, const uint8_t* codes, const uint8_t* tile_scales, const MultirowRows& xq, int64_t m,
                  int64_t n, int64_t t_begin, int64_t t_end, const OutputRows& out) {
  switch (isa) {
    case Isa::avx2:
      return avx2::mr::gemm_tiles(codes, tile_scales, xq, m, n, t_begin, t_end, out);
    case Isa::avx512bw:
      return avx512bw::mr::gemm_tiles(codes, tile_scales, xq, m, n, t_begin, t_end, out);
    case Isa::avx512vnni:
      return avx512vnni::mr::gemm_tiles(codes, tile_scales, xq, m, n, t_begin, t_end, out);
  }
}

constexpr int64_t kMrTile = 16;
#ifndef SPECQD_MR_ROW_BLOCK
#define SPECQD_MR_ROW_BLOCK 64
#endif
constexpr int64_t kMrRowBlock = SPECQD_MR_ROW_BLOCK;  // rows per pass over the weights (large M)

void check_multirow_layout(const char* who, const at::Tensor& codes, const at::Tensor& tile_scales, int64_t n,
                           int64_t nblocks) {
  const int64_t tiles = (n + kMrTile - 1) / kMrTile;
  TORCH_CHECK(codes.device().is_cpu() && tile_scales.device().is_cpu(), who, ": all tensors must be on the CPU");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 3 && codes.size(0) == tiles &&
                  codes.size(1) == nblocks && codes.size(2) == 256,
              who, ": codes must be multirow_repack's contiguous uint8 [", tiles, ", ", nblocks, ", 256] for N=", n,
              ", got ", codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(tile_scales.scalar_type() == at::kByte && tile_scales.is_contiguous() && tile_scales.dim() == 3 &&
                  tile_scales.size(0) == tiles && tile_scales.size(1) == nblocks && tile_scales.size(2) == 16,
              who, ": tile_scales must be multirow_repack's contiguous uint8 [", tiles, ", ", nblocks, ", 16], got ",
              tile_scales.scalar_type(), " ", tile_scales.sizes());
}

std::tuple<at::Tensor, at::Tensor> multirow_repack(const at::Tensor& packed, const at::Tensor& scales) {
  const char* who = "specqd::multirow_repack";
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2 &&
                  packed.is_contiguous() && packed.size(1) % 16 == 0,
              who, ": packed must be contiguous uint8 [N, K_pad/2] on the CPU, got ", packed.sizes());
  const int64_t n = packed.size(0), nblocks = packed.size(1) / 16, tiles = (n + kMrTile - 1) / kMrTile;
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kByte && scales.is_contiguous() &&
                  scales.dim() == 2 && scales.size(0) == n && scales.size(1) == nblocks,
              who, ": scales must be contiguous uint8 [", n, ", ", nblocks, "], got ", scales.sizes());
  at::Tensor codes = at::empty({tiles, nblocks, 256}, packed.options());
  at::Tensor tile_scales = at::empty({tiles, nblocks, 16}, packed.options());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  uint8_t* c = codes.data_ptr<uint8_t>();
  uint8_t* ts = tile_scales.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) { avx2::mr_layout::repack(p, s, n, nblocks, t0, t1, c, ts); });
  return {codes, tile_scales};
}

// Features [16 t0, min(n, 16 t1)) of W as rows of `w` ([rows, k], fp32 or bf16), split over threads.
void dequant_range(const at::Tensor& codes, const at::Tensor& tile_scales, int64_t n, int64_t k, int64_t t0,
                   int64_t t1, at::Tensor& w) {
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint8_t* ts = tile_scales.data_ptr<uint8_t>();
  at::parallel_for(t0, t1, 4, [&](int64_t a, int64_t b) {
    if (w.scalar_type() == at::kFloat)
      avx2::mr_layout::dequant_tiles<float>(c, ts, n, k, t0, a, b, w.data_ptr<float>());
    else
      avx2::mr_layout::dequant_tiles<c10::BFloat16>(c, ts, n, k, t0, a, b, w.data_ptr<c10::BFloat16>());
  });
}

at::Tensor multirow_dequant(const at::Tensor& codes, const at::Tensor& tile_scales, int64_t n, int64_t k,
                            at::ScalarType dtype) {
  const char* who = "specqd::multirow_dequant";
  TORCH_CHECK(k >= 1 && n >= 0, who, ": need N >= 0 and K >= 1, got N=", n, " K=", k);
  check_multirow_layout(who, codes, tile_scales, n, (k + 31) / 32);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, who, ": dtype must be float32 or bfloat16");
  TORCH_CHECK(cpu_has(Isa::avx2), who, " needs an x86-64 CPU with AVX2 and FMA");
  at::Tensor w = at::empty({n, k}, codes.options().dtype(dtype));
  dequant_range(codes, tile_scales, n, k, 0, (n + kMrTile - 1) / kMrTile, w);
  return w;
}

// oneDNN runs bf16 GEMMs natively only with AVX-512 BF16 (or AMX); elsewhere fp32 is the faster GEMM.
bool cpu_has_avx512_bf16() {
#ifdef SPECQD_EMULATE_AVX512
  return false;
#else
  __builtin_cpu_init();
  return cpu_has(Isa::avx512bw) && __builtin_cpu_supports("avx512bf16");
#endif
}

#ifndef SPECQD_LARGE_M_CHUNK_TILES
#define SPECQD_LARGE_M_CHUNK_TILES 32
#endif

// Many rows (prefill, vLLM's profile runs): W dequantized exactly, a chunk of feature tiles at a
// time, then at::linear (oneDNN / MKL). bf16 x runs a bf16 GEMM where the CPU has AVX-512 BF16,
// else fp32 (then one rounding to bf16). Only the GEMM's summation order differs from exact math.
at::Tensor large_m_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tile_scales, int64_t n,
                          const c10::optional<at::Tensor>& bias) {
  const int64_t m = x.size(0), k = x.size(1), tiles = (n + kMrTile - 1) / kMrTile;
  const at::ScalarType gemm_type =
      x.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16() ? at::kBFloat16 : at::kFloat;
  const at::Tensor xg = x.scalar_type() == gemm_type ? x : x.to(gemm_type);
  at::Tensor y = at::empty({m, n}, x.options());
  const int64_t chunk = SPECQD_LARGE_M_CHUNK_TILES;
  at::Tensor w = at::empty({std::min(n, chunk * kMrTile), k}, x.options().dtype(gemm_type));
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk) {
    const int64_t t1 = std::min(tiles, t0 + chunk);
    const int64_t n0 = t0 * kMrTile, rows = std::min(n, t1 * kMrTile) - n0;
    at::Tensor wc = w.narrow(0, 0, rows);
    dequant_range(codes, tile_scales, n, k, t0, t1, wc);
    c10::optional<at::Tensor> bc;
    if (bias.has_value()) bc = bias->narrow(0, n0, rows).to(gemm_type);
    y.narrow(1, n0, rows).copy_(at::linear(xg, wc, bc));
  }
  return y;
}

at::Tensor mxfp4_linear_multirow(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& tile_scales,
                                 int64_t n, const c10::optional<at::Tensor>& bias, const std::string& isa_arg,
                                 int64_t large_m) {
  const char* who = "specqd::mxfp4_linear_multirow";
  TORCH_CHECK(x.device().is_cpu(), who, ": all tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              who, ": x must be a contiguous float32 or bfloat16 [M, K] tensor, got ", x.scalar_type(), " ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1), nblocks = (k + 31) / 32;
  TORCH_CHECK(k >= 1, who, ": x must have K >= 1 columns");
  check_multirow_layout(who, codes, tile_scales, n, nblocks);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() &&
                    (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16),
                who, ": bias must be a contiguous float32 or bfloat16 [", n, "] tensor, got ", bias->scalar_type(),
                " ", bias->sizes());
  }
  const Isa isa = parse_isa(isa_arg);  // also refuses CPUs without AVX2
  if (large_m >= 0 && m > large_m) return large_m_linear(x, codes, tile_scales, n, bias);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;

  thread_local std::vector<int8_t> q_buf;
  thread_local std::vector<int32_t> off_buf;
  thread_local std::vector<float> sx_buf;
  const size_t row_blocks = static_cast<size_t>(m * nblocks);
  int8_t* q = scratch(q_buf, row_blocks * 32);
  int32_t* off = scratch(off_buf, row_blocks);
  float* sx = scratch(sx_buf, row_blocks);
  // One quantizer for every ISA, so the int8 rows (and hence the results) are the same everywhere.
  if (x.scalar_type() == at::kFloat)
    avx2::mr::quantize_rows<float>(x.data_ptr<float>(), m, k, nblocks, q, off, sx);
  else
    avx2::mr::quantize_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), m, k, nblocks, q, off, sx);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint8_t* ts = tile_scales.data_ptr<uint8_t>();
  // Many rows go in blocks whose int8 activations stay in L2 while every tile passes over them
  // (each tile re-reads its block's rows); the weights are then re-read once per block.
  const int64_t elem = x.scalar_type() == at::kBFloat16 ? 2 : 4;
  for (int64_t r0 = 0; r0 < m; r0 += kMrRowBlock) {
    const int64_t rows = std::min(kMrRowBlock, m - r0);
    const MultirowRows xq{q + r0 * nblocks * 32, off + r0 * nblocks, sx + r0 * nblocks, nblocks};
    OutputRows out = output_rows(y, x, bias);
    out.data = static_cast<char*>(out.data) + r0 * n * elem;
    at::parallel_for(0, (n + kMrTile - 1) / kMrTile, 1,
                     [&](int64_t t0, int64_t t1) { multirow_any(isa, c, ts, xq, rows, n, t0, t1, out); });
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> quantize_mxfp4(const at::Tensor& w, const std::string& rule_name) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(),
              "specqd::quantize_mxfp4: w must be a contiguous 2-D CPU tensor, got ", w.sizes());
  TORCH_CHECK(cpu_has(Isa::avx2), "specqd::quantize_mxfp4 needs an x86-64 CPU with AVX2 and FMA");
  using avx2::quant::ScaleRule;
  namespace quant = avx2::quant;
  quant::ScaleRule rule;
  if (rule_name == "floor")
    rule = quant::ScaleRule::floor;
  else if (rule_name == "rceil")
    rule = quant::ScaleRule::rceil;
  else if (rule_name == "mse")
    rule = quant::ScaleRule::mse;
  else
    TORCH_CHECK(false, "specqd::quantize_mxfp4: unknown scale rule '", rule_name, "' (floor, rceil, mse)");
  const int64_t n = w.size(0), k = w.size(1), blocks = (k + 31) / 32;
  at::Tensor packed = at::empty({n, blocks * 16}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({n, blocks}, w.options().dtype(at::kByte));
  uint8_t* p = packed.data_ptr<uint8_t>();
  uint8_t* s = scales.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    uint8_t* pr = p + r0 * blocks * 16;
    uint8_t* sr = s + r0 * blocks;
    switch (w.scalar_type()) {
      case at::kFloat:
        return quant::quantize_rows(w.data_ptr<float>() + r0 * k, r1 - r0, k, rule, pr, sr);
      case at::kBFloat16:
        return quant::quantize_rows(w.data_ptr<c10::BFloat16>() + r0 * k, r1 - r0, k, rule, pr, sr);
      case at::kHalf:
        return quant::quantize_rows(w.data_ptr<c10::Half>() + r0 * k, r1 - r0, k, rule, pr, sr);
      default:
        TORCH_CHECK(false, "specqd::quantize_mxfp4: w must be float32, bfloat16 or float16, got ", w.scalar_type());
    }
  });
  return {packed, scales};
}

std::string resolve_isa(const std::string& name) { return isa_name(parse_isa(name)); }

std::string cpu_isas() {
  std::string names;
  for (Isa isa : {Isa::avx512vnni, Isa::avx512bw, Isa::avx2}) {
    if (!cpu_has(isa)) continue;
    if (!names.empty()) names += ",";
    names += isa_name(isa);
  }
  return names;
}

int64_t stream_read(const at::Tensor& buf) {
  TORCH_CHECK(buf.scalar_type() == at::kByte && buf.is_contiguous(), "stream_read: contiguous uint8 buffer");
  const uint8_t* p = buf.data_ptr<uint8_t>();
  const int64_t bytes = buf.numel() / 128 * 128;
  const int64_t chunks = bytes / 128;
  int64_t total = 0;
  at::parallel_for(0, chunks, 4096, [&](int64_t c0, int64_t c1) {
    uint64_t acc = 0;
    for (int64_t c = c0; c < c1; ++c) {
      uint64_t v[16];
      std::memcpy(v, p + c * 128, 128);  // compiles to vector loads
      for (int i = 0; i < 16; ++i) acc ^= v[i];
    }
    __atomic_fetch_xor(reinterpret_cast<uint64_t*>(&total), acc, __ATOMIC_RELAXED);
  });
  return total;
}

}  // namespace

// The SIMDe-emulated test build registers under its own namespace, so both can load in one process.
#ifdef SPECQD_EMULATE_AVX512
#define SPECQD_DEFINE_OPS TORCH_LIBRARY(specqd_emu, m)
#define SPECQD_CPU_OPS TORCH_LIBRARY_IMPL(specqd_emu, CPU, m)
#define SPECQD_ANY_OPS TORCH_LIBRARY_IMPL(specqd_emu, CompositeExplicitAutograd, m)
#else
#define SPECQD_DEFINE_OPS TORCH_LIBRARY(specqd, m)
#define SPECQD_CPU_OPS TORCH_LIBRARY_IMPL(specqd, CPU, m)
#define SPECQD_ANY_OPS TORCH_LIBRARY_IMPL(specqd, CompositeExplicitAutograd, m)
#endif

SPECQD_DEFINE_OPS {
  m.def("mxfp4_linear(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int act_bits, str isa) -> Tensor");
  m.def("amx_repack(Tensor packed, Tensor scales) -> Tensor");
  m.def("mxfp4_linear_amx(Tensor x, Tensor repacked, int n, Tensor? bias) -> Tensor");
  m.def("amx_available() -> bool");
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("cpu_isas() -> str");
  m.def("resolve_isa(str name) -> str");
  m.def("stream_read(Tensor buf) -> int");
  m.def("quantize_mxfp4(Tensor w, str rule) -> (Tensor, Tensor)");
  m.def("multirow_repack(Tensor packed, Tensor scales) -> (Tensor, Tensor)");
  m.def("mxfp4_linear_multirow(Tensor x, Tensor codes, Tensor tile_scales, int n, Tensor? bias, str isa, int large_m) -> Tensor");
  m.def("multirow_dequant(Tensor codes, Tensor tile_scales, int n, int k, ScalarType dtype) -> Tensor");
}

SPECQD_CPU_OPS {
  m.impl("mxfp4_linear", &mxfp4_linear);
  m.impl("amx_repack", &amx_repack);
  m.impl("mxfp4_linear_amx", &mxfp4_linear_amx);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("stream_read", &stream_read);
  m.impl("quantize_mxfp4", &quantize_mxfp4);
  m.impl("multirow_repack", &multirow_repack);
  m.impl("mxfp4_linear_multirow", &mxfp4_linear_multirow);
  m.impl("multirow_dequant", &multirow_dequant);
}

SPECQD_ANY_OPS {
  m.impl("cpu_isas", &cpu_isas);
  m.impl("resolve_isa", &resolve_isa);
  m.impl("amx_available", &amx_available);
}
