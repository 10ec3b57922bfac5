"""The benchmark suite without running it: acceptance and forward-pass accounting, /metrics parsing,
memory, datasets and methods, served comparisons, the projection formula and report, report formatting.

Pure Python on hand-made records; test_bench_cli.py runs the benchmarks themselves.
"""

from __future__ import annotations

import json

import pytest

from vllm_specqd.bench import datasets, memory, projection, report, spec_stats
from vllm_specqd.bench.methods import METHODS, baseline_name, parse_methods, speculative_config
from vllm_specqd.bench.served import compare_with_baseline, inner_levels, parse_prometheus
from vllm_specqd.config import from_dict
from vllm_specqd.level_report import LevelEntry, LevelReport

# ---------------------------------------------------------------- accounting


def _counters() -> spec_stats.SpecCounters:
    # 2 requests, K = 4: 10 verified drafts, 20 accepted tokens, G = 2 prefill tokens + 10 bonus + 20 accepted.
    return spec_stats.SpecCounters(
        num_drafts=10, num_draft_tokens=40, accepted_tokens=20, accepted_per_pos=[9, 6, 3, 2]
    )


def test_one_level_accounting():
    s = spec_stats.summarize(("MXFP4 self-draft",), 4, _counters(), None, generated_tokens=32, num_requests=2)
    level1 = s["levels"]["1"]
    assert level1["mean_accepted_length"] == 3.0  # 1 + 20 / 10
    assert level1["acceptance_rate"] == 0.5
    assert level1["per_position"] == [0.9, 0.6, 0.3, 0.2]
    assert s["drafting_rounds"] == 12  # 10 verified + one unverified last round per request
    assert level1["forward_passes"] == 48 and level1["passes_per_level1_draft_token"] == 1.0
    assert level1["passes_per_round"] == 4.0
    assert s["target_passes_per_generated_token"] == 12 / 32  # 2 prefills + 10 verify steps


def test_multilevel_accounting():
    delta = LevelReport(
        levels={
            1: LevelEntry(1, "MXFP4 self-draft", forward_passes=99),
            2: LevelEntry(2, "n-gram lookup", proposed_tokens=8, accepted_tokens=6, verify_windows=30),
        }
    )
    s = spec_stats.summarize(("MXFP4 self-draft", None), 4, _counters(), delta, generated_tokens=32, num_requests=2)
    level1, level2 = s["levels"]["1"], s["levels"]["2"]
    assert level1["forward_passes"] == 30  # shared KV: d1 comes from level 1's first window; one pass per window
    assert level1["passes_per_level1_draft_token"] == 30 / 48
    assert level2["proposer"] == "n-gram lookup" and "forward_passes" not in level2
    assert level2["acceptance_rate"] == 0.75
    assert level2["mean_accepted_length"] == (6 + 30) / 30
    separate = spec_stats.summarize(
        ("MXFP4 self-draft", None), 4, _counters(), delta, generated_tokens=32, num_requests=2, level1_first_pass=True
    )
    assert separate["levels"]["1"]["forward_passes"] == 12 + 30  # + vLLM's first pass each round (its own KV)


def test_three_level_accounting_uses_each_levels_own_windows_and_cost():
    delta = LevelReport(
        levels={
            1: LevelEntry(1, "MXFP4 self-draft", windows=30, timed_passes=20, pass_seconds=2.0, head_seconds=0.4),
            2: LevelEntry(2, "model small", proposed_tokens=40, accepted_tokens=30, verify_windows=30, windows=44),
            3: LevelEntry(3, "n-gram lookup", proposed_tokens=9, accepted_tokens=3, verify_windows=44),
        },
        target_passes=10,
        target_pass_seconds=4.0,
        target_head_seconds=1.0,
    )
    delta.levels[2].timed_passes, delta.levels[2].pass_seconds, delta.levels[2].head_seconds = 40, 0.8, 0.2
    models = ("MXFP4 self-draft", "small model (MXFP4)", None)
    s = spec_stats.summarize(models, 4, _counters(), delta, generated_tokens=32, num_requests=2)
    level1, level2 = s["levels"]["1"], s["levels"]["2"]
    assert (level1["forward_passes"], level2["forward_passes"]) == (30, 44)  # no catch-up pass of its own
    # c with the lm_heads: level 1 (2.0 + 0.4) / 20 = 0.12 s, level 2 (0.8 + 0.2) / 40 = 0.025 s per pass;
    # the target (4.0 + 1.0) / 10 = 0.5 s.
    assert abs(level1["cost_ratio_c"] - 0.24) < 1e-12 and abs(level2["cost_ratio_c"] - 0.05) < 1e-12
    assert abs(level2["ms_per_pass"] - 25.0) < 1e-9 and s["target_ms_per_pass"] == 500.0
    assert delta.cost_ratios() == {1: delta.cost_ratio(1), 2: delta.cost_ratio(2)}
    record = {"cost_ratio_c": level1["cost_ratio_c"], "levels": s["levels"]}
    assert report._cost_cell(record) == "0.24 / 0.05"
    assert "c(level/target)=L1:0.24,L2:0.05" in delta.summary()


