"""Scale-out through vLLM itself: specqd under tensor parallelism (TP=2), offline and served.

vLLM's CPU backend runs TP=2 as two worker processes (multiprocessing executor), one core each.
On a one-NUMA-node machine vLLM refuses to bind two CPU workers by itself, so the engines run
with ``VLLM_CPU_OMP_THREADS_BIND='<core a>|<core b>'``. The bundled model's 9 heads do not divide
by 2: the target is a tiny random-weight Llama with 4 heads and 2 KV heads and the bundled
tokenizer (``prepare_tiny_model``). Engines run one at a time, each once per module:

    reference   TP=2, no speculation
    ngram       TP=2, specqd K=4 with an n-gram inner level (k=2)
    served      `vllm serve --tensor-parallel-size 2 --speculative-config specqd.json`, one level
    ray         TP=2, one level, distributed_executor_backend="ray" on a local Ray head (loopback);
                only where vLLM's platform supports Ray (not vLLM 0.32's CPU platform: skipped, reason printed)

Pipeline parallelism is refused by the specqd config (tests/test_config.py).
"""

import contextlib
import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import chat_prompts
from engine_harness import Workload, mean_acceptance_length, ngram_level, run_engine, specqd_spec
from engine_harness import environment as harness_environment
from server_harness import greedy_answers, metric_samples, running, scrape, serve_flags

from vllm_specqd.bench.datasets import humaneval_prompts
from vllm_specqd.level_report import STATS_DIR_ENV, LevelReport

pytestmark = pytest.mark.engine

TP = 2
K = 4
MAX_TOKENS = 24
TP_ENGINE = dict(tensor_parallel_size=TP, max_model_len=512)
MP = dict(distributed_executor_backend="mp", **TP_ENGINE)
ONE_LEVEL = specqd_spec(K)
NGRAM = specqd_spec(K, ngram_level(2))
INSPECTED = ("model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.down_proj")
TIMING_FIELDS = ("timed_passes", "pass_seconds", "head_seconds")


def cpu_worker_binding() -> str:
    """One allowed core per TP rank, as VLLM_CPU_OMP_THREADS_BIND spells it ('0|1')."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < TP:
        pytest.skip(f"TP={TP} on CPU needs {TP} cores, this process may use {len(cores)}")
    return "|".join(str(core) for core in cores[:TP])


@contextlib.contextmanager
def environment(**values: str):
    """The harness's environment(), and afterwards vllm.envs unfrozen: an in-process engine core
    freezes it (vllm/v1/engine/core.py:258), and later engines in this process must see the restored one."""
    try:
        with harness_environment(values):
            yield
    finally:
        import vllm.envs

        vllm.envs.disable_envs_cache()


def tp_environment(stats_dir: Path, in_process: bool = False):
    """Two CPU workers, and a fresh report directory (exactly one report file must appear in it).

    ``in_process``: the engine core runs in this process, one vLLM import less (~30 s here); the
    TP workers are still spawned. Only without speculation: with a specqd engine in process, the
    worker's final idle report never came and read_level_stats timed out (seen 2026-12-02)."""
    return environment(
        VLLM_CPU_OMP_THREADS_BIND=cpu_worker_binding(),
        VLLM_ENABLE_V1_MULTIPROCESSING="0" if in_process else "1",
        **{STATS_DIR_ENV: str(stats_dir)},
    )


def prompts(model_dir: Path) -> list[str]:
    return humaneval_prompts(3) + chat_prompts(model_dir, 2)


def greedy(model_dir: Path) -> Workload:
    from vllm import SamplingParams

    batch = prompts(model_dir)
    return Workload(batch, [SamplingParams(temperature=0, max_tokens=MAX_TOKENS) for _ in batch])


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    with tp_environment(tmp_path_factory.mktemp("stats-reference"), in_process=True):
        return run_engine(tiny_model_dir, None, {"greedy": greedy(tiny_model_dir)}, **MP)


@pytest.fixture(scope="module")
def ngram(tiny_model_dir, tmp_path_factory):
    stats_dir = tmp_path_factory.mktemp("stats-ngram")
    with tp_environment(stats_dir):
        run = run_engine(tiny_model_dir, NGRAM, {"greedy": greedy(tiny_model_dir)}, inspect_layers=INSPECTED, **MP)
    run.report_files = sorted(p.name for p in stats_dir.glob("*.json"))
    return run


# ------------------------------------------------------------------ offline, multiprocessing backend


def test_ngram_outputs_token_identical_to_tp2_without_speculation(ngram, reference):
    ref, got = reference.outputs["greedy"], ngram.outputs["greedy"]
    assert len(ref) == len(got) == 5
    mismatches = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
    assert not mismatches, f"prompts {mismatches} differ from TP=2 without speculation"
    assert all(len(out[0]) == MAX_TOKENS for out in got)


