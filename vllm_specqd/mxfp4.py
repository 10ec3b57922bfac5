"""MXFP4, the OCP Microscaling FP4 weight format: constants, packing, quantize / dequantize.

Reference: OCP Microscaling Formats (MX) Specification v1.0 (Sep 2023), cited as [MX §n]. The
storage layout is fixed by docs/CONTRACTS.md; this module is the only place that encodes it. It
knows nothing of vLLM and runs on whatever device its input lives on.

A weight ``W [N, K]`` is cut along K into blocks of 32 elements; each block stores one E8M0 scale
byte ``X = 2^(byte - 127)`` (255 = NaN) [MX §5.4.1] and 32 FP4 E2M1 codes ``s ee m`` worth
+-{0, 0.5, 1, 1.5, 2, 3, 4, 6} [MX §5.3.3], two per byte, element ``2i`` in the low nibble. K is
zero-padded to a multiple of 32. Elements round to nearest, ties to even, saturating at +-6
[MX §6.3]. Scale rules ``"floor"`` (the spec's), ``"rceil"`` and ``"mse"``, and the conventions
chosen where the spec leaves room (zero blocks, -0.0, NaN, exact exponents): docs/design.md.

Worked example (FLOOR): one block ``w = [0.3, -2.2, 5.2, 10.0, 0, ..., 0]``: amax = 10,
floor(log2 10) = 3, so ``e = 3 - 2 = 1``, ``X = 2``, scale byte ``127 + 1 = 128``. Scaled:
``[0.15, -1.1, 2.6, 5.0]`` rounds to ``[0, -1, 3, 4]`` (5.0 is a tie between 4 and 6 and goes to
the even code 4 = 0b0110), so codes ``[0x0, 0xA, 0x5, 0x6]``, packed bytes ``[0xA0, 0x65, 0x00,
...]``, and dequantization gives ``[0, -2, 6, 8, 0, ...]``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK_SIZE = 32  # elements sharing one scale, along K [MX §5, Table 1]
FP4_EMAX = 2  # largest unbiased E2M1 exponent: 6 = 1.5 * 2^2
E8M0_BIAS = 127
E8M0_NAN = 255
SCALE_EXP_MIN, SCALE_EXP_MAX = -127, 127  # bytes 0..254
ZERO_BLOCK_SCALE_BYTE = 0
SCALE_RULES = ("floor", "rceil", "mse")

# Value of every E2M1 code, indexed by the nibble [MX §5.3.3]; 0x8 is negative zero.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Midpoints between consecutive magnitudes 0 < 0.5 < 1 < ... < 6. At a tie, round-to-nearest-even
# keeps the neighbour whose mantissa bit is 0: that is the lower code when the lower code is even
# (strict ">" to move up) and the upper code when the lower code is odd (">=" moves up).
_MIDPOINTS_TIE_UP = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


class MXFP4Tensor(NamedTuple):
    """A quantized weight; see docs/CONTRACTS.md. Unpacks as ``packed, scales, k = q``."""

    packed: torch.Tensor  # [..., K_pad // 2] uint8, two E2M1 codes per byte
    scales: torch.Tensor  # [..., K_pad // 32] uint8, E8M0
    k: int  # original K before padding

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_mxfp4(self.packed, self.scales, self.k, dtype)


def _magnitude_codes(magnitude: torch.Tensor) -> torch.Tensor:
    # magnitude: [...] float >= 0 -> [...] uint8 codes 0..7.
    # Counting the midpoints passed gives the code; values beyond 5 land on 7 (= 6.0), which is the
    # saturation the spec asks for. Bool tensors are viewed as bytes to skip a conversion pass.
    codes = torch.zeros(magnitude.shape, dtype=torch.uint8, device=magnitude.device)
    for midpoint, tie_goes_up in _MIDPOINTS_TIE_UP:
        codes += ((magnitude >= midpoint) if tie_goes_up else (magnitude > midpoint)).view(torch.uint8)
    return codes


def _encode_fp4(x_scaled: torch.Tensor) -> torch.Tensor:
    # x_scaled: [...] float, assumed NaN-free -> [...] uint8 codes 0..15
    codes = _magnitude_codes(x_scaled.abs())
    negative = (x_scaled < 0) & (codes != 0)  # keeps zero canonical: never 0x8
    return codes | (negative.view(torch.uint8) << 3)


def float_to_fp4_codes(x_scaled: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 codes (RNE, saturating at +-6; +-inf saturate too).

    ``x_scaled``: ``[...]`` any float dtype. Returns ``[...]`` uint8 codes in 0..15.
    Anything that rounds to zero, -0.0 included, is code 0x0. NaN raises ValueError.
    """
    if torch.isnan(x_scaled).any():
        raise ValueError("float_to_fp4_codes: input contains NaN, which FP4 E2M1 cannot encode")
    return _encode_fp4(x_scaled)


