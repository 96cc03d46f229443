"""Credit multipliers gamma [B, T] (docs/definitions.md sections 4 and 8) and shaped advantages.

``credit_multipliers`` is the public name of the one gamma path, :func:`rhythm.credit.gamma.compute_gamma`
(the strategy table, the random baseline's seeding rule, the chunking); ``shape_advantages`` applies gamma.
"""
from __future__ import annotations

import torch

from rhythm.config import check, default
from rhythm.credit.gamma import compute_gamma


def credit_multipliers(waad, fai, response_mask, *, strategy: str = default("strategy"), fai_valid=None,
                       entropy=None, q: float = default("q"), gamma_amp: float = default("gamma_amp"),
                       alpha: float = default("alpha"), k: int = default("k"), seed: int = default("seed"),
                       row_ids=None, sequence_start=None) -> torch.Tensor:
    """Per-token credit multipliers gamma (docs/definitions.md section 4): ``compute_gamma`` with the
    signals first.

    Args:
        waad, fai: float [B, T] per-token signals after head grouping (``token_signals``); a strategy that
            does not read one of them accepts None for it (random and entropy read neither).
        response_mask: bool [B, T], True on response tokens (one contiguous run per row; empty rows allowed).
        strategy: "local" | "global" | "coupled" | "random" | "entropy".
        fai_valid: bool [B, T] or None (= every position valid); anchors are chosen among valid tokens only.
        entropy: float [B, T], per-token entropy of the sampling distribution (required for "entropy").
        q: selected fraction in (0, 1]. gamma_amp: amplification >= 1. alpha: intro share in [0, 1].
        k: look-back window of dominated anchors (>= 1). seed: base seed of the "random" strategy.
        row_ids, sequence_start: the "random" strategy's row identities (default 0..B-1) and each row's first
            real column (default 0): row b draws from the seed sha256(seed, row_ids[b]) (``row_seed``).
    Returns:
        gamma: float32 [B, T], 1 off the response; in [1, 1 + (1 + alpha)(gamma_amp - 1)].
    """
    return compute_gamma(strategy, response_mask, waad=waad, fai=fai, fai_valid=fai_valid, entropy=entropy,
                         row_ids=row_ids, sequence_start=sequence_start, q=q, gamma_amp=gamma_amp, alpha=alpha,
                         k=k, seed=seed)


def shape_advantages(advantages: torch.Tensor, gamma: torch.Tensor, sign: str = default("sign")) -> torch.Tensor:
    """A~_t = gamma_t * A_t where the sign allows, A_t elsewhere (gamma detached, not renormalised).

    Args:
        advantages: float [B, T] per token, or [B] / [B, 1] per sequence (broadcast over tokens, as GRPO).
        gamma: float [B, T] (``credit_multipliers``).
        sign: "both" (default) | "positive" (A >= 0 only, paper v1) | "negative" (A < 0 only).
    Returns:
        float [B, T] in the dtype of ``advantages``.
    Raises ValueError when gamma holds NaN, Inf or a negative value, or when a finite advantage times gamma
    does not fit the advantages' dtype (float16: 6e4 * 2) (one host sync).
    """
    sign = check("sign", sign)
    for name, x in (("advantages", advantages), ("gamma", gamma)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a float tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got dtype {x.dtype}")
    if gamma.dim() != 2:
        raise ValueError(f"gamma must have shape [B, T], got {list(gamma.shape)}")
    batch, length = gamma.shape
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    if advantages.dim() != 2 or advantages.shape[0] != batch or advantages.shape[1] not in (1, length):
        raise ValueError(f"advantages must have shape [B], [B, 1] or [B, T] with B = {batch}, T = {length} "
                         f"(the shape of gamma), got {list(advantages.shape)}")
    if advantages.device != gamma.device:
        raise ValueError(f"advantages must be on the device of gamma ({gamma.device}), got {advantages.device}")
    compute = torch.promote_types(advantages.dtype, torch.float32)
    adv = advantages.expand(batch, length)
    shaped = (adv.to(compute) * gamma.detach().to(compute)).to(advantages.dtype)
    if sign != "both":
        allowed = adv >= 0 if sign == "positive" else adv < 0
        shaped = torch.where(allowed, shaped, adv)
    _check_values(gamma, adv, shaped)
    return shaped


def _check_values(gamma: torch.Tensor, adv: torch.Tensor, shaped: torch.Tensor) -> None:
    """One host sync: gamma finite and >= 0 everywhere (NaN would poison the advantages, a negative value would
    flip their sign), and no finite advantage turned infinite (A * gamma beyond the advantages' dtype: float16
    ends at 65504)."""
    bad = ~torch.isfinite(gamma) | (gamma < 0)
    overflow = torch.isinf(shaped) & torch.isfinite(adv)
    flags = torch.stack([bad.any(), overflow.any()]).tolist()
    if flags[0]:
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"gamma must be finite and >= 0 (credit multipliers; 1 = unchanged), got "
                         f"{float(gamma[b, t])} at [{b}, {t}] ({int(bad.sum())} bad value(s))")
    if flags[1]:
        b, t = (int(i) for i in overflow.nonzero()[0])
        raise ValueError(f"advantages * gamma overflows {adv.dtype} at [{b}, {t}] ({float(adv[b, t])} * "
                         f"{float(gamma[b, t])}; {int(overflow.sum())} value(s)): pass float32 advantages")


def rows_needing_credit(advantages: torch.Tensor, sign: str = "both") -> torch.Tensor:
    """Rows whose shaped advantage can differ from the plain one: some advantage != 0 that ``sign`` lets
    gamma touch. On every other row (e.g. a GRPO group with equal rewards: A = 0) gamma changes nothing, so it
    is 1 there without any metrics work.

    advantages: float [B] per sequence or [B, T] per token (a mask is not needed: 0 on padding changes nothing).
    Returns bool [B] on the device of ``advantages``.
    """
    sign = check("sign", sign)
    if not isinstance(advantages, torch.Tensor) or advantages.dim() not in (1, 2):
        raise ValueError(f"advantages must be a [B] or [B, T] tensor, got {advantages!r}")
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    touched = adv != 0 if sign == "both" else (adv > 0 if sign == "positive" else adv < 0)
    return touched.any(dim=1)

