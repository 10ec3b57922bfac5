"""vllm-specqd: lossless speculative decoding for vLLM with MXFP4 self-drafts.

The engine-agnostic parts (``mxfp4``, ``kernels``, ``multilevel``, ``config``)
import without vLLM. When vLLM is installed, its version is checked here so an
unsupported one fails at import with a clear message rather than deep inside
a monkeypatch.
"""

from vllm_specqd.vllm_compat import check_vllm_version

__version__ = "0.1.0"

check_vllm_version(required=False)
