"""Tests of the engine-agnostic multi-level drafter (vllm_specqd.multilevel, vllm_specqd.ngram).

The toy models simulate a KV cache: each position stores its token and a
checksum of the whole prefix (as real KV depends on the whole prefix), and the
greedy choice depends on that checksum. A window that starts after stale KV
(tokens the level above rejected) therefore changes later choices, and one that
starts past unprocessed positions fails an assertion; so KV-bookkeeping bugs
show up as lossless-ness failures, not just as slowdowns.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_specqd.multilevel import (
    LevelStats,
    RequestContext,
    SpeculativeLevel,
    build_chain,
)
from vllm_specqd.ngram import NgramProposer, find_ngram_continuation

VOCAB = 8
MASK = (1 << 64) - 1


def _mix(*values: int) -> int:
    """splitmix64 over a few ints: deterministic across runs, unlike hash()."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & MASK)) * 0xBF58476D1CE4E5B9 & MASK
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & MASK
        h ^= h >> 29
    return h


class ToyModel:
    """A deterministic WindowModel with a simulated KV cache.

    Next token after a prefix: usually a function of the last two tokens (so
    text repeats and n-gram lookup has something to find), sometimes one of
    the prefix checksum. With `parent`, it copies the parent's choice with
    probability `agreement`: a "smaller model" that often agrees.
    """

    def __init__(self, seed: int, parent: "ToyModel | None" = None, agreement: float = 0.0):
        self.seed, self.parent, self.agreement = seed, parent, agreement
        self.cache: dict = {}  # req_id -> list of (token, checksum), one per position
        self.calls: list[list[tuple]] = []  # per forward pass: (req_id, start, window)
        self.kv_limits: dict = {}  # req_id -> first position a window must not write

    def _choose(self, tokens: list[int], checksum: int) -> int:
        if self.parent is not None and _mix(self.seed, checksum) % 1000 < self.agreement * 1000:
            return self.parent._choose(tokens, checksum)
        if _mix(self.seed, 1, checksum) % 4 == 0:
            return _mix(self.seed, 2, checksum) % VOCAB
        return _mix(self.seed, 3, *tokens[-2:]) % VOCAB

    def greedy_next_tokens(self, req_ids, windows, start_positions, needed_from=None):
        assert len(req_ids) == len(windows) == len(start_positions) > 0
        self.calls.append(list(zip(req_ids, start_positions, windows)))
        out = []
        needed_from = needed_from or [0] * len(windows)
        for req_id, window, start, skip in zip(req_ids, windows, start_positions, needed_from):
            assert len(window) >= 1
            cache = self.cache.setdefault(req_id, [])
            assert 0 <= start <= len(cache), f"window at {start} skips unprocessed KV ({len(cache)})"
            if req_id in self.kv_limits:
                assert start + len(window) <= self.kv_limits[req_id], "window past the KV cap"
            del cache[start:]
            choices = []
            for token in window:
                checksum = _mix(cache[-1][1] if cache else 0, int(token))
                cache.append((int(token), checksum))
                choices.append(self._choose([t for t, _ in cache[-2:]], checksum))
            assert 0 <= skip < len(window), (skip, len(window))
            out.append([-1] * skip + choices[skip:])  # unread choices: a wrong token, never a draft
        return out

    def plain_greedy(self, tokens, n: int) -> list[int]:
        """What one-token-at-a-time greedy decoding gives, without touching the cache."""
        tokens, checksum = [int(t) for t in tokens], 0
        for t in tokens:
            checksum = _mix(checksum, t)
        out = []
        for _ in range(n):
            out.append(self._choose(tokens, checksum))
            tokens.append(out[-1])
            checksum = _mix(checksum, out[-1])
        return out

    def cached_tokens(self, req_id) -> list[int]:
        return [t for t, _ in self.cache.get(req_id, [])]


