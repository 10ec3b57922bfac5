"""Wall time of a model's forward passes, through forward hooks (public torch API, no vLLM names).

Used for c, the draft/target cost ratio of the level report. CPU only: on CUDA a forward returns
before its kernels finish, and forcing a sync on every pass would slow the engine it measures.
"""

from __future__ import annotations

import time

import torch.nn as nn


class PassTimer:
    """Counts and times ``module``'s forward passes once :attr:`enabled` (after warm-up)."""

    def __init__(self, module: nn.Module):
        self.enabled = False
        self.passes = 0
        self.seconds = 0.0
        self.last_seconds: float | None = None  # the latest timed pass
        self._started: float | None = None
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, module, args) -> None:
        self._started = time.perf_counter() if self.enabled else None

    def _after(self, module, args, output) -> None:
        if self._started is not None:
            self.last_seconds = time.perf_counter() - self._started
            self.seconds += self.last_seconds
            self.passes += 1
            self._started = None