def fp4_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """``codes``: ``[...]`` integer tensor of nibbles 0..15. Returns ``[...]`` float32 values."""
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.int()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``codes``: ``[..., 2M]`` uint8 nibbles. Returns ``[..., M]`` uint8, element 2i in the low nibble."""
    if codes.dtype != torch.uint8 or codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs uint8 codes with an even last dim, got {codes.dtype} {tuple(codes.shape)}")
    return (codes[..., 0::2] & 0xF) | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """``packed``: ``[..., M]`` uint8. Returns ``[..., 2M]`` uint8 codes (inverse of ``pack_fp4``)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp4 needs uint8, got {packed.dtype}")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _exp2_exact(exponents: torch.Tensor) -> torch.Tensor:
    # exponents: [...] int in [-127, 127] -> [...] float32 equal to 2^exponent.
    # Built from the bit pattern so that it is exact on every device; 2^-127 is the one
    # fp32 subnormal in range (mantissa bit 22 set, biased exponent 0).
    biased = exponents.to(torch.int32) + E8M0_BIAS
    bits = torch.where(biased > 0, biased << 23, torch.full_like(biased, 1 << 22))
    return bits.view(torch.float32)


def e8m0_to_float(scale_bytes: torch.Tensor) -> torch.Tensor:
    """``scale_bytes``: ``[...]`` uint8. Returns ``[...]`` float32 ``2^(byte-127)``, NaN for 255."""
    scale = _exp2_exact(scale_bytes.int().clamp(max=E8M0_NAN - 1) - E8M0_BIAS)
    return torch.where(scale_bytes == E8M0_NAN, torch.full_like(scale, float("nan")), scale)


def _floor_exponents(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # amax: [...] float32 >= 0 -> (FLOOR exponent [...] int32, frexp mantissa [...] in [0.5, 1)).
    # Not yet clamped to E8M0: RCEIL and MSE derive their exponents from the true FLOOR one.
    # frexp gives amax = m * 2^E exactly, so floor(log2(amax)) = E - 1 with no rounding risk.
    mantissa, exponent = torch.frexp(amax)
    floor_exp = exponent - 1 - FP4_EMAX
    # log2(0) = -inf: an all-zero block takes the bottom of the range (ZERO_BLOCK_SCALE_BYTE).
    floor_exp = torch.where(amax == 0, torch.full_like(floor_exp, SCALE_EXP_MIN), floor_exp)
    return floor_exp, mantissa


def _clamp_e8m0(exponents: torch.Tensor) -> torch.Tensor:
    return exponents.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX)


