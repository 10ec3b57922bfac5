"""Prompt-lookup (n-gram) proposer, engine agnostic.

Behaves like vLLM's `v1/spec_decode/ngram_proposer.py`
(`_find_longest_matched_ngram_and_propose_tokens`) but is plain numpy, so the
innermost level of a multi-level chain needs neither vLLM nor numba.
"""

from collections.abc import Sequence

import numpy as np

from vllm_specqd.multilevel import RequestContext


def find_ngram_continuation(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Propose up to `k` tokens by finding the context's suffix earlier in the context.

    Takes the longest suffix of `tokens`, between `min_n` and `max_n` tokens
    long, that also occurs earlier, and returns the tokens that followed its
    earliest occurrence. The continuation stops at the end of the context, and
    an occurrence may overlap the suffix itself (as in vLLM).

    Example, min_n=1, max_n=3, k=2:
        tokens = [1 2 3 4 2 3]: the suffix [2 3] occurred at positions 1..2
        ([4 2 3] never did, and [3] is shorter), so propose [4 2].
        tokens = [5 5 5 5]: [5 5 5] occurred at positions 0..2 and only one
        token follows it, so propose [5].
        tokens = [1 2 3]: nothing repeats, so propose [].

    Cost: one vectorized comparison over the context, then a few over the
    (usually short) list of candidate occurrences.
    """
    tokens = np.asarray(tokens)  # [num_tokens]
    assert tokens.ndim == 1, tokens.shape
    assert 1 <= min_n <= max_n and k >= 0, (min_n, max_n, k)
    if k == 0 or len(tokens) < 2:
        return tokens[:0]
    # An occurrence "ends at e" when tokens[e - n + 1 : e + 1] equals the suffix
    # of length n; the suffix itself (e = len - 1) is not a candidate.
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    matched = 1
    while ends.size and matched < max_n:
        long_enough = ends[ends >= matched]
        longer = long_enough[tokens[long_enough - matched] == tokens[-1 - matched]]
        if not longer.size:
            break
        ends, matched = longer, matched + 1
    if not ends.size or matched < min_n:
        return tokens[:0]
    start = ends[0] + 1  # `ends` is sorted: ends[0] is the earliest occurrence
    return tokens[start : start + k]


class NgramProposer:
    """Prompt lookup for a batch; the innermost `Proposer` of a chain.

    Stateless: every call searches each request's whole context afresh, so
    rewinds by the caller need no bookkeeping.
    """

    def __init__(self, min_n: int, max_n: int, num_speculative_tokens: int):
        assert 1 <= min_n <= max_n, (min_n, max_n)
        assert num_speculative_tokens >= 1, num_speculative_tokens
        self.min_n = min_n
        self.max_n = max_n
        self.num_speculative_tokens = num_speculative_tokens

    def propose(self, contexts: Sequence[RequestContext], max_new_tokens: Sequence[int]) -> list[list[int]]:
        """For each request, up to min(num_speculative_tokens, max_new_tokens[i]) tokens."""
        assert len(contexts) == len(max_new_tokens)
        return [
            find_ngram_continuation(
                context.tokens, self.min_n, self.max_n, min(self.num_speculative_tokens, n)
            ).tolist()
            for context, n in zip(contexts, max_new_tokens)
        ]

    def forget(self, req_id) -> None:
        """Nothing to drop: the proposer keeps no per-request state."""
