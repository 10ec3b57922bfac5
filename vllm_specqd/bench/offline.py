"""Offline runner: one `vllm.LLM` per method, a warm-up, a timed greedy run, then teardown.

The callers (`bench` and `demo`) must run under ``if __name__ == "__main__":``:
vLLM's engine processes re-import the main module.
"""

from __future__ import annotations

import gc
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from vllm_specqd.bench.datasets import Prompt
from vllm_specqd.bench.memory import added_memory, kv_bytes_per_token, kv_report
from vllm_specqd.bench.methods import SAME_GEMM_BASELINE, Method, baseline_name, speculative_config_for
from vllm_specqd.bench.preload import apply_preload
from vllm_specqd.bench.spec_stats import adaptive_record, counters_from_metrics, summarize
from vllm_specqd.level_report import LevelReport

WARMUP_TOKENS = 8


@dataclass(frozen=True)
class RunSettings:
    model_dir: str
    small_dir: str | None
    dtype: str
    k: int
    max_tokens: int
    batch_size: int
    max_model_len: int
    ignore_eos: bool = False
    inner_k: int | None = None
    specqd_draft: dict | None = None
    specqd_adaptive: dict | None = None
    eager: bool = False  # enforce_eager; vLLM's default (and users') is torch.compile


def set_engine_env_defaults(verbose: bool) -> None:
    """Before vLLM is imported (its logger and the CPU KV budget read these once); user settings win.

    Also the tcmalloc + libiomp5 LD_PRELOAD of vLLM's CPU docs (bench/preload.py): every engine this
    process starts, whatever its method, is spawned with it.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    apply_preload(verbose=verbose)


@contextmanager
def environment(env: dict[str, str] | None):
    """Set ``env`` for the block (engines read it at start-up; their processes inherit it), then
    restore what was there."""
    saved = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _start_engine(settings: RunSettings, spec_config: dict | None):
    from vllm import LLM

    return LLM(
        model=settings.model_dir,
        dtype=settings.dtype,
        enforce_eager=settings.eager,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.batch_size,
        disable_log_stats=False,  # get_metrics() needs the stat loggers
        speculative_config=spec_config,
        seed=0,
    )


def _memory(llm, method: Method, settings: RunSettings, report: LevelReport | None) -> dict:
    vllm_config = llm.llm_engine.vllm_config
    elem_bytes = vllm_config.model_config.dtype.itemsize
    cache = vllm_config.cache_config
    capacity = cache.kv_cache_size_tokens or (cache.num_gpu_blocks or 0) * cache.block_size or None
    added = added_memory(method.name, report, settings.model_dir, elem_bytes)
    kv = kv_report(
        cache.kv_cache_memory_bytes,
        capacity,
        cache.block_size,
        kv_bytes_per_token(settings.model_dir, elem_bytes),
        added["added_kv_bytes_per_token"],
    )
    return {**added, **kv}


def _timed_generate(llm, prompts: list[Prompt], settings: RunSettings, label: str):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens, ignore_eos=settings.ignore_eos)
    outputs, wall = [], 0.0
    with tqdm(total=len(prompts), desc=f"{label} prompts", unit="prompt", leave=False, position=1) as bar:
        for chunk in _chunks(prompts, settings.batch_size):
            start = time.perf_counter()
            outputs += llm.generate([p.text for p in chunk], params, use_tqdm=False)
            wall += time.perf_counter() - start
            bar.update(len(chunk))
    return outputs, wall


def _top2_logprob_gaps(llm, prompts: list[Prompt], settings: RunSettings) -> list[list[float | None]]:
    """Per prompt and position: the target's top-1 minus top-2 logprob (= logit gap), greedy.

    An untimed second pass of the no-speculation engine, so a bf16 divergence can be shown to sit at a
    near-tie rather than asserted to."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=settings.max_tokens, ignore_eos=settings.ignore_eos, logprobs=2)
    gaps = []
    for chunk in _chunks(prompts, settings.batch_size):
        for output in llm.generate([p.text for p in chunk], params, use_tqdm=False):
            per_position = []
            for top in output.outputs[0].logprobs or []:
                best = sorted((lp.logprob for lp in top.values()), reverse=True)
                per_position.append(round(best[0] - best[1], 4) if len(best) > 1 else None)
            gaps.append(per_position)
    return gaps


def identity_vs(
    reference: list[list[int]] | None,
    token_ids: list[list[int]],
    reference_gaps: list[list[float | None]] | None = None,  # [prompt][position]
) -> dict:
    """Whether greedy outputs equal the no-speculation run's, prompt by prompt; where one differs, the
    first differing position and the target's top-2 logit gap there (when ``reference_gaps`` is known).

    Example: reference ``[[5, 6, 7]]``, tokens ``[[5, 9, 7]]``, gaps ``[[3.1, 0.02, 1.0]]`` gives
    ``divergences == [{"prompt": 0, "position": 1, "top2_logit_gap": 0.02}]``.
    """
    if reference is None:
        return {"identical_to_none": None, "num_different": None, "first_different_prompt": None}
    different = [i for i, (a, b) in enumerate(zip(reference, token_ids)) if a != b]
    divergences = []
    for i in different:
        a, b = reference[i], token_ids[i]
        position = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gaps = reference_gaps[i] if reference_gaps else []
        divergences.append(
            {"prompt": i, "position": position, "top2_logit_gap": gaps[position] if position < len(gaps) else None}
        )
    return {
        "identical_to_none": not different,
        "num_different": len(different),
        "first_different_prompt": different[0] if different else None,
        "divergences": divergences,
    }


