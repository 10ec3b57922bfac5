"""Every use of vLLM internals outside the monkeypatches (``patches.py``), behind named functions.

Each function cites the vLLM 0.32.0 file:line it depends on (paths relative to the ``vllm``
package), and :data:`INTERNALS` lists every private or internal vLLM name the adapter touches.
``tests/test_vllm_internals.py`` checks that each still exists at the cited line, and that no other
adapter module reaches past this seam, so a vLLM upgrade starts with that test and these two files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

if TYPE_CHECKING:  # the drafter's modules load in workers only (patches.py imports this module everywhere)
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

PROPOSER = "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer"
RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"


@dataclass(frozen=True)
class Internal:
    """One vLLM name the adapter depends on: where it lives, and the line that defines or sets it."""

    owner: str  # "module:Class" or "module:function" (a name it sets on its argument), or "module"
    name: str
    cite: str  # "path/inside/vllm.py:line"; the line contains ``name``


INTERNALS: tuple[Internal, ...] = (
    # The drafter's base class (SpecDecodeBaseProposer, subclassed by DraftModelProposer).
    Internal(PROPOSER, "_draft_attn_layer_names", "v1/spec_decode/llm_base_proposer.py:1335"),
    Internal(PROPOSER, "draft_attn_groups", "v1/spec_decode/llm_base_proposer.py:1767"),
    Internal(PROPOSER, "kv_cache_gid", "v1/spec_decode/llm_base_proposer.py:1727"),
    Internal(PROPOSER, "block_size", "v1/spec_decode/llm_base_proposer.py:1768"),
    Internal(PROPOSER, "_get_model", "v1/spec_decode/llm_base_proposer.py:1327"),
    Internal(PROPOSER, "_create_draft_vllm_config", "v1/spec_decode/llm_base_proposer.py:1266"),
    Internal(PROPOSER, "num_speculative_tokens", "v1/spec_decode/llm_base_proposer.py:532"),
    Internal(PROPOSER, "_last_draft_probs", "v1/spec_decode/llm_base_proposer.py:533"),
    Internal(PROPOSER, "_greedy_sample", "v1/spec_decode/llm_base_proposer.py:438"),
    Internal(PROPOSER, "_sample_draft_tokens", "v1/spec_decode/llm_base_proposer.py:478"),
    Internal(PROPOSER, "set_inputs_first_pass", "v1/spec_decode/llm_base_proposer.py:817"),
    Internal(PROPOSER, "input_ids", "v1/spec_decode/llm_base_proposer.py:185"),
    Internal(PROPOSER, "positions", "v1/spec_decode/llm_base_proposer.py:207"),
    Internal(PROPOSER, "build_per_group_and_layer_attn_metadata", "v1/spec_decode/llm_base_proposer.py:988"),
    Internal(PROPOSER, "_determine_batch_execution_and_padding", "v1/spec_decode/llm_base_proposer.py:1771"),
    Internal(PROPOSER, "build_model_inputs_first_pass", "v1/spec_decode/llm_base_proposer.py:957"),
    Internal(PROPOSER, "_get_slot_mapping", "v1/spec_decode/llm_base_proposer.py:403"),
    Internal(PROPOSER, "dummy_run", "v1/spec_decode/llm_base_proposer.py:1618"),  # overridden: one forward
    Internal("vllm.compilation.decorators:_support_torch_compile", "do_not_compile", "compilation/decorators.py:402"),
    # The model runner's state, read while drafting.
    Internal(RUNNER, "input_batch", "v1/worker/gpu_model_runner.py:714"),
    Internal("vllm.v1.worker.gpu_input_batch:InputBatch", "token_ids_cpu", "v1/worker/gpu_input_batch.py:137"),
    Internal("vllm.v1.worker.gpu_input_batch:InputBatch", "req_ids", "v1/worker/gpu_input_batch.py:315"),
    Internal(RUNNER, "requests", "v1/worker/gpu_model_runner.py:683"),
    Internal(
        "vllm.v1.worker.gpu_input_batch:CachedRequestState", "num_prompt_tokens", "v1/worker/gpu_input_batch.py:66"
    ),
    Internal("vllm.v1.worker.gpu_input_batch:CachedRequestState", "sampling_params", "v1/worker/gpu_input_batch.py:39"),
    Internal(RUNNER, "discard_request_mask", "v1/worker/gpu_model_runner.py:815"),
    Internal(RUNNER, "kv_cache_config", "v1/worker/gpu_model_runner.py:7072"),
    Internal("vllm.v1.worker.gpu_input_batch:InputBatch", "block_table", "v1/worker/gpu_input_batch.py:183"),
    Internal("vllm.v1.worker.block_table:BlockTable", "get_device_tensor", "v1/worker/block_table.py:188"),
    Internal(RUNNER, "_on_request_state_removed", "v1/worker/gpu_model_runner.py:1156"),
    Internal(RUNNER, "_update_states", "v1/worker/gpu_model_runner.py:1172"),
    Internal("vllm.v1.core.sched.output:CachedRequestData", "resumed_req_ids", "v1/core/sched/output.py:143"),
    # Adaptive speculation hands vLLM per-request draft lists of any length (adaptive_drafter.py):
    # the runner passes a list on as it is, cuts the draft probabilities to each request's count,
    # and the scheduler schedules each request's list, empty included.
    Internal(RUNNER, "_get_draft_token_ids_cpu", "v1/worker/gpu_model_runner.py:4670"),
    Internal(RUNNER, "_get_spec_decode_draft_probs", "v1/worker/gpu_model_runner.py:4719"),
    Internal("vllm.v1.core.sched.scheduler:Scheduler", "update_draft_token_ids", "v1/core/sched/scheduler.py:2550"),
    # KV cache specs and groups.
    Internal("vllm.v1.kv_cache_interface:KVCacheConfig", "kv_cache_groups", "v1/kv_cache_interface.py:1467"),
    Internal("vllm.v1.kv_cache_interface:KVCacheGroupSpec", "layer_names", "v1/kv_cache_interface.py:1445"),
    Internal("vllm.v1.kv_cache_interface:KVCacheGroupSpec", "kv_cache_spec", "v1/kv_cache_interface.py:1447"),
    Internal("vllm.v1.kv_cache_interface:SlidingWindowSpec", "sliding_window", "v1/kv_cache_interface.py:851"),
    Internal("vllm.v1.kv_cache_interface:KVCacheSpec", "page_size_bytes", "v1/kv_cache_interface.py:218"),
    Internal("vllm.v1.kv_cache_interface:KVCacheSpec", "block_size", "v1/kv_cache_interface.py:169"),
    Internal("vllm.v1.kv_cache_interface:UniformTypeKVCacheSpecs", "kv_cache_specs", "v1/kv_cache_interface.py:1232"),
    Internal(RUNNER, "shared_kv_cache_layers", "v1/worker/gpu_model_runner.py:861"),
    # Layers.
    Internal("vllm.model_executor.layers.linear:LinearBase", "prefix", "model_executor/layers/linear.py:285"),
    Internal("vllm.model_executor.layers.linear:LinearBase", "quant_method", "model_executor/layers/linear.py:289"),
    # Set by each parallel linear (ColumnParallelLinear here, RowParallelLinear at :1681).
    Internal(
        "vllm.model_executor.layers.linear:ColumnParallelLinear",
        "input_size_per_partition",
        "model_executor/layers/linear.py:493",
    ),
    Internal(
        "vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm",
        "cpu_linear",
        "model_executor/layers/utils.py:476",
    ),
    Internal(
        "vllm.model_executor.layers.vocab_parallel_embedding:VocabParallelEmbedding",
        "tp_size",
        "model_executor/layers/vocab_parallel_embedding.py:280",
    ),
    Internal(
        "vllm.model_executor.layers.attention.attention:Attention",
        "kv_sharing_target_layer_name",
        "model_executor/layers/attention/attention.py:454",
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl",
        "kv_sharing_target_layer_name",
        "v1/attention/backends/cpu_attn.py:301",
    ),
    # The draft's CPU fast path (draft_fastpath.py) and its shared-KV test hook.
    Internal(
        "vllm.model_executor.layers.attention.attention:Attention",
        "use_direct_call",
        "model_executor/layers/attention/attention.py:440",
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl",
        "do_kv_cache_update",
        "v1/attention/backends/cpu_attn.py:463",
    ),
    Internal(
        "vllm.model_executor.layers.layernorm:RMSNorm", "variance_epsilon", "model_executor/layers/layernorm.py:57"
    ),
    Internal(
        "vllm.model_executor.layers.layernorm:RMSNorm",
        "variance_size_override",
        "model_executor/layers/layernorm.py:58",
    ),
    Internal("vllm.model_executor.layers.layernorm:RMSNorm", "has_weight", "model_executor/layers/layernorm.py:62"),
    Internal(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner", "get_kv_cache_spec", "v1/worker/gpu_model_runner.py:7146"
    ),
    # vLLM's compiled CPU ops (RMSNorm, fused add + RMSNorm, SiLU-and-mul) that draft_fastpath.py calls.
    Internal("torch:ops", "_C", "_custom_ops.py:244"),
    # Wrapped by patches.py (each patch cites its line there too).
    Internal("vllm.config.vllm:VllmConfig", "_get_v2_model_runner_unsupported_features", "config/vllm.py:2914"),
    Internal("vllm.utils.cpu_triton_utils", "_expand_kernel_impl", "utils/cpu_triton_utils.py:390"),
    Internal("vllm.v1.sample.ops.topk_topp_sampler", "apply_top_k_only", "v1/sample/ops/topk_topp_sampler.py:517"),
    Internal(
        "vllm.model_executor.layers.linear:UnquantizedLinearMethod",
        "process_weights_after_loading",
        "model_executor/layers/linear.py:206",
    ),
    Internal("vllm.engine.arg_utils:EngineArgs", "create_speculative_config", "engine/arg_utils.py:2060"),
    Internal("vllm.engine.arg_utils:EngineArgs", "add_cli_args", "engine/arg_utils.py:934"),
    Internal("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm", "model_executor/layers/utils.py:470"),
    Internal(RUNNER, "_sample", "v1/worker/gpu_model_runner.py:3437"),
    Internal(RUNNER, "maybe_add_kv_sharing_layers_to_kv_cache_groups", "v1/worker/gpu_model_runner.py:7028"),
    Internal("vllm.v1.sample.rejection_sampler", "sample_recovered_tokens", "v1/sample/rejection_sampler.py:678"),
    Internal("vllm.v1.spec_decode.metadata:SpecDecodeMetadata", "max_spec_len", "v1/spec_decode/metadata.py:27"),
)


# ---------------------------------------------------------------- the drafter's base class


def load_draft_model(proposer: DraftModelProposer, target: nn.Module, build: Callable[[VllmConfig], nn.Module]) -> None:
    """Run vLLM's DraftModelProposer.load_model with ``build(draft_vllm_config)`` as the draft.

    The base load_model (llm_base_proposer.py:1319) finds the draft's attention layers and sets
    ``proposer.model``, but takes no model: it calls ``self._get_model()`` (:1327; vLLM's own
    builds the draft from a checkpoint, draft_model.py:103). The builder is parked on the
    instance for that one call; the config is the draft's (draft_model.py:81).
    """
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    proposer._get_model = lambda: build(proposer._create_draft_vllm_config())
    try:
        DraftModelProposer.load_model(proposer, target)
    finally:
        del proposer._get_model


def draft_layer_names(proposer: DraftModelProposer) -> set[str]:
    """The draft's attention layers with a KV cache spec (set by load_model, llm_base_proposer.py:1335)."""
    return set(proposer._draft_attn_layer_names)


