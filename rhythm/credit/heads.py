"""Layer sampling, head groups and per-token signals (docs/definitions.md section 3).

Heads of all sampled layers are flattened into one axis of ``n_heads = len(layers) * heads_per_layer``
entries in (layer, head) order: flat index ``i`` is head ``i % heads_per_layer`` of the
``i // heads_per_layer``-th sampled layer. Sorting by flat index therefore equals sorting by (layer, head),
which is the tie-break of docs/definitions.md section 3.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from rhythm_kernels.segments import is_bool, is_integer


def sample_layers(num_layers: int, attention_layers=None) -> list[int]:
    """Five evenly spaced softmax-attention layers of the middle third (0-based, deduplicated, sorted).

    lo = floor(L/3), hi = floor(2L/3); the candidates c_0 < ... < c_{n-1} are the attention layers in
    [lo, hi] (every layer there unless ``attention_layers`` names a hybrid's softmax-attention layers);
    layer_i = c_{(i * (n - 1)) // 4} for i = 0..4. With every layer a candidate, c_j = lo + j and this is
    lo + (i * (hi - lo)) // 4. L = 36 -> [12, 15, 18, 21, 24]; L = 30 -> [10, 12, 15, 17, 20]; L = 3 -> [1, 2];
    L = 48 with attention on every fourth layer (3, 7, ..., 47) -> [19, 23, 27, 31].

    attention_layers: iterable of layer indices in [0, L), or None (every layer is softmax attention).
    Raises ValueError when no attention layer lies in the middle third (pass the layers explicitly).
    """
    if not is_integer(num_layers) or num_layers < 3:
        raise ValueError(f"num_layers must be an int >= 3, got {num_layers!r}")
    num_layers = int(num_layers)
    lo, hi = num_layers // 3, (2 * num_layers) // 3
    if attention_layers is None:
        candidates = list(range(lo, hi + 1))
    else:
        attention_layers = sorted({int(x) for x in attention_layers})
        if attention_layers and (attention_layers[0] < 0 or attention_layers[-1] >= num_layers):
            raise ValueError(f"attention_layers must lie in [0, {num_layers}), got {attention_layers}")
        candidates = [x for x in attention_layers if lo <= x <= hi]
        if not candidates:
            raise ValueError(f"no softmax-attention layer lies in the middle third [{lo}, {hi}] of the "
                             f"{num_layers} layers (attention layers: {attention_layers}); pass layers=... "
                             "explicitly")
    n = len(candidates)
    return sorted({candidates[(i * (n - 1)) // 4] for i in range(5)})


def mean_response_distance(distance: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """d(l, h) = mean over response rows t in R of distance[t].

    Args:
        distance: float [B, n_heads, T] (heads of all sampled layers, flattened in (layer, head) order).
        response_mask: bool [B, T].
    Returns:
        d: float32 [B, n_heads]; 0 on rows whose response is empty (the caller flags those rows).
    """
    if not isinstance(distance, torch.Tensor) or distance.dim() != 3 or not distance.is_floating_point():
        raise ValueError("distance must be a float tensor [B, n_heads, T], got "
                         f"{_describe(distance)}")
    _check_mask("response_mask", response_mask, (distance.shape[0], distance.shape[2]), distance.device)
    mask = response_mask[:, None, :]
    total = torch.where(mask, distance.float(), 0.0).sum(-1)               # [B, n_heads]
    count = response_mask.sum(-1, keepdim=True).clamp(min=1)              # [B, 1]; empty rows -> 0 / 1 = 0
    return total / count


@dataclass
class HeadGroups:
    """Per-row head groups, as indices into the flattened n_heads axis.

    local: long [B, n_sel] (H_loc, sorted by (d, index)); global_: long [B, n_sel] (H_glob, sorted by
    (-d, index)). B may be 1 for a fixed grouping: ``token_signals`` broadcasts it over the batch.
    """

    local: torch.Tensor
    global_: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.local.shape[0]

    def broadcast(self, batch: int) -> "HeadGroups":
        """Expand a fixed grouping (batch dimension 1) to ``batch`` rows (a view, no copy)."""
        if self.batch_size not in (1, batch):
            raise ValueError(f"batch must equal the groups' batch size {self.batch_size} or the groups must "
                             f"have batch size 1, got batch={batch}")
        return HeadGroups(self.local.expand(batch, -1), self.global_.expand(batch, -1))

    def layer_head(self, heads_per_layer: int, layers: list[int] | None = None):
        """((local_layer, local_head), (global_layer, global_head)), each long [B, n_sel].

        The layer is the model's layer index when ``layers`` (the sampled layers) is given, else the slot
        0..len(layers)-1 of the sampled layer.
        """
        return (head_to_layer(self.local, heads_per_layer, layers),
                head_to_layer(self.global_, heads_per_layer, layers))


def head_to_layer(index, heads_per_layer: int, layers: list[int] | None = None):
    """Flat head index -> (layer, head). Works on ints and on long tensors.

    layer = layers[index // heads_per_layer] if ``layers`` is given, else the slot index // heads_per_layer.
    """
    if not is_integer(heads_per_layer) or heads_per_layer < 1:
        raise ValueError(f"heads_per_layer must be an int >= 1, got {heads_per_layer!r}")
    if isinstance(index, torch.Tensor):
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(f"index must be an int or an integer tensor of flat head indices, got {_describe(index)}")
    elif not is_integer(index):
        raise ValueError(f"index must be an int or an integer tensor of flat head indices, got {index!r}")
    slot, head = index // heads_per_layer, index % heads_per_layer
    if layers is None:
        return slot, head
    if isinstance(slot, torch.Tensor):
        return torch.as_tensor(layers, dtype=torch.long, device=slot.device)[slot], head
    return layers[slot], head


def group_size(n_heads: int, fraction: float = 0.3) -> int:
    """ceil(fraction * n_heads) as Python float64 math (ceil(0.3 * 50) = 15; float32 would give 16)."""
    _check_fraction(fraction)
    return math.ceil(fraction * n_heads)


def select_head_groups(d: torch.Tensor, fraction: float = 0.3) -> HeadGroups:
    """Per-row H_loc (the ceil(fraction * n) smallest d) and H_glob (the ceil(fraction * n) largest d).

    Args:
        d: float [B, n_heads] mean response distance per head (``mean_response_distance``).
        fraction: group size as a fraction of n_heads, in (0, 1].
    Returns:
        HeadGroups with local/global_ long [B, ceil(fraction * n_heads)].
    """
    if not isinstance(d, torch.Tensor) or d.dim() != 2 or not d.is_floating_point():
        raise ValueError(f"d must be a float tensor [B, n_heads], got {_describe(d)}")
    if d.shape[1] == 0:
        raise ValueError("d must hold at least one head (n_heads >= 1)")
    n_sel = group_size(d.shape[1], fraction)
    if d.numel() and not bool(torch.isfinite(d).all()):   # NaN would sort anywhere
        raise ValueError("d holds NaN or Inf (mean response distances are finite)")
    # H_loc: sort by (d, index) -- a stable ascending sort keeps index order among equal d.
    local = torch.sort(d, dim=1, stable=True).indices[:, :n_sel]
    # H_glob: sort by (-d, index) -- a stable ascending sort of -d.
    global_ = torch.sort(-d, dim=1, stable=True).indices[:, :n_sel]
    return HeadGroups(local=local, global_=global_)


def fixed_head_groups(d: torch.Tensor, has_response: torch.Tensor | None = None,
                      fraction: float = 0.3) -> HeadGroups:
    """One grouping computed once and reused (docs/definitions.md section 3): select on d averaged over rows.

    Args:
        d: float [B, n_heads] (``mean_response_distance`` of a calibration batch).
        has_response: bool [B], rows to average over (rows with an empty response have d = 0 and should
            be left out); None = all rows.
    Returns:
        HeadGroups with batch dimension 1 (``token_signals`` broadcasts it; ``.broadcast(B)`` expands it).
    """
    if not isinstance(d, torch.Tensor) or d.dim() != 2 or not d.is_floating_point():
        raise ValueError(f"d must be a float tensor [B, n_heads], got {_describe(d)}")
    if has_response is not None:
        _check_mask("has_response", has_response, (d.shape[0],), d.device)
        if not bool(has_response.any()):
            raise ValueError("has_response must mark at least one row (every row's response is empty)")
        d = d[has_response]
    return select_head_groups(d.double().mean(0, keepdim=True), fraction)


def token_signals(waad: torch.Tensor, fai: torch.Tensor, groups: HeadGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token WAAD_t = mean over H_loc of waad[t]; FAI_s = mean over H_glob of fai[s].

    Args:
        waad, fai: float [B, n_heads, T] per-head metrics (flattened (layer, head) order).
        groups: HeadGroups with batch B or 1.
    Returns:
        (waad_tok, fai_tok): float32 [B, T] each.
    """
    for name, x in (("waad", waad), ("fai", fai)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [B, n_heads, T], got {_describe(x)}")
    if waad.shape != fai.shape:
        raise ValueError(f"waad and fai must have one shape [B, n_heads, T], got {tuple(waad.shape)} and "
                         f"{tuple(fai.shape)}")
    batch, n_heads, length = waad.shape
    if not isinstance(groups, HeadGroups):
        raise TypeError(f"groups must be a rhythm.HeadGroups, got {type(groups).__name__}")
    groups = groups.broadcast(batch)
    for name, idx in (("groups.local", groups.local), ("groups.global_", groups.global_)):
        if idx.dim() != 2 or idx.dtype != torch.long or idx.numel() == 0:
            raise ValueError(f"{name} must be a non-empty long tensor [B, n_sel], got {_describe(idx)}")
        if idx.device != waad.device:
            raise ValueError(f"{name} must be on the device of waad ({waad.device}), got {idx.device}")
    low, high = torch.stack([torch.minimum(groups.local.min(), groups.global_.min()),
                             torch.maximum(groups.local.max(), groups.global_.max())]).tolist()
    if low < 0 or high >= n_heads:
        raise ValueError(f"groups hold head index {low if low < 0 else high}, outside [0, n_heads = {n_heads})")

    def group_mean(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        index = idx[:, :, None].expand(batch, idx.shape[1], length)
        return x.float().gather(1, index).mean(1)

    return group_mean(waad, groups.local), group_mean(fai, groups.global_)


def _check_fraction(fraction) -> None:
    if is_bool(fraction) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")


def _check_mask(name: str, mask, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor of shape {list(shape)}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on device {device}, got {mask.device}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