def test_drafts_were_accepted_at_both_levels(ngram):
    metrics = ngram.spec_metrics["greedy"]
    assert metrics["vllm:spec_decode_num_drafts"] > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens"] > 0, metrics
    print(f"[tp] TP=2 n-gram engine: mean acceptance length {mean_acceptance_length(metrics):.2f}")
    assert ngram.level_stats.levels[2].accepted_tokens > 0, ngram.level_stats


def test_each_rank_drafts_with_a_quantization_of_its_own_shard(ngram, tiny_model_dir):
    """Column-parallel qkv: rank r holds rows r of q, k and v; row-parallel down_proj: columns r;
    the vocab-parallel lm_head (tied to the embeddings here): vocab rows r."""
    from safetensors.torch import load_file

    from vllm_specqd.mxfp4 import quantize_mxfp4

    weights = {name: t.to(torch.float32) for name, t in load_file(tiny_model_dir / "model.safetensors").items()}

    def rows(t, rank):
        return t.chunk(TP, dim=0)[rank]

    assert sorted(d["tp_rank"] for d in ngram.drafts) == list(range(TP))
    for draft in ngram.drafts:
        rank = draft["tp_rank"]
        attn = "model.layers.0.self_attn."
        shards = {
            INSPECTED[0]: torch.cat([rows(weights[attn + f"{p}_proj.weight"], rank) for p in "qkv"]),
            INSPECTED[1]: weights["model.layers.1.mlp.down_proj.weight"].chunk(TP, dim=1)[rank],
        }
        for name, shard in shards.items():
            expected = quantize_mxfp4(shard, scale_rule="mse")
            got = draft["layers"][name]
            assert torch.equal(got["packed"], expected.packed), f"rank {rank} {name}"
            assert torch.equal(got["scales"], expected.scales), f"rank {rank} {name}"
        head = quantize_mxfp4(rows(weights["model.embed_tokens.weight"], rank), scale_rule="mse")
        assert torch.equal(draft["lm_head"]["packed"], head.packed), f"rank {rank} lm_head"
        assert torch.equal(draft["lm_head"]["scales"], head.scales), f"rank {rank} lm_head"
    # The two ranks hold different halves: neither holds the whole model.
    a, b = (d["layers"][INSPECTED[0]]["packed"] for d in ngram.drafts)
    assert a.shape == b.shape and not torch.equal(a, b)


