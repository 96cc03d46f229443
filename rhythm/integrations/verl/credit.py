"""verl adapter: rhythm credit as a post-multiply of ``data.batch["advantages"]`` after ``compute_advantage``.

Three pieces, none of which forks verl:

(a) worker side - :func:`compute_rhythm_gamma` runs the scorer (the current policy, no grad) over a verl batch
    ``input_ids`` / ``attention_mask`` / ``position_ids`` [B, T] (``input_ids = prompt (left-padded) + response
    (right-padded)``) and returns gamma aligned to ``responses`` [B, R_len]: entry i is gamma of the token at
    position T - R_len + i (docs/definitions.md section 6: no shift). Gamma does not depend on the layout the
    policy runs in (padded or verl's remove-padding packing): the scorer computes it per sequence.
(b) driver side - :func:`apply_rhythm_gamma` multiplies ``data.batch["advantages"]`` [B, R_len] by gamma on
    ``response_mask`` tokens (sign mode as configured); it works after any estimator (grpo, gae, rloo,
    reinforce_plus_plus, ...), since all of them write token-level advantages of width R_len.
(c) registration - :func:`rhythm.integrations.verl.hooks.install` (called by importing
    ``rhythm.integrations.verl.plugin`` through ``VERL_USE_EXTERNAL_MODULES`` or
    ``actor_rollout_ref.model.external_lib``; importing ``rhythm.integrations.verl.hooks`` itself changes nothing) records the
    metrics inside the actor's own old-log-prob forward and applies (b) right after verl computes the
    advantages, in the legacy and the v1 trainer.

A batch whose advantages were multiplied is marked (``meta_info["rhythm_shaped"]`` on a ``DataProto``, the key
``rhythm_shaped`` on a dict / TensorDict): :func:`apply_rhythm_gamma` refuses a marked batch, so gamma is never
applied twice; verl's ``compute_advantage`` (wrapped by the hooks) writes fresh advantages and clears the mark.

Only tensors and ``DataProto``-like objects (``.batch`` a TensorDict/dict, ``.meta_info`` a dict) are touched;
verl itself is imported by the hooks module only.
"""
from __future__ import annotations

import time

import torch

from rhythm_kernels.segments import trainer_response_mask

from rhythm.credit.gamma import compute_gamma, gamma_metrics, gamma_sums, sequence_starts
from rhythm.credit.shaping import shape_advantages
from rhythm.scoring.scorer import RhythmScorer
from rhythm.integrations.config import RhythmCreditConfig

__all__ = ["RhythmCreditConfig", "GAMMA_KEY", "SHAPED_KEY", "compute_rhythm_gamma", "apply_rhythm_gamma",
           "response_gamma", "is_shaped", "clear_shaped"]

GAMMA_KEY = "rhythm_gamma"
SHAPED_KEY = "rhythm_shaped"  # marks a batch whose advantages already carry gamma


def _batch(data):
    return data.batch if hasattr(data, "batch") else data


def is_shaped(data) -> bool:
    """True when ``data``'s advantages were already multiplied by gamma (:func:`apply_rhythm_gamma`)."""
    meta = getattr(data, "meta_info", None)
    if isinstance(meta, dict):
        return bool(meta.get(SHAPED_KEY, False))
    batch = _batch(data)
    if SHAPED_KEY not in batch.keys():
        return False
    value = batch[SHAPED_KEY]
    return bool(getattr(value, "data", value))


def _mark_shaped(data) -> None:
    meta = getattr(data, "meta_info", None)
    if isinstance(meta, dict):
        meta[SHAPED_KEY] = True
        return
    batch = _batch(data)
    if hasattr(batch, "set_non_tensor"):  # TensorDict
        batch.set_non_tensor(SHAPED_KEY, True)
    else:
        batch[SHAPED_KEY] = True


def clear_shaped(data) -> None:
    """Drop the mark (the advantages are about to be recomputed from the rewards)."""
    meta = getattr(data, "meta_info", None)
    if isinstance(meta, dict):
        meta.pop(SHAPED_KEY, None)
        return
    batch = _batch(data)
    if SHAPED_KEY in batch.keys():
        batch.pop(SHAPED_KEY)


