"""A real `vllm serve` subprocess with `--speculative-config <file>`, driven by the openai client.

Each server runs alone (start, requests, clean stop) to keep memory bounded.
Spec servers must answer exactly as the server without speculation (greedy,
float32), streaming or not, and expose vLLM's and specqd's metrics.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from engine_harness import three_levels
from server_harness import greedy_answers, metric, running, scrape, serve_flags

from vllm_specqd.bench.server_process import vllm_command

pytestmark = pytest.mark.server

QUESTIONS = ["Give me three tips for writing clean Python code.", "Why is the sky blue?"]
COMPLETION_PROMPTS = ["def is_prime(n):\n", "The three primary colors are"]
MAX_TOKENS = 32


def talk(server) -> dict:
    """Chat and completions, streaming and not; greedy, one request at a time."""
    chat = [("chat", question) for question in QUESTIONS]
    completion = [("completion", prompt) for prompt in COMPLETION_PROMPTS]
    out = {}
    for name, requests in (("chat", chat), ("completion", completion)):
        for suffix, stream in (("", False), ("_stream", True)):
            answers = greedy_answers(server, requests, MAX_TOKENS, stream=stream, one_at_a_time=True)
            out[name + suffix] = [a.text for a in answers]
    return out


def serve_and_talk(model_dir: Path, work_dir: Path, name: str, spec_file: Path | None) -> dict:
    with running(model_dir, work_dir, name, spec_file, serve_flags()) as server:
        answers = talk(server)
        metrics = scrape(server)
        # vLLM's and specqd's periodic log lines come every ~10 s.
        deadline = time.monotonic() + 20
        while spec_file is not None and time.monotonic() < deadline and "SpecDecoding metrics" not in server.log_text():
            time.sleep(1)
    return {"answers": answers, "metrics": metrics, "log": server.log_text(), "exit_code": server.exit_code}


def spec_configs(small_model_dir: Path) -> dict[str, dict]:
    return {
        "one": {"method": "specqd", "num_speculative_tokens": 4},  # the defaults: adaptive
        "three": three_levels(small_model_dir),  # K=6 fixed <- the small MXFP4 model (k=3) <- n-gram (k=2)
    }


@pytest.fixture(scope="module")
def served(model_dir, small_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    results = {"none": serve_and_talk(model_dir, root, "none", None)}
    for name, config in spec_configs(small_model_dir).items():
        # JSON for one level, YAML for three: both file kinds work. Two levels (n-gram inner) are
        # served by test_server_stress.py, identical to no speculation before and after its storm.
        if name == "three":
            spec_file = root / "specqd.yaml"
            spec_file.write_text(yaml.safe_dump(config))
        else:
            spec_file = root / f"specqd-{name}.json"
            spec_file.write_text(json.dumps(config))
        results[name] = serve_and_talk(model_dir, root, name, spec_file)
    return results


@pytest.mark.parametrize("levels", ["one", "three"])
def test_served_answers_identical_to_no_speculation(served, levels):
    reference, answers = served["none"]["answers"], served[levels]["answers"]
    assert all(text for texts in reference.values() for text in texts)
    assert answers == reference


def test_streaming_matches_non_streaming(served):
    for result in served.values():
        answers = result["answers"]
        assert answers["chat_stream"] == answers["chat"]
        assert answers["completion_stream"] == answers["completion"]


@pytest.mark.parametrize("levels", ["one", "three"])
def test_spec_decode_metrics_on_metrics_endpoint_and_logs(served, levels):
    result = served[levels]
    drafts = _metric(result["metrics"], "vllm:spec_decode_num_drafts_total")
    accepted = _metric(result["metrics"], "vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and accepted > 0
    assert "vllm:spec_decode_num_accepted_tokens_per_pos_total" in result["metrics"]
    assert "SpecDecoding metrics" in result["log"]
    assert "Mean acceptance length" in result["log"]
    assert "specqd: MXFP4 draft adds" in result["log"]


@pytest.mark.parametrize("levels, deepest", [("three", "3")])
def test_per_level_metrics_served(served, levels, deepest):
    result = served[levels]
    assert f'level="{deepest}"' in result["metrics"]
    # The small model (level 2) proposed to level 1 in every round, and level 1 checked its proposals.
    proposed = _metric(result["metrics"], "specqd:level_proposed_tokens_total", level="2")
    accepted = _metric(result["metrics"], "specqd:level_accepted_tokens_total", level="2")
    assert 0 < accepted <= proposed, (accepted, proposed)
    assert _metric(result["metrics"], "specqd:level_forward_passes_total", level="1") > 0
    assert "specqd levels:" in result["log"]


def test_servers_stop_cleanly(served):
    for name, result in served.items():
        assert result["exit_code"] in (0, -signal.SIGINT), (name, result["log"][-2000:])


def _metric(text: str, name: str, **labels) -> float:
    value = metric(text, name, **labels)
    assert value is not None, f"{name} {labels} not in /metrics"
    return value


def test_bad_config_file_fails_fast_with_a_clear_message(model_dir, tmp_path):
    bad = tmp_path / "specqd.json"
    bad.write_text(json.dumps({"method": "specqd", "num_speculative_tokens": 40}))
    proc = subprocess.run(
        vllm_command(
            "serve", str(model_dir), "--speculative-config", str(bad), "--dtype", "float32", "--enforce-eager"
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "'num_speculative_tokens' must be in 1..16, got 40" in proc.stdout + proc.stderr

    missing = tmp_path / "nope.yaml"
    proc = subprocess.run(
        vllm_command("serve", str(model_dir), "--speculative-config", str(missing)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2  # argparse
    assert "is neither inline JSON nor an existing .json/.yaml file" in proc.stderr