def test_no_speculation_takes_one_target_pass_per_token():
    s = spec_stats.summarize((), 6, spec_stats.SpecCounters(), None, generated_tokens=50, num_requests=5)
    assert s["levels"] == {} and s["target_passes_per_generated_token"] == 1.0


def test_counter_and_level_report_deltas():
    before = spec_stats.SpecCounters(2, 8, 3, [2, 1])
    after = spec_stats.SpecCounters(5, 20, 9, [5, 3, 1])
    assert (after - before).to_dict() == {
        "num_drafts": 3,
        "num_draft_tokens": 12,
        "accepted_tokens": 6,
        "accepted_per_pos": [3, 2, 1],
    }
    old = LevelReport(
        levels={2: LevelEntry(2, "n-gram lookup", proposed_tokens=4, accepted_tokens=2, verify_windows=10)}
    )
    new = LevelReport(
        levels={
            2: LevelEntry(2, "n-gram lookup", proposed_tokens=9, accepted_tokens=6, verify_windows=25),
            3: LevelEntry(3, "n-gram lookup", proposed_tokens=0, accepted_tokens=0, verify_windows=4),
        }
    )
    delta = new.minus(old)
    assert (delta.levels[2].proposed_tokens, delta.levels[2].verify_windows) == (5, 15)
    assert delta.levels[3].verify_windows == 4
    assert inner_levels(new, old)["2"] == {
        "proposed_tokens": 5,
        "accepted_tokens": 4,
        "acceptance_rate": 0.8,
        "mean_accepted_length": (4 + 15) / 15,  # ratios come from the deltas, not the totals
        "verify_windows": 15,
        "verify_windows_without_proposal": 0,
    }


def test_parse_prometheus_reads_spec_counters():
    text = (
        "\n".join(
            [
                "# TYPE vllm:spec_decode_num_drafts counter",
                'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 7.0',
                "# TYPE vllm:spec_decode_num_draft_tokens counter",
                'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 42.0',
                "# TYPE vllm:spec_decode_num_accepted_tokens counter",
                'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 25.0',
                "# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter",
                'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 6.0',
                'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 7.0',
                "# TYPE specqd:level_proposed_tokens counter",
                'specqd:level_proposed_tokens_total{engine="e",level="2"} 3.0',
                "# TYPE specqd:level_mean_accepted_length gauge",
                'specqd:level_mean_accepted_length{engine="e",level="2"} 1.02',
            ]
        )
        + "\n"
    )
    assert parse_prometheus(text).to_dict() == {
        "num_drafts": 7,
        "num_draft_tokens": 42,
        "accepted_tokens": 25,
        "accepted_per_pos": [7, 6],
    }


# ---------------------------------------------------------------- memory, datasets, methods


def test_memory_comes_from_the_level_report_and_the_kv_check(model_dir):
    kv = memory.kv_report(
        budget_bytes=2**20, capacity_tokens=160, block_size=16, target_per_token=3000, added_per_token=3000
    )
    assert kv["kv_capacity_check"] == "matches the engine"  # 2**20 // (6000 * 16) = 10 blocks
    wrong = memory.kv_report(2**20, 320, 16, 3000, 3000)
    assert wrong["kv_capacity_check"].startswith("MISMATCH")
    shared = memory.kv_report(2**20, 336, 16, 3000, 0)
    assert shared["kv_capacity_check"] == "matches the engine"  # no draft KV: 2**20 // (3000 * 16) = 21 blocks
    report = LevelReport(
        levels={
            1: LevelEntry(1, "MXFP4 self-draft", weight_bytes=1000, kv_cache="shared"),
            2: LevelEntry(
                2, "model s", weight_bytes=700, cpu_copy_bytes=200, kv_cache="separate", kv_bytes_per_token=96
            ),
            3: LevelEntry(3, "n-gram lookup"),
        }
    )
    assert memory.added_memory("specqd-small", report, model_dir, 4) == {
        "added_weight_bytes": 1500,
        "cpu_dequantized_copy_bytes": 200,
        "added_kv_bytes_per_token": 96,
        "kv_cache": {"1": "shared", "2": "separate", "3": "none"},
    }
    per_token = 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads of 576 / 9 = 64, fp32: 46080
    assert memory.kv_bytes_per_token(model_dir, 4) == per_token
    full_copy = memory.added_memory("draft_model", None, model_dir, 4)
    assert full_copy["added_kv_bytes_per_token"] == per_token and full_copy["added_weight_bytes"] > 100 * 2**20
    assert memory.added_memory("ngram", None, model_dir, 4)["added_weight_bytes"] == 0