def test_each_rank_adds_half_of_the_mxfp4_bytes(ngram, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    params = layers * ((h + 2 * kv) * h + h * h + 2 * i * h + h * i) + config["vocab_size"] * h  # + lm_head
    whole_model = params * 17 // 32  # 4 bits + one scale byte per 32 elements
    per_rank = [d["extra_weight_bytes"] for d in ngram.drafts]
    assert per_rank == [whole_model // TP] * TP
    # The level report states the bytes of one rank (rank 0 publishes it).
    assert ngram.level_stats.levels[1].weight_bytes == whole_model // TP


def _counters(report: LevelReport) -> LevelReport:
    """The report without wall-clock fields (each rank times its own passes)."""
    levels = {n: replace(e, **dict.fromkeys(TIMING_FIELDS)) for n, e in report.levels.items()}
    return LevelReport(
        levels=levels,
        generated_tokens=report.generated_tokens,
        rounds=report.rounds,
        tracked_requests=report.tracked_requests,
    )


def test_level_report_is_one_set_of_counts(ngram):
    """One rank publishes; every rank counted the same rounds, so that one report is the engine's."""
    assert len(ngram.report_files) == 1, ngram.report_files
    assert [d["publishes_report"] for d in sorted(ngram.drafts, key=lambda d: d["tp_rank"])] == [True, False]
    per_rank = [_counters(LevelReport.from_json(d["level_report"])) for d in ngram.drafts]
    assert per_rank[0] == per_rank[1]
    published = ngram.level_stats
    assert _counters(published) == per_rank[0]
    # Counts of one engine, not of two ranks added up: the tokens the target generated, give or
    # take one round per request (the tail after the last round).
    outputs = [out[0] for out in ngram.outputs["greedy"]]
    generated = sum(len(tokens) for tokens in outputs)
    # The target may commit up to K tokens past max_tokens in a request's last round (vLLM then
    # truncates the output); two ranks added up would count about twice the tokens.
    assert generated - len(outputs) * (K + 1) <= published.generated_tokens <= generated + len(outputs) * K, published


# ------------------------------------------------------------------ served


@pytest.fixture(scope="module")
def served(tiny_model_dir, reference, tmp_path_factory):
    """One `vllm serve` with TP=2 and a one-level specqd file, driven by the openai client."""
    work = tmp_path_factory.mktemp("served-tp")
    stats_dir = work / "stats"
    stats_dir.mkdir()
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_worker_binding(), STATS_DIR_ENV: str(stats_dir)}
    flags = serve_flags(TP_ENGINE["max_model_len"], "--tensor-parallel-size", str(TP))
    with running(tiny_model_dir, work, "server", ONE_LEVEL, flags, env) as server:
        print(f"[tp] TP=2 specqd server healthy after {server.startup_s:.0f}s")
        batch = [("completion", p) for p in prompts(tiny_model_dir)]
        completions = greedy_answers(server, batch, MAX_TOKENS, one_at_a_time=True)
        streamed = greedy_answers(server, batch[:1], MAX_TOKENS, stream=True)[0]
        chat = greedy_answers(server, [("chat", "Hi!")], MAX_TOKENS)[0]
        metrics = scrape(server)
    return {
        "completions": completions,
        "streamed": streamed.text,
        "chat": chat,
        "metrics": metrics,
        "report_files": sorted(p.name for p in stats_dir.glob("*.json")),
        "exit_code": server.exit_code,
        "log": server.log_text(),
    }


def test_served_completions_identical_to_tp2_without_speculation(served, reference):
    texts = [answer.text for answer in served["completions"]]
    assert texts == [out[0] for out in reference.texts["greedy"]]
    assert served["streamed"] == texts[0]
    assert served["chat"].finish_reason in ("stop", "length") and served["chat"].text


def test_served_metrics_are_one_set_of_counts(served):
    metrics = served["metrics"]
    drafts = metric_samples(metrics, "vllm:spec_decode_num_drafts_total")
    accepted = metric_samples(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    assert len(drafts) == len(accepted) == 1 and drafts[0][1] > 0 and accepted[0][1] > 0, (drafts, accepted)
    # specqd's own metrics: one engine, one level, one sample each; not one per rank.
    assert served["report_files"] and len(served["report_files"]) == 1, served["report_files"]
    passes = metric_samples(metrics, "specqd:level_forward_passes_total")
    assert len(passes) == 1 and 'level="1"' in passes[0][0] and passes[0][1] > 0, passes
    assert len(metric_samples(metrics, "specqd:level_weight_bytes")) == 1


def test_served_tp2_stops_cleanly(served):
    assert served["exit_code"] == 0, served["log"][-3000:]


# ------------------------------------------------------------------ Ray


def _ray_unsupported_reason() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'vllm-specqd[ray]'; make install does)"
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        # vllm/platforms/interface.py:150 (empty key); vllm/v1/executor/ray_utils.py:572 raises on it.
        return (
            f"vLLM's {current_platform.device_name} platform does not support Ray "
            "(vllm/v1/executor/ray_utils.py:572: 'current platform cpu does not support ray.')"
        )
    if not current_platform.is_cpu() and current_platform.device_count() < TP:
        return f"TP={TP} over Ray needs {TP} {current_platform.device_name} devices"
    return None


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster for this module only, stopped at its end; engines reach it through RAY_ADDRESS.

    Asked for loopback, but Ray 2.60 still advertises the machine's address and its GCS listens on
    every interface (measured 2026-12-02 with `ss -ltnp`); its token authentication, on by default,
    is what keeps other hosts out."""
    reason = _ray_unsupported_reason()
    if reason is not None:
        print(f"[tp] Ray test skipped: {reason}")
        pytest.skip(reason)
    import ray

    context = ray.init(
        address="local", include_dashboard=False, num_cpus=TP, _node_ip_address="127.0.0.1", log_to_driver=False
    )
    try:
        with environment(RAY_ADDRESS=context.address_info["gcs_address"]):
            yield context
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_ray_backend_outputs_token_identical(ray_head, tiny_model_dir, reference, tmp_path):
    with tp_environment(tmp_path):
        run = run_engine(
            tiny_model_dir,
            ONE_LEVEL,
            {"greedy": greedy(tiny_model_dir)},
            distributed_executor_backend="ray",
            **TP_ENGINE,
        )
    assert run.outputs["greedy"] == reference.outputs["greedy"]
    assert run.spec_metrics["greedy"]["vllm:spec_decode_num_accepted_tokens"] > 0
    assert sorted(d["tp_rank"] for d in run.drafts) == list(range(TP))


def test_vllm_cpu_platform_still_lacks_ray():
    """The Ray test above is skipped on CPU because of this; when vLLM adds Ray to its CPU platform,
    this fails, and the Ray identity test starts running here."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("checks vLLM's CPU platform")
    assert current_platform.ray_device_key == "", "vLLM's CPU platform now supports Ray: update this module"
