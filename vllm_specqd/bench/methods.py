"""The speculative methods the benchmark compares, as vLLM ``speculative_config`` dicts.

Level numbering follows the per-level report (``vllm_specqd/level_report.py``):
level 1 proposes to the target, level L >= 2 proposes to level L-1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vllm_specqd.bench import spec_stats
from vllm_specqd.config import CPU_KERNELS

NGRAM_LOOKUP = {"prompt_lookup_min": 2, "prompt_lookup_max": 5}
SAME_GEMM_BASELINE = "none-specqd-gemm"  # no speculation with the bf16 GEMM specqd gives its targets
NOISE_FLOOR = "none-again"


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    # Who proposes at level 1, 2, ...; None marks an n-gram lookup, spec_stats.MODEL_FREE other
    # proposers without forward passes.
    level_models: tuple[str | None, ...]
    needs_small_model: bool = False
    # Environment the method's engine starts with (on top of the bench's own).
    env: tuple[tuple[str, str], ...] = ()
    # "specqd-1:amx" runs specqd-1 with draft.cpu_kernel "amx" (any specqd method, any CPU kernel).
    cpu_kernel: str | None = None

    @property
    def num_levels(self) -> int:
        return len(self.level_models)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", "no speculation", ()),
        # `none` again, last in the run: how far the machine drifts between two identical engines.
        Method(NOISE_FLOOR, "no speculation again, run after the other methods (the run's noise floor)", ()),
        # The same GEMM specqd gives the target where vLLM's oneDNN declines bf16 (adapter/target_gemm.py):
        # what no speculation gains from that kernel alone.
        Method(SAME_GEMM_BASELINE, "no speculation, specqd's bf16 GEMM", (), env=(("VLLM_SPECQD_BF16_GEMM", "all"),)),
        Method("ngram", "vLLM n-gram prompt lookup", (None,)),
        # Needs arctic-inference, which on CPU has to be built from its sdist (`make bench-extras`).
        Method("suffix", "vLLM suffix decoding (arctic-inference suffix trees)", (spec_stats.SUFFIX_TREE,)),
        Method("draft_model", "vLLM draft_model: a full copy of the target in the run's dtype", ("target copy",)),
        Method("specqd-1", "specqd, one level: MXFP4 self-draft", ("MXFP4 self-draft",)),
        # The draft with its own KV layers (vLLM's draft_model bookkeeping), beside the shared default.
        Method("specqd-1-separate-kv", "specqd, one level, the draft's own KV", ("MXFP4 self-draft",)),
        # num_speculative_tokens is the maximum: each round drafts 0..K per request (vllm_specqd/adaptive.py).
        Method("specqd-adaptive", "specqd, one level, adaptive k per request and step", ("MXFP4 self-draft",)),
        # Speculation configured but never drafting: what a specqd engine costs when nobody drafts.
        Method("specqd-off", "specqd, adaptive policy forced off (never drafts)", ("MXFP4 self-draft",)),
        Method("specqd-ngram", "specqd, two levels: MXFP4 self-draft <- n-gram", ("MXFP4 self-draft", None)),
        Method(
            "specqd-adaptive-ngram",
            "specqd, two levels (MXFP4 self-draft <- n-gram), adaptive level-1 k per request and step",
            ("MXFP4 self-draft", None),
        ),
        Method(
            "specqd-small",
            "specqd, three levels: MXFP4 self-draft <- small MXFP4 model <- n-gram",
            ("MXFP4 self-draft", "small model (MXFP4)", None),
            needs_small_model=True,
        ),
        # The paper's configuration without its optional n-gram level, and the small model unquantized.
        Method(
            "specqd-small-2",
            "specqd, two levels: MXFP4 self-draft <- small MXFP4 model",
            ("MXFP4 self-draft", "small model (MXFP4)"),
            needs_small_model=True,
        ),
        Method(
            "specqd-small-bf16",
            "specqd, three levels: MXFP4 self-draft <- small model in the run's dtype <- n-gram",
            ("MXFP4 self-draft", "small model (run's dtype)", None),
            needs_small_model=True,
        ),
    )
}
SMALL_MODEL_METHODS = ("specqd-small", "specqd-small-2", "specqd-small-bf16")
# What `bench` runs without --methods: every method but the small-model variants of the three-level
# sweep (benchmarks/sweep_three_level.py), which only add engines to a default run.
DEFAULT_METHODS = tuple(name for name in METHODS if name not in ("specqd-small-2", "specqd-small-bf16", NOISE_FLOOR))


def method_named(name: str) -> Method | None:
    """``METHODS[name]``, or a specqd method with a CPU kernel suffix (``specqd-1:amx``); None if neither."""
    base, _, kernel = name.partition(":")
    if base not in METHODS:
        return None
    if not kernel:
        return METHODS[base]
    if not base.startswith("specqd") or kernel not in CPU_KERNELS:
        return None
    return replace(
        METHODS[base], name=name, description=f"{METHODS[base].description}, CPU kernel {kernel}", cpu_kernel=kernel
    )


def parse_methods(text: str) -> list[Method]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if method_named(n) is None]
    if unknown or not names:
        raise ValueError(
            f"unknown method(s) {unknown or text!r}; choose from {','.join(METHODS)} "
            f"(specqd methods take a CPU kernel suffix, e.g. specqd-1:amx; kernels {', '.join(CPU_KERNELS)})"
        )
    # The baseline first: every other method is compared with it.
    return sorted(
        (method_named(n) for n in dict.fromkeys(names)),
        key=lambda m: (m.name != "none", m.name != SAME_GEMM_BASELINE, m.name == NOISE_FLOOR),
    )


def baseline_name(names: list[str]) -> str | None:
    """The method a run compares every other with: stock ``none``, else ``none-specqd-gemm``."""
    return next((name for name in ("none", SAME_GEMM_BASELINE) if name in names), None)


def _ngram(k: int) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, **NGRAM_LOOKUP}


def speculative_config(
    method: Method,
    k: int,
    target_dir: str | Path,
    small_dir: str | Path | None,
    inner_k: int | None = None,
    specqd_draft: dict | None = None,
    specqd_adaptive: dict | None = None,
) -> dict | None:
    """The ``speculative_config`` for ``method`` with K level-1 draft tokens.

    ``inner_k``: tokens the level below the MXFP4 draft proposes per window (default K // 2);
    ``specqd_draft``: extra ``draft`` keys for every specqd method (e.g. ``{"lm_head": "shared"}``);
    ``specqd_adaptive``: ``adaptive`` keys for specqd-adaptive (e.g. ``{"min_gain": 0.05}``).
    """
    if not method.level_models:
        return None
    if method.name == "ngram":
        return _ngram(k)
    if method.name == "suffix":
        # K caps the per-step draft length; tree depth, spec factor and min token prob stay vLLM's defaults.
        return {"method": "suffix", "num_speculative_tokens": k}
    if method.name == "draft_model":
        return {"method": "draft_model", "model": str(target_dir), "num_speculative_tokens": k}
    config: dict = {"method": "specqd", "num_speculative_tokens": k}
    if specqd_draft:
        config["draft"] = dict(specqd_draft)
    if method.cpu_kernel:
        config["draft"] = {**config.get("draft", {}), "cpu_kernel": method.cpu_kernel}
    inner = inner_k if inner_k is not None else max(1, k // 2)
    base = method.name.partition(":")[0]
    if base in ("specqd-adaptive", "specqd-adaptive-ngram"):
        config["adaptive"] = {"enabled": True, **(specqd_adaptive or {})}
    elif base == "specqd-off":
        config["adaptive"] = {"enabled": True, "policy": "off"}
    else:
        config["adaptive"] = False  # a fixed-K method (adaptive is on by default)
    if base == "specqd-1-separate-kv":
        config["draft"] = {**config.get("draft", {}), "kv_cache": "separate"}
    if base in ("specqd-ngram", "specqd-adaptive-ngram"):
        config["inner"] = _ngram(inner)
    elif base in SMALL_MODEL_METHODS:
        if small_dir is None:
            raise ValueError(f"{base} needs a small same-tokenizer model (--small-model)")
        config["inner"] = {"method": "draft_model", "model": str(small_dir), "num_speculative_tokens": inner}
        if base != "specqd-small-bf16":
            config["inner"]["quantization"] = "mxfp4"
        if base != "specqd-small-2":
            config["inner"]["inner"] = _ngram(max(1, inner // 2))
    return config


def speculative_config_for(method: Method, settings) -> dict | None:
    """``speculative_config`` from a run's settings (offline RunSettings or served ServeSettings)."""
    return speculative_config(
        method,
        settings.k,
        settings.model_dir,
        settings.small_dir,
        settings.inner_k,
        settings.specqd_draft,
        settings.specqd_adaptive,
    )
