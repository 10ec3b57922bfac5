"""The per-level speculation report: written by a specqd worker, read by everyone else.

vLLM's own spec-decode metrics cover level 1's acceptance. What only the drafter knows (the levels
below it, the bytes each level adds, its KV mode) is published by the worker as one JSON file per
engine, ``$VLLM_SPECQD_STATS_DIR/<instance_id>.json``, replaced atomically: on an interval, and at
once when its batch starts or empties. The API server's Prometheus collector, offline callers and
the benchmark read it back as a :class:`LevelReport`. Engine-free: no vLLM here.

Level 1 (the MXFP4 draft) proposes to the target; level L >= 2 proposes to level L-1. A level's
proposal counters describe its proposals to the level above and the windows the level above ran to
check them. ``forward_passes`` of a model level counts batched passes, whatever the batch size.
Example: levels 1 (MXFP4, K=6) and 2 (n-gram, k=3); a window [d1 g1 g2 g3] in which level 1 keeps
g1, g2 and adds its own bonus token counts 3 proposed, 2 accepted, 1 verify window for level 2.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

STATS_DIR_ENV = "VLLM_SPECQD_STATS_DIR"
PUBLISH_INTERVAL_S = 0.5
SETTLE_TIMEOUT_S = 30.0
COUNTERS = (
    "forward_passes",
    "windows",
    "proposed_tokens",
    "accepted_tokens",
    "verify_windows",
    "verify_windows_without_proposal",
    "timed_passes",
    "pass_seconds",
    "head_seconds",
)
KV_MODES = ("shared", "separate", "none")  # "none": an n-gram level holds no KV


@dataclass
class LevelEntry:
    """One level: what it is and adds (set at load), and its counters since the engine started."""

    level: int
    proposer: str  # "MXFP4 self-draft", "model <dir>" or "n-gram lookup"
    weight_bytes: int = 0  # weights the level adds to the target's, CPU copies included
    cpu_copy_bytes: int = 0  # of which: dequantized copies for vLLM's CPU GEMM (cpu_kernel "dequantized")
    kv_cache: str = "none"  # one of KV_MODES
    kv_bytes_per_token: int = 0  # KV bytes per token the level adds (0 when shared or "none")
    forward_passes: int | None = None  # model levels
    windows: int | None = None  # model levels in a chain: (request, pass) pairs its model ran, first passes aside
    proposed_tokens: int | None = None  # levels >= 2
    accepted_tokens: int | None = None
    verify_windows: int | None = None
    verify_windows_without_proposal: int | None = None
    timed_passes: int | None = None  # model levels: forward passes timed (wall clock, in the worker)
    pass_seconds: float | None = None  # their total time
    head_seconds: float | None = None  # the lm_head (compute_logits) after those passes, total

    @property
    def mean_pass_seconds(self) -> float | None:
        """One forward pass, its lm_head included where timed."""
        if not self.timed_passes:
            return None
        return (self.pass_seconds + (self.head_seconds or 0.0)) / self.timed_passes

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens the level above gained per verification window, its bonus token included."""
        if not self.verify_windows:
            return None
        return (self.accepted_tokens + self.verify_windows) / self.verify_windows

    def minus(self, before: LevelEntry | None) -> LevelEntry:
        """Counter deltas since ``before`` (facts such as bytes are kept as they are)."""
        if before is None:
            return replace(self)
        deltas = {}
        for name in COUNTERS:
            now, then = getattr(self, name), getattr(before, name)
            deltas[name] = None if now is None else now - (then or 0)
        return replace(self, **deltas)


ADAPTIVE_COUNTERS = (
    "steps",
    "steps_off",
    "requests",
    "requests_off",
    "probes",
    "ngram_requests",
    "decision_seconds",
    "step_seconds",
)


