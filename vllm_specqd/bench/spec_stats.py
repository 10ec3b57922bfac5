"""Acceptance and forward-pass accounting from vLLM's spec-decode counters and the specqd level report.

Pure arithmetic over counter *deltas* (after minus before the timed run), so a
warm-up does not leak into the numbers. Definitions (per request, summed over
requests; N requests, G generated tokens):

* D = verified drafts (``vllm:spec_decode_num_drafts``), T = level-1 draft
  tokens (``..._num_draft_tokens``), A = accepted level-1 tokens,
  a_i = drafts whose position i was accepted (``..._accepted_tokens_per_pos``).
* level 1 mean accepted length = 1 + A / D (bonus token included),
  acceptance rate = A / T, per-position rate = a_i / D.
* level L >= 2 (from the level report, which describes level L's proposals to
  level L-1): acceptance rate = accepted / proposed; mean accepted length =
  (accepted + W_L) / W_L, W_L = ``verify_windows`` (one bonus per window).
* target forward passes = N prefills + D verify steps + P plain decode steps,
  P = max(0, G - N - D - A) (steps where the proposer offered nothing).
* drafting rounds R = D + N: every verified draft, plus each request's last
  round, drafted in the step that finished the request and never verified
  (vLLM drafts for the whole batch before it retires finished requests).
* passes of a model level, per request, over all R rounds: one level of
  drafting runs K passes per round (K * R); with inner levels, level L's model
  runs one pass per window of its own (``windows`` in the level report; older
  reports: W_{L+1}, the windows that checked the level below's proposals),
  plus, for a level 1 with its own KV, the round's first pass (R). Per
  level-1 draft token divides by K * R, so one level gives exactly 1.
* with inner levels the adapter drafts only the tokens a request can still
  use (its max_tokens budget) and pads the rest of the K slots; vLLM counts
  the padding as proposed and rejected, so near the end of each request
  level-1 acceptance reads lower than one level's, for the same draft model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vllm_specqd.level_report import AdaptiveReport, LevelEntry, LevelReport

# Counter names in `LLM.get_metrics()`; Prometheus appends `_total` to counters.
NUM_DRAFTS = "vllm:spec_decode_num_drafts"
NUM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
NUM_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
# Level proposers that run no model forward pass (besides an n-gram lookup, written None).
SUFFIX_TREE = "suffix tree"
MODEL_FREE = (SUFFIX_TREE,)


@dataclass
class SpecCounters:
    """vLLM's level-1 spec-decode counters (cumulative, or a delta of two snapshots)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def __sub__(self, before: SpecCounters) -> SpecCounters:
        width = max(len(self.accepted_per_pos), len(before.accepted_per_pos))
        pad = lambda v: list(v) + [0] * (width - len(v))  # noqa: E731
        return SpecCounters(
            self.num_drafts - before.num_drafts,
            self.num_draft_tokens - before.num_draft_tokens,
            self.accepted_tokens - before.accepted_tokens,
            [a - b for a, b in zip(pad(self.accepted_per_pos), pad(before.accepted_per_pos))],
        )

    def to_dict(self) -> dict:
        return asdict(self)


def counters_from_metrics(metrics) -> SpecCounters:
    """From ``LLM.get_metrics()`` (objects with .name and .value / .values), summed over engines."""
    out = SpecCounters()
    for metric in metrics:
        if metric.name == NUM_DRAFTS:
            out.num_drafts += int(metric.value)
        elif metric.name == NUM_DRAFT_TOKENS:
            out.num_draft_tokens += int(metric.value)
        elif metric.name == NUM_ACCEPTED:
            out.accepted_tokens += int(metric.value)
        elif metric.name == ACCEPTED_PER_POS:
            values = [int(v) for v in metric.values]
            out.accepted_per_pos = [a + b for a, b in zip(out.accepted_per_pos or [0] * len(values), values)]
    return out


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def level1_acceptance(c: SpecCounters) -> dict:
    return {
        "proposed_tokens": c.num_draft_tokens,
        "accepted_tokens": c.accepted_tokens,
        "acceptance_rate": _ratio(c.accepted_tokens, c.num_draft_tokens),
        "mean_accepted_length": 1 + c.accepted_tokens / c.num_drafts if c.num_drafts else None,
        "per_position": [a / c.num_drafts for a in c.accepted_per_pos] if c.num_drafts else [],
        "verify_windows": c.num_drafts,
    }


