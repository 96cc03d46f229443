"""``RhythmCreditConfig``: the one knob set shared by the trainer adapters (TRL, verl).

It carries every constant of docs/definitions.md sections 2-4 plus the adapter's own choices (strategy, sign),
splits
itself into the :class:`rhythm.RhythmScorer` config and the credit options, and derives the per-step seed
of the ``random`` baseline. No framework is imported here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STRATEGIES = ("local", "global", "coupled", "random", "entropy")
SIGNS = ("both", "positive", "negative")
# Strategies that need the attention pass (the scorer); random and entropy read neither WAAD nor FAI.
ATTENTION_STRATEGIES = ("local", "global", "coupled")


@dataclass
class RhythmCreditConfig:
    """How advantages are reshaped: A~_t = gamma_t * A_t on response tokens (docs/definitions.md section 4).

    strategy: "coupled" (paper's rhythm credit, default) | "local" (preplan only) | "global" (anchors only)
        | "random" (baseline: ceil(q |R|) random tokens, a new seed every step) | "entropy" (baseline: top q by
        the rollout's per-token entropy).
    sign: "both" (default) | "positive" (A >= 0 only, paper v1) | "negative" (A < 0 only).
    q, gamma_amp, alpha, k: selection fraction, amplification, intro share, look-back of dominated anchors.
    seed: base seed of the "random" strategy (mixed with the step and the process rank).
    window, horizon, head_fraction, layers, grouping: WAAD window W, FAI horizon (H_lo, H_hi) with H_hi None
        = to the end, size of H_loc / H_glob, sampled layers (None = the five middle-third layers),
        "per_sequence" or "fixed" head grouping.
    micro_batch_size: sequences per scorer forward (None: the trainer's per-device batch size).
    backend: ``attention_metrics`` backend ("auto" = triton on CUDA, torch on CPU).
    """

    strategy: str = "coupled"
    sign: str = "both"
    q: float = 0.4
    gamma_amp: float = 1.5
    alpha: float = 0.5
    k: int = 3
    seed: int = 0
    window: int = 10
    horizon: tuple = (10, 100)
    head_fraction: float = 0.3
    layers: tuple | None = None
    grouping: str = "per_sequence"
    micro_batch_size: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"RhythmCreditConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.sign not in SIGNS:
            raise ValueError(f"RhythmCreditConfig.sign must be one of {SIGNS}, got {self.sign!r}")
        if not (isinstance(self.q, (int, float)) and 0 < self.q <= 1):
            raise ValueError(f"RhythmCreditConfig.q must be in (0, 1], got {self.q!r}")
        if not (isinstance(self.gamma_amp, (int, float)) and math.isfinite(self.gamma_amp) and self.gamma_amp >= 1):
            raise ValueError(f"RhythmCreditConfig.gamma_amp must be a finite number >= 1, got {self.gamma_amp!r}")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise ValueError(f"RhythmCreditConfig.alpha must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"RhythmCreditConfig.k must be an int >= 1, got {self.k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"RhythmCreditConfig.seed must be an int, got {self.seed!r}")
        if self.micro_batch_size is not None and (isinstance(self.micro_batch_size, bool) or not isinstance(
                self.micro_batch_size, int) or self.micro_batch_size < 1):
            raise ValueError(f"RhythmCreditConfig.micro_batch_size must be None or an int >= 1, "
                             f"got {self.micro_batch_size!r}")
        self.horizon = tuple(self.horizon)
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)

    @property
    def needs_scorer(self) -> bool:
        """True when the strategy reads WAAD / FAI (one extra no-grad attention pass per rollout batch)."""
        return self.strategy in ATTENTION_STRATEGIES

    def scorer_kwargs(self, default_micro_batch_size: int = 8) -> dict:
        """Config of :class:`rhythm.RhythmScorer` (``RhythmScorer(model, **cfg.scorer_kwargs())``)."""
        return dict(window=self.window, horizon=self.horizon, head_fraction=self.head_fraction, q=self.q,
                    gamma_amp=self.gamma_amp, alpha=self.alpha, k=self.k, seed=self.seed, layers=self.layers,
                    grouping=self.grouping, backend=self.backend,
                    micro_batch_size=self.micro_batch_size or int(default_micro_batch_size))

    def credit_kwargs(self, seed: int | None = None) -> dict:
        """Options of :func:`rhythm.credit_multipliers` (and overrides of ``RhythmScores.gamma``)."""
        return dict(q=self.q, gamma_amp=self.gamma_amp, alpha=self.alpha, k=self.k,
                    seed=self.seed if seed is None else int(seed))

    def step_seed(self, step: int, rank: int = 0, call: int = 0) -> int:
        """Seed of the ``random`` baseline for one rollout batch: changes with the training step, the process
        rank and the call counter (several generation batches in one step), reproducible across runs."""
        return hash((int(self.seed), int(step), int(rank), int(call))) & 0x7FFFFFFF

    def to_dict(self) -> dict:
        return asdict(self)
