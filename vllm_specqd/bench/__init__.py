"""Benchmark suite: offline and served comparisons of speculative methods, report, projection.

Modules: ``datasets`` (prompts), ``methods`` (speculative configs), ``offline``
(`vllm.LLM` runner), ``server_process`` + ``served`` (`vllm serve` sweep),
``spec_stats`` (acceptance and forward-pass accounting), ``memory`` (bytes
speculation adds), ``report`` + ``served_report`` + ``plot`` (results.md,
results.json, PNG), ``projection`` (the labeled 8B speedup projection),
``cli`` (`python -m vllm_specqd bench`).
"""
