"""Credit multipliers gamma [B, T] and shaped advantages (docs/definitions.md sections 4 and 8).

    local:   gamma = 1 + (gamma_amp - 1) * 1{t in T_loc}
    global:  gamma = 1 + (gamma_amp - 1) * 1{t in T_glob}
    coupled: gamma = 1 + (gamma_amp - 1) * 1{t in T_glob \\ D} + (1 - alpha)(gamma_amp - 1) * 1{t in D}
                       + alpha (gamma_amp - 1) * 1{t in I(D)}                      (additive)
    random / entropy: gamma = 1 + (gamma_amp - 1) * 1{t chosen}  (ceil(q |R|) tokens, seeded / top entropy)

gamma = 1 off the response, on padding and on every position of a row with an empty response.
"""
from __future__ import annotations

import torch

from rhythm.credit import selection as sel
from rhythm.config import check, default


def credit_multipliers(waad, fai, response_mask, *, strategy: str = default("strategy"), fai_valid=None,
                       entropy=None, q: float = default("q"), gamma_amp: float = default("gamma_amp"),
                       alpha: float = default("alpha"), k: int = default("k"),
                       seed: int = default("seed")) -> torch.Tensor:
    """Per-token credit multipliers gamma (docs/definitions.md section 4).

    Args:
        waad, fai: float [B, T] per-token signals after head grouping (``token_signals``); a strategy that
            does not read one of them accepts None for it (random and entropy read neither).
        response_mask: bool [B, T], True on response tokens (one contiguous run per row; empty rows allowed).
        strategy: "local" | "global" | "coupled" | "random" | "entropy".
        fai_valid: bool [B, T] or None (= every position valid); anchors are chosen among valid tokens only.
        entropy: float [B, T], per-token entropy of the sampling distribution (required for "entropy").
        q: selected fraction in (0, 1]. gamma_amp: amplification >= 1. alpha: intro share in [0, 1].
        k: look-back window of dominated anchors (>= 1). seed: seed of the "random" strategy.
    Returns:
        gamma: float32 [B, T], 1 off the response; in [1, 1 + (1 + alpha)(gamma_amp - 1)].
    """
    strategy = check("strategy", strategy)
    needs_waad = strategy in ("local", "coupled")
    needs_fai = strategy in ("global", "coupled")
    if needs_waad and waad is None:
        raise ValueError(f"waad is required for strategy={strategy!r}")
    if needs_fai and fai is None:
        raise ValueError(f"fai is required for strategy={strategy!r}")
    if strategy == "entropy" and entropy is None:
        raise ValueError("entropy [B, T] is required for strategy='entropy' (the per-token entropy of the "
                         "rollout's sampling distribution)")
    sel.check_signals(response_mask=response_mask, waad=waad, fai=fai, fai_valid=fai_valid, entropy=entropy)
    q, gamma_amp, alpha, k, seed = (check(name, value) for name, value in
                                    (("q", q), ("gamma_amp", gamma_amp), ("alpha", alpha), ("k", k), ("seed", seed)))
    sel.check_contents(response_mask, fai_valid, waad=waad if needs_waad else None, fai=fai if needs_fai else None,
                       entropy=entropy if strategy == "entropy" else None)
    if response_mask.shape[1] == 0:      # T = 0: no response token anywhere
        return torch.ones(response_mask.shape, dtype=torch.float32, device=response_mask.device)

    keys = sel.random_keys(response_mask.shape, seed, response_mask.device) if strategy == "random" else None
    signals = dict(waad=waad, fai=fai, fai_valid=fai_valid, entropy=entropy, keys=keys)
    rows = _chunk_rows(response_mask)
    if rows >= response_mask.shape[0]:
        return _gamma(strategy, response_mask, signals, q, gamma_amp, alpha, k)
    # On CPU, rows are processed in chunks of about CPU_CHUNK_ELEMENTS tokens: the working set stays in
    # cache (about 1.6x faster at B = 512, T = 8K) and the extra memory is bounded by the chunk, not by B.
    gamma = torch.empty(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    for lo in range(0, response_mask.shape[0], rows):
        part = slice(lo, lo + rows)
        chunk = {name: None if x is None else x[part] for name, x in signals.items()}
        gamma[part] = _gamma(strategy, response_mask[part], chunk, q, gamma_amp, alpha, k)
    return gamma


CPU_CHUNK_ELEMENTS = 1 << 20


def _chunk_rows(response_mask: torch.Tensor) -> int:
    """Rows per chunk: all of them on accelerators, about CPU_CHUNK_ELEMENTS tokens' worth on CPU."""
    if response_mask.device.type != "cpu":
        return response_mask.shape[0]
    return max(1, CPU_CHUNK_ELEMENTS // max(1, response_mask.shape[1]))


def _gamma(strategy, response_mask, signals, q, gamma_amp, alpha, k) -> torch.Tensor:
    """gamma float32 for a block of rows (inputs already checked)."""
    amp = float(gamma_amp) - 1.0
    waad, fai, fai_valid = signals["waad"], signals["fai"], signals["fai_valid"]
    if strategy == "random":
        chosen = sel.top_q_mask(signals["keys"], response_mask, q)[0]
    elif strategy == "entropy":
        chosen = sel.top_q_mask(signals["entropy"], response_mask, q)[0]
    elif strategy == "local":
        chosen = _local_selection(waad, response_mask, q)
    elif strategy == "global":
        eligible = response_mask if fai_valid is None else response_mask & fai_valid
        chosen = sel.top_q_mask(fai, eligible, q)[0]
    else:
        s = sel._rhythm_selection(waad, fai, response_mask, fai_valid, q, k)
        # 1 + amp 1{T_glob \ D} + (1 - alpha) amp 1{D} + alpha amp 1{I(D)}
        gamma = torch.ones(response_mask.shape, dtype=torch.float32, device=response_mask.device)
        gamma += amp * (s.anchor & ~s.dominated).float()
        gamma += (1.0 - alpha) * amp * s.dominated.float()
        gamma += alpha * amp * s.intro.float()
        return gamma
    return 1.0 + amp * chosen.float()


def _local_selection(waad, response_mask, q) -> torch.Tensor:
    """T_loc alone (no FAI, no medians): top q by Delta over the |R| - 1 tokens where it is defined."""
    delta, delta_valid = sel.response_delta(waad, response_mask)
    return sel.top_q_mask(delta, delta_valid, q)[0]


def shape_advantages(advantages: torch.Tensor, gamma: torch.Tensor, sign: str = default("sign")) -> torch.Tensor:
    """A~_t = gamma_t * A_t where the sign allows, A_t elsewhere (gamma detached, not renormalised).

    Args:
        advantages: float [B, T] per token, or [B] / [B, 1] per sequence (broadcast over tokens, as GRPO).
        gamma: float [B, T] (``credit_multipliers``).
        sign: "both" (default) | "positive" (A >= 0 only, paper v1) | "negative" (A < 0 only).
    Returns:
        float [B, T] in the dtype of ``advantages``.
    Raises ValueError when gamma holds NaN, Inf or a negative value (one host sync).
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
    _check_gamma_values(gamma)
    compute = torch.promote_types(advantages.dtype, torch.float32)
    adv = advantages.expand(batch, length)
    shaped = (adv.to(compute) * gamma.detach().to(compute)).to(advantages.dtype)
    if sign == "both":
        return shaped
    allowed = adv >= 0 if sign == "positive" else adv < 0
    return torch.where(allowed, shaped, adv)


def _check_gamma_values(gamma: torch.Tensor) -> None:
    """gamma must be finite and >= 0 everywhere (one host sync): NaN would poison the advantages, a negative
    value would flip their sign."""
    bad = ~torch.isfinite(gamma) | (gamma < 0)
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"gamma must be finite and >= 0 (credit multipliers; 1 = unchanged), got "
                         f"{float(gamma[b, t])} at [{b}, {t}] ({int(bad.sum())} bad value(s))")


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