def inner_acceptance(entry: LevelEntry | None) -> dict:
    """Acceptance of a level >= 2 from its level-report counter deltas."""
    if entry is None:
        entry = LevelEntry(0, "", proposed_tokens=0, accepted_tokens=0, verify_windows=0)
    return {
        "proposed_tokens": entry.proposed_tokens or 0,
        "accepted_tokens": entry.accepted_tokens or 0,
        "acceptance_rate": entry.acceptance_rate,
        "mean_accepted_length": entry.mean_accepted_length,
        "verify_windows": entry.verify_windows or 0,
        "verify_windows_without_proposal": entry.verify_windows_without_proposal or 0,
    }


def drafting_rounds(c: SpecCounters, num_requests: int) -> int:
    return c.num_drafts + num_requests if c.num_drafts else 0


def model_passes(
    level: int, num_levels: int, k: int, rounds: int, level_delta: LevelReport | None, first_pass: bool = False
) -> int:
    """Per-request forward passes of the model at ``level`` (see the module docstring).

    ``first_pass``: level 1 runs a first pass of its own each round (its separate KV catches up)."""
    if num_levels == 1:
        return k * rounds
    levels = level_delta.levels if level_delta is not None else {}
    entry, below = levels.get(level), levels.get(level + 1)
    if entry is not None and entry.windows is not None:
        windows = entry.windows
    else:
        windows = (below.verify_windows or 0) if below is not None else 0
    return (rounds if level == 1 and first_pass else 0) + windows


def target_passes(c: SpecCounters, generated_tokens: int, num_requests: int) -> int:
    plain_steps = max(0, generated_tokens - num_requests - c.num_drafts - c.accepted_tokens)
    return num_requests + c.num_drafts + plain_steps


def summarize(
    level_models: tuple[str | None, ...],
    k: int,
    counters: SpecCounters,
    level_delta: LevelReport | None,
    generated_tokens: int,
    num_requests: int,
    level1_first_pass: bool = False,
) -> dict:
    """Per-level acceptance and pass counts of one method's timed run (JSON-ready: level keys are strings).

    ``level_delta``: the specqd level report's counter deltas over the run (None for other methods);
    its ``cost_ratio`` gives each model level's c. ``level1_first_pass``: a separate-KV level 1.
    """
    levels = {}
    rounds = drafting_rounds(counters, num_requests)
    for level, model in enumerate(level_models, start=1):
        if level == 1:
            entry = level1_acceptance(counters)
        else:
            entry = inner_acceptance(level_delta.levels.get(level) if level_delta is not None else None)
        entry["proposer"] = model or "n-gram lookup"
        if model is not None and model not in MODEL_FREE:
            passes = model_passes(level, len(level_models), k, rounds, level_delta, level1_first_pass)
            entry["forward_passes"] = passes
            timed = level_delta.levels.get(level) if level_delta is not None else None
            entry["cost_ratio_c"] = level_delta.cost_ratio(level) if level_delta is not None else None
            mean = timed.mean_pass_seconds if timed is not None else None
            entry["ms_per_pass"] = 1e3 * mean if mean is not None else None
            entry["passes_per_generated_token"] = _ratio(passes, generated_tokens)
            entry["passes_per_level1_draft_token"] = _ratio(passes, k * rounds)
            entry["passes_per_round"] = _ratio(passes, rounds)
        levels[str(level)] = entry
    target = target_passes(counters, generated_tokens, num_requests)
    target_seconds = level_delta.mean_target_pass_seconds if level_delta is not None else None
    return {
        "levels": levels,
        "target_ms_per_pass": 1e3 * target_seconds if target_seconds is not None else None,
        "drafting_rounds": rounds,
        "target_passes": target,
        "target_passes_per_generated_token": _ratio(target, generated_tokens),
        "counters": counters.to_dict(),
    }


def adaptive_record(report: AdaptiveReport, level1_batched_passes: int | None) -> dict:
    """The adaptive policy's decisions over a timed run (counter deltas), JSON-ready."""
    return {
        "k_histogram": report.k_histogram,
        "mean_k": report.mean_k,
        "steps": report.steps,
        "steps_off_share": report.steps_off_share,
        "requests_off_share": report.requests_off_share,
        "probes": report.probes,
        "decision_share": report.decision_share,
        "level1_passes_per_step": _ratio(level1_batched_passes or 0, report.steps),
        "estimates": report.estimates,
        "summary": report.summary(),
    }