def test_datasets_and_methods(tmp_path):
    questions = datasets.chat_questions(100)
    assert len(questions) >= 40 and len(set(questions)) == len(questions)
    assert datasets.split_counts("both", 5) == (3, 2)
    assert datasets.humaneval_prompts(2)[0].lstrip().startswith("from typing")
    assert [m.name for m in parse_methods("specqd-1,none")] == ["none", "specqd-1"]
    ordered = [m.name for m in parse_methods("specqd-1,none-specqd-gemm,ngram,none")]
    assert ordered == ["none", "none-specqd-gemm", "specqd-1", "ngram"]
    assert baseline_name(ordered) == "none" and baseline_name(ordered[1:]) == "none-specqd-gemm"
    assert baseline_name(["ngram", "specqd-1"]) is None
    assert [m.name for m in parse_methods("none-again,specqd-off,none")] == ["none", "specqd-off", "none-again"]
    assert speculative_config(METHODS["none-again"], 6, tmp_path, None) is None
    small = speculative_config(METHODS["specqd-small"], 6, tmp_path, tmp_path / "small")
    assert small["inner"]["num_speculative_tokens"] == 3 and small["inner"]["inner"]["num_speculative_tokens"] == 1
    assert small["inner"]["quantization"] == "mxfp4"
    two = speculative_config(METHODS["specqd-small-2"], 8, tmp_path, tmp_path / "small", inner_k=3)
    assert two["inner"]["quantization"] == "mxfp4" and "inner" not in two["inner"]
    unquantized = speculative_config(METHODS["specqd-small-bf16"], 6, tmp_path, tmp_path / "small")
    assert "quantization" not in unquantized["inner"] and unquantized["inner"]["inner"]["method"] == "ngram"
    for name in ("specqd-small", "specqd-small-2", "specqd-small-bf16"):
        assert from_dict(speculative_config(METHODS[name], 6, tmp_path, tmp_path / "small")).levels()
    separate = speculative_config(METHODS["specqd-1-separate-kv"], 6, tmp_path, None, specqd_draft={"lm_head": "mxfp4"})
    assert separate["draft"] == {"lm_head": "mxfp4", "kv_cache": "separate"}
    adaptive = speculative_config(METHODS["specqd-adaptive"], 6, tmp_path, None, specqd_adaptive={"min_gain": 0.5})
    assert from_dict(adaptive).adaptive.min_gain == 0.5 and from_dict(adaptive).adaptive.enabled
    with pytest.raises(ValueError):
        parse_methods("none,eagle")


def test_served_levels_compared_with_the_baseline_present():
    def level(concurrency, tok_s, texts, greedy=None):
        return {"concurrency": concurrency, "output_tokens_per_s": tok_s, "texts": texts, "greedy": greedy}

    records = [
        {"method": "none-specqd-gemm", "concurrency_levels": [level(1, 10.0, ["a", "b"]), level(16, 40.0, ["a"])]},
        {
            "method": "specqd-1",
            "concurrency_levels": [level(1, 15.0, ["a", "x"], [True, False]), level(16, 20.0, ["y"])],
        },
    ]
    compare_with_baseline(records)
    one, sixteen = records[1]["concurrency_levels"]
    assert (one["speedup_vs_none"], one["num_compared"], one["identical_to_none"]) == (1.5, 1, True)
    assert (sixteen["speedup_vs_none"], sixteen["num_different"], sixteen["identical_to_none"]) == (0.5, 1, False)
    no_baseline = [{"method": "ngram", "concurrency_levels": [level(1, 5.0, ["a"])]}]
    compare_with_baseline(no_baseline)
    assert "speedup_vs_none" not in no_baseline[0]["concurrency_levels"][0]


# ---------------------------------------------------------------- projection


