"""One forward pass of a vLLM model over a ragged batch of token windows.

This is the vLLM side of :class:`vllm_specqd.multilevel.WindowModel`: the
multi-level algorithm hands it, per request, a window of tokens starting at
some position; it writes their KV into the model's own KV layers (through the
request's block table, as vLLM's drafter loop does) and returns each token's
greedy successor.

Example: requests A (row 0) and B (row 1) of the running batch, block size 16,
windows A: [t5, t6, t7] at position 5 and B: [u9] at position 9 make one
4-token forward pass with query_start_loc [0, 3, 4], seq_lens [8, 10] and
slot_mapping [bt[0,0]*16+5, +6, +7, bt[1,0]*16+9], in each KV cache group's block table bt
(a target with sliding-window and full-attention layers has one group per kind).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn as nn
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

from vllm_specqd.adapter.vllm_internals import AttentionBinding


class VllmWindowModel:
    """A draft-level model plus, per KV cache group its layers use, their attention groups.

    A target with sliding-window and full-attention layers has several KV cache groups, each with
    its own block table; a shared-KV draft layer uses its target layer's group, a small model's
    layers the group(s) vLLM gave them (the target's, or their own where their attention kind or
    page layout differs). Every pass computes one slot mapping and one attention metadata per group.
    """

    def __init__(self, name: str, model: nn.Module, vllm_config: VllmConfig, device: torch.device):
        self.name = name
        self.model = model
        self.vllm_config = vllm_config
        self.device = device
        self.layer_names: list[str] = []
        self.kv_groups: list[AttentionBinding] = []
        # Set per drafting round by bind_batch().
        self._row_of: dict[Hashable, int] = {}
        self._block_tables: dict[int, torch.Tensor] = {}  # KV cache group id -> [num_reqs, max_blocks]

    def bind_batch(self, row_of: dict[Hashable, int], block_tables: dict[int, torch.Tensor]) -> None:
        self._row_of = row_of
        self._block_tables = block_tables

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int32
        positions: torch.Tensor,  # [num_tokens] int64
        cads: dict[int, CommonAttentionMetadata],  # KV cache group id -> its block table and slots
    ) -> torch.Tensor:  # [num_tokens, hidden]
        per_layer: dict[str, object] = {}
        slot_mapping: dict[str, torch.Tensor] = {}
        for kv_group in self.kv_groups:
            cad = cads[kv_group.kv_cache_gid]
            for group in kv_group.groups:
                metadata = group.build_metadata_for_drafting(common_attn_metadata=cad, draft_index=0)
                for layer_name in group.layer_names:
                    per_layer[layer_name] = metadata
                    slot_mapping[layer_name] = cad.slot_mapping
        with set_forward_context(
            per_layer,
            self.vllm_config,
            num_tokens=input_ids.shape[0],
            cudagraph_runtime_mode=CUDAGraphMode.NONE,
            slot_mapping=slot_mapping,
        ):
            return self.model(input_ids=input_ids, positions=positions, inputs_embeds=None)

    def _cads(
        self,
        rows: torch.Tensor,  # [num_tokens] batch row of each token
        positions: torch.Tensor,  # [num_tokens] int64, on the device
        writes_nowhere: torch.Tensor | None,  # [num_tokens] bool: padding slot
        num_reqs: int,
        query_start_loc_cpu: torch.Tensor,  # [num_reqs + 1] int32
        seq_lens_cpu: torch.Tensor,  # [num_reqs] int32
        req_rows: torch.Tensor,  # [num_reqs] batch row of each request
    ) -> dict[int, CommonAttentionMetadata]:
        """Per KV cache group: the requests' block tables and each token's slot in them."""
        assert self._block_tables, "bind_batch() first"
        dev = self.device
        query_start_loc, seq_lens = query_start_loc_cpu.to(dev), seq_lens_cpu.to(dev)
        cads = {}
        for kv_group in self.kv_groups:
            table = self._block_tables[kv_group.kv_cache_gid]
            block_table = table[req_rows.to(table.device)]
            size = kv_group.block_size
            block_ids = table[rows.to(table.device), (positions // size).to(table.device)]
            slot_mapping = block_ids.to(dev, torch.int64) * size + positions % size
            if writes_nowhere is not None:
                slot_mapping = slot_mapping.masked_fill(writes_nowhere, PADDING_SLOT_ID)
            cads[kv_group.kv_cache_gid] = CommonAttentionMetadata(
                query_start_loc=query_start_loc,
                query_start_loc_cpu=query_start_loc_cpu,
                seq_lens=seq_lens,
                num_reqs=num_reqs,
                num_actual_tokens=positions.shape[0],
                max_query_len=int((query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).max()),
                max_seq_len=int(seq_lens_cpu.max()),
                block_table_tensor=block_table,
                slot_mapping=slot_mapping,
                causal=True,
                seq_lens_cpu_upper_bound=seq_lens_cpu,
            )
        return cads

    @torch.inference_mode()
    def decode_step(
        self,
        token_ids: torch.Tensor,  # [B] int, one token per row of the bound batch
        positions: torch.Tensor,  # [B] int64, the position each token takes
        max_model_len: int,
        rows: torch.Tensor | None = None,  # [B] int64 batch row of each token (default 0..B-1)
    ) -> torch.Tensor:  # [B, hidden]
        """One token per request of the running batch (token i = batch row ``rows[i]``), writing its KV.

        A position at or past ``max_model_len`` writes nowhere (padding slot, position 0, one-token
        context), as vLLM's drafter does: the scheduler drops such drafts anyway.
        Example: rows 0, 1 with tokens [7, 9] at positions [12, 40], block size 16: slots
        [bt[0, 0] * 16 + 12, bt[1, 2] * 16 + 8], seq_lens [13, 41] (in each KV cache group's
        block table bt). With rows [1] and token [9] at position [40], only row 1's slot is written.
        """
        batch = token_ids.shape[0]
        dev = self.device
        positions_cpu = positions.to("cpu", torch.int64)
        past_end = positions_cpu >= max_model_len
        clamped = positions_cpu.masked_fill(past_end, 0)
        seq_lens_cpu = (clamped + 1).to(torch.int32).masked_fill(past_end, 1)
        rows = torch.arange(batch) if rows is None else rows.to("cpu", torch.int64)
        assert rows.shape == (batch,), (rows.shape, batch)
        clamped_dev = clamped.to(dev)
        cads = self._cads(
            rows,
            clamped_dev,
            past_end.to(dev),
            batch,
            torch.arange(batch + 1, dtype=torch.int32),
            seq_lens_cpu,
            rows,
        )
        return self.forward(token_ids.to(dev, torch.int32), clamped_dev, cads)

    @torch.inference_mode()
    def greedy_next_tokens(
        self,
        req_ids: Sequence[Hashable],
        windows: Sequence[Sequence[int]],
        start_positions: Sequence[int],
        needed_from: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """One pass over the windows (their KV written); the lm_head runs only on the rows whose
        choices are read (from ``needed_from[i]`` on in window i), the others get -1.

        Example: windows [p1 p2 c g1] and [c' g'] with needed_from [2, 0]: one 6-row pass, logits
        for 4 rows (c, g1, c', g'); choices [[-1, -1, x, y], [u, v]].
        """
        assert len(req_ids) == len(windows) == len(start_positions)
        lens = [len(w) for w in windows]
        assert min(lens) >= 1, lens
        rows = torch.tensor([self._row_of[r] for r in req_ids], dtype=torch.long)
        cpu_lens = torch.tensor(lens, dtype=torch.int32)
        query_start_loc_cpu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        torch.cumsum(cpu_lens, 0, out=query_start_loc_cpu[1:])
        starts = torch.tensor(start_positions, dtype=torch.int64)
        seq_lens_cpu = (starts + cpu_lens).to(torch.int32)
        token_req = torch.repeat_interleave(torch.arange(len(lens)), cpu_lens.long())
        positions_cpu = starts[token_req] + (
            torch.arange(int(query_start_loc_cpu[-1])) - query_start_loc_cpu[:-1].long()[token_req]
        )
        input_ids_cpu = torch.tensor([t for w in windows for t in w], dtype=torch.int32)
        dev = self.device
        positions = positions_cpu.to(dev)
        cads = self._cads(rows[token_req], positions, None, len(lens), query_start_loc_cpu, seq_lens_cpu, rows)
        hidden = self.forward(input_ids_cpu.to(dev), positions, cads)
        bounds = query_start_loc_cpu.tolist()
        skip = [0] * len(lens) if needed_from is None else [int(n) for n in needed_from]
        assert all(0 <= n < length for n, length in zip(skip, lens)), (skip, lens)
        if any(skip):
            rows = torch.cat([torch.arange(bounds[i] + skip[i], bounds[i + 1]) for i in range(len(lens))])
            hidden = hidden[rows.to(hidden.device)]
        choices = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
        out, at = [], 0
        for n, length in zip(skip, lens):
            out.append([-1] * n + choices[at : at + length - n])
            at += length - n
        return out