@dataclass
class AttentionBinding:
    """Where a draft model's attention layers find their KV: groups (metadata builders) and layout."""

    groups: list  # [vllm.v1.worker.utils.AttentionGroup]
    block_size: int
    kv_cache_gid: int


def attention_binding(proposer: DraftModelProposer) -> AttentionBinding:
    """What the base initialize_attn_backend built for the draft (llm_base_proposer.py:1727, :1767-1768)."""
    return AttentionBinding(list(proposer.draft_attn_groups), proposer.block_size, proposer.kv_cache_gid)


def attention_binding_for(
    proposer: DraftModelProposer, layer_names: list[str], kv_cache_config, kernel_block_sizes
) -> AttentionBinding:
    """Attention groups for other layers (an inner model's) from vLLM's own builder.

    SpecDecodeBaseProposer.initialize_attn_backend (llm_base_proposer.py:1709) builds groups for
    ``_draft_attn_layer_names`` into four fields (:1727, :1767-1768); it runs here over
    ``layer_names``, and the level-1 draft's fields are restored after.
    """
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    saved = (proposer._draft_attn_layer_names, proposer.draft_attn_groups, proposer.kv_cache_gid, proposer.block_size)
    try:
        proposer._draft_attn_layer_names = set(layer_names)
        DraftModelProposer.initialize_attn_backend(proposer, kv_cache_config, kernel_block_sizes)
        return attention_binding(proposer)
    finally:
        proposer._draft_attn_layer_names, proposer.draft_attn_groups, proposer.kv_cache_gid, proposer.block_size = saved


