"""Benchmark suite: offline and served comparisons of speculative methods, report, projection.

Modules: ``datasets`` (prompts), ``methods`` (speculative configs), ``offline``
(`vllm.LLM` runner), ``server_process`` + ``served`` (`vllm serve` sweep),
``spec_stats`` (acceptance and forward-pass accounting), ``memory`` (bytes
speculation adds), ``report`` + ``plot`` (results.md/json/png),
``projection`` (labeled 8B speedup projection), ``cli`` (`python -m vllm_specqd bench`).
"""
