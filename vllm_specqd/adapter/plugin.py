"""`vllm.general_plugins` entry point.

vLLM calls :func:`register` in every process (API server, engine core,
workers) before configs are built. It is idempotent: vLLM may call it more
than once per process. Importing this module checks the vLLM version
(``vllm_specqd/adapter/__init__.py``).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_specqd.adapter import mxfp4_linear  # noqa: F401  registers "specqd_mxfp4"
    from vllm_specqd.adapter.metrics import ensure_stats_dir, register_collector
    from vllm_specqd.adapter.patches import apply_all

    apply_all()
    ensure_stats_dir()  # before the engine processes start, so they inherit it
    register_collector()
    _registered = True
