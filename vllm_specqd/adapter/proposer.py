"""SpecQDProposer: vLLM's DraftModelProposer with an in-memory MXFP4 self-draft.

Level 1 only: vLLM's drafting loop runs unchanged (a first pass that keeps the
draft's KV cache in step with the target, then one forward pass per draft
token).

With ``inner`` levels, a round for K level-1 tokens is:

1. the first pass, as in vLLM, gives d1; small-model levels run the same pass
   over their own KV layers so every level's KV covers the committed context;
2. :class:`vllm_specqd.multilevel.SpeculativeLevel` produces d2..dK: the inner
   chain guesses, the MXFP4 draft checks a whole window per forward pass.
Greedy drafting makes d1..dK exactly what the MXFP4 draft alone would give.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Hashable

import numpy as np
import torch
import torch.nn as nn
from vllm.compilation.backends import set_model_tag
from vllm.config import ModelConfig, get_layers_from_vllm_config
from vllm.config.utils import replace
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.model_loader import get_model
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_specqd.adapter.draft_builder import (
    DRAFT_PREFIX,
    build_mxfp4_draft,
    convert_to_mxfp4_in_place,
    inner_prefix,
)
from vllm_specqd.adapter.level_stats import LevelStatsPublisher
from vllm_specqd.adapter.vllm_internals import sharing_target_kv_while
from vllm_specqd.adapter.window_model import VllmWindowModel
from vllm_specqd.config import InnerSpec, from_dict
from vllm_specqd.multilevel import RequestContext, SpeculativeLevel, build_chain
from vllm_specqd.ngram import NgramProposer

# Under "vllm." so vLLM's logging config (handlers, level, process prefix) applies.
logger = init_logger("vllm." + __name__)

# Debug/test hook: append every round's level-1 drafts as JSON lines to this file.
TRACE_ENV = "VLLM_SPECQD_TRACE_DRAFTS"


class SpecQDProposer(DraftModelProposer):
    def __init__(self, vllm_config, device: torch.device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.runner = runner  # the base class does not keep it; we read its input batch
        self.specqd = from_dict(vllm_config.additional_config["specqd"])
        self._target_for_build: nn.Module | None = None
        self.chain: SpeculativeLevel | None = None
        self.inner_window_models: list[VllmWindowModel] = []
        self.stats = LevelStatsPublisher(vllm_config)
        if runner is not None:
            self._forget_removed_requests(runner)

    def _forget_removed_requests(self, runner) -> None:
        """Drop a request's per-level state as soon as vLLM drops the request.

        GPUModelRunner._update_states calls the platform hook
        _on_request_state_removed for every finished request, aborted ones
        included (vllm/v1/worker/gpu_model_runner.py:1156 the hook, :1183-1185
        the calls), also in the step that only carries finished ids (:3979,
        before the early return for an empty schedule), so idle engines hold nothing.
        """
        removed = runner._on_request_state_removed

        def on_removed(req_id, req_state) -> None:
            removed(req_id, req_state)
            self.stats.forget(req_id, self.chain)

        runner._on_request_state_removed = on_removed

    # ------------------------------------------------------------------ loading

    def load_model(self, target_model: nn.Module) -> None:
        self._target_for_build = target_model
        try:
            super().load_model(target_model)
        finally:
            self._target_for_build = None
        self.stats.level_info["1"] = {"weight_bytes": self.model.specqd_extra_weight_bytes}
        self.shared_kv = self.specqd.draft.kv_cache == "shared"
        self.level1_model = VllmWindowModel("level1", self.model, self.vllm_config, self.device)
        if self.specqd.inner is not None:
            self.chain = self._build_chain()
        logger.info(
            "specqd: level 1 = MXFP4 self-draft (scale rule %s, %s KV, lm_head %s), K=%d, draft sampling %s; "
            "levels below: %s",
            self.specqd.draft.scale_rule,
            self.specqd.draft.kv_cache,
            self.specqd.draft.lm_head,
            self.specqd.num_speculative_tokens,
            self.specqd.draft_sample_method,
            [f"{s.method}(k={s.num_speculative_tokens})" for s in self.specqd.levels()] or "none",
        )

    def _get_model(self) -> nn.Module:
        assert self._target_for_build is not None, "load_model() passes the target in"
        with set_model_tag(DRAFT_PREFIX):
            return build_mxfp4_draft(
                self._create_draft_vllm_config(),
                self._target_for_build,
                cpu_kernel=self.specqd.draft.cpu_kernel,
                lm_head=self.specqd.draft.lm_head,
                scale_rule=self.specqd.draft.scale_rule,
                lm_head_rescore_top_k=self.specqd.draft.lm_head_rescore_top_k,
            )

    def kv_cache_spec_context(self):
        """What the runner's KV cache spec collection runs inside (patches.py, patch 8)."""
        if not self.shared_kv:
            return contextlib.nullcontext()
        return sharing_target_kv_while(self.vllm_config, self._draft_attn_layer_names, DRAFT_PREFIX)

    def _build_chain(self) -> SpeculativeLevel:
        models: list[list] = [[self.level1_model, 0]]
        innermost = None
        for level, spec in enumerate(self.specqd.levels(), start=2):
            models[-1][1] = spec.num_speculative_tokens  # the level above asks this many
            if spec.method == "ngram":
                innermost = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max, spec.num_speculative_tokens)
                break
            window_model = self._load_inner_model(spec, level)
            self.inner_window_models.append(window_model)
            models.append([window_model, 0])
        return build_chain([tuple(m) for m in models], innermost)

    def _load_inner_model(self, spec: InnerSpec, level: int) -> VllmWindowModel:
        target = self.vllm_config.model_config
        model_config = ModelConfig(
            model=spec.model,
            runner="draft",
            tokenizer=target.tokenizer,
            tokenizer_mode=target.tokenizer_mode,
            trust_remote_code=target.trust_remote_code,
            dtype=target.dtype,
            seed=target.seed,
            max_model_len=target.max_model_len,
            enforce_eager=True,  # ragged windows run eagerly anyway
            max_logprobs=target.max_logprobs,
        )
        inner_config = replace(self.vllm_config, model_config=model_config, quant_config=None)
        before = set(get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase))
        prefix = inner_prefix(level)
        with set_model_tag(prefix):
            try:
                model = get_model(vllm_config=inner_config, model_config=model_config, prefix=prefix)
            except Exception as e:  # a corrupt or truncated checkpoint: say which level and files
                raise RuntimeError(
                    f"specqd: level {level} model {spec.model!r} failed to load: {type(e).__name__}: {e}"
                ) from e
        cpu_copy_bytes = 0
        if spec.quantization == "mxfp4":
            converted, cpu_copy_bytes = convert_to_mxfp4_in_place(model, cpu_kernel=spec.cpu_kernel)
            logger.info("specqd: level %d (%s) converted %d linear layers to MXFP4", level, spec.model, converted)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + cpu_copy_bytes
        self.stats.level_info[str(level)] = {"weight_bytes": weight_bytes}
        window_model = VllmWindowModel(f"level{level}", model, self.vllm_config, self.device)
        after = get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase)
        window_model.layer_names = sorted(
            name for name in set(after) - before if after[name].get_kv_cache_spec(self.vllm_config) is not None
        )
        return window_model

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
        if self.shared_kv:
            self.stats.level_info["1"]["kv_bytes_per_token"] = 0
        else:
            self.stats.level_info["1"]["kv_bytes_per_token"] = self._kv_bytes_per_token(self._draft_attn_layer_names)
        self.stats.level_info["1"]["kv_cache"] = self.specqd.draft.kv_cache
        level1 = self.level1_model
        level1.layer_names = sorted(self._draft_attn_layer_names)
        level1.attn_groups, level1.block_size = self.draft_attn_groups, self.block_size
        if self.chain is None:
            return
        # The base method builds attention groups for `_draft_attn_layer_names`;
        # run it once per inner model over that model's layers.
        saved = (self._draft_attn_layer_names, self.draft_attn_groups, self.kv_cache_gid, self.block_size)
        try:
            for window_model in self.inner_window_models:
                self._draft_attn_layer_names = set(window_model.layer_names)
                super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
                if self.kv_cache_gid != saved[2]:
                    raise RuntimeError(
                        f"specqd: {window_model.name}'s KV layers landed in a different KV cache group "
                        "than the MXFP4 draft's; inner models need the target's KV block layout."
                    )
                window_model.attn_groups, window_model.block_size = self.draft_attn_groups, self.block_size
                level = window_model.name.removeprefix("level")
                self.stats.level_info[level]["kv_bytes_per_token"] = self._kv_bytes_per_token(window_model.layer_names)
        finally:
            self._draft_attn_layer_names, self.draft_attn_groups, self.kv_cache_gid, self.block_size = saved

    def _kv_bytes_per_token(self, layer_names) -> int:
        layers = get_layers_from_vllm_config(self.vllm_config, AttentionLayerBase, sorted(layer_names))
        specs = [layer.get_kv_cache_spec(self.vllm_config) for layer in layers.values()]
        return sum(spec.page_size_bytes // spec.block_size for spec in specs if spec is not None)

    # ------------------------------------------------------------------ drafting

    def propose(
        self,
        num_speculative_tokens,
        target_token_ids: torch.Tensor,  # [num_tokens]
        target_positions: torch.Tensor,  # [num_tokens]
        target_hidden_states: torch.Tensor,  # [num_tokens, hidden]
        next_token_ids: torch.Tensor,  # [batch_size]
        token_indices_to_sample: torch.Tensor | None,
        common_attn_metadata,
        sampling_metadata,
        mm_embed_inputs=None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,  # [batch_size]
        slot_mappings=None,
    ) -> torch.Tensor:  # [batch_size, num_speculative_tokens]
        trace_path = os.environ.get(TRACE_ENV)
        if trace_path:
            next_positions = self._next_positions(target_positions, common_attn_metadata, num_rejected_tokens_gpu)
        if self.shared_kv and (self.chain is None or num_speculative_tokens <= 1):
            self.stats.first_passes += max(1, num_speculative_tokens)
            self.stats.publish(None)
            drafts = self._propose_shared_kv(
                num_speculative_tokens,
                target_positions,
                next_token_ids,
                common_attn_metadata,
                sampling_metadata,
                num_rejected_tokens_gpu,
            )
        elif self.chain is None or num_speculative_tokens <= 1:
            self.stats.first_passes += max(1, num_speculative_tokens)  # vLLM's loop: K passes
            self.stats.publish(None)
            drafts = super().propose(
                num_speculative_tokens,
                target_token_ids,
                target_positions,
                target_hidden_states,
                next_token_ids,
                token_indices_to_sample,
                common_attn_metadata,
                sampling_metadata,
                mm_embed_inputs,
                num_rejected_tokens_gpu,
                slot_mappings,
            )
        else:
            drafts = self._propose_multilevel(
                num_speculative_tokens,
                target_token_ids,
                target_positions,
                target_hidden_states,
                next_token_ids,
                token_indices_to_sample,
                common_attn_metadata,
                num_rejected_tokens_gpu,
                mm_embed_inputs,
            )
        if trace_path:
            self._trace(trace_path, next_positions, drafts)
        return drafts

    def _propose_shared_kv(
        self,
        num_speculative_tokens: int,
        target_positions: torch.Tensor,  # [num_tokens]
        next_token_ids: torch.Tensor,  # [batch_size]
        cad,
        sampling_metadata,
        num_rejected_tokens_gpu: torch.Tensor | None,  # [batch_size]
    ) -> torch.Tensor:  # [batch_size, K]
        """K single-token passes per request over the target's own KV (QSpec).

        The committed context's KV is the target's, exact; pass j writes the slot of position
        p + 1 + j only, which the next verification rewrites before attending to it.
        """
        self.num_speculative_tokens = num_speculative_tokens
        self._last_draft_probs = None
        positions = self._sampled_positions(target_positions, cad, num_rejected_tokens_gpu)
        self.level1_model.bind_batch({}, cad.block_table_tensor)
        tokens, drafts, probs = next_token_ids, [], []
        for step in range(max(1, num_speculative_tokens)):
            hidden = self.level1_model.decode_step(tokens, positions + step, self.max_model_len)
            tokens, step_probs = self._sample_draft_tokens(hidden, sampling_metadata)
            drafts.append(tokens)
            if step_probs is not None:
                probs.append(step_probs)
        if probs:
            self._last_draft_probs = torch.stack(probs, dim=1).contiguous()
        return torch.stack(drafts, dim=1)

    @staticmethod
    def _sampled_positions(target_positions, cad, num_rejected_tokens_gpu) -> torch.Tensor:  # [batch_size]
        """Position of the token the target just sampled: one past each request's last kept row."""
        last_kept = cad.query_start_loc[1:].long() - 1
        if num_rejected_tokens_gpu is not None:
            last_kept = last_kept - num_rejected_tokens_gpu.long()
        return target_positions[last_kept].long() + 1

    @staticmethod
    def _accepted_rows(cad, num_rejected_tokens_gpu) -> list[tuple[int, int]]:
        """Per request, the [lo, hi) rows of the target's input that it kept this step."""
        qsl = cad.query_start_loc_cpu.tolist()
        num_reqs = len(qsl) - 1
        rejected = num_rejected_tokens_gpu.tolist() if num_rejected_tokens_gpu is not None else [0] * num_reqs
        return [(qsl[i], qsl[i + 1] - rejected[i]) for i in range(num_reqs)]

    def _next_positions(self, target_positions, cad, num_rejected_tokens_gpu) -> list[int]:
        """Position of the token the target just sampled, per request."""
        positions = target_positions.tolist()
        return [positions[hi - 1] + 1 for _, hi in self._accepted_rows(cad, num_rejected_tokens_gpu)]

    def _trace(self, path: str, next_positions: list[int], drafts: torch.Tensor) -> None:
        req_ids = self.runner.input_batch.req_ids
        discarded = self.runner.discard_request_mask.np
        with open(path, "a") as f:
            for i, (pos, row) in enumerate(zip(next_positions, drafts.tolist())):
                if not discarded[i]:
                    f.write(json.dumps({"req": req_ids[i], "pos": pos, "drafts": row}) + "\n")

    def _propose_multilevel(
        self,
        num_speculative_tokens,
        target_token_ids,
        target_positions,
        target_hidden_states,
        next_token_ids,
        token_indices_to_sample,
        common_attn_metadata,
        num_rejected_tokens_gpu,
        mm_embed_inputs,
    ) -> torch.Tensor:
        self.num_speculative_tokens = num_speculative_tokens
        self._last_draft_probs = None
        contexts = self._committed_contexts(
            target_token_ids, target_positions, next_token_ids, common_attn_metadata, num_rejected_tokens_gpu
        )
        first_tokens = self._first_pass(
            target_token_ids,
            target_positions,
            target_hidden_states,
            next_token_ids,
            token_indices_to_sample,
            common_attn_metadata,
            mm_embed_inputs,
            num_rejected_tokens_gpu,
        )
        return self._draft_rest(contexts, first_tokens, num_speculative_tokens, common_attn_metadata)

    def _committed_contexts(
        self, target_token_ids, target_positions, next_token_ids, cad, num_rejected_tokens_gpu
    ) -> list[np.ndarray]:
        """Per request: every token up to and including the one the target just sampled.

        The runner has not yet booked this step's tokens (the drafter runs
        before bookkeeping), so the tail comes from the target's own inputs:
        token_ids_cpu[:first input position] + the accepted input rows + next token.
        """
        batch = self.runner.input_batch
        tokens = target_token_ids.tolist()
        positions = target_positions.tolist()
        next_tokens = next_token_ids.tolist()
        contexts = []
        for i, (lo, hi) in enumerate(self._accepted_rows(cad, num_rejected_tokens_gpu)):
            first_pos = positions[lo]
            context = np.concatenate(
                [
                    batch.token_ids_cpu[i, :first_pos].astype(np.int64),
                    np.asarray(tokens[lo:hi], dtype=np.int64),
                    np.asarray([next_tokens[i]], dtype=np.int64),
                ]
            )
            assert positions[hi - 1] == len(context) - 2, "target rows must be contiguous positions"
            contexts.append(context)
        return contexts

    def _first_pass(
        self,
        target_token_ids,
        target_positions,
        target_hidden_states,
        next_token_ids,
        token_indices_to_sample,
        common_attn_metadata,
        mm_embed_inputs,
        num_rejected_tokens_gpu,
    ) -> torch.Tensor:  # [batch_size] d1 per request
        """vLLM's first drafting pass (llm_base_proposer.py:535-590), plus the inner models.

        With a shared KV the MXFP4 draft only runs the token the target just sampled; inner
        models with their own KV still catch up over the target's whole input.
        """
        if self.shared_kv:
            positions = self._sampled_positions(target_positions, common_attn_metadata, num_rejected_tokens_gpu)
            self.level1_model.bind_batch({}, common_attn_metadata.block_table_tensor)
            hidden = self.level1_model.decode_step(next_token_ids, positions, self.max_model_len)
            if self.inner_window_models:
                num_tokens, _, cad = self.set_inputs_first_pass(
                    target_token_ids=target_token_ids,
                    next_token_ids=next_token_ids,
                    target_positions=target_positions,
                    target_hidden_states=target_hidden_states,
                    token_indices_to_sample=token_indices_to_sample,
                    cad=common_attn_metadata,
                    num_rejected_tokens_gpu=num_rejected_tokens_gpu,
                )
                for window_model in self.inner_window_models:
                    window_model.forward(self.input_ids[:num_tokens], self.positions[:num_tokens], cad)
            self.stats.first_passes += 1
            return self._greedy_sample(hidden)
        num_tokens, token_indices_to_sample, cad = self.set_inputs_first_pass(
            target_token_ids=target_token_ids,
            next_token_ids=next_token_ids,
            target_positions=target_positions,
            target_hidden_states=target_hidden_states,
            token_indices_to_sample=token_indices_to_sample,
            cad=common_attn_metadata,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu,
        )
        _, per_layer = self.build_per_group_and_layer_attn_metadata(cad)
        mode, num_input_tokens, across_dp = self._determine_batch_execution_and_padding(num_tokens)
        model_kwargs, slot_mapping_size = self.build_model_inputs_first_pass(
            num_tokens, num_input_tokens, mm_embed_inputs
        )
        with set_forward_context(
            per_layer,
            self.vllm_config,
            num_tokens=num_input_tokens,
            num_tokens_across_dp=across_dp,
            cudagraph_runtime_mode=mode,
            slot_mapping=self._get_slot_mapping(slot_mapping_size, cad.slot_mapping),
        ):
            hidden_states = self.model(**model_kwargs)
        for window_model in self.inner_window_models:
            window_model.forward(self.input_ids[:num_tokens], self.positions[:num_tokens], cad)
        self.stats.first_passes += 1
        return self._greedy_sample(hidden_states[token_indices_to_sample])

    def _useful_draft_tokens(self, req_id: Hashable, context_len: int, k: int) -> int:
        """How many of d2..dK the next target step can use.

        Windows stay below max_model_len (vLLM clamps its own draft positions
        the same way), and a request that may generate only m more tokens can
        use at most m - 1 drafts, d1 included.
        """
        useful = min(k - 1, self.max_model_len - context_len)
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        if params is not None and params.max_tokens is not None:
            generated = context_len - state.num_prompt_tokens
            useful = min(useful, params.max_tokens - generated - 2)
        return max(0, useful)

    def _draft_rest(self, contexts: list[np.ndarray], first_tokens: torch.Tensor, k: int, cad) -> torch.Tensor:
        batch = self.runner.input_batch
        req_ids: list[Hashable] = list(batch.req_ids[: len(contexts)])
        row_of = {req_id: i for i, req_id in enumerate(req_ids)}
        for window_model in [self.chain.model, *self.inner_window_models]:
            window_model.bind_batch(row_of, cad.block_table_tensor)
        discarded = self.runner.discard_request_mask.np[: len(contexts)]
        first = first_tokens.tolist()
        requests, wanted = [], []
        for i, (req_id, context) in enumerate(zip(req_ids, contexts)):
            for level in self.chain.chain():
                level.mark_kv_valid(req_id, context)
            wanted.append(0 if discarded[i] else self._useful_draft_tokens(req_id, len(context), k))
            requests.append(RequestContext(req_id, np.append(context, first[i])))
            self.stats.count_round(req_id, len(context), discarded[i])
        self.stats.forget_missing(req_ids, self.chain)
        rest = self.chain.propose(requests, wanted)
        drafts = [[first[i], *rest[i]] + [first[i]] * (k - 1 - len(rest[i])) for i in range(len(contexts))]
        self.stats.publish(self.chain)
        return torch.tensor(drafts, dtype=first_tokens.dtype, device=first_tokens.device)
