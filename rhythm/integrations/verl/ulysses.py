"""Ulysses sequence parallelism in verl: the exchange the capture does around attention, with verl's helpers.

verl (``ulysses_sequence_parallel_size > 1``, FSDP engine, remove-padding) pads the packed micro-batch [1, N]
to a multiple of sp (``ulysses_pad_and_slice_inputs``: the pad is one more packed segment, position ids
0, 1, ...) and gives rank r the positions [r T/sp, (r + 1) T/sp). Its patched flash-attention forward
(``verl.models.transformers.monkey_patch._ulysses_flash_attention_forward``) repeats the KV heads sp // Hkv
times when sp > Hkv, all-to-alls q, k, v to all T positions and Hq/sp heads (``gather_seq_scatter_heads``),
all-gathers the position ids, and all-to-alls the output back (``gather_heads_scatter_seq``). The capture
replaces the attention function on every layer, so :class:`VerlUlysses` does that same exchange with the
same verl functions, on the same process group; the only traffic it adds is the all-gather of the sampled
layers' per-head maps (``gather_heads``: 5 maps of [B, Hq/sp, T] per sampled layer).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from rhythm.capture.recording import SequenceParallel

__all__ = ["VerlUlysses", "padded_length"]


def padded_length(length: int, sp: int) -> int:
    """T of the packed row after verl's ``ulysses_pad``: N rounded up to a multiple of sp."""
    return length + (sp - length % sp) % sp


class VerlUlysses(SequenceParallel):
    """verl's Ulysses exchange on ``group`` (default: verl's current sequence-parallel group)."""

    def __init__(self, group=None):
        from verl.utils.ulysses import get_ulysses_sequence_parallel_group

        self.group = get_ulysses_sequence_parallel_group() if group is None else group
        if self.group is None:
            raise ValueError("VerlUlysses needs verl's sequence-parallel group (set_ulysses_sequence_parallel_group)")
        self.size = dist.get_world_size(self.group)

    def gather(self, query, key, value):
        from verl.models.transformers.monkey_patch import repeat_kv
        from verl.utils.ulysses import gather_seq_scatter_heads

        q, k, v = (x.transpose(1, 2) for x in (query, key, value))        # verl's layout [B, T/sp, H, D]
        repeats = max(self.size // k.size(2), 1)                           # verl's rule when sp > Hkv
        k, v = repeat_kv(k, repeats), repeat_kv(v, repeats)
        q, k, v = (gather_seq_scatter_heads(x, seq_dim=1, head_dim=2, group=self.group) for x in (q, k, v))
        return tuple(x.transpose(1, 2) for x in (q, k, v))                 # [B, H/sp, T, D]

    def scatter(self, out):
        from verl.utils.ulysses import gather_heads_scatter_seq

        return gather_heads_scatter_seq(out, seq_dim=1, head_dim=2, group=self.group)

    def gather_heads(self, x):
        """[B, Hq/sp, T] -> [B, Hq, T]: rank r holds heads [r Hq/sp, (r + 1) Hq/sp) (verl's head split)."""
        from verl.utils.ulysses import all_gather_tensor

        dtype = x.dtype
        local = x.to(torch.uint8) if dtype == torch.bool else x
        full = all_gather_tensor(local.transpose(0, 1).contiguous(), group=self.group)   # [Hq, B, T]
        return full.transpose(0, 1).to(dtype)

    def gather_positions(self, position_ids):
        parts = [torch.empty_like(position_ids) for _ in range(self.size)]
        dist.all_gather(parts, position_ids.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
