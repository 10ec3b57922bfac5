"""A real `vllm serve` subprocess with `--speculative-config <file>`, driven by the openai client.

Each server runs alone (start, requests, clean stop) to keep memory bounded.
Spec servers must answer exactly as the server without speculation (greedy,
float32), streaming or not, and expose vLLM's and specqd's metrics.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.server

VLLM = str(Path(sys.executable).parent / "vllm")
QUESTIONS = ["Give me three tips for writing clean Python code.", "Why is the sky blue?"]
COMPLETION_PROMPTS = ["def is_prime(n):\n", "The three primary colors are"]
MAX_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        spec_file: Path | None = None,
        extra_args: tuple[str, ...] = (),  # appended: a repeated flag overrides the one above
        env: dict[str, str] | None = None,  # added to this process's environment
    ):
        from vllm_specqd.vllm_compat import ensure_vllm_metadata_alias

        ensure_vllm_metadata_alias()
        self.port = free_port()
        self.model = str(model_dir)
        self.log_path = log_path
        cmd = [
            VLLM,
            "serve",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--seed",
            "0",
        ]
        if spec_file is not None:
            cmd += ["--speculative-config", str(spec_file)]
        cmd += list(extra_args)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


def talk(server: Server) -> dict:
    """Chat and completions, streaming and not; greedy."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="EMPTY")
    out: dict[str, list[str]] = {"chat": [], "chat_stream": [], "completion": [], "completion_stream": []}
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        kwargs = dict(model=server.model, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        out["chat"].append(client.chat.completions.create(**kwargs).choices[0].message.content)
        chunks = client.chat.completions.create(**kwargs, stream=True)
        out["chat_stream"].append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    for prompt in COMPLETION_PROMPTS:
        kwargs = dict(model=server.model, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
        out["completion"].append(client.completions.create(**kwargs).choices[0].text)
        chunks = client.completions.create(**kwargs, stream=True)
        out["completion_stream"].append("".join(c.choices[0].text for c in chunks if c.choices))
    return out


def serve_and_talk(model_dir: Path, log_path: Path, spec_file: Path | None) -> dict:
    server = Server(model_dir, log_path, spec_file)
    try:
        server.wait_healthy()
        answers = talk(server)
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        # vLLM's and specqd's periodic log lines come every ~10 s.
        deadline = time.monotonic() + 20
        while spec_file is not None and time.monotonic() < deadline and "SpecDecoding metrics" not in server.log_text():
            time.sleep(1)
    finally:
        code = server.stop()
    return {"answers": answers, "metrics": metrics, "log": server.log_text(), "exit_code": code}


def spec_configs(small_model_dir: Path) -> dict[str, dict]:
    ngram = {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    return {
        "one": {"method": "specqd", "num_speculative_tokens": 4},  # the defaults: adaptive
        "three": {
            "method": "specqd",
            "num_speculative_tokens": 6,
            "adaptive": False,
            "inner": {
                "method": "draft_model",
                "model": str(small_model_dir),
                "quantization": "mxfp4",
                "num_speculative_tokens": 3,
                "inner": {**ngram, "num_speculative_tokens": 2},
            },
        },
    }


@pytest.fixture(scope="module")
def served(model_dir, small_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    results = {"none": serve_and_talk(model_dir, root / "none.log", None)}
    for name, config in spec_configs(small_model_dir).items():
        # JSON for one level, YAML for three: both file kinds work. Two levels (n-gram inner) are
        # served by test_server_stress.py, identical to no speculation before and after its storm.
        if name == "three":
            spec_file = root / "specqd.yaml"
            spec_file.write_text(yaml.safe_dump(config))
        else:
            spec_file = root / f"specqd-{name}.json"
            spec_file.write_text(json.dumps(config))
        results[name] = serve_and_talk(model_dir, root / f"{name}.log", spec_file)
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
    assert _metric(result["metrics"], "specqd:level_proposed_tokens_total", level="2") >= 0
    assert _metric(result["metrics"], "specqd:level_forward_passes_total", level="1") > 0
    assert "specqd levels:" in result["log"]


def test_servers_stop_cleanly(served):
    for name, result in served.items():
        assert result["exit_code"] in (0, -signal.SIGINT), (name, result["log"][-2000:])


def _metric(text: str, name: str, **labels) -> float:
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} {labels} not in /metrics"
    return total


def test_bad_config_file_fails_fast_with_a_clear_message(model_dir, tmp_path):
    bad = tmp_path / "specqd.json"
    bad.write_text(json.dumps({"method": "specqd", "num_speculative_tokens": 40}))
    proc = subprocess.run(
        [VLLM, "serve", str(model_dir), "--speculative-config", str(bad), "--dtype", "float32", "--enforce-eager"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "'num_speculative_tokens' must be in 1..16, got 40" in proc.stdout + proc.stderr

    missing = tmp_path / "nope.yaml"
    proc = subprocess.run(
        [VLLM, "serve", str(model_dir), "--speculative-config", str(missing)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2  # argparse
    assert "is neither inline JSON nor an existing .json/.yaml file" in proc.stderr
