"""The vLLM adapter: the only part of vllm-specqd that imports vLLM."""
