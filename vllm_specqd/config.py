"""The ``specqd`` speculative config: one typed, validated object per process.

Users write one JSON/YAML object (``specqd.json``)::

    {"method": "specqd", "num_speculative_tokens": 8,
     "draft": {"quantization": "mxfp4", "scale_rule": "floor"},
     "inner": {"method": "ngram", "num_speculative_tokens": 4,
               "prompt_lookup_min": 2, "prompt_lookup_max": 5}}

``"adaptive": true`` (or ``{"enabled": true, "min_gain": 0.05}``) lets the drafter pick each
request's number of level-1 draft tokens per step, up to ``num_speculative_tokens``
(:class:`AdaptiveSpec`, vllm_specqd/adaptive.py).

Level 1 is always the MXFP4 self-draft of the target (:class:`DraftSpec`). ``inner`` is optional
and recursive: an :class:`NgramLevel`, or a :class:`ModelLevel` (a small same-tokenizer model,
optionally MXFP4) that may have its own ``inner``. Every problem raises :class:`SpecQDConfigError`
naming the key and what is allowed, before anything starts. This module knows nothing of vLLM.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_specqd.mxfp4 import SCALE_RULES

MAX_SPECULATIVE_TOKENS = 16
QUANTIZATIONS = ("mxfp4",)
DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")
# How MXFP4 linears run on CPU (vllm_specqd/kernels/__init__.py): "multirow" (int8 activations,
# each weight block decoded once per call for every row; the default: without AMX the fastest at
# every row count, 1 included), the AMX kernel (bf16 activations; faster from a few rows on where
# the CPU has AMX), the per-row native kernels with int8 or int16 activations, "auto" (AMX where
# the CPU has it, else multirow), or a once-dequantized copy through vLLM's GEMM (a debugging aid:
# it costs a full-precision copy).
CPU_KERNELS = ("auto", "multirow", "amx", "w4a8", "w4a16", "dequantized")
LM_HEADS = ("shared", "mxfp4")
# "shared": the draft reads the target's KV for the committed context and writes only the slots of
# the positions it drafts (QSpec); "separate": its own KV layers, caught up by a first pass each round.
KV_CACHE_MODES = ("shared", "separate")
NGRAM_METHOD, MODEL_METHOD = "ngram", "draft_model"  # the inner levels' "method" in the user's dict

# "mse": its draft is accepted more often than the spec's FLOOR rule's, and both are plain MXFP4
# bytes (docs/design.md, "MXFP4 conventions").
DEFAULT_SCALE_RULE = "mse"
# How the level-1 draft picks tokens for sampled (temperature > 0) requests. A probabilistic draft
# hands vLLM's rejection sampler its probabilities and is accepted more often than a greedy
# (one-hot) one. Inner levels verify the draft's greedy choices, so with `inner` it is greedy
# (docs/design.md, "The MXFP4 draft, made in memory").
DEFAULT_DRAFT_SAMPLE_METHOD = "probabilistic"
DEFAULT_DRAFT_SAMPLE_METHOD_WITH_INNER = "greedy"
DEFAULT_CPU_KERNEL = "multirow"
DEFAULT_LM_HEAD = "mxfp4"
DEFAULT_KV_CACHE = "shared"
DEFAULT_LM_HEAD_RESCORE_TOP_K = 8
# "random": the adversarial test policy (k uniform per request and step); "off": never draft (idle cost).
ADAPTIVE_POLICIES = ("cost", "random", "off")
# On by default: served, it was faster than fixed K at every concurrency measured (docs/design.md,
# "Adaptive speculation").
DEFAULT_ADAPTIVE = True
DEFAULT_MIN_GAIN = 0.0
DEFAULT_REPROBE_AFTER = 8


class SpecQDConfigError(ValueError):
    """A bad specqd speculative config; the message names the offending key."""


@dataclass(frozen=True)
class DraftSpec:
    """Level 1: the target's own weights, direct-cast to MXFP4."""

    quantization: str = "mxfp4"
    scale_rule: str = DEFAULT_SCALE_RULE
    cpu_kernel: str = DEFAULT_CPU_KERNEL
    # "shared": the target's own lm_head (as in the paper); "mxfp4": a direct-cast copy for the draft.
    lm_head: str = DEFAULT_LM_HEAD
    kv_cache: str = DEFAULT_KV_CACHE
    # With lm_head "mxfp4": the target head's exact logits for the MXFP4 head's top-k tokens (0: off).
    lm_head_rescore_top_k: int = DEFAULT_LM_HEAD_RESCORE_TOP_K


