"""What the target's step hands the drafter, read once per round, and how many drafts a request can use."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from vllm_specqd.adapter import vllm_internals as internals


@dataclass(frozen=True)
class TargetStep:
    """The arguments of one ``propose`` call: the target's input rows and what it sampled.

    Example: two requests; request 0 fed [t0, d1, d2] at positions 10..12 and the target rejected
    d2; request 1 fed one prefill chunk [p0..p3] at positions 0..3. Then ``query_start_loc`` is
    [0, 3, 7], ``num_rejected`` is [1, 0], ``kept_rows`` is [(0, 2), (3, 7)] and
    ``sampled_positions`` is [12, 4]: where each request's freshly sampled token sits.
    """

    token_ids: torch.Tensor  # [num_tokens] the target's input tokens
    positions: torch.Tensor  # [num_tokens]
    hidden_states: torch.Tensor  # [num_tokens, hidden]
    next_token_ids: torch.Tensor  # [batch] the token the target just sampled per request
    token_indices_to_sample: torch.Tensor | None  # [batch]
    attn_metadata: object  # vLLM's CommonAttentionMetadata of the target's step
    sampling_metadata: object
    num_rejected: torch.Tensor | None  # [batch] input rows the verification rejected
    mm_embed_inputs: object = None
    slot_mappings: object = None

    @property
    def batch_size(self) -> int:
        return self.next_token_ids.shape[0]

    @cached_property
    def sampled_positions(self) -> torch.Tensor:  # [batch] int64
        """Position of the token the target just sampled: one past each request's last kept row."""
        last_kept = self.attn_metadata.query_start_loc[1:].long() - 1
        if self.num_rejected is not None:
            last_kept = last_kept - self.num_rejected.long()
        return self.positions[last_kept].long() + 1

    @cached_property
    def kept_rows(self) -> list[tuple[int, int]]:  # [batch] of [lo, hi) input rows
        """Per request, the input rows it kept this step."""
        qsl = self.attn_metadata.query_start_loc_cpu.tolist()
        num_reqs = len(qsl) - 1
        rejected = self.num_rejected.tolist() if self.num_rejected is not None else [0] * num_reqs
        return [(qsl[i], qsl[i + 1] - rejected[i]) for i in range(num_reqs)]

    def committed_contexts(self, runner) -> list[np.ndarray]:  # [batch] of [sampled_position + 1] int64
        """Per request: every token up to and including the one the target just sampled.

        The runner has not booked this step's tokens yet (the drafter runs before bookkeeping), so
        the tail comes from the step itself: the booked tokens before the first input position,
        the kept input rows, then the sampled token.
        """
        tokens = self.token_ids.tolist()
        positions = self.positions.tolist()
        next_tokens = self.next_token_ids.tolist()
        contexts = []
        for i, (lo, hi) in enumerate(self.kept_rows):
            context = np.concatenate(
                [
                    internals.committed_token_ids(runner, i, positions[lo]),
                    np.asarray(tokens[lo:hi], dtype=np.int64),
                    np.asarray([next_tokens[i]], dtype=np.int64),
                ]
            )
            assert positions[hi - 1] == len(context) - 2, "target rows must be contiguous positions"
            contexts.append(context)
        return contexts


def usable_drafts(max_k: int, context_len: int, max_model_len: int, budget: tuple[int, int] | None) -> int:
    """How many drafts (d1 included) the next target step can use for one request.

    ``context_len`` counts the committed tokens, the one just sampled included; ``budget`` is
    (prompt tokens, max_tokens) or None. The next step feeds positions context_len - 1 ..
    context_len - 1 + k, which must stay below max_model_len; it commits at most k + 1 tokens, and
    the request may generate only max_tokens - (context_len - prompt tokens) more.

    Example: max_k=6, max_model_len=100, prompt 10, max_tokens 20, 15 tokens committed: 5 are
    generated, 15 may follow, so min(6, 100 - 15, 15 - 1) = 6; with 28 committed, 2 may follow,
    so 1 draft (it and the bonus token fill the budget).
    """
    cap = min(max_k, max_model_len - context_len)
    if budget is not None:
        num_prompt_tokens, max_tokens = budget
        cap = min(cap, max_tokens - (context_len - num_prompt_tokens) - 1)
    return max(0, cap)


def request_draft_cap(runner, req_id, max_k: int, context_len: int, max_model_len: int) -> int:
    """``usable_drafts`` for a running request, its budget read from the runner."""
    return usable_drafts(max_k, context_len, max_model_len, internals.generation_budget(runner, req_id))
