"""One prompt's probe: the signals of its greedy response, the perturbation trials, the coupling counts, WAAD
against entropy, and the per-head distances with their attention-sink share.

Positions are response indices j (the token at absolute position P + j, P the prompt length).

- **Eligible** tokens: response tokens with a valid FAI (docs/definitions.md section 2) followed by at least
  ``min_after`` response tokens (something to compare; it also keeps the trials off the response's last
  tokens, whose FAI averages only a few rows and whose continuations are only a few words).
- **Perturbation trials** (paper Table 1): ``high`` = the k eligible tokens of largest FAI, ``low`` = the k
  of smallest FAI (ties to the lower position in both), ``random`` = k eligible tokens drawn with a
  generator seeded by (seed, prompt id), and one ``replay`` at the first ``high`` position that keeps the
  original token (the machinery's own check: its continuation must be the original). A perturbed trial
  replaces token j by the model's most likely token other than the original (the second most likely, as
  greedy decoding chose the most likely), continues greedily for the tokens the original had after j, and
  compares the content words after j (:mod:`rhythm.app.probe.text`). Trials need 2k eligible tokens.
- **Coupling** counts, for offsets delta: the eligible tokens at peak + delta (targets, K of N eligible) and
  how many of the n anchors lie on them (x). Peaks are the WAAD peaks (strict local maxima of WAAD inside
  the response: WAAD_j > WAAD_{j-1} and WAAD_j >= WAAD_{j+1}) or the preplan tokens (section 4). Under the
  permutation baseline (the n anchors placed uniformly at random among the N eligible tokens) x is
  hypergeometric with mean n K / N.
- **Entropy**: Spearman's rho of WAAD and the entropy of the distribution that produced each token
  (section 4) over the response, and the mean entropy at WAAD peaks and at the other response tokens.
- **Heads**: per sampled head, the mean response distance d (section 3), the attention-sink share
  mean_t A[t, 0] over the response rows t (position 0: the sequence's first token), and the mean distance
  without the sink, mean_t (distance[t] - t A[t, 0]) / (1 - A[t, 0]); the local and global groups.
"""
from __future__ import annotations

import random

import torch

from rhythm.app.probe.stats import spearman

OFFSETS = tuple(range(-3, 6))          # anchor position - peak position
NEAR = (0, 1, 2)                       # "at or just after" a peak


def trial_seed(seed: int, prompt_id) -> str:
    """The random control's seed for one prompt (str seeds of random.Random are hashed deterministically)."""
    return f"{int(seed)}\0{type(prompt_id).__name__}\0{prompt_id}"


def choose_positions(fai: list[float], eligible: list[bool], k: int, seed: str) -> dict | None:
    """{"high": [...], "low": [...], "random": [...]} response indices, or None with fewer than 2k eligible."""
    pool = [j for j, ok in enumerate(eligible) if ok]
    if len(pool) < 2 * k:
        return None
    by_high = sorted(pool, key=lambda j: (-fai[j], j))
    by_low = sorted(pool, key=lambda j: (fai[j], j))
    return {"high": by_high[:k], "low": by_low[:k], "random": random.Random(seed).sample(pool, k)}


def waad_peaks(waad: list[float]) -> list[bool]:
    """Strict local maxima of WAAD inside the response (both neighbours in it)."""
    n = len(waad)
    return [0 < j < n - 1 and waad[j] > waad[j - 1] and waad[j] >= waad[j + 1] for j in range(n)]


def coupling_counts(peaks: list[bool], anchors: list[bool], eligible: list[bool]) -> dict:
    """{"N": eligible tokens, "n": anchors, "by_offset": {delta: [K, x]}, "near": [K, x]} (module docstring)."""
    n_tok = len(peaks)
    where = [j for j, p in enumerate(peaks) if p]

    def count(targets: set[int]) -> list[int]:
        targets = {j for j in targets if 0 <= j < n_tok and eligible[j]}
        return [len(targets), sum(1 for j in targets if anchors[j])]

    return {"N": sum(eligible), "n": sum(anchors),
            "by_offset": {str(d): count({j + d for j in where}) for d in OFFSETS},
            "near": count({j + d for j in where for d in NEAR})}


def entropy_stats(waad: list[float], entropy: list[float], peaks: list[bool]) -> dict:
    at = [e for e, p in zip(entropy, peaks) if p]
    rest = [e for e, p in zip(entropy, peaks) if not p]
    return {"spearman": spearman(waad, entropy), "peaks": sum(at) / len(at) if at else None,
            "others": sum(rest) / len(rest) if rest else None, "n_peaks": len(at)}


