"""One drafting round per function, each on a :class:`SpecQDProposer` and the target's step.

``shared_kv_round``: single-token level-1 passes over the target's own KV (QSpec).
``chain_round``: the chain of levels gives d1..dK (with a separate-KV level 1, ``first_pass`` gives d1).
docs/design.md draws both. The proposer picks which one runs (``SpecQDProposer._pick_path``).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from vllm_specqd.adapter import vllm_internals as internals
from vllm_specqd.adapter.target_step import TargetStep, request_draft_cap
from vllm_specqd.multilevel import RequestContext
from vllm_specqd.ngram import find_ngram_continuation


def block_tables(proposer, step: TargetStep) -> dict[int, torch.Tensor]:  # KV cache group id -> [num_reqs, max_blocks]
    """Each KV cache group's block table for this step's batch. vLLM hands the drafter one
    group's; with one group that is all there is."""
    if len(proposer.kv_group_ids) == 1:
        return {proposer.kv_group_ids[0]: step.attn_metadata.block_table_tensor}
    return internals.group_block_tables(proposer.runner, proposer.kv_group_ids, step.attn_metadata.num_reqs)


def shared_kv_round(
    proposer,
    step: TargetStep,
    passes: int,
    limits: list[int] | None = None,  # [batch_size] adaptive: drafts each request keeps
) -> torch.Tensor:  # [batch_size, max(1, passes)] int64
    """Level-1 drafts from single-token passes over the target's own KV.

    The committed context's KV is the target's, exact; pass j writes the slot of position
    p + 1 + j only, which the next verification rewrites before attending to it.
    With ``limits``, pass j runs only the rows that keep more than j drafts (the entries of
    the others stay 0 and are cut away): a round where few requests draft costs few rows.
    Example: limits [2, 0, 1] run pass 0 over rows 0 and 2 and pass 1 over row 0.
    """
    internals.begin_round(proposer, passes)
    positions = step.sampled_positions
    proposer.level1_model.bind_batch({}, block_tables(proposer, step))
    passes = max(1, passes)
    batch = step.batch_size
    keep = torch.tensor(limits, dtype=torch.int64) if limits is not None else None
    drafts = torch.zeros(batch, passes, dtype=torch.int64, device=step.next_token_ids.device)
    probs = None
    tokens = step.next_token_ids
    for j in range(passes):
        rows = torch.arange(batch) if keep is None else torch.nonzero(keep > j).flatten()
        if rows.numel() == 0:
            break
        rows_dev = rows.to(drafts.device)
        hidden = proposer.level1_model.decode_step(
            tokens[rows_dev], positions[rows_dev] + j, proposer.max_model_len, rows
        )
        metadata = step.sampling_metadata
        if keep is not None:
            metadata = internals.sampling_metadata_for_rows(metadata, rows_dev)
        j_tokens, j_probs = internals.sample_draft_tokens(proposer, hidden, metadata)
        drafts[rows_dev, j] = j_tokens.to(torch.int64)
        if j_probs is not None:
            if probs is None:
                probs = j_probs.new_zeros(batch, passes, j_probs.shape[-1])
            probs[rows_dev, j] = j_probs
        tokens = drafts[:, j]
    if probs is not None:
        internals.keep_draft_probs(proposer, probs)
    return drafts