def test_projection_formula_hand_examples():
    # Constant acceptance a = 0.5, K = 2: E = 1 + 0.5 + 0.25 = (1 - a^3) / (1 - a) = 1.75 (Leviathan et al.).
    assert projection.expected_tokens_per_round([0.5, 0.25]) == 1.75
    assert projection.projected_speedup([0.5, 0.25], [(2, 0.5)]) == 1.75 / 2.0
    # One level, K = 3, c = 0.25: E = 2.8, cost = 1 + 3 * 0.25.
    assert projection.projected_speedup([0.8, 0.6, 0.4], [(3, 0.25)]) == pytest.approx(1.6)
    # Two model levels: 1.5 MXFP4 passes at c1 = 0.3 and 2 small-model passes at c2 = 0.1 per round.
    assert projection.projected_speedup([0.9, 0.8], [(1.5, 0.3), (2.0, 0.1)]) == pytest.approx(2.7 / 1.65)


def _results(per_position, levels_extra=None, method="specqd-1"):
    levels = {"1": {"per_position": per_position, "passes_per_round": float(len(per_position))}}
    levels.update(levels_extra or {})
    return {"meta": {"target_layers": 30, "small_layers": 8}, "methods": [{"method": method, "levels": levels}]}


def test_projection_report_with_and_without_c():
    results = _results([0.8, 0.6, 0.4])
    measured = projection.project(results, c1=0.25, c_source="test")
    assert "PROJECTION" in measured and "| specqd-1 | 2.80 | 3.00 x 0.25 | 1.60x |" in measured
    assert "2.0x" in measured  # the paper's figure beside it
    hypothetical = projection.project(results, c1=None)
    assert "NO c WAS MEASURED" in hypothetical and "c=0.25 (hypothetical)" in hypothetical
    small = _results([0.8, 0.6, 0.4], {"2": {"passes_per_round": 2.0}}, method="specqd-small")
    small["methods"][0]["levels"]["1"]["passes_per_round"] = 1.5
    # c2 defaults to c1 * 8 / 30 layers.
    assert projection.level_costs(small["methods"][0], 0.3, 0.3 * 8 / 30) == [(1.5, 0.3), (2.0, 0.3 * 8 / 30)]


def test_projection_refuses_cpu_smoke_json(tmp_path):
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps({"cpu_smoke": True, "device": "cpu", "rows": [{"batch": 1, "c": 5.0}]}))
    with pytest.raises(ValueError, match="CPU smoke"):
        projection.measured_c(path)
    path.write_text(json.dumps({"cpu_smoke": False, "device": "cuda", "rows": [{"batch": 1, "c": 0.31}]}))
    assert projection.measured_c(path) == 0.31


# ---------------------------------------------------------------- report formatting


def test_markdown_table_and_cells():
    assert report.markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert report.fmt(None) == "n/a" and report.fmt(1.234) == "1.23" and report.fmt(True) == "yes"
    record = {
        "method": "specqd-1",
        "num_levels": 1,
        "tokens_per_s": 12.345,
        "speedup_vs_none": 0.5,
        "identical_to_none": False,
        "num_different": 1,
        "num_requests": 4,
        "levels": {
            "1": {
                "mean_accepted_length": 4.5,
                "acceptance_rate": 0.58,
                "passes_per_generated_token": 1.3,
                "passes_per_level1_draft_token": 1.0,
            }
        },
        "target_passes_per_generated_token": 0.22,
        "cost_ratio_c": 0.31,
        "engine_start_s": 41.26,
        "memory": {
            "added_weight_bytes": 2 * report.MiB,
            "cpu_dequantized_copy_bytes": 0,
            "added_kv_bytes_per_token": 0,
            "kv_cache": {"1": "shared"},
            "kv_capacity_tokens": 46592,
        },
    }
    row = report.offline_row(record)
    assert row == [
        "specqd-1",
        "1",
        "12.3",
        "0.50x",
        "41.3",
        "no (1/4 differ)",
        "4.50",
        "0.58",
        "0.22",
        "1.30",
        "1.00",
        "0.31",
        "2.0",
        "0.0",
        "shared",
        "0",
        "46592",
    ]
    assert len(row) == len(report.OFFLINE_COLUMNS)
    failed = report.offline_row({"method": "ngram", "num_levels": 1, "error": "boom"})
    assert len(failed) == len(report.OFFLINE_COLUMNS) and "FAILED" in failed[2]


def test_adaptive_decisions_are_summarized_and_a_decision_over_budget_flagged():
    def record(share):
        return {"method": "specqd-adaptive", "adaptive": {"summary": "adaptive[k 0:3 6:9]", "decision_share": share}}

    within = report.notes({"dtype": "float32"}, [record(0.004)])
    assert within == ["specqd-adaptive, the adaptive policy's decisions over the timed run: adaptive[k 0:3 6:9]"]
    over = report.notes({"dtype": "float32"}, [record(0.012)])
    assert len(over) == 2 and "deciding took 1.20% of step time, over its 1% budget" in over[1]
    assert len(report.notes({"dtype": "float32"}, [record(None)])) == 1  # no step was measured