class CappedLevel:
    """Wraps an inner SpeculativeLevel: checks its windows against the cap of each call."""

    def __init__(self, level: SpeculativeLevel, model: ToyModel):
        self.level, self.model = level, model

    def propose(self, contexts, max_new_tokens):
        self.model.kv_limits = {c.req_id: len(c.tokens) + n - 1 for c, n in zip(contexts, max_new_tokens)}
        drafts = self.level.propose(contexts, max_new_tokens)
        self.model.kv_limits = {}
        for context, n, draft in zip(contexts, max_new_tokens, drafts):
            assert draft == self.model.plain_greedy(context.tokens, n)
        return drafts

    def forget(self, req_id):
        self.level.forget(req_id)


class NoisyOracle:
    """Knows the level model's greedy answer; returns a random-length prefix of it
    with each token corrupted with probability `error_rate` (1.0: always wrong)."""

    def __init__(self, model: ToyModel, error_rate: float, seed: int = 0, exact_length=False):
        self.model, self.error_rate, self.exact_length = model, error_rate, exact_length
        self.rng = np.random.default_rng(seed)

    def propose(self, contexts, max_new_tokens):
        out = []
        for context, n in zip(contexts, max_new_tokens):
            length = n if self.exact_length else int(self.rng.integers(0, n + 1))
            guess = self.model.plain_greedy(context.tokens, length)
            out.append([(t + 1) % VOCAB if self.rng.random() < self.error_rate else t for t in guess])
        return out


class RandomProposer:
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def propose(self, contexts, max_new_tokens):
        return [self.rng.integers(0, VOCAB, int(self.rng.integers(0, n + 1))).tolist() for n in max_new_tokens]


class EmptyProposer:
    def propose(self, contexts, max_new_tokens):
        return [[] for _ in contexts]


def _contexts(rng, req_ids, min_len=1, max_len=30):
    return [RequestContext(r, rng.integers(0, VOCAB, int(rng.integers(min_len, max_len + 1)))) for r in req_ids]


def _build(kind: str, big: ToyModel, seed: int, k1: int, k2: int):
    """Level 1 over `big`, with the inner chain named by `kind`; returns (level, inner models)."""
    small = ToyModel(seed + 1, parent=big, agreement=0.7)
    if kind == "ngram":
        return SpeculativeLevel(big, NgramProposer(1, 3, k1), k1), []
    if kind == "random":
        return SpeculativeLevel(big, RandomProposer(seed), k1), []
    if kind == "noisy":
        return SpeculativeLevel(big, NoisyOracle(big, 0.3, seed), k1), []
    if kind == "empty":
        return SpeculativeLevel(big, EmptyProposer(), k1), []
    innermost = {
        "small+ngram": NgramProposer(1, 3, k2),
        "small+random": RandomProposer(seed),
        "small+noisy": NoisyOracle(small, 0.3, seed),
    }[kind]
    inner = CappedLevel(SpeculativeLevel(small, innermost, k2, name="level2"), small)
    return SpeculativeLevel(big, inner, k1), [small]


KINDS = ["ngram", "random", "noisy", "empty", "small+ngram", "small+random", "small+noisy"]


def _run_rounds(level, big, rng, req_ids, rounds, max_k, check_kv=True):
    """Draft, then let a simulated target accept a random prefix and append its own
    token (a rewind for the drafter); every draft must equal plain greedy."""
    contexts = _contexts(rng, req_ids)
    for _ in range(rounds):
        ks = [int(rng.integers(0, max_k + 1)) for _ in contexts]
        big.kv_limits = {c.req_id: len(c.tokens) + k - 1 for c, k in zip(contexts, ks)}
        drafts = level.propose(contexts, ks)
        big.kv_limits = {}
        for context, k, draft in zip(contexts, ks, drafts):
            assert draft == big.plain_greedy(context.tokens, k)
            if check_kv and k:
                # The level claims the KV a plain level would hold, and the model holds it.
                held = level.kv_tokens(context.req_id).tolist()
                assert held == context.tokens.tolist() + draft[:-1]
                assert big.cached_tokens(context.req_id)[: len(held)] == held
        contexts = [
            RequestContext(
                c.req_id, np.concatenate([c.tokens, d[: int(rng.integers(0, k + 1))], [int(rng.integers(0, VOCAB))]])
            )
            for c, k, d in zip(contexts, ks, drafts)
        ]


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 4),
    k1=st.integers(1, 5),
    k2=st.integers(1, 3),
    max_k=st.integers(1, 7),
    rounds=st.integers(1, 5),
)
def test_drafts_equal_plain_greedy(kind, seed, batch, k1, k2, max_k, rounds):
    big = ToyModel(seed)
    level, _ = _build(kind, big, seed, k1, k2)
    _run_rounds(level, big, np.random.default_rng(seed), list(range(batch)), rounds, max_k)


