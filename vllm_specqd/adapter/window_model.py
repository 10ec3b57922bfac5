"""One forward pass of a vLLM model over a ragged batch of token windows.

This is the vLLM side of :class:`vllm_specqd.multilevel.WindowModel`: the
multi-level algorithm hands it, per request, a window of tokens starting at
some position; it writes their KV into the model's own KV layers (through the
request's block table, as vLLM's drafter loop does) and returns each token's
greedy successor.

Example: requests A (row 0) and B (row 1) of the running batch, block size 16,
windows A: [t5, t6, t7] at position 5 and B: [u9] at position 9 make one
4-token forward pass with query_start_loc [0, 3, 4], seq_lens [8, 10] and
slot_mapping [bt[0,0]*16+5, +6, +7, bt[1,0]*16+9].
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn as nn
from vllm.config import CUDAGraphMode, VllmConfig
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.utils import PADDING_SLOT_ID
from vllm.v1.worker.utils import AttentionGroup


class VllmWindowModel:
    """A draft-level model plus the attention groups of its KV layers."""

    def __init__(self, name: str, model: nn.Module, vllm_config: VllmConfig, device: torch.device):
        self.name = name
        self.model = model
        self.vllm_config = vllm_config
        self.device = device
        self.layer_names: list[str] = []
        self.attn_groups: list[AttentionGroup] = []
        self.block_size = -1
        # Set per drafting round by bind_batch().
        self._row_of: dict[Hashable, int] = {}
        self._block_table: torch.Tensor | None = None  # [num_reqs, max_blocks]

    def bind_batch(self, row_of: dict[Hashable, int], block_table: torch.Tensor) -> None:
        self._row_of = row_of
        self._block_table = block_table

    def build_attn_metadata(self, cad: CommonAttentionMetadata) -> dict[str, object]:
        per_layer: dict[str, object] = {}
        for group in self.attn_groups:
            metadata = group.build_metadata_for_drafting(common_attn_metadata=cad, draft_index=0)
            for layer_name in group.layer_names:
                per_layer[layer_name] = metadata
        return per_layer

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int32
        positions: torch.Tensor,  # [num_tokens] int64
        cad: CommonAttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        with set_forward_context(
            self.build_attn_metadata(cad),
            self.vllm_config,
            num_tokens=input_ids.shape[0],
            cudagraph_runtime_mode=CUDAGraphMode.NONE,
            slot_mapping={name: cad.slot_mapping for name in self.layer_names},
        ):
            return self.model(input_ids=input_ids, positions=positions, inputs_embeds=None)

    @torch.inference_mode()
    def decode_step(
        self,
        token_ids: torch.Tensor,  # [B] int, one token per row of the bound batch
        positions: torch.Tensor,  # [B] int64, the position each token takes
        max_model_len: int,
    ) -> torch.Tensor:  # [B, hidden]
        """One token per request of the running batch (row i = batch row i), writing its KV.

        A position at or past ``max_model_len`` writes nowhere (padding slot, position 0, one-token
        context), as vLLM's drafter does: the scheduler drops such drafts anyway.
        Example: rows 0, 1 with tokens [7, 9] at positions [12, 40], block size 16: slots
        [bt[0, 0] * 16 + 12, bt[1, 2] * 16 + 8], seq_lens [13, 41].
        """
        assert self._block_table is not None, "bind_batch() first"
        batch = token_ids.shape[0]
        dev = self.device
        positions_cpu = positions.to("cpu", torch.int64)
        past_end = positions_cpu >= max_model_len
        clamped = positions_cpu.masked_fill(past_end, 0)
        seq_lens_cpu = (clamped + 1).to(torch.int32).masked_fill(past_end, 1)
        query_start_loc_cpu = torch.arange(batch + 1, dtype=torch.int32)
        block_table = self._block_table[:batch]
        clamped_dev = clamped.to(dev)
        block_ids = block_table[
            torch.arange(batch, device=block_table.device), (clamped_dev // self.block_size).to(block_table.device)
        ]
        slot_mapping = block_ids.to(torch.int64) * self.block_size + clamped_dev % self.block_size
        slot_mapping = slot_mapping.masked_fill(past_end.to(dev), PADDING_SLOT_ID)
        cad = CommonAttentionMetadata(
            query_start_loc=query_start_loc_cpu.to(dev),
            query_start_loc_cpu=query_start_loc_cpu,
            seq_lens=seq_lens_cpu.to(dev),
            num_reqs=batch,
            num_actual_tokens=batch,
            max_query_len=1,
            max_seq_len=int(seq_lens_cpu.max()),
            block_table_tensor=block_table,
            slot_mapping=slot_mapping,
            causal=True,
            seq_lens_cpu_upper_bound=seq_lens_cpu,
        )
        return self.forward(token_ids.to(dev, torch.int32), clamped_dev, cad)

    @torch.inference_mode()
    def greedy_next_tokens(
        self,
        req_ids: Sequence[Hashable],
        windows: Sequence[Sequence[int]],
        start_positions: Sequence[int],
    ) -> list[list[int]]:
        assert self._block_table is not None, "bind_batch() first"
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
        block_table = self._block_table[rows.to(self._block_table.device)]
        positions = positions_cpu.to(dev)
        token_rows = token_req.to(dev)
        block_ids = block_table[token_rows, positions // self.block_size]
        slot_mapping = block_ids.to(torch.int64) * self.block_size + positions % self.block_size
        cad = CommonAttentionMetadata(
            query_start_loc=query_start_loc_cpu.to(dev),
            query_start_loc_cpu=query_start_loc_cpu,
            seq_lens=seq_lens_cpu.to(dev),
            num_reqs=len(lens),
            num_actual_tokens=len(input_ids_cpu),
            max_query_len=max(lens),
            max_seq_len=int(seq_lens_cpu.max()),
            block_table_tensor=block_table,
            slot_mapping=slot_mapping,
            causal=True,
            seq_lens_cpu_upper_bound=seq_lens_cpu,
        )
        hidden = self.forward(input_ids_cpu.to(dev), positions, cad)
        choices = self.model.compute_logits(hidden).argmax(dim=-1).tolist()
        bounds = query_start_loc_cpu.tolist()
        return [choices[bounds[i] : bounds[i + 1]] for i in range(len(lens))]