@dataclass
class AdaptiveReport:
    """Adaptive speculation's level-1 decisions (vllm_specqd/adaptive.py), counted since start."""

    policy: str  # "cost", or "random" (the adversarial test policy)
    min_gain: float
    steps: int = 0  # drafting rounds decided
    steps_off: int = 0  # of which no request drafted
    requests: int = 0  # (request, round) pairs that could draft
    requests_off: int = 0  # of which drafted nothing
    probes: int = 0  # one-token drafts that re-measure a request's acceptance
    ngram_requests: int = 0  # (request, round) pairs whose drafts were their n-gram proposal
    k_histogram: list[int] = field(default_factory=list)  # [K + 1] (request, round) pairs by chosen k
    decision_seconds: float = 0.0  # spent deciding
    step_seconds: float = 0.0  # measured steps (target + drafting) while deciding
    estimates: dict[str, float] = field(default_factory=dict)  # the cost model's latest numbers (seconds)

    @property
    def steps_off_share(self) -> float | None:
        return self.steps_off / self.steps if self.steps else None

    @property
    def requests_off_share(self) -> float | None:
        return self.requests_off / self.requests if self.requests else None

    @property
    def decision_share(self) -> float | None:
        """The decision's cost as a share of the measured step time."""
        return self.decision_seconds / self.step_seconds if self.step_seconds else None

    @property
    def mean_k(self) -> float | None:
        total = sum(self.k_histogram)
        return sum(k * n for k, n in enumerate(self.k_histogram)) / total if total else None

    def minus(self, before: AdaptiveReport | None) -> AdaptiveReport:
        if before is None:
            return replace(self, k_histogram=list(self.k_histogram), estimates=dict(self.estimates))
        deltas = {name: getattr(self, name) - getattr(before, name) for name in ADAPTIVE_COUNTERS}
        histogram = [a - b for a, b in zip(self.k_histogram, before.k_histogram)]
        return replace(self, **deltas, k_histogram=histogram, estimates=dict(self.estimates))

    def summary(self) -> str:
        """e.g. ``adaptive[k 0:40 1:3 6:57, off steps=12% requests=40%, target=12.1ms+0.31ms/tok, ...]``"""
        ks = " ".join(f"{k}:{n}" for k, n in enumerate(self.k_histogram) if n)
        bits = [f"k {ks or '-'}"]
        if self.steps:
            bits.append(f"off steps={self.steps_off_share:.0%} requests={self.requests_off_share or 0:.0%}")
        if self.ngram_requests:
            bits.append(f"n-gram to target={self.ngram_requests / max(1, self.requests):.0%} of requests")
        e = self.estimates
        if "target_step_s" in e:
            bits.append(f"target={1e3 * e['target_step_s']:.1f}ms+{1e3 * e['target_per_token_s']:.2f}ms/tok")
        if "draft_pass_s" in e:
            bits.append(f"draft={1e3 * e['draft_pass_s']:.1f}ms+{1e3 * e['draft_per_row_s']:.2f}ms/row")
        if "expected_tokens_per_s" in e and "plain_tokens_per_s" in e:
            bits.append(f"tok/s est={e['expected_tokens_per_s']:.1f} plain={e['plain_tokens_per_s']:.1f}")
        if self.decision_share is not None:
            bits.append(f"decision={self.decision_share:.2%} of step")
        return f"adaptive[{', '.join(bits)}]"


