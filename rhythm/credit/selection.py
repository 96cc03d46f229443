"""Token selection of docs/definitions.md section 4 as boolean masks [B, T] that can be inspected and plotted.

All functions are batched over rows and vectorised over tokens (selections, shifts and scatters; the only
Python loop is over the k offsets of the look-back window). The response of a row is the one contiguous run
of True in ``response_mask`` (any left/right padding and prompt are False); a row with no True is an empty
response and selects nothing.

Counts follow docs/definitions.md section 4: count = ceil(q * n_eligible) in float64 (exactly Python's
``math.ceil(q * n)``), and
ties are broken by lower position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rhythm_kernels.segments import is_bool

from rhythm.config import check

INF = float("inf")


@dataclass
class RhythmSelection:
    """The preplan/anchor structure of each row (all [B, T] unless noted; False/0 off the response).

    preplan: bool, T_loc (top q of response tokens by delta).
    anchor: bool, T_glob (top q of fai_valid response tokens by FAI).
    dominated: bool, D (locally dominated anchors).
    intro: bool, I(D) = { intro(t) : t in D }.
    intro_of: long, for t in D the position intro(t), -1 elsewhere (to draw anchor <- intro arrows).
    delta: float32, |WAAD_t - WAAD_{t+1}| where defined, 0 elsewhere.
    delta_valid: bool, t and t + 1 both response tokens (every response token but the last).
    tau_waad: float32 [B], lower median of WAAD over the response (0 on empty rows).
    tau_delta: float32 [B], smallest delta in T_loc (+inf when T_loc is empty).
    preplan_count, anchor_count: long [B], |T_loc| = ceil(q (|R| - 1)), |T_glob| = ceil(q |fai_valid & R|).
    """

    preplan: torch.Tensor
    anchor: torch.Tensor
    dominated: torch.Tensor
    intro: torch.Tensor
    intro_of: torch.Tensor
    delta: torch.Tensor
    delta_valid: torch.Tensor
    tau_waad: torch.Tensor
    tau_delta: torch.Tensor
    preplan_count: torch.Tensor
    anchor_count: torch.Tensor


def selection_count(q: float, n: torch.Tensor) -> torch.Tensor:
    """ceil(q * n) per row, in float64 like Python's ``math.ceil(q * n)`` (long [B])."""
    # An IEEE double product of the same two doubles rounds identically on every device.
    return torch.ceil(n.to(torch.float64) * float(q)).to(torch.long)