def run_method(method: Method, prompts: list[Prompt], settings: RunSettings) -> dict:
    """Start an engine for ``method``, time greedy generation over ``prompts``, tear it down.

    Returns a JSON-ready record; on failure the record has ``error`` and no numbers.
    """
    from vllm_specqd.adapter.metrics import read_level_stats

    spec = speculative_config_for(method, settings)
    record = {
        "method": method.name,
        "description": method.description,
        "speculative_config": spec,
        "num_levels": method.num_levels,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),  # what the spawned engine processes got
    }
    llm = None
    try:
        started = time.perf_counter()
        with environment(dict(method.env)):
            llm = _start_engine(settings, spec)
        record["engine_start_s"] = time.perf_counter() - started
        from vllm import SamplingParams

        warmup = SamplingParams(temperature=0.0, max_tokens=min(WARMUP_TOKENS, settings.max_tokens))
        llm.generate([p.text for p in prompts[: settings.batch_size]], warmup, use_tqdm=False)

        counters_before, levels_before = counters_from_metrics(llm.get_metrics()), read_level_stats(llm)
        outputs, wall = _timed_generate(llm, prompts, settings, method.name)
        counters = counters_from_metrics(llm.get_metrics()) - counters_before
        levels_after = read_level_stats(llm)
        level_delta = levels_after.minus(levels_before) if levels_after is not None else None

        if level_delta is not None and level_delta.adaptive is not None:
            record["adaptive"] = adaptive_record(level_delta.adaptive, level_delta.levels[1].forward_passes)
        token_ids = [list(o.outputs[0].token_ids) for o in outputs]
        generated = sum(len(t) for t in token_ids)
        if method.name == "none" and settings.dtype != "float32":
            record["top2_logprob_gaps"] = _top2_logprob_gaps(llm, prompts, settings)
        record.update(
            wall_s=wall,
            num_requests=len(prompts),
            generated_tokens=generated,
            tokens_per_s=generated / wall if wall else None,
            **summarize(
                method.level_models,
                settings.k,
                counters,
                level_delta,
                generated,
                len(prompts),
                level1_first_pass=((spec or {}).get("draft") or {}).get("kv_cache") == "separate",
            ),
            memory=_memory(llm, method, settings, levels_after),
            cost_ratio_c=level_delta.cost_ratio(1) if level_delta is not None else None,
            bf16_gemm_layers=levels_after.bf16_gemm_layers if levels_after is not None else None,
            outputs=[
                {"source": p.source, "token_ids": t, "text": o.outputs[0].text}
                for p, t, o in zip(prompts, token_ids, outputs)
            ],
        )
        if "adaptive" in record:  # rounds draft 0..K tokens: K passes per round does not hold
            for key in ("forward_passes", "passes_per_generated_token", "passes_per_level1_draft_token"):
                record["levels"]["1"].pop(key, None)
            record["levels"]["1"]["passes_per_round"] = None
    except Exception as error:  # one failing method must not cost the others' numbers
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()
    finally:
        del llm
        gc.collect()
    return record


def run_methods(methods: list[Method], prompts: list[Prompt], settings: RunSettings) -> list[dict]:
    """Every method in turn (the baseline first), each compared with the baseline's outputs and speed."""
    records = []
    reference = baseline_tps = reference_gaps = None
    baseline = baseline_name([m.name for m in methods])
    for method in tqdm(methods, desc="methods", unit="method", position=0):
        record = run_method(method, prompts, settings)
        ok = "error" not in record
        if method.name == baseline and ok:
            reference = [o["token_ids"] for o in record["outputs"]]
            baseline_tps = record["tokens_per_s"]
            reference_gaps = record.get("top2_logprob_gaps")
        if ok:
            record.update(identity_vs(reference, [o["token_ids"] for o in record["outputs"]], reference_gaps))
            record["speedup_vs_none"] = record["tokens_per_s"] / baseline_tps if baseline_tps else None
        else:
            tqdm.write(f"[bench] {method.name} failed: {record['error']}")
        records.append(record)
    compare_with_same_gemm_baseline(records)
    return records


def compare_with_same_gemm_baseline(records: list[dict]) -> None:
    """specqd engines run their bf16 linears on specqd's GEMM (adapter/target_gemm.py); where the run
    has no speculation with that same GEMM, compare their outputs with it too (``identical_to_same_gemm``)."""
    baseline = next((r for r in records if r["method"] == SAME_GEMM_BASELINE and "error" not in r), None)
    if baseline is None:
        return
    reference = [o["token_ids"] for o in baseline["outputs"]]
    for record in records:
        if record["method"].startswith("specqd") and "error" not in record:
            same = identity_vs(reference, [o["token_ids"] for o in record["outputs"]])
            record["identical_to_same_gemm"] = same["identical_to_none"]
            record["num_different_from_same_gemm"] = same["num_different"]


def default_models(model: str | None, need_small: bool, small_layers: int = 24) -> tuple[str, str | None]:
    """(target dir, small draft dir): the bundled model and a layer cut of it unless ``model`` is given."""
    from vllm_specqd import model_prep

    if model is not None:
        return str(Path(model).expanduser()), None
    small = str(model_prep.prepare_small_model(small_layers, quiet=True)) if need_small else None
    return str(model_prep.prepare_model(quiet=True)), small