def test_three_level_chain_with_build_chain():
    rng = np.random.default_rng(0)
    big = ToyModel(7)
    mid = ToyModel(8, parent=big, agreement=0.8)
    small = ToyModel(9, parent=mid, agreement=0.8)
    top = build_chain([(big, 4), (mid, 3), (small, 2)], NgramProposer(1, 3, 2))
    assert [lvl.name for lvl in top.chain()] == ["level1", "level2", "level3"]
    _run_rounds(top, big, rng, ["a", "b", "c"], rounds=20, max_k=6)
    stats = top.chain_stats()
    assert stats["level1"]["accepted_tokens"] > 0 and stats["level3"]["forward_passes"] > 0
    # Fewer level-1 passes than tokens: the inner chain pays off.
    assert stats["level1"]["passes_per_token"] < 1


def test_stale_kv_is_caught_by_the_toy_model():
    """The harness must fail a level that forgets to rewind its KV."""

    class NoRewindLevel(SpeculativeLevel):
        def _reusable_kv_length(self, context):
            held = self.kv_tokens(context.req_id)
            return 0 if held is None else min(len(held), len(context.tokens) - 1)

    big = ToyModel(3)
    level = NoRewindLevel(big, RandomProposer(1), 3)
    with pytest.raises(AssertionError):
        _run_rounds(level, big, np.random.default_rng(1), [0, 1, 2], rounds=10, max_k=5, check_kv=False)


def test_window_never_passes_the_plain_levels_kv():
    big = ToyModel(5)
    level = SpeculativeLevel(big, NoisyOracle(big, 0.0, exact_length=True), 8)
    context = RequestContext("r", [1, 2, 3])
    level.propose([context], [4])
    ((req, start, window),) = big.calls[-1]
    # A perfect inner proposer asked for 8 may only offer 3; the window ends at the
    # position of the 3rd draft token (3 + 4 - 2), as a plain level's last one would.
    assert (start, len(window)) == (0, 6) and start + len(window) - 1 == 3 + 4 - 2


def test_perfect_inner_proposer_takes_one_pass():
    big = ToyModel(11)
    level = SpeculativeLevel(big, NoisyOracle(big, 0.0, exact_length=True), 3)
    drafts = level.propose([RequestContext(0, [4, 5, 6])], [4])
    assert drafts[0] == big.plain_greedy([4, 5, 6], 4)
    s = level.stats
    assert (s.forward_passes, s.proposed_tokens, s.accepted_tokens, s.produced_tokens) == (1, 3, 3, 4)
    assert s.acceptance_rate == 1.0 and s.mean_accepted_length == 4.0 and s.passes_per_token == 0.25


def test_useless_inner_proposer_takes_one_pass_per_token():
    big = ToyModel(12)
    level = SpeculativeLevel(big, NoisyOracle(big, 1.0, exact_length=True), 3)
    drafts = level.propose([RequestContext(0, [4, 5, 6])], [4])
    assert drafts[0] == big.plain_greedy([4, 5, 6], 4)
    s = level.stats
    # Guesses are capped by what is still needed, minus the bonus: 3, 2, 1, then none.
    assert (s.forward_passes, s.proposed_tokens, s.accepted_tokens) == (4, 6, 0)
    assert s.windows_without_proposal == 1 and s.acceptance_rate == 0.0
    assert s.to_dict()["passes_per_token"] == 1.0
    s.reset()
    assert s == LevelStats()


