"""The one path to the credit multipliers gamma [B, T] (docs/definitions.md section 4).

Every caller - ``rhythm.credit_multipliers``, ``RhythmScores.gamma``, ``rhythm score``, the TRL and verl
adapters - gets gamma from :func:`compute_gamma`; they supply only the layout (a response mask, and where
each row's sequence starts), the signals and the rows' identities. :data:`STRATEGY_TABLE` says what each
strategy reads; :func:`row_seed` is the one seeding rule of the random baseline; :func:`gamma_sums` /
:func:`gamma_metrics` are the one definition of the logged statistics ``rhythm/frac_amplified`` and
``rhythm/gamma_mean``.

    local:   gamma = 1 + (gamma_amp - 1) * 1{t in T_loc}
    global:  gamma = 1 + (gamma_amp - 1) * 1{t in T_glob}
    coupled: gamma = 1 + (gamma_amp - 1) * 1{t in T_glob \\ D} + (1 - alpha)(gamma_amp - 1) * 1{t in D}
                       + alpha (gamma_amp - 1) * 1{t in I(D)}                      (additive)
    random / entropy: gamma = 1 + (gamma_amp - 1) * 1{t chosen}  (ceil(q |R|) tokens, top keys / top entropy)

gamma = 1 off the response, on padding and on every position of a row with an empty response.

The random baseline, per row b (independent of the batch, its padding, its device and its micro-batching):
the CPU ``torch.Generator`` seeded with ``row_seed(seed, row_ids[b])`` draws uniform float32 keys; the key of
the token at sequence position j (j = 0 at the row's first real token, column ``sequence_start[b]``, prompt
included) is draw j. The response tokens with the top ceil(q |R|) keys are chosen (ties to the lower
position).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from rhythm_kernels.segments import is_integer

from rhythm.config import STRATEGIES, check, default
from rhythm.credit import selection as sel


@dataclass(frozen=True)
class Strategy:
    """What one strategy reads. waad / fai / entropy: the per-token signal is required; fai_valid: the
    anchors are chosen among the fai_valid tokens when a mask is given; seed: the choice is drawn from the seed
    and each row's identity (:func:`row_seed`)."""

    name: str
    waad: bool
    fai: bool
    fai_valid: bool
    entropy: bool
    seed: bool
    summary: str

    @property
    def attention(self) -> bool:
        """Reads WAAD or FAI: needs the attention pass (a scorer or a recorded forward)."""
        return self.waad or self.fai


STRATEGY_TABLE: dict[str, Strategy] = {s.name: s for s in (
    Strategy("local", waad=True, fai=False, fai_valid=False, entropy=False, seed=False,
             summary="preplan tokens T_loc: top q by abs(WAAD_t - WAAD_{t+1})"),
    Strategy("global", waad=False, fai=True, fai_valid=True, entropy=False, seed=False,
             summary="anchors T_glob: top q by FAI among the fai_valid tokens"),
    Strategy("coupled", waad=True, fai=True, fai_valid=True, entropy=False, seed=False,
             summary="anchors, dominated anchors sharing credit with their intro preplan token"),
    Strategy("random", waad=False, fai=False, fai_valid=False, entropy=False, seed=True,
             summary="baseline: ceil(q |R|) tokens by seeded per-row random keys"),
    Strategy("entropy", waad=False, fai=False, fai_valid=False, entropy=True, seed=False,
             summary="baseline: top q by the rollout's per-token entropy"),
)}
assert tuple(STRATEGY_TABLE) == STRATEGIES, "rhythm.config.STRATEGIES and the strategy table must agree"


def strategy_info(strategy: str) -> Strategy:
    """The table entry of ``strategy`` (ConfigError naming the argument for an unknown one)."""
    return STRATEGY_TABLE[check("strategy", strategy)]