def layers_by_kv_cache_group(kv_cache_config, layer_names) -> dict[int, list[str]]:
    """KV cache group id -> the given layers in it, sorted (KVCacheConfig.kv_cache_groups,
    v1/kv_cache_interface.py:1467; KVCacheGroupSpec.layer_names, :1445). Shared-KV draft layers
    sit in their target layer's group (vllm/v1/worker/utils.py:775)."""
    wanted = set(layer_names)
    groups = {}
    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        names = sorted(wanted.intersection(group.layer_names))
        if names:
            groups[gid] = names
    return groups


def attention_bindings_for(
    proposer: DraftModelProposer, layer_names, kv_cache_config, kernel_block_sizes
) -> list[AttentionBinding]:
    """Attention groups for the given layers, one binding per KV cache group they are in.

    vLLM's SpecDecodeBaseProposer.initialize_attn_backend asserts that every layer it binds is in
    one KV cache group (validate_same_kv_cache_group, llm_base_proposer.py:1687, called at :1723):
    a hybrid target (sliding-window and full attention) has several, and a small model whose
    attention kind differs from the target's gets its own. It runs here once per group, over that
    group's layers (:func:`attention_binding_for`), so each gets its own metadata builders, block
    size and sliding window; the proposer's fields are restored after each.
    """
    by_group = layers_by_kv_cache_group(kv_cache_config, layer_names)
    return [attention_binding_for(proposer, names, kv_cache_config, kernel_block_sizes) for names in by_group.values()]


