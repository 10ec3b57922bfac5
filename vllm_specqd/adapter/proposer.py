"""SpecQDProposer: vLLM's DraftModelProposer with an in-memory MXFP4 self-draft.

One phase per method, as vLLM calls them: :meth:`load_model` (the draft, the inner levels),
:meth:`initialize_attn_backend` (where each level's KV lives), :meth:`propose` (one round).
A round takes one of the paths of :class:`RoundPath`, picked by :meth:`_pick_path`; docs/design.md
draws each. Every vLLM internal it needs goes through ``vllm_internals``.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from vllm.compilation.backends import set_model_tag
from vllm.config import CompilationMode
from vllm.logger import init_logger
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_specqd.adapter import draft_rounds as rounds
from vllm_specqd.adapter import vllm_internals as internals
from vllm_specqd.adapter.adaptive_drafter import AdaptiveDrafter
from vllm_specqd.adapter.draft_builder import DRAFT_PREFIX, build_mxfp4_draft, mxfp4_layers
from vllm_specqd.adapter.draft_fastpath import use_platform_custom_ops
from vllm_specqd.adapter.engine_config import separate_kv_on_hybrid_target_error
from vllm_specqd.adapter.inner_models import load_inner_model
from vllm_specqd.adapter.level_stats import LevelStatsPublisher
from vllm_specqd.adapter.target_step import TargetStep
from vllm_specqd.adapter.window_model import VllmWindowModel
from vllm_specqd.adaptive import Decision
from vllm_specqd.config import ModelLevel, NgramLevel, SpecQDConfigError, from_dict
from vllm_specqd.multilevel import SpeculativeLevel, build_chain
from vllm_specqd.ngram import NgramProposer

# Under "vllm." so vLLM's logging config (handlers, level, process prefix) applies.
logger = init_logger("vllm." + __name__)

# "1": in a compiled engine, compile the draft too (by default it runs eagerly: docs/design.md).
DRAFT_COMPILE_ENV = "VLLM_SPECQD_DRAFT_COMPILE"
# Debug/test hook: append every round's level-1 drafts as JSON lines to this file.
TRACE_ENV = "VLLM_SPECQD_TRACE_DRAFTS"


class RoundPath(enum.Enum):
    NO_DRAFTS = "adaptive chose k = 0 for every request: no pass"
    CHAIN = "a first pass gives d1, the speculative chain of inner levels d2..dK"
    SHARED_KV = "K single-token passes over the target's own KV (QSpec)"
    VLLM_LOOP = "vLLM's own loop: a first pass catching the draft's separate KV up, then one pass per token"


@dataclass
class DrafterWork:
    """What the drafter did, counted per request and round (tests check idle rounds do none of it)."""

    rounds: int = 0
    rounds_without_passes: int = 0
    ngram_lookups: int = 0  # requests whose committed context was copied and looked up for an n-gram
    warmup_forwards: int = 0  # draft forwards of vLLM's profile / compile warm-up runs (dummy_run)


class SpecQDProposer(DraftModelProposer):
    def __init__(self, vllm_config, device: torch.device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.runner = runner  # the base class does not keep it; we read its input batch
        self.specqd = from_dict(vllm_config.additional_config["specqd"])
        self.shared_kv = self.specqd.draft.kv_cache == "shared"
        self.chain: SpeculativeLevel | None = None
        self.kv_group_ids: list[int] = []  # the KV cache groups every level's layers are in
        self.inner_window_models: list[VllmWindowModel] = []  # level 2, 3, ... (model levels only)
        self.stats = LevelStatsPublisher(vllm_config)
        self._trace_rounds = 0
        self.work = DrafterWork()
        self.draft_kept_eager = False  # in a compiled engine, see _build_draft
        self.adaptive: AdaptiveDrafter | None = None
        # Adaptive, shared KV, an n-gram inner level: the n-gram proposes to the target directly.
        self.ngram_direct: NgramLevel | None = None
        if self.specqd.adaptive.enabled and self.shared_kv and isinstance(self.specqd.inner, NgramLevel):
            self.ngram_direct = self.specqd.inner
        if self.specqd.adaptive.enabled:
            # Separate KV and inner models catch their KV up in a round's first pass: it always runs.
            catch_up = not self.shared_kv or (self.specqd.inner is not None and self.ngram_direct is None)
            self.adaptive = self.stats.adaptive = AdaptiveDrafter(
                self.specqd.adaptive,
                self.specqd.num_speculative_tokens,
                min_passes=int(catch_up),
                max_model_len=vllm_config.model_config.max_model_len,
                passes_run_drafting_rows_only=not catch_up,  # _shared_kv_round's limits
            )
        if runner is not None:
            internals.on_request_removed(runner, self._forget_request)
            internals.on_request_resumed(runner, self._forget_kv)

    def _forget_kv(self, req_id: str) -> None:
        """A preempted request resumed in new KV blocks: what the inner levels held of it is gone."""
        if self.chain is not None:
            self.chain.forget(req_id)

    def _forget_request(self, req_id: str) -> None:
        """vLLM dropped a request (finished or aborted): free its per-level state at once."""
        if self.adaptive is not None:
            self.adaptive.forget(req_id)
        self.stats.forget(req_id, batch_empty=not internals.runner_holds_requests(self.runner))

    # ------------------------------------------------------------------ loading

    def load_model(self, target_model: nn.Module) -> None:
        draft = self.specqd.draft
        internals.load_draft_model(self, target_model, lambda config: self._build_draft(config, target_model))
        self.level1_model = VllmWindowModel("level1", self.model, self.vllm_config, self.device)
        self.stats.set_level(
            1,
            proposer="MXFP4 self-draft",
            weight_bytes=self.model.specqd_extra_weight_bytes,
            cpu_copy_bytes=self.model.specqd_cpu_copy_bytes,
            kv_cache=draft.kv_cache,
        )
        if self.ngram_direct is not None:
            self.stats.set_level(2, proposer="n-gram lookup, straight to the target", kv_cache="none")
        elif self.specqd.inner is not None:
            self.chain, self.inner_window_models = build_level_chain(
                self.specqd, self.level1_model, self.vllm_config, self.device, self.stats
            )
            self.stats.chain = self.chain
        model_levels = [self.model, *(w.model for w in self.inner_window_models)]
        self.stats.time_passes(target_model, dict(enumerate(model_levels, start=1)))
        if self.adaptive is not None:
            self.adaptive.target_timer = self.stats.target_timer
            self.adaptive.calibrate(mxfp4_layers(self.model))
        logger.info(
            "specqd: level 1 = MXFP4 self-draft (scale rule %s, %s KV, lm_head %s), K=%d%s, draft sampling %s; "
            "levels below: %s",
            draft.scale_rule,
            draft.kv_cache,
            draft.lm_head,
            self.specqd.num_speculative_tokens,
            f" (adaptive, {self.specqd.adaptive.policy} policy: K is the maximum)" if self.adaptive else "",
            self.specqd.draft_sample_method,
            [_describe(level) for level in self.specqd.levels()] or "none",
        )

    def _build_draft(self, draft_vllm_config, target_model: nn.Module) -> nn.Module:
        draft = self.specqd.draft
        with set_model_tag(DRAFT_PREFIX):
            model = build_mxfp4_draft(
                draft_vllm_config,
                target_model,
                cpu_kernel=draft.cpu_kernel,
                lm_head=draft.lm_head,
                scale_rule=draft.scale_rule,
                lm_head_rescore_top_k=draft.lm_head_rescore_top_k,
            )
        compiled_engine = draft_vllm_config.compilation_config.mode != CompilationMode.NONE
        if compiled_engine and os.environ.get(DRAFT_COMPILE_ENV, "0") != "1":
            internals.run_eagerly(model)
            self.draft_kept_eager = True
            if self.device.type == "cpu":
                internals.call_attention_directly(model)
                wrapped = use_platform_custom_ops(model, target_model)
                logger.info("specqd: compiled engine, eager MXFP4 draft (%d vLLM ops on their CPU kernels)", wrapped)
        return model

    def kv_cache_spec_context(self):
        """What the runner's KV cache spec collection runs inside (patches.py, patch 8)."""
        if not self.shared_kv:
            return contextlib.nullcontext()
        return internals.sharing_target_kv_while(self.vllm_config, internals.draft_layer_names(self), DRAFT_PREFIX)

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        """Attention groups for every level's layers (shared-KV draft layers sit in the target's groups).

        On a hybrid-attention target (sliding-window and full-attention layers) the shared-KV
        draft's layers span the target's KV cache groups: one binding per group.
        """
        draft_layers = internals.draft_layer_names(self)
        num_groups = len(internals.layers_by_kv_cache_group(kv_cache_config, draft_layers))
        if num_groups > 1 and not self.shared_kv:
            raise SpecQDConfigError(separate_kv_on_hybrid_target_error(f"{num_groups} KV cache groups"))
        if num_groups > 1:
            level1 = internals.attention_bindings_by_group(self, kv_cache_config, kernel_block_sizes)
        else:
            super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
            level1 = [internals.attention_binding(self)]
        self._bind(self.level1_model, sorted(draft_layers), level1)
        group_ids = {binding.kv_cache_gid for binding in level1}
        kv_bytes = 0 if self.shared_kv else internals.kv_bytes_per_token(self.vllm_config, draft_layers)
        self.stats.set_level(1, kv_bytes_per_token=kv_bytes)
        for level, window_model in enumerate(self.inner_window_models, start=2):
            # A small model's layers sit in the target's group (one spec per layer where pages differ)
            # or, where their attention kind differs, in group(s) of their own: a binding per group.
            bindings = internals.attention_bindings_for(
                self, window_model.layer_names, kv_cache_config, kernel_block_sizes
            )
            self._bind(window_model, window_model.layer_names, bindings)
            group_ids.update(binding.kv_cache_gid for binding in bindings)
            kv_bytes = internals.kv_bytes_per_token(self.vllm_config, window_model.layer_names)
            self.stats.set_level(level, kv_bytes_per_token=kv_bytes)
        self.kv_group_ids = sorted(group_ids)  # every level's: each round reads these block tables
        self.stats.publish(busy=False, force=True)  # what each level adds, before any request

    @staticmethod
    def _bind(
        window_model: VllmWindowModel, layer_names: list[str], bindings: list[internals.AttentionBinding]
    ) -> None:
        window_model.layer_names = list(layer_names)
        window_model.kv_groups = bindings

    def dummy_run(self, num_tokens: int, use_cudagraphs: bool = True, is_graph_capturing: bool = False, **kwargs):
        """vLLM's profile and compile warm-up runs: one draft forward, not K; none for an eager draft.

        vLLM's runs K forwards of ``num_tokens`` rows (llm_base_proposer.py:1627-1630); the other
        K - 1 repeat the first's shapes, so they compile and allocate nothing new. An eager draft
        has nothing to compile, and the target's run of the same rows already sized activations.
        """
        if not self.draft_kept_eager:
            self.work.warmup_forwards += 1
            super().dummy_run(num_tokens, use_cudagraphs=use_cudagraphs, is_graph_capturing=True, **kwargs)

    # ------------------------------------------------------------------ drafting

    def propose(
        self,
        num_speculative_tokens,
        target_token_ids: torch.Tensor,  # [num_tokens]
        target_positions: torch.Tensor,  # [num_tokens]
        target_hidden_states: torch.Tensor,  # [num_tokens, hidden]
        next_token_ids: torch.Tensor,  # [batch_size]
        token_indices_to_sample: torch.Tensor | None,  # [batch_size]
        common_attn_metadata,
        sampling_metadata,
        mm_embed_inputs=None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,  # [batch_size]
        slot_mappings=None,
    ) -> torch.Tensor | list[list[int]]:  # [batch_size, K], or per-request lists (adaptive)
        step = TargetStep(
            target_token_ids,
            target_positions,
            target_hidden_states,
            next_token_ids,
            token_indices_to_sample,
            common_attn_metadata,
            sampling_metadata,
            num_rejected_tokens_gpu,
            mm_embed_inputs,
            slot_mappings,
        )
        self.stats.start_timing()
        decision = ngram = None
        passes = num_speculative_tokens
        if self.adaptive is not None:
            if self.ngram_direct is not None and self.specqd.adaptive.policy != "off":
                level, k = self.ngram_direct, self.specqd.num_speculative_tokens
                self.work.ngram_lookups += step.batch_size
                ngram = rounds.ngram_proposals(self.runner, step, level.prompt_lookup_min, level.prompt_lookup_max, k)
            decision = self.adaptive.decide(
                self.runner, step.sampled_positions, step.attn_metadata, step.num_rejected, ngram
            )
            passes = decision.passes
        path = self._pick_path(decision, passes)
        self.work.rounds += 1
        if path is RoundPath.NO_DRAFTS:
            self.work.rounds_without_passes += 1
            internals.begin_round(self, self.specqd.num_speculative_tokens)  # clears last round's draft probs
            drafts = [[] for _ in decision.k]
            self.stats.publish()
        elif path is RoundPath.CHAIN:
            drafts = rounds.chain_round(self, step, passes, decision.k if decision is not None else None)
        elif path is RoundPath.SHARED_KV:
            self.stats.first_passes += max(1, passes)
            self.stats.publish()
            limits = [0 if sent else k for k, sent in zip(decision.k, decision.ngram)] if decision else None
            drafts = rounds.shared_kv_round(self, step, passes, limits)
        else:
            self.stats.first_passes += max(1, passes)
            self.stats.publish()
            drafts = super().propose(
                passes,
                step.token_ids,
                step.positions,
                step.hidden_states,
                step.next_token_ids,
                step.token_indices_to_sample,
                step.attn_metadata,
                step.sampling_metadata,
                step.mm_embed_inputs,
                step.num_rejected,
                step.slot_mappings,
            )
        if decision is not None:
            drafts = self.adaptive.finish(drafts, decision, ngram)
        trace_path = os.environ.get(TRACE_ENV)
        if trace_path:
            self._trace_rounds += 1
            rounds.trace_round(trace_path, self.runner, self._trace_rounds, step, drafts)
        return drafts

    def _pick_path(self, decision: Decision | None, passes: int) -> RoundPath:
        if decision is not None and decision.passes == 0:
            return RoundPath.NO_DRAFTS
        # With one fixed token to draft the chain has nothing to speed up.
        if self.chain is not None and (decision is not None or passes > 1):
            return RoundPath.CHAIN
        return RoundPath.SHARED_KV if self.shared_kv else RoundPath.VLLM_LOOP