def response_gamma(gamma: torch.Tensor, response_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """gamma float32 [B, width] aligned to the responses, from the per-sequence gamma the actor returns.

    gamma: jagged nested [B, j] over each sequence's real tokens (prompt + response, the layout of verl's
    nested ``log_probs``). response_lengths: [B] response tokens per sequence (a suffix of each sequence).
    Entry i of row b is gamma at position j_b - r_b + i, the response token itself (docs/definitions.md
    section 6: no shift; verl's log-probs are shifted by one because logits predict the next token).
    1 on response padding."""
    if not gamma.is_nested:
        raise ValueError(f"gamma must be a jagged nested tensor [B, j], got a {list(gamma.shape)} tensor")
    lengths = [int(x) for x in response_lengths.tolist()]
    rows = gamma.unbind()
    if len(rows) != len(lengths):
        raise ValueError(f"gamma has {len(rows)} sequences but response_lengths has {len(lengths)}")
    out = torch.ones(len(rows), width, dtype=torch.float32)
    for b, (row, r) in enumerate(zip(rows, lengths)):
        if not 0 <= r <= min(width, row.shape[0]):
            raise ValueError(f"sequence {b}: {r} response tokens do not fit its {row.shape[0]} tokens / width {width}")
        if r:
            out[b, :r] = row[row.shape[0] - r:].float().cpu()
    return out


@torch.no_grad()
def compute_rhythm_gamma(scorer: RhythmScorer | None, data, config: RhythmCreditConfig | None = None, *,
                         seed: int | None = None, row_ids=None, return_metrics: bool = False,
                         advantages: torch.Tensor | None = None):
    """Worker side: gamma float32 [B, R_len] aligned to ``data.batch["responses"]``.

    scorer: a :class:`rhythm.RhythmScorer` over the current policy (None only for strategy "random"/"entropy").
    data: a verl ``DataProto`` (or its ``.batch``) with ``input_ids``, ``attention_mask``, ``responses`` and
        optionally ``position_ids`` [B, T]; strategy "entropy" also reads ``entropys`` [B, R_len] (the
        entropy of the distribution that sampled each response token, from verl's log-prob pass).
    seed, row_ids: the "random" strategy's base seed (default: the config's) and row identities (default
        0..B-1); row b draws from sha256(seed, row_ids[b]) (``rhythm.credit.gamma.row_seed``). For fresh draws
        every step put the step into the ids (``rhythm.credit.gamma.trainer_row_ids``).
    advantages: optional [B, R_len], the batch's advantages when already computed: rows whose advantages are
        all exactly 0 (GRPO groups with equal rewards) get gamma 1 without any scoring work - gamma cannot
        change a zero advantage.
    Returns gamma (and a metrics dict with ``return_metrics``); gamma = 1 on response padding.
    """
    cfg = config or RhythmCreditConfig()
    start = time.perf_counter()
    batch = _batch(data)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    width = batch["responses"].shape[1]
    if row_ids is not None and (isinstance(row_ids, (str, bytes)) or len(row_ids) != input_ids.shape[0]):
        raise ValueError(f"row_ids must hold one id per row ({input_ids.shape[0]}), got {row_ids!r:.80}")
    if advantages is not None:
        if tuple(advantages.shape) != (batch["responses"].shape[0], width):
            raise ValueError(f"advantages must be [B, R_len] = {list(batch['responses'].shape)}, got "
                             f"{list(advantages.shape)}")
        live = (advantages != 0).any(-1).to(input_ids.device)
        gamma = torch.ones(advantages.shape, dtype=torch.float32, device=input_ids.device)
        if bool(live.any()):
            names = [k for k in ("input_ids", "attention_mask", "position_ids", "responses", "entropys")
                     if k in batch.keys()]
            ids = list(range(len(live))) if row_ids is None else list(row_ids)
            gamma[live] = compute_rhythm_gamma(scorer, {k: batch[k][live] for k in names}, cfg, seed=seed,
                                               row_ids=[ids[i] for i in live.nonzero().flatten().tolist()]
                                               ).to(gamma.device)
        if not return_metrics:
            return gamma
        return gamma, _gamma_metrics(gamma, trainer_response_mask(attention_mask, width)[:, -width:], start,
                                     skipped=int((~live).sum()))
    position_ids = batch["position_ids"] if "position_ids" in batch.keys() else None
    response = trainer_response_mask(attention_mask, width)
    options = cfg.credit_kwargs(seed)
    if cfg.needs_scorer:
        if scorer is None:
            raise ValueError(f"strategy={cfg.strategy!r} needs a RhythmScorer over the current policy")
        scores = scorer.score(input_ids, attention_mask, response, position_ids=position_ids)
        gamma = scores.gamma(cfg.strategy, **options)
    else:
        entropy = None
        if cfg.strategy == "entropy":
            if "entropys" not in batch.keys():
                raise ValueError("strategy='entropy' needs data.batch['entropys'] [B, R_len] (compute_log_prob with "
                                 "calculate_entropy=True)")
            entropy = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
            entropy[:, -width:] = batch["entropys"].float()
        gamma = compute_gamma(cfg.strategy, response, entropy=entropy, row_ids=row_ids,
                              sequence_start=sequence_starts(attention_mask), **options)
    gamma = torch.where(response, gamma.to(response.device), 1.0)[:, -width:].float()
    if not return_metrics:
        return gamma
    return gamma, _gamma_metrics(gamma, response[:, -width:], start)


def _gamma_metrics(gamma, mask, start, skipped=0) -> dict:
    return {**gamma_metrics(gamma_sums(gamma, mask)), "rhythm/scorer_time_s": time.perf_counter() - start,
            "rhythm/rows_skipped": skipped}


def apply_rhythm_gamma(data, gamma: torch.Tensor | None = None, *, sign: str = "both", key: str = GAMMA_KEY,
                       pop: bool = False):
    """Driver side, after ``compute_advantage``: advantages <- advantages * gamma on ``response_mask`` tokens
    (where ``sign`` allows), unchanged elsewhere. gamma [B, R_len] defaults to ``data.batch[key]``.
    ``response_mask`` defaults to ``attention_mask[:, -R_len:]`` (verl's ``compute_response_mask``).
    Marks the batch as shaped and refuses a batch already marked (gamma applied twice would square it).
    Returns ``data`` (modified in place) - its ``meta_info["metrics"]`` gains rhythm/* entries."""
    if is_shaped(data):
        raise ValueError("these advantages were already multiplied by gamma (the batch carries the "
                         f"{SHAPED_KEY!r} mark): with rhythm.integrations.verl.hooks installed, verl's "
                         "compute_advantage applies gamma itself - do not call apply_rhythm_gamma after it")
    batch = _batch(data)
    if gamma is None:
        if key not in batch.keys():
            raise KeyError(f"no gamma given and data.batch has no {key!r}")
        gamma = batch[key]
    advantages = batch["advantages"]
    if tuple(gamma.shape) != tuple(advantages.shape):
        raise ValueError(f"gamma must match advantages {list(advantages.shape)} (responses [B, R_len]), got "
                         f"{list(gamma.shape)}")
    if "response_mask" in batch.keys():
        mask = batch["response_mask"].bool()
    else:
        mask = batch["attention_mask"][:, -advantages.shape[1]:].bool()
    gamma = torch.where(mask, gamma.to(advantages.device, torch.float32), 1.0)
    batch["advantages"] = shape_advantages(advantages, gamma, sign=sign)
    _mark_shaped(data)
    if pop and key in batch.keys():
        batch.pop(key)
    metrics = gamma_metrics(gamma_sums(gamma, mask))
    meta = getattr(data, "meta_info", None)
    if isinstance(meta, dict):
        meta.setdefault("metrics", {}).update(metrics)
    return data