def _mse_exponents(blocks: torch.Tensor, floor_exp: torch.Tensor) -> torch.Tensor:
    # blocks: [..., B, 32] float32, floor_exp: [..., B] int32 unclamped -> [..., B] int32 exponents.
    # Errors are measured in units of the (clamped) FLOOR scale: the ordering is the same as in
    # absolute units, but squares can neither overflow (huge weights) nor underflow to a false tie.
    unit_exp = _clamp_e8m0(floor_exp)
    # Rounding keeps the sign, so magnitudes alone give the same errors.
    scaled = blocks.abs() / _exp2_exact(unit_exp).unsqueeze(-1)
    best_exp, best_err = unit_exp, None
    # Preference order; only a strictly smaller error displaces. (-1 and +1 never both beat FLOOR:
    # +1 wins only via an element above 6X, on which -1 loses over 5X^2 to FLOOR, while -1 gains
    # at most 31 * (X/4)^2 < 2X^2 elsewhere; so "then lower" only orders clamped duplicates.)
    for delta in (0, -1, 1):
        exp = _clamp_e8m0(floor_exp + delta)
        step = _exp2_exact(exp - unit_exp).unsqueeze(-1)  # 1/2, 1 or 2 in FLOOR units
        rounded = fp4_codes_to_float(_magnitude_codes(scaled / step)) * step
        err = (rounded - scaled).square().sum(dim=-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_exp, best_err = torch.where(better, exp, best_exp), torch.where(better, err, best_err)
    return best_exp


@torch.no_grad()
def quantize_mxfp4(w: torch.Tensor, scale_rule: str = "floor", name: str = "weight") -> MXFP4Tensor:
    """Quantize ``w`` (``[..., K]``, usually ``[N, K]``; fp32/bf16/fp16) to MXFP4 along the last dim.

    Computes in fp32 on ``w``'s device. ``name`` only labels errors (e.g. the parameter name).
    Raises ValueError for an unknown ``scale_rule`` or non-finite values in ``w``.
    """
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown MXFP4 scale_rule {scale_rule!r}; expected one of {SCALE_RULES}")
    if not w.is_floating_point() or w.dim() == 0:
        raise ValueError(f"{name}: need a floating-point tensor with at least 1 dim, got {w.dtype} {tuple(w.shape)}")
    w32 = w.detach().float()
    finite = torch.isfinite(w32)  # checked after the cast: a float64 beyond fp32 range is Inf here
    if not finite.all():
        n_bad = int((~finite).sum())
        raise ValueError(f"{name}: cannot quantize to MXFP4, {n_bad} of {w.numel()} values are NaN or Inf")
    del finite

    k = w.shape[-1]
    k_pad = -(-k // BLOCK_SIZE) * BLOCK_SIZE
    lead = w.shape[:-1]
    if k_pad != k:
        w32 = torch.nn.functional.pad(w32, (0, k_pad - k))  # zeros: code 0, no effect on amax
    blocks = w32.reshape(*lead, k_pad // BLOCK_SIZE, BLOCK_SIZE)  # [..., B, 32]

    floor_exp, mantissa = _floor_exponents(blocks.abs().amax(dim=-1))  # [..., B]
    if scale_rule == "floor":
        exp = _clamp_e8m0(floor_exp)
    elif scale_rule == "rceil":
        # amax = m * 2^E with m in [0.5, 1): amax / 2^(E-3) = 8m <= 6 iff m <= 0.75, otherwise
        # one more power of two is needed. Zero blocks have m = 0 and stay at the bottom.
        exp = _clamp_e8m0(floor_exp + (mantissa > 0.75).int())
    else:
        exp = _mse_exponents(blocks, floor_exp)

    codes = _encode_fp4(blocks / _exp2_exact(exp).unsqueeze(-1))  # [..., B, 32]
    packed = pack_fp4(codes.reshape(*lead, k_pad)).contiguous()
    scales = (exp + E8M0_BIAS).to(torch.uint8).contiguous()
    return MXFP4Tensor(packed, scales, k)


def dequantize_mxfp4(
    packed: torch.Tensor,  # [..., K_pad // 2] uint8
    scales: torch.Tensor,  # [..., K_pad // 32] uint8
    k: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode to ``[..., k]`` (``k`` defaults to ``K_pad``) in ``dtype``, computed exactly in fp32."""
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"packed and scales must be uint8, got {packed.dtype} and {scales.dtype}")
    k_pad = packed.shape[-1] * 2
    if packed.shape[:-1] != scales.shape[:-1] or scales.shape[-1] * BLOCK_SIZE != k_pad:
        raise ValueError(
            f"packed {tuple(packed.shape)} and scales {tuple(scales.shape)} do not describe "
            f"the same [..., K_pad] weight with {BLOCK_SIZE}-element blocks"
        )
    if k is None:
        k = k_pad
    if -(-k // BLOCK_SIZE) * BLOCK_SIZE != k_pad:
        raise ValueError(f"k={k} does not pad to K_pad={k_pad}")
    values = fp4_codes_to_float(unpack_fp4(packed)).reshape(*scales.shape, BLOCK_SIZE)
    values = values * e8m0_to_float(scales).unsqueeze(-1)
    return values.reshape(*packed.shape[:-1], k_pad)[..., :k].to(dtype)