def kth_smallest(values: torch.Tensor, eligible: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """The eligible value of 0-based ascending rank ``rank`` in each row (float [B]; meaningless where rank is
    outside [0, n_eligible), which callers mask). O(T) per row: one ``torch.kthvalue`` with one k for all.

    Each row is padded with T - 1 - rank copies of -inf (below every value) and +inf for the rest, and the
    ineligible positions become +inf: the element of overall rank T - 1 is then the eligible one of rank
    ``rank``, so a single k serves every row.
    """
    batch, length = values.shape
    if length == 0:                      # no position at all (T = 0): nothing is eligible
        return torch.full((batch,), INF, dtype=values.dtype, device=values.device)
    rank = rank.clamp(0, length - 1)
    pad_index = torch.arange(length - 1, device=values.device)
    pad = torch.where(pad_index[None, :] < (length - 1 - rank)[:, None], -INF, INF).to(values.dtype)
    extended = torch.cat([torch.where(eligible, values, INF), pad], dim=1)
    return torch.kthvalue(extended, length, dim=1).values


def top_q_mask(scores: torch.Tensor, eligible: torch.Tensor, q: float, *, validate: bool = True):
    """Top ceil(q * |eligible|) eligible positions of each row by score, ties to the lower position.

    Args:
        scores: float [B, T] (finite on eligible positions). eligible: bool [B, T]. q in (0, 1].
        validate: check that the eligible scores are finite (one host sync); False when the caller did.
    Returns:
        (mask bool [B, T], threshold [B] = smallest selected score or +inf if none (in the compute dtype:
        float32, or float64 for float64 scores), count long [B]).
    """
    check_signals(response_mask=eligible, scores=scores, mask_name="eligible")
    q, validate = check("q", q), _check_validate(validate)
    if validate and eligible.shape[1] and bool((eligible & ~torch.isfinite(scores)).any()):
        raise ValueError("scores holds NaN or Inf on eligible positions")
    return _top_q(scores, eligible, q)


def _top_q(scores, eligible, q):
    scores = _as_float(scores)
    n = eligible.sum(1)
    count = selection_count(q, n)
    # threshold = the count-th largest eligible score = ascending rank n - count (a selection, not a sort).
    threshold = torch.where(count > 0, kth_smallest(scores, eligible, n - count), INF)
    above = eligible & (scores > threshold[:, None])
    # Scores equal to the threshold fill the remaining places in position order (lower position first).
    tied = eligible & (scores == threshold[:, None])
    remaining = count - above.sum(1)
    mask = above | (tied & (tied.cumsum(1) <= remaining[:, None]))
    return mask, threshold, count


def rhythm_selection(waad: torch.Tensor, fai: torch.Tensor, response_mask: torch.Tensor,
                     fai_valid: torch.Tensor | None = None, *, q: float = 0.4, k: int = 3,
                     validate: bool = True) -> RhythmSelection:
    """Preplan tokens, anchors, locally dominated anchors and their intro tokens (docs/definitions.md section 4).

    Args:
        waad, fai: float [B, T] per-token signals (``token_signals``). response_mask: bool [B, T], one
            contiguous run per row. fai_valid: bool [B, T] or None (= all valid). q in (0, 1]. k >= 1.
        validate: check the response runs and the signals' finiteness (one host sync); False when the
            caller already did (``rhythm.credit.gamma.compute_gamma``).
    """
    check_signals(waad=waad, fai=fai, response_mask=response_mask, fai_valid=fai_valid)
    q, k, validate = check("q", q), check("k", k), _check_validate(validate)
    if validate:
        check_contents(response_mask, fai_valid, waad=waad, fai=fai)
    return _rhythm_selection(waad, fai, response_mask, fai_valid, q, k)


def entropy_selection(entropy: torch.Tensor, response_mask: torch.Tensor, *, q: float = 0.4) -> torch.Tensor:
    """Top ceil(q * |R|) response tokens per row by the rollout's per-token entropy (bool [B, T])."""
    check_signals(entropy=entropy, response_mask=response_mask)
    q = check("q", q)
    check_contents(response_mask, entropy=entropy)
    return _top_q(entropy, response_mask, q)[0]


def _check_validate(validate) -> bool:
    if not is_bool(validate):
        raise TypeError(f"validate must be a bool (True or False), got {validate!r}")
    return bool(validate)


# ---- implementations (inputs already checked) ------------------------------------------------------------

def response_delta(waad: torch.Tensor, response_mask: torch.Tensor):
    """Delta_t = |WAAD_t - WAAD_{t+1}|, defined where t and t+1 are both response tokens (every response
    token but the last). Returns (delta [B, T] in the compute dtype, 0 where undefined; delta_valid bool)."""
    waad = _as_float(waad)
    delta_valid = torch.zeros_like(response_mask)
    delta_valid[:, :-1] = response_mask[:, :-1] & response_mask[:, 1:]
    delta = torch.zeros_like(waad)
    delta[:, :-1] = (waad[:, :-1] - waad[:, 1:]).abs()
    return torch.where(delta_valid, delta, 0.0), delta_valid


def _rhythm_selection(waad, fai, response_mask, fai_valid, q, k) -> RhythmSelection:
    waad = _as_float(waad)
    batch, length = response_mask.shape
    device = response_mask.device
    delta, delta_valid = response_delta(waad, response_mask)

    # T_loc: top q by Delta over the |R| - 1 tokens where it is defined; tau_delta = its smallest Delta.
    preplan, tau_delta, preplan_count = _top_q(delta, delta_valid, q)
    # T_glob: top q by FAI over the fai_valid response tokens.
    eligible = response_mask if fai_valid is None else response_mask & fai_valid
    anchor, _, anchor_count = _top_q(fai, eligible, q)

    # tau_waad: lower median of WAAD over the response (torch.median's choice: sorted index (n-1)//2).
    n_resp = response_mask.sum(1)
    tau_waad = torch.where(n_resp > 0, kth_smallest(waad, response_mask, (n_resp - 1) // 2), 0.0)

    # Look-back window [t-k, t-1] within R: for t in R those positions are response tokens exactly where
    # delta_valid holds. Scan offsets j = 1..k (latest position first); a strict '>' keeps the latest
    # position on ties (intro(t) = argmax, latest on ties). No response token in the window -> -inf.
    masked_delta = torch.where(delta_valid, delta, -INF)
    best = torch.full_like(masked_delta, -INF)
    best_pos = torch.full((batch, length), -1, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device).expand(batch, length)
    for j in range(1, min(k, length - 1) + 1):
        shifted = torch.full_like(masked_delta, -INF)
        shifted[:, j:] = masked_delta[:, :-j]
        better = shifted > best
        best = torch.where(better, shifted, best)
        best_pos = torch.where(better, positions - j, best_pos)

    # D = { t in T_glob : WAAD_t <= tau_waad and max window Delta >= tau_delta }.
    dominated = anchor & (waad <= tau_waad[:, None]) & (best >= tau_delta[:, None])
    intro_of = torch.where(dominated, best_pos, -1)
    # I(D): mark every intro position (an integer scatter-add is deterministic, duplicates allowed).
    hits = torch.zeros((batch, length), dtype=torch.int32, device=device)
    hits.scatter_add_(1, intro_of.clamp(min=0), dominated.to(torch.int32))
    intro = hits > 0
    return RhythmSelection(preplan=preplan, anchor=anchor, dominated=dominated, intro=intro,
                           intro_of=intro_of, delta=delta.float(), delta_valid=delta_valid,
                           tau_waad=tau_waad.float(), tau_delta=tau_delta.float(), preplan_count=preplan_count,
                           anchor_count=anchor_count)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Compute in at least float32 (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ---- argument checks shared with rhythm.credit.gamma ---------------------------------------------------------------

def check_signals(*, response_mask, mask_name: str = "response_mask", **signals) -> None:
    """response_mask bool [B, T]; every signal given (not None) a float tensor [B, T] ('fai_valid' bool).
    ``mask_name`` names the mask in errors (e.g. "eligible")."""
    if not isinstance(response_mask, torch.Tensor):
        raise TypeError(f"{mask_name} must be a bool tensor [B, T], got {type(response_mask).__name__}")
    if response_mask.dtype != torch.bool:
        raise TypeError(f"{mask_name} must be a bool tensor [B, T], got dtype {response_mask.dtype} "
                        "(convert with .bool())")
    if response_mask.dim() != 2:
        raise ValueError(f"{mask_name} must have rank 2 [B, T], got shape {list(response_mask.shape)}")
    shape = list(response_mask.shape)
    for name, x in signals.items():
        if x is None:
            continue
        want_bool = name == "fai_valid"
        kind = "bool" if want_bool else "float"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a {kind} tensor [B, T], got {type(x).__name__}")
        if want_bool and x.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor [B, T], got dtype {x.dtype}")
        if not want_bool and not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor [B, T], got dtype {x.dtype}")
        if list(x.shape) != shape:
            raise ValueError(f"{name} must have the shape of {mask_name} {shape}, got {list(x.shape)}")
        if x.device != response_mask.device:
            raise ValueError(f"{name} must be on the device of {mask_name} ({response_mask.device}), "
                             f"got {x.device}")


def check_contents(response_mask, fai_valid=None, **signals) -> None:
    """One host synchronisation: the response is one contiguous run per row and signals are finite on it
    (fai only where fai_valid holds: an invalid FAI is never read, whatever it holds)."""
    if response_mask.shape[1] == 0:      # T = 0: nothing to check
        return
    starts = response_mask[:, 1:] & ~response_mask[:, :-1]
    runs = starts.sum(1) + response_mask[:, 0].long()
    flags = [(runs > 1).any()]
    names = [name for name, x in signals.items() if x is not None]
    read = {name: response_mask & fai_valid if name == "fai" and fai_valid is not None else response_mask
            for name in names}
    flags += [(read[name] & ~torch.isfinite(signals[name])).any() for name in names]
    bad = torch.stack(flags).tolist()
    if bad[0]:
        raise ValueError("response_mask must hold one contiguous run of True per row (the response); "
                         "got a row with several runs")
    for name, is_bad in zip(names, bad[1:]):
        if is_bad:
            where = "fai_valid response positions" if name == "fai" and fai_valid is not None else "response positions"
            raise ValueError(f"{name} holds NaN or Inf on {where}")
