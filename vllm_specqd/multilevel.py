"""Multi-level speculative drafting (ML-SpecQD, arXiv 2503.13565), engine agnostic.

The target model checks drafts from its MXFP4 copy (level 1). Level 1 is
itself sped up by speculative decoding: a cheaper inner proposer (a smaller
level, or an n-gram lookup) guesses tokens, level 1 checks all of them in one
forward pass, and keeps the longest prefix that matches its own greedy choice
plus one token of its own (the bonus). Every kept token is one the level's
model picks greedily, so a level returns exactly what plain one-token-at-a-time
greedy drafting with its model would, whatever the inner proposer says. A
level is itself a `Proposer`, so levels nest to any depth.

Nothing here knows vLLM or torch: a level's model is anything that implements
`WindowModel` (one forward pass over a ragged batch, greedy next tokens out).
"""

from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np


@dataclass
class RequestContext:
    """The known tokens of one request; a proposer continues after the last one."""

    req_id: Hashable
    tokens: np.ndarray  # [num_tokens] int

    def __post_init__(self):
        if not (isinstance(self.tokens, np.ndarray) and self.tokens.dtype.kind in "iu"):
            self.tokens = np.asarray(self.tokens, dtype=np.int64)
        assert self.tokens.ndim == 1, self.tokens.shape


class Proposer(Protocol):
    """Anything that guesses continuations (an n-gram lookup, a `SpeculativeLevel`).

    It may also have `forget(req_id)`; `SpeculativeLevel.forget` passes it on.
    """

    def propose(self, contexts: Sequence[RequestContext], max_new_tokens: Sequence[int]) -> list[list[int]]:
        """Up to max_new_tokens[i] tokens that may follow contexts[i].tokens (may be none)."""
        ...


class WindowModel(Protocol):
    """The model of one level: one call is one forward pass over a ragged batch."""

    def greedy_next_tokens(
        self,
        req_ids: Sequence[Hashable],
        windows: Sequence[Sequence[int]],
        start_positions: Sequence[int],
        needed_from: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """windows[i] are the tokens at positions start_positions[i] ..
        start_positions[i] + len(windows[i]) - 1 of request req_ids[i]. The
        model attends to its KV cache for the positions before
        start_positions[i] and writes KV for every window token (overwriting
        what was there). Returns, for each window token, the model's greedy
        choice for the position after it (same ragged shape as `windows`).
        ``needed_from[i]``: the choices of window i's first needed_from[i] tokens
        are not read (tokens only caught up into KV); the model may skip them
        (their logits) and put any value there."""
        ...


@dataclass
class LevelStats:
    """Counters of one level, summed over calls until `reset()`."""

    forward_passes: int = 0  # batched model calls: one per pass, whatever the batch size
    windows: int = 0  # (request, pass) pairs
    window_tokens: int = 0  # tokens fed to the model, summed over windows
    proposed_tokens: int = 0  # offered by the inner proposer
    accepted_tokens: int = 0  # of those, the ones that matched the model's greedy choice
    produced_tokens: int = 0  # returned to the caller: accepted + one bonus per window
    windows_without_proposal: int = 0  # plain single-token steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per window, bonus included (the paper's acceptance length)."""
        return self.produced_tokens / self.windows if self.windows else 0.0

    @property
    def passes_per_token(self) -> float:
        return self.forward_passes / self.produced_tokens if self.produced_tokens else 0.0

    def reset(self) -> None:
        for name, default in asdict(LevelStats()).items():
            setattr(self, name, default)

    def to_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "passes_per_token": self.passes_per_token,
        }