def build_level_chain(
    specqd, level1_model: VllmWindowModel, vllm_config, device, stats: LevelStatsPublisher
) -> tuple[SpeculativeLevel, list[VllmWindowModel]]:
    """Level 1's window model, then each inner level's, nested; an n-gram level ends the chain.

    Returns the chain and the inner levels' window models (level 2, 3, ...; model levels only)."""
    models, asks, innermost, inner_models = [level1_model], [], None, []
    for level, spec in enumerate(specqd.levels(), start=2):
        asks.append(spec.num_speculative_tokens)  # the level above asks this many per pass
        if isinstance(spec, NgramLevel):
            innermost = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max, spec.num_speculative_tokens)
            stats.set_level(level, proposer="n-gram lookup", kv_cache="none")
            break
        inner = load_inner_model(vllm_config, spec, level, device)
        stats.set_level(
            level,
            proposer=f"model {spec.model}",
            weight_bytes=inner.weight_bytes,
            cpu_copy_bytes=inner.cpu_copy_bytes,
            kv_cache="separate",
        )
        inner_models.append(inner.window_model)
        models.append(inner.window_model)
    asks += [0] * (len(models) - len(asks))  # the innermost model level asks nobody
    return build_chain(list(zip(models, asks)), innermost), inner_models


def _describe(level: NgramLevel | ModelLevel) -> str:
    what = "ngram" if isinstance(level, NgramLevel) else f"model {level.model}"
    return f"{what} (k={level.num_speculative_tokens})"