def attention_strategies() -> tuple[str, ...]:
    """The strategies that read WAAD or FAI (the others need no model pass)."""
    return tuple(name for name, s in STRATEGY_TABLE.items() if s.attention)


# ---- the random baseline's seeding rule ------------------------------------------------------------------

def row_seed(seed: int, row_id) -> int:
    """The random baseline's seed for one row: the first 8 bytes of sha256("{seed}\\0{type}\\0{id}")
    (little-endian), shifted right by one: 63 bits. ``type`` is the id's Python type name, so the int 5 and
    the string "5" draw differently."""
    digest = hashlib.sha256(f"{int(seed)}\0{type(row_id).__name__}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def trainer_row_ids(step: int, batch: int, rows: Iterable[int]) -> list[str]:
    """Row identities of a trainer's rollout batch: ``"step S batch C row I"`` - the training step, the
    generation batch within the process's run (0 when there is one per step) and the row's index in the
    step's whole (all-rank) batch. The trainer adapters (TRL, verl) use these with :func:`row_seed`."""
    return [f"step {int(step)} batch {int(batch)} row {int(i)}" for i in rows]


def sequence_starts(attention_mask: torch.Tensor) -> torch.Tensor:
    """long [B]: the column of each row's first real token (``attention_mask`` [B, T] bool / 0-1; 0 for a row
    without one) - the ``sequence_start`` of a padded trainer batch."""
    real = attention_mask.bool()
    cols = torch.arange(real.shape[1], device=real.device)
    first = torch.where(real, cols, real.shape[1]).amin(1) if real.shape[1] else real.sum(1)
    return torch.where(real.any(1), first, 0)


def random_keys(response_mask: torch.Tensor, seed: int, row_ids: Sequence | None = None,
                sequence_start: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """The random baseline's keys float32 [B, T] on the mask's device (see the module docstring): row b's
    key at column t is draw t - sequence_start[b] of the CPU generator seeded with row_seed(seed, row_ids[b]),
    for t up to the row's last response token; 0 elsewhere (never read). Inputs already checked."""
    batch, length = response_mask.shape
    keys = torch.zeros(batch, length, dtype=torch.float32)
    cols = torch.arange(length, device=response_mask.device)
    ends = torch.where(response_mask, cols + 1, 0).amax(1).tolist() if length else [0] * batch
    starts = _starts(sequence_start, batch)
    generator = torch.Generator()
    for b, (start, end) in enumerate(zip(starts, ends)):
        if end == 0:                     # empty response: nothing is chosen
            continue
        generator.manual_seed(row_seed(seed, b if row_ids is None else row_ids[b]))
        draws = torch.rand(end - start, generator=generator)       # draw j = sequence position j
        first = max(start, 0)            # a tensor that starts inside the sequence skips its first draws
        keys[b, first:end] = draws[first - start:]
    return keys.to(response_mask.device)


def _starts(sequence_start, batch: int) -> list[int]:
    if sequence_start is None:
        return [0] * batch
    return [int(s) for s in (sequence_start.tolist() if isinstance(sequence_start, torch.Tensor) else sequence_start)]


def _check_layout(response_mask, row_ids, sequence_start) -> None:
    """row_ids: None or one hashable id per row; sequence_start: None or one int per row, at or before the
    row's first response token (one host sync)."""
    batch, length = response_mask.shape
    if row_ids is not None:
        if isinstance(row_ids, (str, bytes)) or not hasattr(row_ids, "__len__") or len(row_ids) != batch:
            raise ValueError(f"row_ids must be a sequence of one id per row ({batch}), got {row_ids!r:.80}")
    if sequence_start is None:
        return
    if isinstance(sequence_start, torch.Tensor):
        if sequence_start.dim() != 1 or sequence_start.dtype.is_floating_point or sequence_start.dtype == torch.bool:
            raise ValueError(f"sequence_start must be an integer tensor [B], got {sequence_start.dtype} "
                             f"{list(sequence_start.shape)}")
        starts = sequence_start.tolist()
    else:
        starts = list(sequence_start)
    if len(starts) != batch or not all(is_integer(s) for s in starts):
        raise ValueError(f"sequence_start must hold one int per row ({batch}), got {starts!r:.80}")
    cols = torch.arange(length, device=response_mask.device)
    firsts = torch.where(response_mask, cols, length).amin(1).tolist() if length else [0] * batch
    for b, (s, first) in enumerate(zip(starts, firsts)):
        if s > min(first, length):
            raise ValueError(f"sequence_start[{b}] = {s} must be at most the row's first response position "
                             f"{min(first, length)}")


def random_selection(response_mask: torch.Tensor, *, q: float = default("q"), seed: int = default("seed"),
                     row_ids: Sequence | None = None, sequence_start=None) -> torch.Tensor:
    """ceil(q * |R|) response tokens per row chosen uniformly at random (bool [B, T]): the tokens the
    ``random`` strategy amplifies, drawn by the rule of the module docstring (row_ids default 0..B-1,
    sequence_start default 0). The same seed, ids and sequences give the same choice on every device and in
    every batch; trainers put the step into the ids (:func:`trainer_row_ids`) for fresh draws."""
    sel.check_signals(response_mask=response_mask)
    q, seed = check("q", q), check("seed", seed)
    _check_layout(response_mask, row_ids, sequence_start)
    sel.check_contents(response_mask)
    keys = random_keys(response_mask, seed, row_ids, sequence_start)
    return sel.top_q_mask(keys, response_mask, q, validate=False)[0]


# ---- the one gamma function ------------------------------------------------------------------------------

def compute_gamma(strategy: str, response_mask: torch.Tensor, *, waad=None, fai=None, fai_valid=None,
                  entropy=None, row_ids: Sequence | None = None, sequence_start=None,
                  q: float = default("q"), gamma_amp: float = default("gamma_amp"), alpha: float = default("alpha"),
                  k: int = default("k"), seed: int = default("seed")) -> torch.Tensor:
    """Per-token credit multipliers gamma (docs/definitions.md section 4), for every strategy and caller.

    Args:
        strategy: a key of :data:`STRATEGY_TABLE` ("local" | "global" | "coupled" | "random" | "entropy").
        response_mask: bool [B, T], True on response tokens (one contiguous run per row; empty rows allowed).
        waad, fai: float [B, T] per-token signals after head grouping; required where the strategy reads them.
        fai_valid: bool [B, T] or None (= every position valid); anchors are chosen among valid tokens only.
        entropy: float [B, T], per-token entropy of the sampling distribution (required for "entropy").
        row_ids: the "random" baseline's row identities, one per row (ints / strings; default: 0..B-1).
        sequence_start: long [B] (or ints): column of each row's first real token (default 0; the random
            keys are drawn from there, so a row's draw does not depend on its padding). Negative for a tensor
            that starts inside the sequence: a response-aligned [B, R_len] tensor has -(prompt length).
        q: selected fraction in (0, 1]. gamma_amp: amplification >= 1. alpha: intro share in [0, 1].
        k: look-back window of dominated anchors (>= 1). seed: base seed of the "random" strategy.
    Returns:
        gamma: float32 [B, T] on the mask's device, 1 off the response; in [1, 1 + (1 + alpha)(gamma_amp - 1)].
    """
    info = strategy_info(strategy)
    given = {"waad": waad, "fai": fai, "entropy": entropy}
    for name in ("waad", "fai", "entropy"):
        if getattr(info, name) and given[name] is None:
            if name == "entropy":
                raise ValueError("entropy [B, T] is required for strategy='entropy' (the per-token entropy of the "
                                 "rollout's sampling distribution)")
            raise ValueError(f"{name} is required for strategy={info.name!r}")
    sel.check_signals(response_mask=response_mask, waad=waad, fai=fai, fai_valid=fai_valid, entropy=entropy)
    q, gamma_amp, alpha, k, seed = (check(name, value) for name, value in
                                    (("q", q), ("gamma_amp", gamma_amp), ("alpha", alpha), ("k", k), ("seed", seed)))
    _check_layout(response_mask, row_ids, sequence_start)
    sel.check_contents(response_mask, fai_valid, waad=waad if info.waad else None, fai=fai if info.fai else None,
                       entropy=entropy if info.entropy else None)
    if response_mask.shape[1] == 0:      # T = 0: no response token anywhere
        return torch.ones(response_mask.shape, dtype=torch.float32, device=response_mask.device)

    keys = random_keys(response_mask, seed, row_ids, sequence_start) if info.seed else None
    signals = dict(waad=waad, fai=fai, fai_valid=fai_valid, entropy=entropy, keys=keys)
    rows = _chunk_rows(response_mask)
    if rows >= response_mask.shape[0]:
        return _gamma(info.name, response_mask, signals, q, gamma_amp, alpha, k)
    # On CPU, rows are processed in chunks of about CPU_CHUNK_ELEMENTS tokens: the working set stays in
    # cache (about 1.6x faster at B = 512, T = 8K) and the extra memory is bounded by the chunk, not by B.
    gamma = torch.empty(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    for lo in range(0, response_mask.shape[0], rows):
        part = slice(lo, lo + rows)
        chunk = {name: None if x is None else x[part] for name, x in signals.items()}
        gamma[part] = _gamma(info.name, response_mask[part], chunk, q, gamma_amp, alpha, k)
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
        chosen = sel.top_q_mask(signals["keys"], response_mask, q, validate=False)[0]
    elif strategy == "entropy":
        chosen = sel.top_q_mask(signals["entropy"], response_mask, q, validate=False)[0]
    elif strategy == "local":
        # T_loc alone (no FAI, no medians): top q by Delta over the |R| - 1 tokens where it is defined.
        delta, delta_valid = sel.response_delta(waad, response_mask)
        chosen = sel.top_q_mask(delta, delta_valid, q, validate=False)[0]
    elif strategy == "global":
        eligible = response_mask if fai_valid is None else response_mask & fai_valid
        chosen = sel.top_q_mask(fai, eligible, q, validate=False)[0]
    else:
        s = sel.rhythm_selection(waad, fai, response_mask, fai_valid, q=q, k=k, validate=False)
        # 1 + amp 1{T_glob \ D} + (1 - alpha) amp 1{D} + alpha amp 1{I(D)}
        gamma = torch.ones(response_mask.shape, dtype=torch.float32, device=response_mask.device)
        gamma += amp * (s.anchor & ~s.dominated).float()
        gamma += (1.0 - alpha) * amp * s.dominated.float()
        gamma += alpha * amp * s.intro.float()
        return gamma
    return 1.0 + amp * chosen.float()


# ---- the logged statistics ---------------------------------------------------------------------------------

def gamma_sums(gamma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float64 [3] on the CPU: (tokens with gamma > 1, sum of gamma (a float32 sum), tokens) over ``mask``
    (bool, the shape of gamma: the tokens the loss reads). Sums of several batches or ranks add up."""
    mask = mask.bool().to(gamma.device)
    gamma = gamma.float()
    return torch.stack([((gamma > 1) & mask).sum().double(), (gamma * mask).sum().double(),
                        mask.sum().double()]).cpu()


def gamma_metrics(sums: torch.Tensor) -> dict:
    """``rhythm/frac_amplified`` (share of the tokens with gamma > 1) and ``rhythm/gamma_mean`` (mean gamma
    over the tokens) from :func:`gamma_sums`; 0 / 0 reads as 0."""
    amplified, total, count = (float(x) for x in sums.tolist())
    count = max(count, 1.0)
    return {"rhythm/frac_amplified": amplified / count, "rhythm/gamma_mean": total / count}
