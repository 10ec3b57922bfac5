"""The vLLM adapter: the only part of vllm-specqd that imports vLLM (private names: ``vllm_internals``).

Importing it checks the installed vLLM first, so an unsupported one fails here with a clear message
rather than deep inside a monkeypatch.
"""

from vllm_specqd.vllm_compat import check_vllm_version

check_vllm_version(required=True)