class SpeculativeLevel:
    """A level model sped up by an optional inner proposer; itself a `Proposer`.

    KV bookkeeping: the level remembers, per request, the tokens whose KV its
    model holds correctly (`kv_tokens`, always a prefix of what it was last
    asked about). A new context may differ from it after the level above
    rejected tokens; KV is reused up to their common prefix and everything
    after it is pending and goes into the next window again.

    Across calls the level keeps what its KV holds: a level below level 1 catches up on the
    tokens the levels above committed since its last call in its first window of the next call
    (pending tokens), not in a pass of its own, so tokens it drafted itself and were kept cost it
    nothing more. Whoever knows that the model's KV for a request is gone (blocks reallocated)
    calls `forget`.

    Window cap: a request that has j of its n tokens asks the inner proposer
    for at most min(inner_max_tokens, n - j - 1) tokens, so no window writes KV
    beyond the position of the (n-1)-th draft token: the same slots a plain
    level uses (it never feeds its last draft token back). The vLLM adapter
    allocates KV slots on that assumption; `_build_windows` asserts it.
    After `propose`, kv_tokens(req_id) == context + draft[:-1], as for a plain level.
    """

    def __init__(
        self,
        model: WindowModel,
        inner: Proposer | None = None,
        inner_max_tokens: int = 0,
        name: str = "level",
    ):
        assert inner_max_tokens >= 0, inner_max_tokens
        assert (inner is None) == (inner_max_tokens == 0), "an inner proposer needs inner_max_tokens >= 1, and only it"
        self.model = model
        self.inner = inner
        self.inner_max_tokens = inner_max_tokens
        self.name = name
        self.stats = LevelStats()
        self._kv_tokens: dict[Hashable, np.ndarray] = {}

    def propose(self, contexts: Sequence[RequestContext], max_new_tokens: Sequence[int]) -> list[list[int]]:
        """Return exactly max_new_tokens[i] greedy tokens of the level model after contexts[i].

        Example: one request with context [a b] (KV held for [a]),
        max_new_tokens = 4, inner_max_tokens = 2; the model's greedy
        continuation is [c d e f]:
            pass 1: the inner proposer guesses [c x]; window [b c x] at position 1;
                    the model picks [c d _]: c is accepted, x is not, d is the bonus.
                    Drafts [c d]; KV now valid for [a b c].
            pass 2: the inner proposer may guess min(2, 4 - 2 - 1) = 1 token: [e];
                    window [d e] at position 3; the model picks [e f]: e is accepted,
                    f is the bonus. Drafts [c d e f] after 2 passes instead of 4;
                    the last window ends at position 4, where a plain level's would.
        Requests that have all their tokens sit out the remaining passes.
        """
        assert len(contexts) == len(max_new_tokens), (len(contexts), len(max_new_tokens))
        assert all(len(c.tokens) >= 1 for c in contexts), "a context needs a last known token"
        assert all(n >= 0 for n in max_new_tokens), max_new_tokens
        assert len({c.req_id for c in contexts}) == len(contexts), "duplicate req_id"
        drafts: list[list[int]] = [[] for _ in contexts]
        while active := [i for i, n in enumerate(max_new_tokens) if len(drafts[i]) < n]:
            extended = [RequestContext(contexts[i].req_id, _append(contexts[i].tokens, drafts[i])) for i in active]
            still_needed = [max_new_tokens[i] - len(drafts[i]) for i in active]
            kv_limits = [len(contexts[i].tokens) + max_new_tokens[i] - 1 for i in active]
            guesses = self._ask_inner(extended, still_needed)
            starts, windows = self._build_windows(extended, guesses, kv_limits)
            # Pending tokens before a context's last one are only caught up: their choices are unread.
            needed_from = [len(c.tokens) - 1 - start for c, start in zip(extended, starts)]
            greedy = self.model.greedy_next_tokens([c.req_id for c in extended], windows, starts, needed_from)
            self.stats.forward_passes += 1
            assert len(greedy) == len(windows)
            for i, context, guess, start, window, choices in zip(active, extended, guesses, starts, windows, greedy):
                assert len(choices) == len(window), (len(choices), len(window))
                drafts[i] += self._accept(context, guess, start, list(choices))
        return drafts

    def _ask_inner(self, contexts: list[RequestContext], still_needed: list[int]) -> list[list[int]]:
        """Phase 1: the inner proposer's guesses, capped so the bonus token still fits."""
        caps = [min(self.inner_max_tokens, n - 1) for n in still_needed]
        guesses: list[list[int]] = [[] for _ in contexts]
        asked = [i for i, cap in enumerate(caps) if cap > 0]
        if self.inner is None or not asked:
            return guesses
        answers = self.inner.propose([contexts[i] for i in asked], [caps[i] for i in asked])
        assert len(answers) == len(asked), (len(answers), len(asked))
        for i, answer in zip(asked, answers):
            assert len(answer) <= caps[i], f"inner proposer returned {len(answer)} > {caps[i]}"
            guesses[i] = [int(t) for t in answer]
        return guesses

    def _build_windows(
        self, contexts: list[RequestContext], guesses: list[list[int]], kv_limits: list[int]
    ) -> tuple[list[int], list[list[int]]]:
        """Phase 2: window = pending tokens (not yet in KV) + guesses, one per request."""
        starts, windows = [], []
        for context, guess, kv_limit in zip(contexts, guesses, kv_limits):
            start = self._reusable_kv_length(context)
            window = context.tokens[start:].tolist() + guess
            assert start + len(window) <= kv_limit, "window writes KV past the plain level's"
            starts.append(start)
            windows.append(window)
        return starts, windows

    def _accept(self, context: RequestContext, guess: list[int], start: int, choices: list[int]) -> list[int]:
        """Phase 3: keep the guesses that match the model's greedy choices, plus the bonus."""
        # choices[j] is the model's pick for the position after window token j;
        # the first guess sits right after the context's last token.
        first = len(context.tokens) - 1 - start
        accepted = 0
        while accepted < len(guess) and guess[accepted] == choices[first + accepted]:
            accepted += 1
        # Claim no KV for rejected guesses (the bonus replaces the first of them
        # anyway) nor for the bonus (not processed yet): what a plain level holds.
        self._kv_tokens[context.req_id] = _append(context.tokens, guess[:accepted])
        self.stats.windows += 1
        self.stats.window_tokens += len(choices)
        self.stats.proposed_tokens += len(guess)
        self.stats.accepted_tokens += accepted
        self.stats.produced_tokens += accepted + 1
        self.stats.windows_without_proposal += not guess
        return guess[:accepted] + [int(choices[first + accepted])]

    def _reusable_kv_length(self, context: RequestContext) -> int:
        """How many leading tokens of the context already have valid KV.

        Capped at len - 1: the last token's prediction is needed, so it is
        always (re)processed.
        """
        held = self._kv_tokens.get(context.req_id)
        if held is None:
            return 0
        limit = min(len(held), len(context.tokens) - 1)
        mismatches = np.flatnonzero(held[:limit] != context.tokens[:limit])
        return int(mismatches[0]) if mismatches.size else limit

    def mark_kv_valid(self, req_id: Hashable, tokens: np.ndarray) -> None:
        """Declare that the model's KV for `req_id` is correct for exactly `tokens`
        (positions 0 .. len - 1), e.g. after the adapter ran a pass itself."""
        tokens = np.array(tokens)  # [num_tokens] int; a copy, callers reuse their buffers
        assert tokens.ndim == 1 and (tokens.size == 0 or tokens.dtype.kind in "iu"), tokens
        self._kv_tokens[req_id] = tokens

    def kv_tokens(self, req_id: Hashable) -> np.ndarray | None:
        """The tokens whose KV this level believes its model holds, or None if unknown."""
        return self._kv_tokens.get(req_id)

    def forget(self, req_id: Hashable) -> None:
        """Drop a finished request's state here and in the levels below."""
        self._kv_tokens.pop(req_id, None)
        forget_inner = getattr(self.inner, "forget", None)
        if forget_inner is not None:
            forget_inner(req_id)

    def chain(self) -> list["SpeculativeLevel"]:
        """This level and the `SpeculativeLevel`s below it, outermost first."""
        levels = [self]
        while isinstance(levels[-1].inner, SpeculativeLevel):
            levels.append(levels[-1].inner)
        return levels

    def chain_stats(self) -> dict[str, dict[str, float]]:
        return {level.name: level.stats.to_dict() for level in self.chain()}


def build_chain(levels: Sequence[tuple[WindowModel, int]], innermost: Proposer | None = None) -> SpeculativeLevel:
    """Nest levels: levels[0] is level 1 (the draft right below the target).

    Each entry is (model, k): the level's model and how many tokens it asks the
    next entry (or `innermost`, for the last entry) for per pass. The last k
    must be 0 when there is no innermost proposer.
    Example: build_chain([(mxfp4_draft, 3), (small_draft, 2)], NgramProposer(1, 3, 2)).
    """
    assert levels, "need at least one level"
    inner = innermost
    for depth in reversed(range(len(levels))):
        model, k = levels[depth]
        inner = SpeculativeLevel(model, inner, k, name=f"level{depth + 1}")
    return inner


def _append(tokens: np.ndarray, more: list[int]) -> np.ndarray:
    return np.concatenate([tokens, np.asarray(more, dtype=tokens.dtype)])