@dataclass(frozen=True)
class NgramLevel:
    """An inner level that looks the context's suffix up earlier in the context (no model, no KV)."""

    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5


@dataclass(frozen=True)
class ModelLevel:
    """An inner level run by a small same-tokenizer model with its own KV layers."""

    num_speculative_tokens: int
    model: str  # a local HF checkpoint directory
    quantization: str | None = None  # "mxfp4": direct-cast its linears, as level 1's
    scale_rule: str = DEFAULT_SCALE_RULE
    cpu_kernel: str | None = None  # None: level 1's draft.cpu_kernel
    inner: InnerLevel | None = None


InnerLevel = NgramLevel | ModelLevel


@dataclass(frozen=True)
class AdaptiveSpec:
    """Per-step, per-request level-1 draft lengths 0..num_speculative_tokens (vllm_specqd/adaptive.py)."""

    enabled: bool = DEFAULT_ADAPTIVE
    # Draft only when the cost model expects at least this much more tokens/s than plain decoding.
    min_gain: float = DEFAULT_MIN_GAIN
    policy: str = "cost"
    seed: int = 0  # the "random" policy's
    reprobe_after: int = DEFAULT_REPROBE_AFTER  # k = 0 steps before a request drafts one token to re-measure


@dataclass(frozen=True)
class SpecQDConfig:
    num_speculative_tokens: int
    draft: DraftSpec = DraftSpec()
    inner: InnerLevel | None = None
    draft_sample_method: str = DEFAULT_DRAFT_SAMPLE_METHOD
    adaptive: AdaptiveSpec = AdaptiveSpec()

    def levels(self) -> list[InnerLevel]:
        """The inner levels, outermost first (level 2, level 3, ...)."""
        chain, level = [], self.inner
        while level is not None:
            chain.append(level)
            level = level.inner if isinstance(level, ModelLevel) else None
        return chain

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form that round-trips through :func:`parse_config` (``additional_config``)."""
        out: dict[str, Any] = {
            "method": "specqd",
            "num_speculative_tokens": self.num_speculative_tokens,
            "draft": asdict(self.draft),
            "draft_sample_method": self.draft_sample_method,
            "adaptive": asdict(self.adaptive),
        }
        if self.inner is not None:
            out["inner"] = _inner_to_dict(self.inner)
        return out


def _inner_to_dict(level: InnerLevel) -> dict[str, Any]:
    if isinstance(level, NgramLevel):
        return {"method": NGRAM_METHOD, **asdict(level)}
    out = {"method": MODEL_METHOD, **{k: v for k, v in asdict(level).items() if k != "inner" and v is not None}}
    if level.inner is not None:
        out["inner"] = _inner_to_dict(level.inner)
    return out


# ---------------------------------------------------------------- validation

_TOP_KEYS = {"method", "num_speculative_tokens", "draft", "inner", "draft_sample_method", "adaptive"}
_ADAPTIVE_KEYS = {"enabled", "min_gain", "policy", "seed", "reprobe_after"}
_DRAFT_KEYS = {"quantization", "scale_rule", "cpu_kernel", "lm_head", "kv_cache", "lm_head_rescore_top_k"}
_NGRAM_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"}
_MODEL_KEYS = {"method", "num_speculative_tokens", "model", "quantization", "scale_rule", "cpu_kernel", "inner"}


def _fail(path: str, message: str) -> SpecQDConfigError:
    return SpecQDConfigError(f"specqd config: '{path}' {message}")


def _check_keys(raw: Mapping, allowed: set[str], where: str) -> None:
    if not isinstance(raw, Mapping):
        raise _fail(where or "<root>", f"must be an object/dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if "cpu_dequantize_once" in unknown and "cpu_kernel" in allowed:
        prefix = f"{where}." if where else ""
        raise _fail(
            prefix + "cpu_dequantize_once",
            f"was replaced by '{prefix}cpu_kernel' ({list(CPU_KERNELS)}); "
            "'dequantized' is what cpu_dequantize_once: true did",
        )
    if unknown:
        prefix = f"{where}." if where else ""
        raise _fail(prefix + unknown[0], f"is not a known key; allowed keys here: {sorted(allowed)}")


def _int_in_range(raw: Mapping, key: str, path: str, lo: int, hi: int, required: bool = True) -> int | None:
    if key not in raw or raw[key] is None:
        if required:
            raise _fail(path, f"is required (an integer in {lo}..{hi})")
        return None
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"must be an integer in {lo}..{hi}, got {value!r} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise _fail(path, f"must be in {lo}..{hi}, got {value}")
    return value


def _int_or(raw: Mapping, key: str, path: str, lo: int, hi: int, default: int) -> int:
    value = _int_in_range(raw, key, path, lo, hi, required=False)
    return default if value is None else value


def _choice(raw: Mapping, key: str, path: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    value = raw.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, str) or value not in allowed:
        raise _fail(path, f"must be one of {list(allowed)}, got {value!r}")
    return value


def _parse_adaptive(raw: Any) -> AdaptiveSpec:
    if raw is None:
        return AdaptiveSpec()
    if isinstance(raw, bool):
        return AdaptiveSpec(enabled=raw)
    if not isinstance(raw, Mapping):
        raise _fail("adaptive", f"must be true, false or an object with keys {sorted(_ADAPTIVE_KEYS)}, got {raw!r}")
    _check_keys(raw, _ADAPTIVE_KEYS, "adaptive")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail("adaptive.enabled", f"must be true or false, got {enabled!r}")
    min_gain = raw.get("min_gain", DEFAULT_MIN_GAIN)
    if isinstance(min_gain, bool) or not isinstance(min_gain, int | float) or not 0 <= min_gain <= 10:
        raise _fail("adaptive.min_gain", f"must be a number in 0..10 (a relative gain: 0.05 = 5%), got {min_gain!r}")
    return AdaptiveSpec(
        enabled=enabled,
        min_gain=float(min_gain),
        policy=_choice(raw, "policy", "adaptive.policy", ADAPTIVE_POLICIES, "cost"),
        seed=_int_or(raw, "seed", "adaptive.seed", 0, 2**31 - 1, 0),
        reprobe_after=_int_or(raw, "reprobe_after", "adaptive.reprobe_after", 1, 4096, DEFAULT_REPROBE_AFTER),
    )


def _parse_inner(
    raw: Any, path: str, outer_k: int, seen: set[int], model_chain: list[str], check_paths: bool
) -> InnerLevel:
    if id(raw) in seen:
        raise _fail(path, "forms a cycle: an inner level refers back to one of its outer levels")
    seen = seen | {id(raw)}
    if not isinstance(raw, Mapping):
        raise _fail(path, f"must be an object/dict, got {type(raw).__name__}")
    method = _choice(raw, "method", f"{path}.method", (NGRAM_METHOD, MODEL_METHOD), None)
    if method is None:
        raise _fail(f"{path}.method", f"is required; one of {[NGRAM_METHOD, MODEL_METHOD]}")
    _check_keys(raw, _NGRAM_KEYS if method == NGRAM_METHOD else _MODEL_KEYS, path)
    k = _int_in_range(raw, "num_speculative_tokens", f"{path}.num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
    if k > outer_k:
        raise _fail(
            f"{path}.num_speculative_tokens",
            f"is {k}, larger than the level above's num_speculative_tokens={outer_k}; "
            "an inner level proposes tokens for the level above, so it must be <= that",
        )
    if method == NGRAM_METHOD:
        lo = _int_in_range(raw, "prompt_lookup_min", f"{path}.prompt_lookup_min", 1, 1024, required=False)
        hi = _int_in_range(raw, "prompt_lookup_max", f"{path}.prompt_lookup_max", 1, 1024, required=False)
        lo, hi = lo or hi or 2, hi or max(lo or 2, 5)
        if lo > hi:
            raise _fail(f"{path}.prompt_lookup_min", f"({lo}) must be <= prompt_lookup_max ({hi})")
        return NgramLevel(k, prompt_lookup_min=lo, prompt_lookup_max=hi)

    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise _fail(f"{path}.model", "is required for method 'draft_model': a local HF checkpoint directory")
    if check_paths:
        if not (Path(model) / "config.json").is_file():
            raise _fail(f"{path}.model", f"= {model!r} is not a local checkpoint directory with a config.json")
        resolved = os.path.realpath(model)
        if resolved in model_chain:
            raise _fail(f"{path}.model", f"= {model!r} already drafts at an outer level: the chain forms a cycle")
        model_chain = model_chain + [resolved]
    quantization = _choice(raw, "quantization", f"{path}.quantization", QUANTIZATIONS, None)
    scale_rule = _choice(raw, "scale_rule", f"{path}.scale_rule", SCALE_RULES, DEFAULT_SCALE_RULE)
    inner = None
    if raw.get("inner") is not None:
        inner = _parse_inner(raw["inner"], f"{path}.inner", k, seen, model_chain, check_paths)
    cpu_kernel = _choice(raw, "cpu_kernel", f"{path}.cpu_kernel", CPU_KERNELS, None)
    return ModelLevel(k, model, quantization=quantization, scale_rule=scale_rule, cpu_kernel=cpu_kernel, inner=inner)


def parse_config(raw: Mapping[str, Any], target_model: str | None = None, check_paths: bool = True) -> SpecQDConfig:
    """Validate a user's ``speculative_config`` dict with ``method: specqd``.

    ``target_model`` (a path), when given, lets the cycle check catch an inner level that names the
    target itself. ``check_paths=False`` skips the file-system checks (model directories, cycles
    through paths): for a dict that was validated with them already, in another process.
    """
    _check_keys(raw, _TOP_KEYS, "")
    if raw.get("method") != "specqd":
        raise _fail("method", f"must be 'specqd', got {raw.get('method')!r}")
    k = _int_in_range(raw, "num_speculative_tokens", "num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS)
    draft_raw = raw.get("draft") or {}
    _check_keys(draft_raw, _DRAFT_KEYS, "draft")
    draft = DraftSpec(
        quantization=_choice(draft_raw, "quantization", "draft.quantization", QUANTIZATIONS, "mxfp4"),
        scale_rule=_choice(draft_raw, "scale_rule", "draft.scale_rule", SCALE_RULES, DEFAULT_SCALE_RULE),
        cpu_kernel=_choice(draft_raw, "cpu_kernel", "draft.cpu_kernel", CPU_KERNELS, DEFAULT_CPU_KERNEL),
        lm_head=_choice(draft_raw, "lm_head", "draft.lm_head", LM_HEADS, DEFAULT_LM_HEAD),
        kv_cache=_choice(draft_raw, "kv_cache", "draft.kv_cache", KV_CACHE_MODES, DEFAULT_KV_CACHE),
        lm_head_rescore_top_k=_int_or(
            draft_raw, "lm_head_rescore_top_k", "draft.lm_head_rescore_top_k", 0, 64, DEFAULT_LM_HEAD_RESCORE_TOP_K
        ),
    )
    inner = None
    if raw.get("inner") is not None:
        chain = []
        if check_paths and target_model and os.path.isdir(target_model):
            chain = [os.path.realpath(target_model)]
        inner = _parse_inner(raw["inner"], "inner", k, {id(raw)}, chain, check_paths)
    default_sample = DEFAULT_DRAFT_SAMPLE_METHOD if inner is None else DEFAULT_DRAFT_SAMPLE_METHOD_WITH_INNER
    sample = _choice(raw, "draft_sample_method", "draft_sample_method", DRAFT_SAMPLE_METHODS, default_sample)
    if inner is not None and sample != "greedy":
        raise _fail(
            "draft_sample_method",
            "must be 'greedy' when 'inner' levels are configured: the inner levels verify the "
            "MXFP4 draft's greedy choices",
        )
    return SpecQDConfig(
        num_speculative_tokens=k,
        draft=draft,
        inner=inner,
        draft_sample_method=sample,
        adaptive=_parse_adaptive(raw.get("adaptive")),
    )


def from_dict(data: Mapping[str, Any]) -> SpecQDConfig:
    """The config behind :meth:`SpecQDConfig.to_dict` output (``additional_config["specqd"]`` in a
    worker): parsed once per process and content, without repeating the file-system checks."""
    return _from_json(json.dumps(data, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _from_json(text: str) -> SpecQDConfig:
    return parse_config(json.loads(text), check_paths=False)


# ---------------------------------------------------------------- file loading


def load_speculative_config_arg(value: str) -> dict[str, Any] | None:
    """``--speculative-config`` value: inline JSON, or a path to a .json/.yaml/.yml file."""
    if value in ("", "None"):
        return None
    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecQDConfigError(f"--speculative-config: invalid inline JSON: {e}") from e
    path = Path(os.path.expanduser(text))
    if not path.is_file():
        raise SpecQDConfigError(
            f"--speculative-config: {value!r} is neither inline JSON nor an existing .json/.yaml file"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            raise SpecQDConfigError(f"--speculative-config: {path} must end in .json, .yaml or .yml")
    except (json.JSONDecodeError, ValueError) as e:
        if isinstance(e, SpecQDConfigError):
            raise
        raise SpecQDConfigError(f"--speculative-config: cannot parse {path}: {e}") from e
    except Exception as e:  # yaml.YAMLError has no common base with ValueError
        raise SpecQDConfigError(f"--speculative-config: cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise SpecQDConfigError(f"--speculative-config: {path} must hold an object, got {type(data).__name__}")
    return data
