"""SpecQDProposer: vLLM's DraftModelProposer with an in-memory MXFP4 self-draft.

Level 1 reuses vLLM's drafting loop unchanged (its first pass keeps the
draft's KV cache in step with the target; then one forward pass per draft
token). When ``inner`` levels are configured, the remaining K-1 tokens come
from :mod:`vllm_specqd.multilevel` instead, which lets a cheaper proposer
guess several tokens that the MXFP4 draft checks in one pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from vllm.compilation.backends import set_model_tag
from vllm.logger import init_logger
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_specqd.adapter.draft_builder import DRAFT_PREFIX, build_mxfp4_draft
from vllm_specqd.config import from_dict

logger = init_logger(__name__)


class SpecQDProposer(DraftModelProposer):
    def __init__(self, vllm_config, device: torch.device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.specqd = from_dict(vllm_config.additional_config["specqd"])
        self._target_for_build: nn.Module | None = None

    def load_model(self, target_model: nn.Module) -> None:
        self._target_for_build = target_model
        try:
            super().load_model(target_model)
        finally:
            self._target_for_build = None
        logger.info(
            "specqd: level 1 = MXFP4 self-draft (scale rule %s), K=%d, draft sampling %s",
            self.specqd.draft.scale_rule,
            self.specqd.num_speculative_tokens,
            self.specqd.draft_sample_method,
        )

    def _get_model(self) -> nn.Module:
        assert self._target_for_build is not None, "load_model() passes the target in"
        with set_model_tag(DRAFT_PREFIX):
            return build_mxfp4_draft(
                self._create_draft_vllm_config(),
                self._target_for_build,
                dequantize_once=self.specqd.draft.cpu_dequantize_once,
            )