@dataclass
class LevelReport:
    levels: dict[int, LevelEntry] = field(default_factory=dict)
    generated_tokens: int | None = None  # tokens the target committed in drafted requests (multi-level only)
    rounds: int | None = None  # (request, drafting round) pairs (multi-level only)
    tracked_requests: int = 0  # requests whose per-level state the drafter still holds
    busy: bool = False  # the worker held requests when it wrote this: a final write follows when it empties
    target_passes: int | None = None  # the target's forward passes, timed like the levels'
    target_pass_seconds: float | None = None
    target_head_seconds: float | None = None  # the target's lm_head (compute_logits), total
    adaptive: AdaptiveReport | None = None  # level 1's per-step draft lengths, when adaptive is on
    bf16_gemm_layers: int = 0  # the worker's linears on specqd's bf16 GEMM (adapter/target_gemm.py)

    def cost_ratio(self, level: int = 1) -> float | None:
        """c: the level's mean forward pass over the target's mean forward pass, measured in the run.

        At batch 1 a level-1 pass drafts one token per request and a target pass verifies K + 1,
        which is the ratio the speculative-decoding speedup formula takes. Any model level has one
        (a small model's passes over the target's); None for an n-gram level. Passes count with
        their lm_head (compute_logits) where the report has its time, the target's as a level's."""
        entry = self.levels.get(level)
        mean = entry.mean_pass_seconds if entry is not None else None
        if mean is None or not self.target_passes:
            return None
        return mean / self.mean_target_pass_seconds

    @property
    def mean_target_pass_seconds(self) -> float | None:
        """One target forward pass, its lm_head included where timed."""
        if not self.target_passes:
            return None
        return (self.target_pass_seconds + (self.target_head_seconds or 0.0)) / self.target_passes

    def cost_ratios(self) -> dict[int, float]:
        """c of every model level whose passes were timed, by level."""
        ratios = {number: self.cost_ratio(number) for number in sorted(self.levels)}
        return {number: c for number, c in ratios.items() if c is not None}

    def passes_per_generated_token(self, level: int) -> float | None:
        passes = self.levels[level].forward_passes
        return passes / self.generated_tokens if passes is not None and self.generated_tokens else None

    def minus(self, before: LevelReport | None) -> LevelReport:
        """Counter deltas since ``before`` (an earlier report of the same engine), per level."""
        if before is None:
            adaptive = self.adaptive.minus(None) if self.adaptive is not None else None
            return replace(self, levels={n: replace(e) for n, e in self.levels.items()}, adaptive=adaptive)

        def delta(now: int | None, then: int | None) -> int | None:
            return None if now is None else now - (then or 0)

        return replace(
            self,
            levels={n: entry.minus(before.levels.get(n)) for n, entry in self.levels.items()},
            generated_tokens=delta(self.generated_tokens, before.generated_tokens),
            rounds=delta(self.rounds, before.rounds),
            target_passes=delta(self.target_passes, before.target_passes),
            target_pass_seconds=delta(self.target_pass_seconds, before.target_pass_seconds),
            target_head_seconds=delta(self.target_head_seconds, before.target_head_seconds),
            adaptive=self.adaptive.minus(before.adaptive) if self.adaptive is not None else None,
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["levels"] = [asdict(entry) for _, entry in sorted(self.levels.items())]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> LevelReport:
        data = json.loads(text)
        known = {f.name for f in fields(LevelEntry)}
        levels = {e["level"]: LevelEntry(**{k: v for k, v in e.items() if k in known}) for e in data.pop("levels")}
        adaptive = data.pop("adaptive", None)
        if adaptive is not None:
            adaptive = AdaptiveReport(
                **{k: v for k, v in adaptive.items() if k in {f.name for f in fields(AdaptiveReport)}}
            )
        return cls(
            levels=levels, adaptive=adaptive, **{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        )

    def summary(self) -> str:
        """One log line, e.g. ``generated=96 level1[kv=shared +0 B/tok, passes/token=0.62] level2[...]``."""
        parts = []
        for number, entry in sorted(self.levels.items()):
            bits = [f"kv={entry.kv_cache} +{entry.kv_bytes_per_token} B/tok"] if entry.kv_cache != "none" else []
            per_token = self.passes_per_generated_token(number)
            if per_token is not None:
                bits.append(f"passes/token={per_token:.2f}")
            elif entry.forward_passes is not None:
                bits.append(f"passes={entry.forward_passes}")
            if entry.proposed_tokens is not None:
                mean = entry.mean_accepted_length
                bits.append(
                    f"proposed={entry.proposed_tokens} accepted={entry.accepted_tokens} mean_accepted_len={mean:.2f}"
                    if mean is not None
                    else f"proposed={entry.proposed_tokens}"
                )
            parts.append(f"level{number}[{', '.join(bits)}]")
        prefix = f"generated={self.generated_tokens} " if self.generated_tokens is not None else ""
        costs = self.cost_ratios()
        suffix = (" c(level/target)=" + ",".join(f"L{n}:{c:.2f}" for n, c in costs.items())) if costs else ""
        if self.adaptive is not None:
            suffix += " " + self.adaptive.summary()
        return prefix + " ".join(parts) + suffix


# ---------------------------------------------------------------- files


def stats_dir() -> Path | None:
    directory = os.environ.get(STATS_DIR_ENV)
    return Path(directory) if directory else None


def report_path(instance_id: str, directory: str | Path | None = None) -> Path | None:
    directory = directory or stats_dir()
    return Path(directory) / f"{instance_id}.json" if directory else None


def read_report(path: Path) -> LevelReport | None:
    """The report at ``path``, or None when there is none (yet)."""
    try:
        return LevelReport.from_json(path.read_text())
    except FileNotFoundError:
        return None


def read_settled_report(path: Path, timeout_s: float = SETTLE_TIMEOUT_S) -> LevelReport | None:
    """The report once the worker has written it with an empty batch: right after a generate()
    returns, the worker may not have dropped its finished requests yet, nor written their last
    counts. A report written while busy always has a final, idle write after it."""
    deadline = time.monotonic() + timeout_s
    report = read_report(path)
    while report is not None and report.busy and time.monotonic() < deadline:
        time.sleep(0.02)
        report = read_report(path)
    if report is not None and report.busy:
        raise TimeoutError(f"specqd: {path} still reports a busy batch after {timeout_s:.0f} s")
    return report


def read_reports(directory: Path) -> dict[str, LevelReport]:
    """Every engine's report in ``directory``, by engine (instance id)."""
    reports = {}
    for path in directory.glob("*.json"):
        try:
            reports[path.stem] = LevelReport.from_json(path.read_text())
        except (OSError, ValueError):
            continue  # removed meanwhile; files are replaced atomically, never half-written
    return reports


class ReportWriter:
    """Writes a worker's report: at most every ``interval_s``, and at once when ``busy`` flips.

    ``write(build, busy)`` calls ``build()`` only when it writes, so a drafting step that is not
    due costs one clock read.
    """

    def __init__(self, path: Path | None, interval_s: float = PUBLISH_INTERVAL_S, clock=time.monotonic):
        self.path = path
        self.interval_s = interval_s
        self.clock = clock
        self.last_write = float("-inf")
        self.last_busy: bool | None = None

    def write(self, build: Callable[[], LevelReport], busy: bool, force: bool = False) -> LevelReport | None:
        """The report written, or None when this call was not due."""
        if self.path is None:
            return None
        now = self.clock()
        if not (force or busy != self.last_busy or now - self.last_write >= self.interval_s):
            return None
        report = replace(build(), busy=busy)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(report.to_json())
        os.replace(tmp, self.path)
        self.last_write, self.last_busy = now, busy
        return report