def attention_bindings_by_group(
    proposer: DraftModelProposer, kv_cache_config, kernel_block_sizes
) -> list[AttentionBinding]:
    """The draft's attention groups, one binding per KV cache group its layers are in
    (:func:`attention_bindings_for`). vLLM's fields (llm_base_proposer.py:1727, :1767-1768) end
    with every group's attention groups and the first group's id and block size.
    """
    bindings = attention_bindings_for(proposer, proposer._draft_attn_layer_names, kv_cache_config, kernel_block_sizes)
    proposer.draft_attn_groups = [group for binding in bindings for group in binding.groups]
    proposer.kv_cache_gid, proposer.block_size = bindings[0].kv_cache_gid, bindings[0].block_size
    return bindings


def kv_bytes_per_token(vllm_config: VllmConfig, layer_names) -> int:
    """KV-cache bytes one token takes in the given layers' own KV: page_size_bytes / block_size of each
    layer's spec (Attention.get_kv_cache_spec, model_executor/layers/attention/attention.py:606;
    KVCacheSpec, v1/kv_cache_interface.py:165, :218). Layers that share KV have no spec."""
    layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, sorted(layer_names))
    specs = [layer.get_kv_cache_spec(vllm_config) for layer in layers.values()]
    return sum(spec.page_size_bytes // spec.block_size for spec in specs if spec is not None)


def begin_round(proposer: DraftModelProposer, num_speculative_tokens: int) -> None:
    """The per-round state vLLM's propose resets first (llm_base_proposer.py:532-533)."""
    proposer.num_speculative_tokens = num_speculative_tokens
    proposer._last_draft_probs = None


def keep_draft_probs(proposer: DraftModelProposer, probs: torch.Tensor) -> None:  # [batch, K, vocab]
    """Hand the rejection sampler the draft's probabilities (take_last_draft_probs, llm_base_proposer.py:509)."""
    proposer._last_draft_probs = probs


def sample_draft_tokens(
    proposer: DraftModelProposer, hidden: torch.Tensor, sampling_metadata
) -> tuple[torch.Tensor, torch.Tensor | None]:  # [batch] tokens, [batch, vocab] probs or None
    """vLLM's draft sampling: greedy, or probabilistic per draft_sample_method (llm_base_proposer.py:478)."""
    return proposer._sample_draft_tokens(hidden, sampling_metadata)


def sampling_metadata_for_rows(sampling_metadata, rows: torch.Tensor):  # rows: [R] batch rows
    """The sampling metadata of some batch rows, for draft sampling. The draft sampler reads only
    the per-request temperature and the all_greedy / all_random flags, which stay true of any
    subset (compute_probs_and_sample_next_token, llm_base_proposer.py:1822-1860)."""
    if sampling_metadata.temperature is None:
        return sampling_metadata
    return dataclasses.replace(sampling_metadata, temperature=sampling_metadata.temperature[rows])


def greedy_sample(proposer: DraftModelProposer, hidden: torch.Tensor) -> torch.Tensor:  # [batch]
    """Argmax of the draft's logits (llm_base_proposer.py:438)."""
    return proposer._greedy_sample(hidden)


@dataclass
class FirstPassInputs:
    """The draft's first-pass inputs, prepared by vLLM in the proposer's persistent buffers."""

    input_ids: torch.Tensor  # [num_tokens] int32: the target's kept inputs shifted by one + the sampled token
    positions: torch.Tensor  # [num_tokens] int64
    cad: CommonAttentionMetadata  # for those rows (vLLM may extend each query)
    sample_rows: torch.Tensor  # [batch_size] the row of each request's last token


def first_pass_inputs(
    proposer: DraftModelProposer,
    target_token_ids: torch.Tensor,  # [num_tokens]
    next_token_ids: torch.Tensor,  # [batch_size]
    target_positions: torch.Tensor,  # [num_tokens]
    target_hidden_states: torch.Tensor,  # [num_tokens, hidden]
    token_indices_to_sample: torch.Tensor | None,
    cad: CommonAttentionMetadata,
    num_rejected_tokens_gpu: torch.Tensor | None,  # [batch_size]
) -> FirstPassInputs:
    """vLLM's input preparation for the first drafting pass (llm_base_proposer.py:817
    set_inputs_first_pass, filling the buffers of :185 and :207)."""
    num_tokens, sample_rows, cad = proposer.set_inputs_first_pass(
        target_token_ids=target_token_ids,
        next_token_ids=next_token_ids,
        target_positions=target_positions,
        target_hidden_states=target_hidden_states,
        token_indices_to_sample=token_indices_to_sample,
        cad=cad,
        num_rejected_tokens_gpu=num_rejected_tokens_gpu,
    )
    return FirstPassInputs(proposer.input_ids[:num_tokens], proposer.positions[:num_tokens], cad, sample_rows)


def run_first_pass(
    proposer: DraftModelProposer, inputs: FirstPassInputs, mm_embed_inputs=None
) -> torch.Tensor:  # [num_input_tokens, hidden]
    """The draft over its first-pass inputs, writing its own KV, as vLLM's propose runs it
    (llm_base_proposer.py:560-600): per-layer attention metadata (:988), CUDA-graph / data-parallel
    padding (:1771), model kwargs (:957) and the slot mapping of the draft's layers (:403)."""
    from vllm.forward_context import set_forward_context

    num_tokens = inputs.input_ids.shape[0]
    _, per_layer = proposer.build_per_group_and_layer_attn_metadata(inputs.cad)
    mode, num_input_tokens, across_dp = proposer._determine_batch_execution_and_padding(num_tokens)
    model_kwargs, slot_mapping_size = proposer.build_model_inputs_first_pass(
        num_tokens, num_input_tokens, mm_embed_inputs
    )
    with set_forward_context(
        per_layer,
        proposer.vllm_config,
        num_tokens=num_input_tokens,
        num_tokens_across_dp=across_dp,
        cudagraph_runtime_mode=mode,
        slot_mapping=proposer._get_slot_mapping(slot_mapping_size, inputs.cad.slot_mapping),
    ):
        return proposer.model(**model_kwargs)


# ---------------------------------------------------------------- the model runner's state


def committed_token_ids(runner, row: int, length: int) -> np.ndarray:  # [length] int64
    """The first ``length`` tokens of batch row ``row`` as the runner booked them
    (InputBatch.token_ids_cpu, gpu_input_batch.py:137; runner.input_batch, gpu_model_runner.py:714)."""
    return runner.input_batch.token_ids_cpu[row, :length].astype(np.int64)


def group_block_tables(runner, group_ids, num_reqs: int) -> dict[int, torch.Tensor]:  # gid -> [num_reqs, max_blocks]
    """The running batch's block table in each KV cache group, as the target's step used them
    (runner.input_batch.block_table, gpu_input_batch.py:183, a MultiGroupBlockTable indexed by
    group, v1/worker/block_table.py:300; BlockTable.get_device_tensor, :188; the runner reads them
    so for its own metadata, gpu_model_runner.py:2300). The drafter's common metadata carries
    group 0's only (:2517-2545)."""
    return {gid: runner.input_batch.block_table[gid].get_device_tensor(num_reqs) for gid in group_ids}


def kv_cache_groups(runner) -> list[dict]:
    """The engine's KV cache groups as plain data: spec type, block size, sliding window, layers
    (runner.kv_cache_config, gpu_model_runner.py:7072; KVCacheGroupSpec, v1/kv_cache_interface.py:1439-1447;
    SlidingWindowSpec.sliding_window, :851)."""
    return [
        {
            "spec": type(group.kv_cache_spec).__name__,
            "block_size": group.kv_cache_spec.block_size,
            "sliding_window": getattr(group.kv_cache_spec, "sliding_window", None),
            "layer_names": list(group.layer_names),
        }
        for group in runner.kv_cache_config.kv_cache_groups
    ]


def batch_req_ids(runner, num_rows: int) -> list[str]:
    """Request ids of the first ``num_rows`` rows of the running batch (gpu_input_batch.py:315)."""
    return list(runner.input_batch.req_ids[:num_rows])


def discarded_rows(runner, num_rows: int) -> np.ndarray:  # [num_rows] bool
    """Rows whose sampled token this step is thrown away, e.g. a partial prefill chunk
    (discard_request_mask, gpu_model_runner.py:815, set at :2058)."""
    return runner.discard_request_mask.np[:num_rows]


def generation_budget(runner, req_id: str) -> tuple[int, int] | None:
    """(prompt tokens, max_tokens) of a running request, or None when it has no max_tokens
    (runner.requests, gpu_model_runner.py:683; CachedRequestState, gpu_input_batch.py:39, :66)."""
    state = runner.requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    if params is None or params.max_tokens is None:
        return None
    return state.num_prompt_tokens, params.max_tokens


def runner_holds_requests(runner) -> bool:
    """Whether the runner still holds any request, running or preempted (gpu_model_runner.py:683)."""
    return bool(runner.requests)


def on_request_removed(runner, callback: Callable[[str], None]) -> None:
    """Call ``callback(req_id)`` whenever the runner drops a request, finished or aborted.

    GPUModelRunner._update_states pops the request, then calls the platform hook
    _on_request_state_removed (gpu_model_runner.py:1156 the hook, :1183-1185 the calls), also in
    the step that only carries finished ids (before the early return for an empty schedule), so
    an idle engine has dropped them all. The hook is wrapped on this runner instance only.
    """
    removed = runner._on_request_state_removed

    def on_removed(req_id, req_state) -> None:
        removed(req_id, req_state)
        callback(req_id)

    runner._on_request_state_removed = on_removed


def on_request_resumed(runner, callback: Callable[[str], None]) -> None:
    """Call ``callback(req_id)`` for each request resumed from preemption, before the runner's step
    uses it: its KV blocks were freed and it got new ones (``req_state.block_ids`` replaced).

    GPUModelRunner._update_states reads ``scheduler_output.scheduled_cached_reqs.resumed_req_ids``
    (gpu_model_runner.py:1220, :1335, the block ids replaced at :1426); wrapped on this runner only.
    """
    update = runner._update_states

    def update_states(scheduler_output):
        for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            callback(req_id)
        return update(scheduler_output)

    runner._update_states = update_states


# ---------------------------------------------------------------- layers: KV sharing


def share_target_kv(vllm_config: VllmConfig, draft_layer_names: set[str], draft_prefix: str) -> dict[str, str]:
    """Make each draft attention layer use its target twin's KV cache; returns draft -> target names.

    vLLM's cross-layer KV sharing does the bookkeeping: a layer whose ``kv_sharing_target_layer_name``
    is set gets no KV cache spec of its own (vllm/v1/worker/gpu_model_runner.py:7161-7172), joins its
    target's KV cache group (vllm/v1/worker/utils.py:779 add_kv_sharing_layers_to_kv_cache_groups)
    and is bound to the target's KV tensor (gpu_model_runner.py:7008). Use it only while the specs
    are collected (:func:`sharing_target_kv_while`): the attribute also makes a layer skip its KV
    writes, and a graph compiled while it is set would keep skipping them.
    """
    layers = get_layers_from_vllm_config(vllm_config, Attention)
    targets = {}
    for name in sorted(draft_layer_names):
        target = name.removeprefix(draft_prefix + ".")
        if name == target or target not in layers or not isinstance(layers.get(name), Attention):
            raise RuntimeError(
                f"specqd: draft layer {name!r} has no target attention layer {target!r} to share KV with"
            )
        layers[name].kv_sharing_target_layer_name = target
        targets[name] = target
    return targets


@contextmanager
def sharing_target_kv_while(vllm_config: VllmConfig, draft_layer_names: set[str], draft_prefix: str):
    """Share the target's KV for the duration of the block: the runner collecting KV cache specs
    (GPUModelRunner.get_kv_cache_spec, v1/worker/gpu_model_runner.py:7146, wrapped by patches.py #8)."""
    share_target_kv(vllm_config, draft_layer_names, draft_prefix)
    try:
        yield
    finally:
        enable_shared_kv_writes(vllm_config, draft_layer_names)


def give_shared_layers_their_targets_spec(runner, kv_cache_config) -> int:
    """In a KV cache group with per-layer specs, give each KV-sharing layer its target layer's spec;
    returns how many it gave.

    Layers of one attention type whose pages differ in size (a small-model inner level with
    another head_dim or KV-head count than the target's) share one KV cache group whose spec is a
    UniformTypeKVCacheSpecs, one spec per layer (kv_cache_specs, v1/kv_cache_interface.py:1232;
    get_kv_cache_groups, v1/core/kv_cache_utils.py:2189). A shared-KV draft layer had no spec when
    specs were collected (gpu_model_runner.py:7161-7172): it joins its target's group by name only
    (runner.shared_kv_cache_layers, gpu_model_runner.py:861; v1/worker/utils.py:803-805), and the
    runner and the drafter look every layer of a group up in kv_cache_specs (gpu_model_runner.py:6739,
    :2457; v1/spec_decode/llm_base_proposer.py:1742): KeyError. The layer reads and writes its
    target's KV tensor (gpu_model_runner.py:7008), so its spec is the target's. This runs on the
    worker's own copy of the config (:7071), after the engine core sized the cache from it
    (v1/core/kv_cache_utils.py:1588), so the group's summed page size, which now counts the shared
    layers too, is read by nobody.
    """
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    given = 0
    for group in kv_cache_config.kv_cache_groups:
        specs = group.kv_cache_spec
        if not isinstance(specs, UniformTypeKVCacheSpecs):
            continue
        in_group = set(group.layer_names)
        for layer, target in runner.shared_kv_cache_layers.items():
            if layer in in_group and layer not in specs.kv_cache_specs and target in specs.kv_cache_specs:
                specs.kv_cache_specs[layer] = specs.kv_cache_specs[target]
                given += 1
    return given


def enable_shared_kv_writes(vllm_config: VllmConfig, draft_layer_names: set[str]) -> None:
    """Let shared-KV draft layers write their KV again (into the target's cache).

    vLLM's sharing layers only read (Attention.forward skips unified_kv_cache_update when
    kv_sharing_target_layer_name is set, model_executor/layers/attention/attention.py:541-547
    and :563-568); the draft must write the positions it drafts, which the target's next verify
    pass overwrites before attending to them. The attribute is read again only when specs are
    collected, which has happened by now.
    """
    layers = get_layers_from_vllm_config(vllm_config, Attention, sorted(draft_layer_names))
    for layer in layers.values():
        layer.kv_sharing_target_layer_name = None
        if hasattr(layer.impl, "kv_sharing_target_layer_name"):  # cpu_attn.py:301 and GPU backends
            layer.impl.kv_sharing_target_layer_name = None


def is_custom_op(module: nn.Module) -> bool:
    """A vLLM CustomOp: its forward dispatches to forward_native or a platform kernel such as
    forward_cpu, chosen at construction from the compilation config (model_executor/custom_op.py:172)."""
    from vllm.model_executor.custom_op import CustomOp

    return isinstance(module, CustomOp)


def run_eagerly(model: nn.Module) -> int:
    """Make the torch.compile-decorated modules of ``model`` run eagerly in a compiled engine.

    The decorator reads ``do_not_compile`` on every call (compilation/decorators.py:402 set,
    :528 read) and calls ``forward`` directly when it is true. Returns how many modules it set.
    """
    modules = [m for m in model.modules() if hasattr(m, "do_not_compile")]
    for module in modules:
        module.do_not_compile = True
    return len(modules)


# ---------------------------------------------------------------- the draft's CPU fast path


def fused_cpu_ops_available() -> bool:
    """vLLM's compiled CPU kernels for RMSNorm and SiLU-and-mul (torch.ops._C, as _custom_ops.py:244 calls them)."""
    return all(hasattr(torch.ops._C, op) for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul"))


def cpu_rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """``out <- rmsnorm(x) * weight`` (vLLM's kernel, called as _custom_ops.py:244 does)."""
    torch.ops._C.rms_norm(out, x, weight, eps)


def cpu_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: ``residual <- x + residual``, ``x <- rmsnorm(residual) * weight`` (_custom_ops.py:337)."""
    torch.ops._C.fused_add_rms_norm(x, residual, weight, eps)


def cpu_silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    """``out <- silu(x[..., :d]) * x[..., d:]`` (the kernel SiluAndMul uses off x86, model_executor/layers/activation.py:138)."""
    torch.ops._C.silu_and_mul(out, x)


def plain_rms_norm_eps(module: nn.Module) -> float | None:
    """epsilon of a plain weighted ``RMSNorm`` over the whole hidden size, else None
    (RMSNorm.variance_epsilon / variance_size_override / has_weight, model_executor/layers/layernorm.py:57-62)."""
    from vllm.model_executor.layers.layernorm import RMSNorm

    if type(module) is RMSNorm and module.variance_size_override is None and module.has_weight:
        return module.variance_epsilon
    return None


def is_silu_and_mul(module: nn.Module) -> bool:
    """vLLM's SiluAndMul, which on x86 runs its native torch ops (model_executor/layers/activation.py:156)."""
    from vllm.model_executor.layers.activation import SiluAndMul

    return type(module) is SiluAndMul


def call_attention_directly(model: nn.Module) -> int:
    """Eager engines only: the model's attention layers call vLLM's attention functions directly.

    On CPU vLLM routes every attention through two opaque torch custom ops
    (CpuPlatform.opaque_attention_op, platforms/cpu.py:619), which only torch.compile needs; in
    eager mode the dispatcher round trip costs more than the attention kernel. The functions are
    the same (Attention.use_direct_call, model_executor/layers/attention/attention.py:440, :540).
    """
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.use_direct_call = True
    return len(layers)


def poison_kv_writes(model: nn.Module) -> int:
    """Test hook: every KV write of ``model`` stores large random values instead of its keys/values.

    Wraps each attention layer's ``impl.do_kv_cache_update`` (v1/attention/backends/cpu_attn.py:463),
    which both attention call paths use (model_executor/layers/attention/attention.py:737).
    """
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        write = layer.impl.do_kv_cache_update

        def poisoned(attn_layer, key, value, kv_cache, slot_mapping, write=write):
            write(attn_layer, torch.randn_like(key) * 100, torch.randn_like(value) * 100, kv_cache, slot_mapping)

        layer.impl.do_kv_cache_update = poisoned
    return len(layers)


# ---------------------------------------------------------------- layers: weights

_STASH = "specqd_mxfp4"  # our attribute on a vLLM linear layer: its MXFP4 copy, until the draft takes it


def linear_prefix(layer: nn.Module) -> str:
    """A linear layer's dotted name in its model, e.g. "specqd_inner2.model.layers.0.mlp.down_proj"
    (LinearBase.prefix, model_executor/layers/linear.py:285)."""
    return layer.prefix


def stash_mxfp4(layer: nn.Module, quantized) -> None:
    """Keep ``quantized`` (an MXFP4Tensor) on the layer, before vLLM may free its weight
    (UnquantizedLinearMethod.process_weights_after_loading, model_executor/layers/linear.py:206)."""
    setattr(layer, _STASH, quantized)


def has_mxfp4_stash(layer: nn.Module) -> bool:
    """Whether :func:`stash_mxfp4` ran on this layer (our attribute, no vLLM name)."""
    return hasattr(layer, _STASH)


def take_mxfp4_stash(layer: nn.Module, name: str):
    """The MXFP4 copy stashed on ``layer`` (removed from it; our attribute, no vLLM name)."""
    stash = getattr(layer, _STASH, None)
    if stash is None:
        raise RuntimeError(
            f"specqd: no MXFP4 copy of '{name}'. The target must be an unquantized dense "
            "model loaded with the specqd plugin active."
        )
    delattr(layer, _STASH)
    return stash


def switch_linear_to_mxfp4(layer: nn.Module, method) -> None:
    """Turn a loaded BF16 linear into an MXFP4 one run by ``method`` (an MXFP4LinearMethod).

    Swaps LinearBase.quant_method (linear.py:289, called by forward at :417), drops the BF16
    weight and the CPU GEMM closure vLLM's UnquantizedLinearMethod attached to it
    (``cpu_linear``, model_executor/layers/utils.py:476-603): both hold the full-precision bytes.
    """
    layer.quant_method = method
    layer.specqd_in_features = layer.input_size_per_partition  # linear.py:493
    del layer.weight
    layer.__dict__.pop("cpu_linear", None)


def cpu_gemm(layer: nn.Module):
    """The CPU GEMM closure dispatch_cpu_unquantized_gemm attached (utils.py:476-603), or None."""
    return getattr(layer, "cpu_linear", None)


def uses_torch_fallback_gemm(layer: nn.Module) -> bool:
    """True when dispatch_cpu_unquantized_gemm gave ``layer`` its last resort, the closure over
    torch.nn.functional.linear (utils.py:603), because oneDNN declined the weight (utils.py:596)."""
    code = getattr(cpu_gemm(layer), "__code__", None)
    return code is not None and code.co_names == ("torch", "nn", "functional", "linear")


def set_cpu_gemm(layer: nn.Module, gemm: Callable) -> None:
    """Replace the closure cpu_unquantized_gemm calls, ``gemm(x, weight, bias)`` (utils.py:617)."""
    layer.cpu_linear = gemm


def lm_head_tp_size(lm_head: nn.Module) -> int:
    """Vocab-parallel shards of an lm_head (VocabParallelEmbedding.tp_size, vocab_parallel_embedding.py:280;
    read by LogitsProcessor, model_executor/layers/logits_processor.py:193)."""
    return lm_head.tp_size
