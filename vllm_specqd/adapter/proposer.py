"""SpecQDProposer: vLLM's DraftModelProposer with an in-memory MXFP4 self-draft.

One phase per function, as vLLM calls them: :meth:`load_model` (the draft, the inner levels),
:meth:`initialize_attn_backend` (where each level's KV lives), :meth:`propose` (one round).
A round for K level-1 tokens takes one of three paths:

* shared KV, one level: K single-token passes over the target's own KV (``_propose_shared_kv``);
* separate KV, one level: vLLM's own loop (a first pass that catches the draft's KV up, then one
  pass per token);
* inner levels: a first pass gives d1 (``_first_pass``), then the speculative chain gives
  d2..dK (``_draft_rest``). Greedy drafting makes d1..dK exactly what the MXFP4 draft alone gives.

With ``adaptive`` on, each round first asks :class:`AdaptiveDrafter` for every request's k
(0..K); the round runs max(k) passes (none when every k is 0 and nothing must catch up) and
returns per-request lists cut to each k. With a shared KV and an n-gram inner level, each request
may instead send its n-gram proposal straight to the target (``_ngram_proposals``): the policy
weighs it against the MXFP4 drafts, and only the requests drafting with MXFP4 run passes.

Every vLLM internal it needs goes through ``vllm_internals``; docs/design.md draws the rounds.
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
from vllm.logger import init_logger
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_specqd.adapter import vllm_internals as internals
from vllm_specqd.adapter.adaptive_drafter import AdaptiveDrafter
from vllm_specqd.adapter.draft_builder import DRAFT_PREFIX, build_mxfp4_draft, mxfp4_layers
from vllm_specqd.adapter.engine_config import model_levels_on_hybrid_target_error, separate_kv_on_hybrid_target_error
from vllm_specqd.adapter.inner_models import load_inner_model
from vllm_specqd.adapter.level_stats import LevelStatsPublisher
from vllm_specqd.adapter.window_model import VllmWindowModel
from vllm_specqd.config import ModelLevel, NgramLevel, SpecQDConfigError, from_dict
from vllm_specqd.multilevel import RequestContext, SpeculativeLevel, build_chain
from vllm_specqd.ngram import NgramProposer, find_ngram_continuation

# Under "vllm." so vLLM's logging config (handlers, level, process prefix) applies.
logger = init_logger("vllm." + __name__)

# Debug/test hook: append every round's level-1 drafts as JSON lines to this file.
TRACE_ENV = "VLLM_SPECQD_TRACE_DRAFTS"


class SpecQDProposer(DraftModelProposer):
    def __init__(self, vllm_config, device: torch.device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.runner = runner  # the base class does not keep it; we read its input batch
        self.specqd = from_dict(vllm_config.additional_config["specqd"])
        self.shared_kv = self.specqd.draft.kv_cache == "shared"
        self.chain: SpeculativeLevel | None = None
        self.kv_group_ids: list[int] = []  # the KV cache groups level 1's layers are in
        self.inner_window_models: list[VllmWindowModel] = []  # level 2, 3, ... (model levels only)
        self.stats = LevelStatsPublisher(vllm_config)
        self._trace_rounds = 0
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
                passes_run_drafting_rows_only=not catch_up,  # _propose_shared_kv's limits
            )
        if runner is not None:
            internals.on_request_removed(runner, self._forget_request)

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
            self.chain = self.stats.chain = self._build_chain()
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
            return build_mxfp4_draft(
                draft_vllm_config,
                target_model,
                cpu_kernel=draft.cpu_kernel,
                lm_head=draft.lm_head,
                scale_rule=draft.scale_rule,
                lm_head_rescore_top_k=draft.lm_head_rescore_top_k,
            )

    def kv_cache_spec_context(self):
        """What the runner's KV cache spec collection runs inside (patches.py, patch 8)."""
        if not self.shared_kv:
            return contextlib.nullcontext()
        return internals.sharing_target_kv_while(self.vllm_config, internals.draft_layer_names(self), DRAFT_PREFIX)

    def _build_chain(self) -> SpeculativeLevel:
        """Level 1's window model, then each inner level's, nested; an n-gram level ends the chain."""
        models, asks, innermost = [self.level1_model], [], None
        for level, spec in enumerate(self.specqd.levels(), start=2):
            asks.append(spec.num_speculative_tokens)  # the level above asks this many per pass
            if isinstance(spec, NgramLevel):
                innermost = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max, spec.num_speculative_tokens)
                self.stats.set_level(level, proposer="n-gram lookup", kv_cache="none")
                break
            inner = load_inner_model(self.vllm_config, spec, level, self.device)
            self.stats.set_level(
                level,
                proposer=f"model {spec.model}",
                weight_bytes=inner.weight_bytes,
                cpu_copy_bytes=inner.cpu_copy_bytes,
                kv_cache="separate",
            )
            self.inner_window_models.append(inner.window_model)
            models.append(inner.window_model)
        asks += [0] * (len(models) - len(asks))  # the innermost model level asks nobody
        return build_chain(list(zip(models, asks)), innermost)

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        """Attention groups for every level's layers (shared-KV draft layers sit in the target's groups).

        On a hybrid-attention target (sliding-window and full-attention layers) the shared-KV
        draft's layers span the target's KV cache groups: one binding per group.
        """
        draft_layers = internals.draft_layer_names(self)
        num_groups = len(internals.layers_by_kv_cache_group(kv_cache_config, draft_layers))
        if num_groups > 1 and not self.shared_kv:
            raise SpecQDConfigError(separate_kv_on_hybrid_target_error(f"{num_groups} KV cache groups"))
        if num_groups > 1 and self.inner_window_models:
            raise SpecQDConfigError(model_levels_on_hybrid_target_error(f"{num_groups} KV cache groups"))
        if num_groups > 1:
            level1 = internals.attention_bindings_by_group(self, kv_cache_config, kernel_block_sizes)
        else:
            super().initialize_attn_backend(kv_cache_config, kernel_block_sizes)
            level1 = [internals.attention_binding(self)]
        self._bind(self.level1_model, sorted(draft_layers), level1)
        self.kv_group_ids = [binding.kv_cache_gid for binding in level1]
        kv_bytes = 0 if self.shared_kv else internals.kv_bytes_per_token(self.vllm_config, draft_layers)
        self.stats.set_level(1, kv_bytes_per_token=kv_bytes)
        for level, window_model in enumerate(self.inner_window_models, start=2):
            binding = internals.attention_binding_for(
                self, window_model.layer_names, kv_cache_config, kernel_block_sizes
            )
            if binding.kv_cache_gid != level1[0].kv_cache_gid:
                raise RuntimeError(
                    f"specqd: {window_model.name}'s KV layers landed in a different KV cache group "
                    "than the MXFP4 draft's; inner models need the target's KV block layout."
                )
            self._bind(window_model, window_model.layer_names, [binding])
            kv_bytes = internals.kv_bytes_per_token(self.vllm_config, window_model.layer_names)
            self.stats.set_level(level, kv_bytes_per_token=kv_bytes)
        self.stats.publish(busy=False, force=True)  # what each level adds, before any request

    @staticmethod
    def _bind(
        window_model: VllmWindowModel, layer_names: list[str], bindings: list[internals.AttentionBinding]
    ) -> None:
        window_model.layer_names = list(layer_names)
        window_model.kv_groups = bindings

    def _block_tables(self, cad) -> dict[int, torch.Tensor]:  # KV cache group id -> [num_reqs, max_blocks]
        """Each KV cache group's block table for this step's batch. vLLM hands the drafter one
        group's (``cad``); with one group that is all there is."""
        if len(self.kv_group_ids) == 1:
            return {self.kv_group_ids[0]: cad.block_table_tensor}
        return internals.group_block_tables(self.runner, self.kv_group_ids, cad.num_reqs)

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
    ) -> torch.Tensor | list[list[int]]:  # [batch_size, num_speculative_tokens], or per-row lists (adaptive)
        self.stats.start_timing()
        trace_path = os.environ.get(TRACE_ENV)
        if trace_path:
            next_positions = self._next_positions(target_positions, common_attn_metadata, num_rejected_tokens_gpu)
        decision = ngram = None
        if self.adaptive is not None:
            sampled = self._sampled_positions(target_positions, common_attn_metadata, num_rejected_tokens_gpu)
            if self.ngram_direct is not None:
                ngram = self._ngram_proposals(
                    target_token_ids, target_positions, next_token_ids, common_attn_metadata, num_rejected_tokens_gpu
                )
            decision = self.adaptive.decide(
                self.runner, sampled, common_attn_metadata, num_rejected_tokens_gpu, ngram_proposals=ngram
            )
            num_speculative_tokens = decision.passes
        if decision is not None and decision.passes == 0:
            internals.begin_round(self, self.specqd.num_speculative_tokens)  # clears last round's draft probs
            drafts = [[] for _ in decision.k]
            self.stats.publish()
        elif self.chain is not None and (decision is not None or num_speculative_tokens > 1):
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
                limits=decision.k if decision is not None else None,
            )
        elif self.shared_kv:
            self.stats.first_passes += max(1, num_speculative_tokens)
            self.stats.publish()
            drafts = self._propose_shared_kv(
                num_speculative_tokens,
                target_positions,
                next_token_ids,
                common_attn_metadata,
                sampling_metadata,
                num_rejected_tokens_gpu,
                limits=[0 if sent else k for k, sent in zip(decision.k, decision.ngram)] if decision else None,
            )
        else:
            self.stats.first_passes += max(1, num_speculative_tokens)  # vLLM's loop: K passes
            self.stats.publish()
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
        if decision is not None:
            drafts = self.adaptive.finish(drafts, decision, ngram)
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
        limits: list[int] | None = None,  # [batch_size] adaptive: drafts each row keeps
    ) -> torch.Tensor:  # [batch_size, K]
        """K single-token passes per request over the target's own KV (QSpec).

        The committed context's KV is the target's, exact; pass j writes the slot of position
        p + 1 + j only, which the next verification rewrites before attending to it.
        With ``limits``, pass j runs only the rows that keep more than j drafts (the entries of
        the others stay 0 and are cut away): a round where few requests draft costs few rows.
        """
        internals.begin_round(self, num_speculative_tokens)
        positions = self._sampled_positions(target_positions, cad, num_rejected_tokens_gpu)
        self.level1_model.bind_batch({}, self._block_tables(cad))
        passes = max(1, num_speculative_tokens)
        if limits is None:
            return self._shared_kv_passes_over_batch(passes, next_token_ids, positions, sampling_metadata)
        batch = next_token_ids.shape[0]
        drafts = torch.zeros(batch, passes, dtype=torch.int64, device=next_token_ids.device)
        probs = None
        kept = torch.tensor(limits, dtype=torch.int64)
        tokens = next_token_ids
        for step in range(passes):
            rows = torch.nonzero(kept > step).flatten()
            if rows.numel() == 0:
                break
            rows_dev = rows.to(next_token_ids.device)
            hidden = self.level1_model.decode_step(
                tokens[rows_dev], positions[rows_dev] + step, self.max_model_len, rows=rows
            )
            step_tokens, step_probs = internals.sample_draft_tokens(
                self, hidden, internals.sampling_metadata_for_rows(sampling_metadata, rows_dev)
            )
            drafts[rows_dev, step] = step_tokens.to(torch.int64)
            if step_probs is not None:
                if probs is None:
                    probs = step_probs.new_zeros(batch, passes, step_probs.shape[-1])
                probs[rows_dev, step] = step_probs
            tokens = drafts[:, step]
        if probs is not None:
            internals.keep_draft_probs(self, probs)
        return drafts

    def _shared_kv_passes_over_batch(
        self,
        passes: int,
        next_token_ids: torch.Tensor,  # [batch_size]
        positions: torch.Tensor,  # [batch_size] of the sampled token
        sampling_metadata,
    ) -> torch.Tensor:  # [batch_size, passes]
        tokens, drafts, probs = next_token_ids, [], []
        for step in range(passes):
            hidden = self.level1_model.decode_step(tokens, positions + step, self.max_model_len)
            tokens, step_probs = internals.sample_draft_tokens(self, hidden, sampling_metadata)
            drafts.append(tokens)
            if step_probs is not None:
                probs.append(step_probs)
        if probs:
            internals.keep_draft_probs(self, torch.stack(probs, dim=1).contiguous())
        return torch.stack(drafts, dim=1)

    def _ngram_proposals(
        self, target_token_ids, target_positions, next_token_ids, cad, num_rejected_tokens_gpu
    ) -> list[list[int]]:  # [batch_size] up to K tokens each
        """Each request's n-gram continuation of its committed context (empty for discarded rows)."""
        level = self.ngram_direct
        contexts = self._committed_contexts(
            target_token_ids, target_positions, next_token_ids, cad, num_rejected_tokens_gpu
        )
        discarded = internals.discarded_rows(self.runner, len(contexts))
        k = self.specqd.num_speculative_tokens
        return [
            []
            if discarded[i]
            else find_ngram_continuation(context, level.prompt_lookup_min, level.prompt_lookup_max, k).tolist()
            for i, context in enumerate(contexts)
        ]

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

    def _trace(self, path: str, next_positions: list[int], drafts: torch.Tensor | list[list[int]]) -> None:
        req_ids = internals.batch_req_ids(self.runner, len(next_positions))
        discarded = internals.discarded_rows(self.runner, len(next_positions))
        rows = drafts.tolist() if isinstance(drafts, torch.Tensor) else drafts
        self._trace_rounds += 1
        with open(path, "a") as f:
            for i, (pos, row) in enumerate(zip(next_positions, rows)):
                if not discarded[i]:
                    entry = {"req": req_ids[i], "pos": pos, "drafts": row, "round": self._trace_rounds}
                    f.write(json.dumps(entry) + "\n")

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
        limits: list[int] | None = None,
    ) -> torch.Tensor | list[list[int]]:
        internals.begin_round(self, num_speculative_tokens)
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
        return self._draft_rest(contexts, first_tokens, num_speculative_tokens, common_attn_metadata, limits)

    def _committed_contexts(
        self, target_token_ids, target_positions, next_token_ids, cad, num_rejected_tokens_gpu
    ) -> list[np.ndarray]:
        """Per request: every token up to and including the one the target just sampled.

        The runner has not yet booked this step's tokens (the drafter runs
        before bookkeeping), so the tail comes from the target's own inputs:
        the booked tokens before the first input position + the accepted input rows + next token.
        """
        tokens = target_token_ids.tolist()
        positions = target_positions.tolist()
        next_tokens = next_token_ids.tolist()
        contexts = []
        for i, (lo, hi) in enumerate(self._accepted_rows(cad, num_rejected_tokens_gpu)):
            context = np.concatenate(
                [
                    internals.committed_token_ids(self.runner, i, positions[lo]),
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
        """The round's first level-1 pass, which gives d1; inner models catch their own KV up.

        With a shared KV the MXFP4 draft runs only the token the target just sampled; with a
        separate KV it runs vLLM's first pass over the target's whole input (its KV must follow).
        """

        def vllm_first_pass_inputs() -> internals.FirstPassInputs:
            return internals.first_pass_inputs(
                self,
                target_token_ids,
                next_token_ids,
                target_positions,
                target_hidden_states,
                token_indices_to_sample,
                common_attn_metadata,
                num_rejected_tokens_gpu,
            )

        if self.shared_kv:
            positions = self._sampled_positions(target_positions, common_attn_metadata, num_rejected_tokens_gpu)
            self.level1_model.bind_batch({}, self._block_tables(common_attn_metadata))
            hidden = self.level1_model.decode_step(next_token_ids, positions, self.max_model_len)
            inputs = vllm_first_pass_inputs() if self.inner_window_models else None
        else:
            inputs = vllm_first_pass_inputs()
            hidden = internals.run_first_pass(self, inputs, mm_embed_inputs)[inputs.sample_rows]
        for window_model in self.inner_window_models:
            window_model.forward_in_one_group(inputs.input_ids, inputs.positions, inputs.cad)
        self.stats.first_passes += 1
        return internals.greedy_sample(self, hidden)

    def _useful_draft_tokens(self, req_id: Hashable, context_len: int, k: int) -> int:
        """How many of d2..dK the next target step can use.

        Windows stay below max_model_len (vLLM clamps its own draft positions
        the same way), and a request that may generate only m more tokens can
        use at most m - 1 drafts, d1 included.
        """
        useful = min(k - 1, self.max_model_len - context_len)
        budget = internals.generation_budget(self.runner, req_id)
        if budget is not None:
            num_prompt_tokens, max_tokens = budget
            useful = min(useful, max_tokens - (context_len - num_prompt_tokens) - 2)
        return max(0, useful)

    def _draft_rest(
        self, contexts: list[np.ndarray], first_tokens: torch.Tensor, k: int, cad, limits: list[int] | None = None
    ) -> torch.Tensor | list[list[int]]:
        """d2..dK: the speculative chain continues every request's context + d1.

        ``limits`` (adaptive): request i's drafts, d1 included; the rows come back as lists cut to them.
        """
        req_ids: list[Hashable] = internals.batch_req_ids(self.runner, len(contexts))
        row_of = {req_id: i for i, req_id in enumerate(req_ids)}
        block_tables = self._block_tables(cad)
        for window_model in [self.chain.model, *self.inner_window_models]:
            window_model.bind_batch(row_of, block_tables)
        discarded = internals.discarded_rows(self.runner, len(contexts))
        first = first_tokens.tolist()
        requests, wanted = [], []
        for i, (req_id, context) in enumerate(zip(req_ids, contexts)):
            for level in self.chain.chain():
                level.mark_kv_valid(req_id, context)
            useful = 0 if discarded[i] else self._useful_draft_tokens(req_id, len(context), k)
            wanted.append(useful if limits is None else max(0, min(useful, limits[i] - 1)))
            requests.append(RequestContext(req_id, np.append(context, first[i])))
            self.stats.count_round(req_id, len(context), discarded[i])
        self.stats.forget_missing(req_ids)
        rest = self.chain.propose(requests, wanted)
        if limits is not None:
            self.stats.publish()
            return [[first[i], *rest[i]][: limits[i]] for i in range(len(contexts))]
        drafts = [[first[i], *rest[i]] + [first[i]] * (k - 1 - len(rest[i])) for i in range(len(contexts))]
        self.stats.publish()
        return torch.tensor(drafts, dtype=first_tokens.dtype, device=first_tokens.device)


def _describe(level: NgramLevel | ModelLevel) -> str:
    what = "ngram" if isinstance(level, NgramLevel) else f"model {level.model}"
    return f"{what} (k={level.num_speculative_tokens})"