def chain_round(
    proposer, step: TargetStep, k: int, limits: list[int] | None = None
) -> torch.Tensor | list[list[int]]:  # [batch_size, k] int64, or per-request lists cut to ``limits``
    """The speculative chain drafts d1..dK for every committed context.

    Shared KV: level 1's first window starts at the token the target just sampled (its KV is the
    target's up to there), so d1 comes from the chain too. Separate KV: vLLM's first pass gives d1
    and catches level 1's own KV up (``first_pass``); the chain continues every context + d1. Inner
    model levels catch their own KV up in their first window (the tokens they do not hold yet).
    ``limits`` (adaptive): request i's drafts, d1 included. Greedy drafting makes d1..dK exactly
    what the MXFP4 draft alone gives, whatever the inner levels guess.
    """
    internals.begin_round(proposer, k)
    runner, chain, stats = proposer.runner, proposer.chain, proposer.stats
    contexts = step.committed_contexts(runner)
    first = None if proposer.shared_kv else first_pass(proposer, step).tolist()
    req_ids = internals.batch_req_ids(runner, len(contexts))
    tables = block_tables(proposer, step)
    for window_model in [chain.model, *proposer.inner_window_models]:
        window_model.bind_batch({req_id: i for i, req_id in enumerate(req_ids)}, tables)
    discarded = internals.discarded_rows(runner, len(contexts))
    requests, wanted = [], []
    for i, (req_id, context) in enumerate(zip(req_ids, contexts)):
        # Level 1's KV is exact for the committed context: the target's, but for the sampled token
        # (shared), or its own after the first pass. Inner levels keep what they hold.
        chain.mark_kv_valid(req_id, context if first is not None else context[:-1])
        n = 0 if discarded[i] else request_draft_cap(runner, req_id, k, len(context), proposer.max_model_len)
        if limits is not None:
            n = min(n, limits[i])
        if not discarded[i] and (limits is None or limits[i] > 0):
            n = max(n, 1)  # d1 always, as one level drafts it
        if first is None:
            wanted.append(n)
            requests.append(RequestContext(req_id, context))
        else:
            wanted.append(max(0, n - 1))  # d2..dK
            requests.append(RequestContext(req_id, np.append(context, first[i])))
        stats.count_round(req_id, len(context), discarded[i])
    stats.forget_missing(req_ids)
    drafts = chain.propose(requests, wanted)
    stats.publish()
    if first is not None:
        drafts = [[first[i], *d] for i, d in enumerate(drafts)]
    if limits is not None:
        return [d[: limits[i]] for i, d in enumerate(drafts)]
    pad = step.next_token_ids.tolist()  # rows with fewer than k drafts (cut by their budget, or discarded)
    padded = [d + [d[0] if d else pad[i]] * (k - len(d)) for i, d in enumerate(drafts)]
    return torch.tensor(padded, dtype=torch.int64, device=step.next_token_ids.device)


def first_pass(proposer, step: TargetStep) -> torch.Tensor:  # [batch_size] d1 per request
    """vLLM's first pass of a separate-KV level 1 over the target's whole input: d1, and the
    draft's own KV caught up on every kept row and the sampled token."""
    inputs = internals.first_pass_inputs(
        proposer,
        step.token_ids,
        step.next_token_ids,
        step.positions,
        step.hidden_states,
        step.token_indices_to_sample,
        step.attn_metadata,
        step.num_rejected,
    )
    hidden = internals.run_first_pass(proposer, inputs, step.mm_embed_inputs)[inputs.sample_rows]
    proposer.stats.first_passes += 1
    return internals.greedy_sample(proposer, hidden)


def ngram_proposals(
    runner, step: TargetStep, prompt_lookup_min: int, prompt_lookup_max: int, k: int
) -> list[list[int]]:  # [batch_size] up to k tokens each
    """Each request's n-gram continuation of its committed context (empty for discarded rows)."""
    contexts = step.committed_contexts(runner)
    discarded = internals.discarded_rows(runner, len(contexts))
    return [
        [] if discarded[i] else find_ngram_continuation(context, prompt_lookup_min, prompt_lookup_max, k).tolist()
        for i, context in enumerate(contexts)
    ]


def trace_round(path: str, runner, round_index: int, step: TargetStep, drafts: torch.Tensor | list[list[int]]) -> None:
    """Append each request's level-1 drafts of this round as a JSON line (VLLM_SPECQD_TRACE_DRAFTS)."""
    positions = step.sampled_positions.tolist()
    req_ids = internals.batch_req_ids(runner, len(positions))
    discarded = internals.discarded_rows(runner, len(positions))
    rows = drafts.tolist() if isinstance(drafts, torch.Tensor) else drafts
    with open(path, "a") as f:
        for i, (pos, row) in enumerate(zip(positions, rows)):
            if not discarded[i]:
                f.write(json.dumps({"req": req_ids[i], "pos": pos, "drafts": row, "round": round_index}) + "\n")
