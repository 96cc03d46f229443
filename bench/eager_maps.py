"""The baseline every benchmark compares against: the eager-maps pipeline users write today."""
from __future__ import annotations


def eager_maps(q, k, *, scale: float, window: int, horizon: tuple[int, int], response_start: int = 0):
    """Materialise A = softmax(QK^T) in fp32 ([B, Hq, T, T]), then read distance, WAAD and FAI off it.

    q [B, Hq, T, D], k [B, Hkv, T, D] (repeated for GQA, as such code does). Returns distance, waad
    ([B, Hq, T]) and fai ([B, Hq, T], mean over the response rows t >= response_start of the horizon band).
    """
    import torch

    group = q.shape[1] // k.shape[1]
    length = q.shape[2]
    scores = torch.matmul(q.float(), k.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    pos = torch.arange(length, device=q.device)
    lag = pos[:, None] - pos[None, :]
    scores.masked_fill_(lag < 0, float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    del scores
    lagf = lag.clamp_min(0).float()
    distance = (attn * lagf).sum(-1)
    waad = (attn * lagf.clamp_max(window)).sum(-1)
    band = (lag >= horizon[0]) & (lag <= horizon[1]) & (pos[:, None] >= response_start)
    fai = (attn * band).sum(-2) / band.sum(0).clamp_min(1)
    return distance, waad, fai