def test_fallback_and_ragged_progress():
    big = ToyModel(13)
    level = SpeculativeLevel(big, EmptyProposer(), 2)
    contexts = _contexts(np.random.default_rng(2), ["x", "y", "z"], min_len=3)
    drafts = level.propose(contexts, [1, 5, 3])
    assert [len(d) for d in drafts] == [1, 5, 3]
    for c, d in zip(contexts, drafts):
        assert d == big.plain_greedy(c.tokens, len(d))
    # Finished requests leave the batch; each pass counts once however many it holds.
    assert [len(call) for call in big.calls] == [3, 2, 2, 1, 1]
    assert [[len(w) for _, _, w in call] for call in big.calls][1:] == [[1, 1]] * 2 + [[1]] * 2
    assert level.stats.forward_passes == 5 and level.stats.windows == 9
    assert level.stats.windows_without_proposal == 9


def test_partial_fallback_within_a_batch():
    big = ToyModel(14)

    class OnlyForA:
        def propose(self, contexts, max_new_tokens):
            return [big.plain_greedy(c.tokens, n) if c.req_id == "a" else [] for c, n in zip(contexts, max_new_tokens)]

    level = SpeculativeLevel(big, OnlyForA(), 4)
    contexts = [RequestContext("a", [1, 2]), RequestContext("b", [3, 4])]
    assert level.propose(contexts, [5, 5]) == [big.plain_greedy(c.tokens, 5) for c in contexts]
    # "a" is done after one pass (4 guesses + bonus); "b" steps alone.
    assert [len(call) for call in big.calls] == [2, 1, 1, 1, 1]


def test_zero_tokens_requested_runs_nothing():
    big = ToyModel(15)
    level = SpeculativeLevel(big)
    assert level.propose([RequestContext(0, [1])], [0]) == [[]]
    assert big.calls == []


def test_overlong_inner_proposal_is_rejected():
    class Greedy:
        def propose(self, contexts, max_new_tokens):
            return [[1] * (n + 1) for n in max_new_tokens]

    with pytest.raises(AssertionError, match="inner proposer returned"):
        SpeculativeLevel(ToyModel(0), Greedy(), 2).propose([RequestContext(0, [1, 2])], [3])


def test_mark_kv_valid_and_forget():
    big = ToyModel(16)
    level = SpeculativeLevel(big, NgramProposer(1, 2, 2), 2)
    prompt = [1, 2, 3, 1, 2]
    # The adapter runs the first pass itself, then asks for the rest.
    ((first,),) = [c[-1:] for c in big.greedy_next_tokens(["r"], [prompt], [0])]
    level.mark_kv_valid("r", np.array(prompt))
    drafts = level.propose([RequestContext("r", prompt + [first])], [3])
    assert [first] + drafts[0] == big.plain_greedy(prompt, 4)
    assert big.calls[1][0][1] == len(prompt)  # only the new token was pending
    level.forget("r")
    assert level.kv_tokens("r") is None
    level.propose([RequestContext("r", prompt)], [1])
    assert big.calls[-1][0][1] == 0  # no KV assumed after forget


def test_forget_reaches_inner_levels():
    big, small = ToyModel(17), ToyModel(18)
    top = build_chain([(big, 2), (small, 1)], NgramProposer(1, 2, 1))
    top.propose([RequestContext("r", [1, 2, 1, 2])], [4])
    inner = top.chain()[1]
    assert inner.kv_tokens("r") is not None
    top.forget("r")
    assert top.kv_tokens("r") is None and inner.kv_tokens("r") is None


# ---------------------------------------------------------------- n-gram proposer