def test_bf16_difference_is_explained_and_fp32_difference_is_flagged():
    records = [{"method": "ngram", "identical_to_none": False}]
    assert "query-length invariant" in report.notes({"dtype": "bfloat16", "machine": "x"}, records)[0]
    assert "bug" in report.notes({"dtype": "float32", "machine": "x"}, records)[0]


def test_cost_ratio_from_the_level_report():
    from vllm_specqd.level_report import LevelEntry, LevelReport

    before = LevelReport(
        levels={1: LevelEntry(1, "MXFP4 self-draft", timed_passes=10, pass_seconds=1.0)},
        target_passes=2,
        target_pass_seconds=1.0,
    )
    after = LevelReport(
        levels={1: LevelEntry(1, "MXFP4 self-draft", timed_passes=40, pass_seconds=4.0)},
        target_passes=7,
        target_pass_seconds=6.0,
    )
    # Over the run: 30 draft passes in 3.0 s (0.1 s each), 5 target passes in 5.0 s (1.0 s each).
    assert abs(after.minus(before).cost_ratio(1) - 0.1) < 1e-12
    assert LevelReport(levels={1: LevelEntry(1, "x")}).cost_ratio(1) is None
    assert LevelReport.from_json(after.to_json()).cost_ratio(1) == after.cost_ratio(1)


def test_identity_reports_where_outputs_diverge_and_the_logit_gap_there():
    from vllm_specqd.bench.offline import identity_vs

    same = identity_vs([[5, 6, 7]], [[5, 6, 7]], [[1.0, 2.0, 3.0]])
    assert same["identical_to_none"] and same["divergences"] == []
    got = identity_vs([[5, 6, 7], [1, 2]], [[5, 9, 7], [1, 2, 3]], [[3.1, 0.02, 1.0], [0.5, 0.7]])
    assert got["num_different"] == 2
    assert got["divergences"] == [
        {"prompt": 0, "position": 1, "top2_logit_gap": 0.02},
        {"prompt": 1, "position": 2, "top2_logit_gap": None},  # the reference ended first
    ]


def test_implied_verify_cost_inverts_the_time_per_token():
    from vllm_specqd.bench.report import implied_verify_cost

    record = {
        "speedup_vs_none": 0.8,
        "cost_ratio_c": 0.07,
        "target_passes_per_generated_token": 0.23,
        "levels": {"1": {"passes_per_generated_token": 1.38}},
    }
    assert abs(implied_verify_cost(record) - 1.25 / (0.23 + 1.38 * 0.07)) < 1e-12
    assert implied_verify_cost({"speedup_vs_none": 1.0}) is None  # no specqd level report


def test_specqd_outputs_are_also_compared_with_no_speculation_on_the_same_gemm():
    from vllm_specqd.bench.offline import compare_with_same_gemm_baseline

    def record(name, outputs):
        return {"method": name, "outputs": [{"token_ids": t} for t in outputs], "identical_to_none": False}

    records = [
        record("none", [[1, 2], [3, 4]]),
        record("none-specqd-gemm", [[1, 2], [3, 5]]),
        record("specqd-1", [[1, 2], [3, 5]]),
        record("specqd-ngram", [[1, 9], [3, 5]]),
    ]
    compare_with_same_gemm_baseline(records)
    by_name = {r["method"]: r for r in records}
    assert by_name["specqd-1"]["identical_to_same_gemm"] is True
    assert (
        by_name["specqd-ngram"]["identical_to_same_gemm"],
        by_name["specqd-ngram"]["num_different_from_same_gemm"],
    ) == (False, 1)
    assert "identical_to_same_gemm" not in by_name["none"]
    lines = report.notes({"dtype": "bfloat16"}, records)
    assert any(line.startswith("specqd-1: token-identical to `none-specqd-gemm`") for line in lines)
    assert any("specqd-ngram (1)" in line for line in lines)


def test_cpu_description_names_the_core_and_its_flags(tmp_path):
    from vllm_specqd.bench.cpu_info import cpu_description

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu avx2 fma avx512f avx512bw avx512_bf16\n\nprocessor\t: 1\ncpu family\t: 99\n"
    )
    name, flags = cpu_description(info)
    assert name.endswith('AMD EPYC, CPU family 25 model 17 (Zen 4 "Genoa")'), name
    assert flags == ["avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"]
    assert cpu_description(tmp_path / "missing")[1] == []