def head_stats(records, layers: list[int], qk: dict, layer_attention: dict, prompt_length: int) -> dict:
    """Per flattened (layer, head): sink share and sink-free mean distance over the response rows."""
    from rhythm.report.band import band_attention

    sink, no_sink = [], []
    for layer in layers:
        query, key, scale = qk[layer]
        group = query.shape[1] // key.shape[1]
        heads = query.shape[1]
        length = query.shape[2]
        keys = key[0, torch.arange(heads) // group]                       # [Hq, T, D]
        lse = records[layer].lse[0].cpu()                                 # [Hq, T]
        # A[t, 0] for t = P..T-1: the key-anchored band at s = 0 on lags t - 0 = P..T-1
        a0 = band_attention(query[0], keys, lse, lags=range(prompt_length, length), scale=scale, anchor="key",
                            layer=layer_attention.get(layer))[:, 0, :].double()          # [Hq, R]
        t = torch.arange(prompt_length, length, dtype=torch.float64)
        dist = records[layer].distance[0, :, prompt_length:].cpu().double()           # [Hq, R]
        # distance without the sink: sum_{s>0} A[t,s] (t - s) / sum_{s>0} A[t,s]
        rest = (1 - a0).clamp(min=1e-12)
        sink += a0.mean(-1).tolist()
        no_sink += ((dist - t * a0) / rest).mean(-1).tolist()
    return {"sink": sink, "distance_no_sink": no_sink}


def analyse(model, tokenizer, scorer, prompt_ids: list[int], response_ids: list[int]) -> dict:
    """Signals of one sequence: the scorer's (waad, fai, fai_valid, entropy, preplan, anchor on the response;
    head distances and groups) and one full pass keeping q/k (sink shares, logits of the replacements).

    Returns a dict of response-length lists plus "heads" and "logits" (float32 [R, V]: logits[j] predicts
    response token j)."""
    from rhythm.report.band import capture_qk

    ids = prompt_ids + response_ids
    p, length = len(prompt_ids), len(ids)
    x = torch.tensor([ids])
    response = torch.zeros(1, length, dtype=torch.bool)
    response[0, p:] = True
    scores = scorer.score(x, None, response, with_entropy=True)
    selection = scores.selection()
    records, qk, layer_attention, output = capture_qk(model, scorer, ids, p, stop_after_last=False)
    logits = output.logits[0, p - 1: length - 1].float().cpu()
    heads = {"distance": scores.head_distance[0].tolist(), "local": scores.groups.local[0].tolist(),
             "global": scores.groups.global_[0].tolist(), "layers": list(scores.layers),
             "heads_per_layer": scores.heads_per_layer}
    heads.update(head_stats(records, list(scores.layers), qk, layer_attention, p))
    part = lambda t: t[0, p:].tolist()    # noqa: E731
    return {"waad": part(scores.waad), "fai": part(scores.fai), "fai_valid": part(scores.fai_valid),
            "entropy": part(scores.entropy), "preplan": part(selection.preplan), "anchor": part(selection.anchor),
            "heads": heads, "logits": logits}


def replacement(logits: torch.Tensor, original: int) -> int:
    """The most likely token other than ``original`` under ``logits`` [V] (ties to the lower id)."""
    top = torch.topk(logits, 2)
    first, second = int(top.indices[0]), int(top.indices[1])
    return second if first == original else first


def eligible_positions(fai_valid: list[bool], min_after: int) -> list[bool]:
    n = len(fai_valid)
    return [bool(v) and j + min_after <= n - 1 for j, v in enumerate(fai_valid)]


def plan_trials(signals: dict, response_ids: list[int], k: int, seed: str, min_after: int) -> list[dict] | None:
    """The trials of one response (without continuations): kind, rank, position j, original, replacement
    token ids, FAI at j. None when the response has fewer than 2k eligible tokens."""
    eligible = eligible_positions(signals["fai_valid"], min_after)
    chosen = choose_positions(signals["fai"], eligible, k, seed)
    if chosen is None:
        return None
    trials = []
    for kind in ("high", "low", "random"):
        for rank, j in enumerate(chosen[kind]):
            trials.append({"kind": kind, "rank": rank, "position": j, "fai": signals["fai"][j],
                           "original_id": response_ids[j],
                           "replacement_id": replacement(signals["logits"][j], response_ids[j])})
    j = chosen["high"][0]
    trials.append({"kind": "replay", "rank": 0, "position": j, "fai": signals["fai"][j],
                   "original_id": response_ids[j], "replacement_id": response_ids[j]})
    return trials