@pytest.mark.parametrize(
    "tokens, min_n, max_n, k, expected",
    [
        ([1, 2, 3, 4, 2, 3], 1, 3, 2, [4, 2]),  # longest suffix [2 3] wins over [3]
        ([5, 5, 5, 5], 1, 3, 2, [5]),  # occurrence overlaps the suffix; stops at the end
        ([1, 2, 3], 1, 3, 2, []),  # nothing repeats
        ([1, 2, 3, 4, 2, 3], 3, 3, 2, []),  # [2 3] is shorter than min_n
        ([7, 1, 9, 7, 1, 8, 7, 1], 1, 2, 1, [9]),  # earliest of equal-length occurrences
        ([7, 1, 9, 7, 1, 8, 7, 1], 1, 2, 5, [9, 7, 1, 8, 7]),
        ([3, 1, 2, 3, 9, 1, 2, 3], 1, 3, 2, [9, 1]),  # [1 2 3] at 1..3
        ([3, 1, 2, 3, 9, 1, 2, 3], 1, 1, 2, [1, 2]),  # max_n=1: [3] first at 0
    ],
)
def test_ngram_examples(tokens, min_n, max_n, k, expected):
    assert find_ngram_continuation(np.array(tokens), min_n, max_n, k).tolist() == expected


def test_ngram_proposer_respects_both_limits():
    proposer = NgramProposer(1, 2, num_speculative_tokens=3)
    contexts = [RequestContext(0, [1, 2, 3, 4, 5, 1, 2]), RequestContext(1, [1, 2])]
    assert proposer.propose(contexts, [5, 5]) == [[3, 4, 5], []]
    assert proposer.propose(contexts, [2, 1]) == [[3, 4], []]


def test_ngram_matches_vllm():
    ngram_proposer = pytest.importorskip("vllm.v1.spec_decode.ngram_proposer")
    vllm_find = ngram_proposer._find_longest_matched_ngram_and_propose_tokens
    rng = np.random.default_rng(0)
    for _ in range(2000):
        vocab = int(rng.integers(1, 6))
        tokens = rng.integers(0, vocab, int(rng.integers(0, 40))).astype(np.int32)
        min_n = int(rng.integers(1, 5))
        max_n = int(rng.integers(min_n, 7))
        k = int(rng.integers(1, 6))
        expected = vllm_find(tokens, min_n, max_n, 1_000_000, k).tolist()
        assert find_ngram_continuation(tokens, min_n, max_n, k).tolist() == expected, (tokens.tolist(), min_n, max_n, k)


def test_inner_level_catches_up_in_its_first_window_of_the_next_round():
    """An inner level is never marked valid from outside: next round, its first window starts where
    what it holds stops matching (the tokens it drafted and the level above kept cost nothing)."""
    big = ToyModel(21)
    small = ToyModel(22, parent=big, agreement=0.9)
    inner = SpeculativeLevel(small, NgramProposer(1, 3, 1), 1, name="level2")
    top = SpeculativeLevel(big, inner, 3)
    context = RequestContext("r", np.array([1, 2, 3, 4, 1, 2]))
    drafts = top.propose([context], [6])[0]
    assert drafts == big.plain_greedy(context.tokens, 6)
    held = inner.kv_tokens("r")
    assert len(held) > len(context.tokens)  # it holds tokens it drafted itself
    # The target keeps three drafts and samples its own token.
    committed = np.concatenate([context.tokens, drafts[:3], [(drafts[3] + 1) % VOCAB]])
    small.calls.clear()
    assert top.propose([RequestContext("r", committed)], [4])[0] == big.plain_greedy(committed, 4)
    (_, start, window), *_ = small.calls[0]
    same = next((i for i, (a, b) in enumerate(zip(held, committed)) if a != b), min(len(held), len(committed)))
    assert start == min(same, len(committed) - 1) > len(context.tokens)
    assert window[: len(committed) - start] == committed[start:].tolist()  # the pending tokens, then guesses
