"""The drafter's view of a target step, and the draft cap shared by every round and the adaptive drafter."""

from types import SimpleNamespace

import pytest
import torch

from vllm_specqd.adapter.target_step import TargetStep, usable_drafts


def _step(query_lens, first_positions, rejected):
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(first_positions, query_lens)])
    metadata = SimpleNamespace(query_start_loc=qsl, query_start_loc_cpu=qsl)
    return TargetStep(
        token_ids=torch.zeros(int(qsl[-1]), dtype=torch.int32),
        positions=positions,
        hidden_states=torch.zeros(int(qsl[-1]), 4),
        next_token_ids=torch.zeros(len(query_lens), dtype=torch.int32),
        token_indices_to_sample=None,
        attn_metadata=metadata,
        sampling_metadata=None,
        num_rejected=torch.tensor(rejected),
    )


def test_sampled_positions_and_kept_rows_follow_the_docstring_example():
    step = _step([3, 4], [10, 0], [1, 0])
    assert step.kept_rows == [(0, 2), (3, 7)]
    assert step.sampled_positions.tolist() == [12, 4]


def _fits(k, context_len, max_model_len, budget):
    """The next step feeds positions context_len - 1 .. context_len - 1 + k and commits up to k + 1 tokens."""
    if context_len - 1 + k > max_model_len - 1:
        return False
    if budget is not None:
        prompt, max_tokens = budget
        if k + 1 > max_tokens - (context_len - prompt):
            return False
    return True


@pytest.mark.parametrize("budget", [None, (10, 20), (10, 1), (5, 8)])
def test_usable_drafts_is_the_largest_k_that_fits(budget):
    max_model_len = 40
    for max_k in (1, 4, 6):
        for context_len in range(1, max_model_len + 1):
            if budget is not None and context_len - budget[0] > budget[1]:
                continue  # past max_tokens: the request is finished
            k = usable_drafts(max_k, context_len, max_model_len, budget)
            largest = max((j for j in range(max_k + 1) if _fits(j, context_len, max_model_len, budget)), default=0)
            assert k == largest, (max_k, context_len, budget)


def test_usable_drafts_docstring_example():
    assert usable_drafts(6, 15, 100, (10, 20)) == 6
    assert usable_drafts(6, 28, 100, (10, 20)) == 1
