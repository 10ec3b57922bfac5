"""The shapes the session checks and times (shared by precompile, tune_check, timings and the tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .layout import repo_module

SMOKE = os.environ.get("SPECQD_SESSION_SMOKE") == "1"
SHORT = os.environ.get("SPECQD_SESSION_SHORT") == "1"
# Tiny layers for the Triton interpreter on CPU (SPECQD_SESSION_SMOKE=1): (layer, N, K).
SMOKE_MODELS = {"8b": [("o", 64, 64), ("gate_up", 96, 64), ("down", 40, 96)], "70b": [("o", 32, 64)]}
DECODE_MODELS = ("8b", "70b")
PREFILL_MODEL = "8b"


@dataclass(frozen=True)
class Shapes:
    models: dict[str, list[tuple[str, int, int]]]  # model -> [(layer, N, K)], bench_kernels.MODELS
    decode_m: tuple[int, ...]  # activation rows M of the decode GEMMs, also the decode-step batches
    prefill_m: tuple[int, ...]  # M of the prefill GEMMs (launcher path: dequant)

    def decode_jobs(self) -> list[tuple[str, str, int, int, int]]:
        """(model, layer, N, K, M) of every decode GEMM."""
        layers = [(mod, layer, n, k) for mod in DECODE_MODELS for layer, n, k in self.models[mod]]
        return [(mod, layer, n, k, m) for mod, layer, n, k in layers for m in self.decode_m]

    def prefill_jobs(self) -> list[tuple[str, str, int, int, int]]:
        """(model, layer, N, K, M) of every prefill GEMM (8B)."""
        return [(PREFILL_MODEL, layer, n, k, m) for layer, n, k in self.models[PREFILL_MODEL] for m in self.prefill_m]


def session_shapes(smoke: bool = SMOKE, short: bool = SHORT) -> Shapes:
    """The shapes of a smoke, short or full session (smoke wins over short)."""
    if smoke:
        return Shapes(SMOKE_MODELS, (1, 2), (17, 33))
    models = repo_module("benchmarks", "bench_kernels").MODELS
    if short:
        return Shapes(models, (1, 4, 16), (64, 256))
    return Shapes(models, (1, 2, 4, 8, 16), (64, 256, 1024, 4096))
