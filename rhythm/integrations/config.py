"""``RhythmCreditConfig``: the one knob set shared by the trainer adapters (TRL, verl).

It carries every constant of docs/definitions.md sections 2-4 plus the adapter's own choices (strategy, sign
mode) and splits itself into the :class:`rhythm.RhythmScorer` config and the credit options (what a strategy
reads: :data:`rhythm.credit.gamma.STRATEGY_TABLE`). No framework is imported here.
"""
from __future__ import annotations

from dataclasses import asdict

from rhythm.config import (CREDIT_KNOBS, GAMMA_KNOBS, SCORER_KNOBS, SIGNS, STRATEGIES, check, default, from_mapping,
                           knob_dataclass)
from rhythm.credit.gamma import attention_strategies, strategy_info

ATTENTION_STRATEGIES = attention_strategies()

__all__ = ["ATTENTION_STRATEGIES", "RhythmCreditConfig", "SIGNS", "STRATEGIES"]


@knob_dataclass(CREDIT_KNOBS, defaults={"micro_batch_size": None}, optional_names=("micro_batch_size",))
class RhythmCreditConfig:
    """How advantages are reshaped: A~_t = gamma_t * A_t on response tokens (docs/definitions.md section 4).

    Every field, default and check is defined once in :mod:`rhythm.config` (a bad value fails here, on
    construction, naming the field).

    strategy: "coupled" (paper's rhythm credit, default) | "local" (preplan only) | "global" (anchors only)
        | "random" (baseline: ceil(q |R|) random tokens, fresh every step) | "entropy" (baseline: top q by
        the rollout's per-token entropy).
    sign: "both" (default) | "positive" (A >= 0 only, paper v1) | "negative" (A < 0 only).
    q, gamma_amp, alpha, k: selection fraction, amplification, intro share, look-back of dominated anchors.
    seed: base seed of the "random" strategy (each row draws from sha256(seed, its identity); the trainers'
        identities carry the step and the row, ``rhythm.credit.gamma.trainer_row_ids``).
    window, horizon, head_fraction, layers, grouping: WAAD window W, FAI horizon (H_lo, H_hi) with H_hi None
        = to the end, size of H_loc / H_glob, sampled layers (None = the five middle-third layers),
        "per_sequence" or "fixed" head grouping.
    micro_batch_size: sequences per scorer forward (None: the trainer's per-device batch size).
    backend: ``attention_metrics`` backend ("auto" = triton on CUDA, torch on CPU).
    """

    @classmethod
    def from_mapping(cls, mapping, *, where: str | None = None) -> "RhythmCreditConfig":
        """From a JSON object / Hydra node; unknown keys are refused naming the closest known one."""
        return from_mapping(mapping, cls, where=where)

    @property
    def needs_scorer(self) -> bool:
        """True when the strategy reads WAAD / FAI (one extra no-grad attention pass per rollout batch)."""
        return strategy_info(self.strategy).attention

    def scorer_kwargs(self, default_micro_batch_size: int | None = None) -> dict:
        """Config of :class:`rhythm.RhythmScorer` (``RhythmScorer(model, **cfg.scorer_kwargs())``): the shared
        knobs; micro_batch_size None becomes ``default_micro_batch_size`` (the trainer's), else the scorer's.
        A trainer's scorer pass runs one forward per micro-batch (``batch_invariant=False``): the trainer's own
        forwards see its batches together anyway, and one forward per rollout is what it costs."""
        kwargs = {name: getattr(self, name) for name in CREDIT_KNOBS if name in SCORER_KNOBS}
        kwargs["batch_invariant"] = False
        size = self.micro_batch_size or default_micro_batch_size or default("micro_batch_size")
        kwargs["micro_batch_size"] = check("micro_batch_size", size, "scorer_kwargs(default_micro_batch_size)")
        return kwargs

    def credit_kwargs(self, seed: int | None = None) -> dict:
        """Options of :func:`rhythm.credit.gamma.compute_gamma` (and overrides of ``RhythmScores.gamma``);
        ``seed`` overrides the config's base seed."""
        kwargs = {name: getattr(self, name) for name in GAMMA_KNOBS}
        if seed is not None:
            kwargs["seed"] = check("seed", seed, "credit_kwargs(seed)")
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)
