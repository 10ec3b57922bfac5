"""vllm-specqd: lossless speculative decoding for vLLM with MXFP4 self-drafts.

The engine-free modules (``mxfp4``, ``kernels``, ``multilevel``, ``ngram``, ``config``,
``level_report``) import without vLLM, whatever vLLM is installed. The vLLM version is checked where
vLLM is used: the plugin entry point and ``vllm_specqd.adapter``.
"""

__version__ = "0.1.0"
