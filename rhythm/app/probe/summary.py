"""The probe's summary: the statistics over every prompt's record (a pure function of the records, so a
resumed run summarises exactly like an uninterrupted one).

Units: the perturbation tests pair the r-th high-FAI trial of a response with its r-th low-FAI (or random)
trial, as the paper counts trials; the trials of one response share its text, so the per-prompt row (the
mean Jaccard of each kind per response, one pair per prompt) is the conservative test. Coupling, entropy
and the head groups are per response.
"""
from __future__ import annotations

from rhythm.app.probe.stats import (hypergeometric_tail, paired_summary, sign_test, wilcoxon_signed_rank,
                                    bootstrap_mean_ci, median)
from rhythm.app.probe.trials import OFFSETS

# Li et al. (arXiv 2510.13554) Table 1, Qwen3-4B-Base: content-word Jaccard after perturbing a high-FAI versus
# a low-FAI token, and the share of trials where the high-FAI perturbation deviates more.
PAPER = {"model": "Qwen3-4B-Base", "jaccard_high": 0.534, "jaccard_low": 0.631, "high_deviates_more": 0.8714}


def _mean(values):
    return sum(values) / len(values) if values else None


def _pairs(records, a: str, b: str):
    """(J_a, J_b) over trials paired by rank within each response."""
    xs, ys = [], []
    for record in records:
        by = {(t["kind"], t["rank"]): t["jaccard"] for t in record.get("trials") or []}
        for (kind, rank), value in sorted(by.items(), key=lambda kv: kv[0][1]):
            if kind == a and (b, rank) in by:
                xs.append(value)
                ys.append(by[(b, rank)])
    return xs, ys


def _per_prompt(records, a: str, b: str):
    xs, ys = [], []
    for record in records:
        trials = record.get("trials") or []
        ja = [t["jaccard"] for t in trials if t["kind"] == a]
        jb = [t["jaccard"] for t in trials if t["kind"] == b]
        if ja and jb:
            xs.append(_mean(ja))
            ys.append(_mean(jb))
    return xs, ys


def _lift(counts: list[tuple[int, int, int, int]]) -> dict:
    """Pooled coupling lift of (N, n, K, x) per response: observed sum x, expected sum n K / N, lift, and the
    exact one-sided p of the permutation baseline."""
    usable = [(big_n, n, k, x) for big_n, n, k, x in counts if big_n > 0]
    observed = sum(x for *_, x in usable)
    expected = sum(n * k / big_n for big_n, n, k, _ in usable)
    return {"responses": len(usable), "observed": observed, "expected": expected,
            "lift": observed / expected if expected > 0 else None,
            "p": hypergeometric_tail([(big_n, k, n) for big_n, n, k, _ in usable], observed)}


def _coupling(records, which: str) -> dict:
    rows = [r["coupling"][which] for r in records if r.get("coupling")]
    by_offset = {d: _lift([(c["N"], c["n"], *c["by_offset"][str(d)]) for c in rows]) for d in OFFSETS}
    return {"by_offset": {str(d): v for d, v in by_offset.items()},
            "near": _lift([(c["N"], c["n"], *c["near"]) for c in rows])}


def _one_sample(values: list[float], seed: int) -> dict:
    wil = wilcoxon_signed_rank(values)
    pos = sum(1 for v in values if v > 0)
    neg = sum(1 for v in values if v < 0)
    return {"n": len(values), "mean": _mean(values), "mean_ci": bootstrap_mean_ci(values, seed=seed),
            "median": median(values), "n_positive": pos, "n_negative": neg, "sign_p": sign_test(neg, pos),
            "wilcoxon_p": wil["p"], "wilcoxon_method": wil["method"]}


def _heads(records, seed: int) -> dict:
    rows = [r["heads"] for r in records if r.get("heads")]
    if not rows:
        return {"responses": 0}
    n_heads = len(rows[0]["distance"])
    group_means = {"local": {}, "global": {}, "all": {}}
    paired = {"sink_local": [], "sink_global": []}
    for name in ("distance", "sink", "distance_no_sink"):
        for group in group_means:
            values = []
            for h in rows:
                members = range(n_heads) if group == "all" else h[group]
                values.append(_mean([h[name][i] for i in members]))
            group_means[group][name] = _mean(values)
    for h in rows:
        paired["sink_local"].append(_mean([h["sink"][i] for i in h["local"]]))
        paired["sink_global"].append(_mean([h["sink"][i] for i in h["global"]]))
    per_head = [{"index": i, "layer": rows[0]["layers"][i // rows[0]["heads_per_layer"]],
                 "head": i % rows[0]["heads_per_layer"],
                 "distance": _mean([h["distance"][i] for h in rows]), "sink": _mean([h["sink"][i] for h in rows]),
                 "distance_no_sink": _mean([h["distance_no_sink"][i] for h in rows]),
                 "local": sum(i in h["local"] for h in rows), "global": sum(i in h["global"] for h in rows)}
                for i in range(n_heads)]
    return {"responses": len(rows), "groups": group_means,
            "sink_global_vs_local": paired_summary(paired["sink_global"], paired["sink_local"], seed=seed),
            "per_head": per_head}


def summarize(records: list[dict], *, seed: int = 0) -> dict:
    """Every statistic of the page and the JSON (module docstring); ``seed`` drives the bootstrap only."""
    with_trials = [r for r in records if r.get("trials")]
    replays = [t for r in with_trials for t in r["trials"] if t["kind"] == "replay"]
    perturbation = {name: paired_summary(*_pairs(with_trials, a, b), seed=seed)
                    for name, (a, b) in {"high_vs_low": ("high", "low"), "high_vs_random": ("high", "random"),
                                         "random_vs_low": ("random", "low")}.items()}
    perturbation["high_vs_low_by_prompt"] = paired_summary(*_per_prompt(with_trials, "high", "low"), seed=seed)
    perturbation["replay"] = {"n": len(replays), "identical": sum(1 for t in replays if t["identical"])}
    perturbation["positions"] = {kind: {"mean": _mean([t["position"] / len(r["response_ids"]) for r in with_trials
                                                       for t in r["trials"] if t["kind"] == kind]),
                                        "mean_fai": _mean([t["fai"] for r in with_trials for t in r["trials"]
                                                           if t["kind"] == kind])}
                                 for kind in ("high", "low", "random")}
    entropy_rows = [r["entropy"] for r in records if r.get("entropy")]
    both = [e for e in entropy_rows if e["peaks"] is not None and e["others"] is not None]
    rhos = [e["spearman"] for e in entropy_rows if e["spearman"] is not None]
    return {
        "prompts": len(records), "with_trials": len(with_trials),
        "skipped": [{"id": r["id"], "reason": r["skipped"]} for r in records if r.get("skipped")],
        "perturbation": perturbation,
        "coupling": {"waad_peaks": _coupling(records, "waad_peaks"), "preplan": _coupling(records, "preplan")},
        "entropy": {"peaks_vs_others": paired_summary([e["peaks"] for e in both], [e["others"] for e in both],
                                                      seed=seed),
                    "spearman": _one_sample(rhos, seed)},
        "heads": _heads(records, seed),
        "paper": PAPER,
    }
