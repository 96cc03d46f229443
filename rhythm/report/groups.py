"""What ``rhythm analyze --input rollouts.jsonl --id X`` adds to a report: the GRPO group of the rollout
(completions of the same prompt, their rewards, advantages and advantage x gamma per token) and the head
groups' exact attention bands (from q, k and lse of one extra early-stopped pass)."""
from __future__ import annotations

import math

from rhythm_kernels.segments import is_real

from rhythm.report.sequence import GroupMember, SequenceReport

# GRPO's group normalisation as TRL's GRPOTrainer does it (scale_rewards="group"):
#   A_i = (r_i - mean_j r_j) / (std_j r_j + EPS), std with Bessel's correction (torch.std's default).
ADVANTAGE_EPS = 1e-4
LOCAL_BAND_WIDTH = 64


def group_of(rows: list, chosen) -> list:
    """The rows (``rhythm.app.rows.InputRow``) of ``chosen``'s GRPO group, in file order: the same ``group``
    value when ``chosen`` has one, otherwise the same prompt (text, or token ids)."""
    if "group" in chosen.extra:
        return [r for r in rows if r.extra.get("group") == chosen.extra["group"]]

    def prompt_key(row):
        return ("text", row.prompt) if row.is_text else ("ids", tuple(row.prompt_ids))

    key = prompt_key(chosen)
    return [r for r in rows if prompt_key(r) == key]


def grpo_advantages(rewards: list[float]) -> list[float]:
    """A_i = (r_i - mean r) / (std r + 1e-4) with the unbiased std (0 for a group of one)."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0.0
    return [(r - mean) / (std + ADVANTAGE_EPS) for r in rewards]


def _number(row, name: str):
    value = row.extra.get(name)
    if not is_real(value) or not math.isfinite(value):
        return None
    return float(value)


def attach_group(report: SequenceReport, rows: list, index: int, scores, response_tokens: list[list[str]],
                 strategy: str = "coupled") -> str | None:
    """Fill ``report.group`` from the scored group (``scores`` of ``rows`` in that order). Advantages: the rows'
    ``advantage`` values when every row has one, else GRPO's from their ``reward`` values. Returns a note
    when the group view cannot be drawn (no rewards), else None."""
    rewards = [_number(r, "reward") for r in rows]
    given = [_number(r, "advantage") for r in rows]
    if all(a is not None for a in given):
        advantages = given
    elif all(r is not None for r in rewards):
        advantages = grpo_advantages(rewards)
    else:
        return (f"{len(rows)} rows share this prompt, but not all carry a numeric 'reward' (or 'advantage'): "
                "no group view")
    gamma = scores.gamma(strategy)
    members = []
    for i, row in enumerate(rows):
        span = scores.segments.spans[i]
        members.append(GroupMember(id=str(row.id), tokens=response_tokens[i],
                                   reward=rewards[i],
                                   advantage=advantages[i], gamma=gamma[span.row, span.response_start:span.end].tolist(), selected=i == index))
    report.group, report.group_strategy = members, strategy
    return None


def attach_bands(report: SequenceReport, model, scorer, ids: list[int], prompt_length: int) -> None:
    """Fill ``report.local_band`` (H_loc, lags 0..63, by query row) and ``report.fai_band`` (H_glob, the FAI
    horizon's lags, by key column, response rows only) from one early-stopped pass over the sequence alone
    that keeps q and k of the sampled layers and their attention descriptions
    (:class:`rhythm.report.band.QKCapture`)."""
    from rhythm.report.band import capture_qk, group_band

    if not report.local_heads or not report.global_heads:
        return          # an empty response: no head groups, no bands (the page says so)
    config = scorer.config
    length = len(ids)
    records, qk, layers, _ = capture_qk(model, scorer, ids, prompt_length)
    lse = {layer: records[layer].lse.cpu() for layer in scorer.layers}
    h_lo, h_hi = config.horizon
    last = length - 1 if h_hi is None else min(h_hi, length - 1)
    report.local_band = _cells(group_band(qk, lse, report.local_heads, lags=range(min(LOCAL_BAND_WIDTH, length)),
                                          layers=layers))
    lags = range(h_lo, max(h_lo, last) + 1)
    report.fai_band = _cells(group_band(qk, lse, report.global_heads, lags=lags, anchor="key",
                                        rows=slice(prompt_length, length), layers=layers))


def _cells(band) -> list[list[float | None]]:
    """A band as nested lists, None on the cells nothing observes (NaN in the tensor): strict JSON."""
    return [[None if v != v else v for v in row] for row in band.tolist()]
