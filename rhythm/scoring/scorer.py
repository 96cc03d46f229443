"""``RhythmScorer``: one no-grad pass over rollouts -> per-token WAAD / FAI and credit multipliers.

Data flow: input_ids + masks -> :class:`rhythm.capture.recording.Capture` (per-head
lse / distance / waad / fai of the sampled layers, the forward stopped after the last one) -> head groups
(``rhythm.credit.heads``) -> per-token signals -> ``credit_multipliers`` on demand (``RhythmScores.gamma``).

Two input layouts:

- padded: ``input_ids [B, T]``, ``attention_mask [B, T]`` (left and/or right padding, one contiguous real
  span per row), ``response_mask [B, T]`` (a suffix of each row's real span);
- packed (verl's remove-padding path): ``B = 1`` and ``attention_mask=None`` with ``cu_seqlens
  [n_seq + 1]`` and/or ``position_ids [1, T]`` whose resets mark where each sequence starts.

Inside, every sequence is a :class:`~rhythm_kernels.segments.Span` (row, start, end, response start on the T
axis) of the layout's :class:`~rhythm_kernels.segments.Segments`; signals, head groups and credit are computed
and stored per sequence (:class:`TokenSignals`, one left-aligned row each), so a packed row holding several
rollouts is scored like a padded batch. ``Segments.from_rows`` / ``to_rows`` are the one conversion to and
from the input layout, ``to_response_tensor`` the one to the trainer's response tensors [B, R_len].
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cached_property

import torch

from rhythm_kernels.segments import Segments, Span, influence_counts, is_integer, segments_from_cu_seqlens, \
    segments_from_mask, to_response_tensor, trainer_response_mask

from rhythm.config import GAMMA_KNOBS, SCORER_KNOBS, ConfigError, knob_dataclass
from rhythm.capture.architectures import attention_layers
from rhythm.capture.recording import Capture, CaptureRequest, cu_seqlens_from_position_ids
from rhythm.credit.gamma import compute_gamma
from rhythm.credit.heads import HeadGroups, fixed_head_groups, mean_response_distance, sample_layers, select_head_groups, \
    token_signals

GAMMA_OVERRIDES = GAMMA_KNOBS


@knob_dataclass(SCORER_KNOBS)
class ScorerConfig:
    """Every default of docs/definitions.md sections 2-4 and the scorer's own knobs (defined once, with their
    checks, in :mod:`rhythm.config`; a bad value fails here, on construction, naming the field).

    window: W of WAAD. horizon: (H_lo, H_hi) of FAI, H_hi None = to the end. head_fraction: size of H_loc
    and H_glob as a fraction of the sampled heads. q, gamma_amp, alpha, k, seed: credit defaults (section 4).
    layers: sampled layers (None = the five middle-third layers). grouping: "per_sequence" (default)
    or "fixed" (computed once from the first micro-batch with a response, then reused; or pass
    ``fixed_groups``). micro_batch_size: sequences per forward. backend: ``attention_metrics`` backend.
    validate: let ``attention_metrics`` check q/k/v for NaN/Inf (one host sync per layer).
    temperature: sampling temperature of the rollouts; the entropy baseline (``with_entropy``) reads the
    entropy of softmax(logits / temperature), the distribution that sampled each token (section 4).
    """

    fixed_groups: HeadGroups | None = None

    def __post_init__(self):
        if self.fixed_groups is not None and not isinstance(self.fixed_groups, HeadGroups):
            raise ConfigError(f"ScorerConfig.fixed_groups must be None or a rhythm.HeadGroups, got "
                              f"{type(self.fixed_groups).__name__}")


@dataclass(frozen=True)
class TokenSignals:
    """Per-token signals of scored sequences, one row per sequence (left-aligned, ``[n_seq, L]``): what
    :meth:`RhythmScorer.signals` returns and what :class:`RhythmScores` stores.

    waad, fai: float32 [n_seq, L] per token after head grouping, on every position of the sequence (prompt
        included); 0 after its end and on every position of a sequence whose response is empty.
    fai_valid: bool [n_seq, L], False after the end and where FAI's horizon holds no response row.
    response: bool [n_seq, L], True on the response positions.
    head_distance: float32 [n_seq, n_heads], d(l, h) = mean response distance per head.
    groups: HeadGroups, local / global_ long [n_seq, n_sel] indices into the flattened (layer, head) axis
        (``rhythm.credit.heads.head_to_layer`` maps them back); -1 on sequences with an empty response.
    entropy: float32 [n_seq, L] or None; entropy[t] of the distribution that sampled token t (0 on each
        sequence's first token and after its end).
    """

    waad: torch.Tensor
    fai: torch.Tensor
    fai_valid: torch.Tensor
    response: torch.Tensor
    head_distance: torch.Tensor
    groups: HeadGroups
    entropy: torch.Tensor | None = None

    def to(self, device) -> "TokenSignals":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return TokenSignals(waad=move(self.waad), fai=move(self.fai), fai_valid=move(self.fai_valid),
                            response=move(self.response), head_distance=move(self.head_distance),
                            groups=HeadGroups(move(self.groups.local), move(self.groups.global_)),
                            entropy=move(self.entropy))


# The notebook view of RhythmScores (``_repr_html_``) is drawn by the report layer: rhythm.report.html registers
# its renderer here when it is imported (``import rhythm`` imports it), so the scoring layer never imports upward.
_notebook_view = None


def set_notebook_view(render) -> None:
    """Register ``render(scores: RhythmScores) -> str`` (one HTML element) as the notebook view of
    :class:`RhythmScores` (None: no view, the notebook shows the plain repr). rhythm.report.html calls it."""
    global _notebook_view
    _notebook_view = render


@dataclass
class RhythmScores:
    """Per-token signals of one scored batch, stored per sequence (``signals``: one left-aligned row per
    sequence) with ``segments`` saying where each sequence sits in the input layout.

    signals: :class:`TokenSignals` [n_seq, L_max] (n_seq = B when padded).
    segments: ``rhythm_kernels.segments.Segments`` (on the CPU) of the input layout [B, T]: one
        :class:`~rhythm_kernels.segments.Span` (row, start, end, response_start) per sequence; its
        ``to_rows`` / ``from_rows`` are the one conversion between the rows and that layout.
    layers: the sampled layer indices. heads_per_layer: query heads per layer.
    config: the scorer's ScorerConfig (defaults of gamma()).

    In the input layout ([B, T]; B = 1 when packed), each converted once on first use: waad, fai (0 on
    padding), fai_valid, response_mask, attention_mask (the real positions), entropy (or None). Per sequence:
    groups (HeadGroups [n_seq, n_sel]), head_distance [n_seq, n_heads].
    """

    signals: TokenSignals
    segments: Segments
    layers: list[int]
    heads_per_layer: int
    config: ScorerConfig

    @property
    def packed(self) -> bool:
        return self.segments.packed

    @property
    def groups(self) -> HeadGroups:
        return self.signals.groups

    @property
    def head_distance(self) -> torch.Tensor:
        return self.signals.head_distance

    # -- the input layout [B, T] --------------------------------------------------------------------------
    @cached_property
    def waad(self) -> torch.Tensor:
        return self.segments.from_rows(self.signals.waad)

    @cached_property
    def fai(self) -> torch.Tensor:
        return self.segments.from_rows(self.signals.fai)

    @cached_property
    def fai_valid(self) -> torch.Tensor:
        return self.segments.from_rows(self.signals.fai_valid, fill=False)

    @cached_property
    def response_mask(self) -> torch.Tensor:
        return self.segments.from_rows(self.signals.response, fill=False)

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        return self.segments.from_rows(torch.ones_like(self.signals.response), fill=False)

    @cached_property
    def entropy(self) -> torch.Tensor | None:
        return None if self.signals.entropy is None else self.segments.from_rows(self.signals.entropy)

    def gamma(self, strategy: str = "coupled", *, row_ids=None, **overrides) -> torch.Tensor:
        """Credit multipliers gamma float32 [B, T] in the input layout (``rhythm.credit.gamma.compute_gamma`` on
        the per-sequence rows; 1 off the responses).

        row_ids: the identity of each sequence for the ``random`` baseline (default 0..n_seq-1; the keys of a
        sequence are drawn from its first real token, so its gamma does not depend on the batch).
        overrides: any of q, gamma_amp, alpha, k, seed (defaults from the scorer's config).
        """
        unknown = sorted(set(overrides) - set(GAMMA_OVERRIDES))
        if unknown:
            raise TypeError(f"gamma() got unknown override(s) {unknown}; allowed: {GAMMA_OVERRIDES}")
        options = {name: overrides.get(name, getattr(self.config, name)) for name in GAMMA_OVERRIDES}
        if strategy == "entropy" and self.signals.entropy is None:
            raise ValueError("strategy='entropy' needs per-token entropies: score(..., with_entropy=True)")
        rows = self.signals    # one row per sequence, left-aligned: each sequence starts at column 0
        gamma = compute_gamma(strategy, rows.response, waad=rows.waad, fai=rows.fai, fai_valid=rows.fai_valid,
                              entropy=rows.entropy, row_ids=row_ids, **options)
        return self.segments.from_rows(gamma, fill=1.0)

    def _repr_html_(self) -> str | None:
        """Notebook view: head groups, top anchors / preplan tokens with their values, WAAD / FAI strips, drawn
        by the renderer the report layer registered (:func:`set_notebook_view`); None (the plain repr) when
        none is."""
        return None if _notebook_view is None else _notebook_view(self)

    def fai_rows(self) -> torch.Tensor:
        """|T(s)| per sequence: long [n_seq, L_max], the number of response rows each FAI value averages over
        (docs/definitions.md section 2; 0 where FAI is not valid and after each sequence's end)."""
        counts = influence_counts(self.segments, *self.segments.shape, tuple(self.config.horizon))
        return self.segments.to_rows(counts)

    def selection(self, **overrides):
        """The preplan / anchor / dominated / intro masks (``rhythm.credit.selection.rhythm_selection``) per
        sequence: [n_seq, L_max], row i = sequence i left-aligned (``intro_of`` indexes that row).

        overrides: q, k (defaults from the scorer's config); min_fai_rows (opt-in, default None = the paper's
        definition): anchor candidates need at least this many response rows behind their FAI, |T(s)|."""
        from rhythm.credit.selection import rhythm_selection

        unknown = sorted(set(overrides) - {"q", "k", "min_fai_rows"})
        if unknown:
            raise TypeError(f"selection() got unknown override(s) {unknown}; allowed: ['k', 'min_fai_rows', 'q']")
        q = overrides.get("q", self.config.q)
        k = overrides.get("k", self.config.k)
        rows = self.signals
        eligible = rows.fai_valid
        minimum = overrides.get("min_fai_rows")
        if minimum is not None:
            if not is_integer(minimum) or minimum < 1:
                raise ValueError(f"min_fai_rows must be None or an int >= 1, got {minimum!r}")
            eligible = eligible & (self.fai_rows().to(eligible.device) >= int(minimum))
        return rhythm_selection(rows.waad, rows.fai, rows.response, eligible, q=q, k=k)


# The trainer layout (prompt left-padded + response right-padded) and its response tensors [B, R_len] are
# described in rhythm_kernels.segments, beside the padded and packed layouts; re-exported here.
__all__ = ["RhythmScorer", "RhythmScores", "ScorerConfig", "TokenSignals", "Recording", "to_response_tensor",
           "trainer_response_mask"]


# ---- the scorer ---------------------------------------------------------------------------------------------

class RhythmScorer:
    """Score rollouts of a transformers causal LM (docs/definitions.md section 8).

    ``RhythmScorer(model, **config)`` with config keys of :class:`ScorerConfig`;
    ``.score(input_ids, attention_mask, response_mask, *, position_ids=None, cu_seqlens=None,
    with_entropy=False) -> RhythmScores``.
    """

    def __init__(self, model: torch.nn.Module, **config):
        valid = {f.name for f in fields(ScorerConfig)}
        unknown = sorted(set(config) - valid)
        if unknown:
            raise TypeError(f"RhythmScorer got unknown config key(s) {unknown}; valid keys: {sorted(valid)}")
        self.config = ScorerConfig(**config)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a transformers causal LM (a torch.nn.Module), got {type(model).__name__}")
        if getattr(model, "config", None) is None:
            raise TypeError(f"model must be a transformers causal LM: RhythmScorer reads model.config "
                            f"(num_hidden_layers, num_attention_heads) and hooks its attention, but "
                            f"{type(model).__name__} has no config")
        self.model = model
        text_config = _text_config(model)
        self.num_layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
        self.heads_per_layer = int(getattr(text_config, "num_attention_heads", 0) or 0)
        if self.heads_per_layer < 1:
            raise ValueError(f"model config ({type(text_config).__name__}) has no num_attention_heads")
        # A hybrid's softmax-attention layers (the only ones with attention to sample), None = every layer.
        attention = attention_layers(text_config)
        if self.config.layers is None:
            if self.num_layers < 3:
                raise ValueError(f"the model has {self.num_layers} layer(s); the middle-third layer sampling "
                                 "(docs/definitions.md section 3) needs "
                                 "at least 3 (pass layers=... explicitly)")
            self.layers = sample_layers(self.num_layers, attention)
        else:
            self.layers = sorted({int(x) for x in self.config.layers})
            if not self.layers or self.layers[0] < 0 or self.layers[-1] >= self.num_layers:
                raise ValueError(f"layers must be non-empty indices in [0, {self.num_layers}), got {self.config.layers}")
            other = [x for x in self.layers if attention is not None and x not in attention]
            if other:
                raise ValueError(f"layers {other} are not softmax-attention layers of this hybrid model (its "
                                 f"attention layers: {attention}); only those can be sampled")
        self.fixed_groups = self.config.fixed_groups

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- public --------------------------------------------------------------------------------------------
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              response_mask: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, with_entropy: bool = False, progress=None) -> RhythmScores:
        """One no-grad pass in micro-batches (see the module docstring for the layouts).

        input_ids: long [B, T]. attention_mask: [B, T] bool/0-1 int (None = all real; must be None when
        packed). response_mask: [B, T] bool/0-1 int, a suffix of each sequence's real span (may be empty).
        position_ids: long [B, T] (padded: default cumsum(mask) - 1; packed: resets mark sequences).
        cu_seqlens: long [n_seq + 1] packed boundaries (B = 1). with_entropy: also run the upper layers and
        the LM head for per-token entropies. progress: optional callable(n_done_sequences) per micro-batch.
        """
        input_ids, mask, position_ids, segments = self._prepare(
            input_ids, attention_mask, response_mask, position_ids, cu_seqlens)
        parts = []
        model = self.model
        was_training = model.training
        model.eval()
        try:
            # no_grad rather than inference_mode: the policy's parameters stay ordinary tensors, so training
            # wrappers that version them (FSDP2's unshard) work during and after the pass.
            with torch.no_grad(), Capture(model) as capture:
                size = self.config.micro_batch_size
                for first in range(0, segments.count, size):
                    chunk = segments.spans[first:first + size]
                    parts.append(self._score_chunk(capture, chunk, input_ids, position_ids, packed=segments.packed,
                                                   with_entropy=with_entropy))
                    if progress is not None:
                        progress(len(chunk))
        finally:
            model.train(was_training)
        return RhythmScores(signals=_concat_rows(parts, segments.max_len).to(input_ids.device), segments=segments,
                            layers=list(self.layers), heads_per_layer=self.heads_per_layer,
                            config=replace(self.config, fixed_groups=self.fixed_groups))

    # -- fused: record inside a forward the caller runs ----------------------------------------------------------
    def recording(self, attention_mask: torch.Tensor, response_mask: torch.Tensor, *,
                  rows: torch.Tensor | None = None) -> "Recording":
        """Set up recording inside a forward the caller runs itself (a trainer's log-prob or training forward)
        over a padded batch; nothing is computed here.

        attention_mask, response_mask: [B, T] bool/0-1 (as in :meth:`score`) of the batch the forward sees.
        rows: LongTensor [n] of the rows to record (None = all); the metrics of other rows are never computed.
        Use::

            rec = scorer.recording(mask, response, rows=rows)
            with Capture(model) as capture:
                result = capture.run(rec.request, forward=lambda: trainer_forward(...))
            scores = scorer.scores_from(rec, result.records)   # RhythmScores of the n recorded rows, [n, T]
            result.output                                      # what trainer_forward returned
        """
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be a [B, T] tensor, got {_describe(attention_mask)}")
        batch, length = attention_mask.shape
        mask = _as_bool_mask("attention_mask", attention_mask, (batch, length))
        response = _as_bool_mask("response_mask", response_mask, (batch, length))
        rows = torch.arange(batch) if rows is None else torch.as_tensor(rows, dtype=torch.long).reshape(-1).cpu()
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= batch:
            raise ValueError(f"rows must be a non-empty list of row indices in [0, {batch}), got {rows.tolist()}")
        mask, response = mask[rows], response[rows]
        segments = segments_from_mask(mask, *mask.shape, None, "cpu").with_response(response)
        device = self.device
        request = CaptureRequest(
            layers=tuple(self.layers), segments=segments.to(device),
            window=self.config.window, horizon=self.config.horizon, backend=self.config.backend,
            validate=self.config.validate, stop_after_last=False, metrics_only=True, rows=rows.to(device))
        return Recording(request=request, segments=segments, rows=rows)

    def scores_from(self, recording: "Recording", records: dict) -> RhythmScores:
        """RhythmScores [n, T] of the recorded rows.

        records: {layer: AttentionMetrics} of a forward run with ``recording.request`` (``CaptureResult.records``
        of ``Capture.run``), [n, Hq, T] each."""
        missing = [layer for layer in self.layers if layer not in records]
        if missing:
            raise RuntimeError(f"no metrics recorded for sampled layer(s) {missing}: pass the records of a forward "
                               "run with recording.request inside Capture.run")
        return RhythmScores(signals=self.signals(records, recording.segments),
                            segments=recording.segments, layers=list(self.layers),
                            heads_per_layer=self.heads_per_layer,
                            config=replace(self.config, fixed_groups=self.fixed_groups))

    # -- input checks -----------------------------------------------------------------------------------------
    def _prepare(self, input_ids, attention_mask, response_mask, position_ids, cu_seqlens):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
                or input_ids.dtype == torch.bool or input_ids.dtype.is_complex:
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {_describe(input_ids)}")
        input_ids = input_ids.long()   # any integer dtype (uint8, int32, ...) indexes the embedding as long
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {list(input_ids.shape)}")
        cpu = torch.device("cpu")
        if response_mask is None:
            raise ValueError("response_mask [B, T] is required (True on response tokens, a suffix of each sequence)")
        response = _as_bool_mask("response_mask", response_mask, (batch, length))
        if position_ids is not None:
            if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
                raise ValueError(f"position_ids must be an integer tensor [B, T], got {_describe(position_ids)}")
            if position_ids.dim() > 2:
                raise ValueError(f"position_ids must have shape [B, T] (or [T]), got {list(position_ids.shape)}: "
                                 "multimodal RoPE position ids ([B, 3, T] / [3, B, T]) are not supported; pass "
                                 "None (positions from the attention mask) or text-only [B, T] position ids")
            position_ids = position_ids.reshape(-1, length) if position_ids.dim() == 1 else position_ids
            if position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
                raise ValueError(f"position_ids must have shape [B, T] = [{batch}, {length}], got "
                                 f"{list(position_ids.shape)}")
            position_ids = position_ids.expand(batch, length).to(cpu, torch.long)
        packed = cu_seqlens is not None or (
            attention_mask is None and batch == 1 and position_ids is not None
            and cu_seqlens_from_position_ids(position_ids).numel() > 2)
        if packed:
            if attention_mask is not None:
                raise ValueError("attention_mask must be None for a packed batch (cu_seqlens / position_ids resets)")
            if cu_seqlens is None:
                cu_seqlens = cu_seqlens_from_position_ids(position_ids)
            elif not isinstance(cu_seqlens, torch.Tensor):
                raise TypeError(f"cu_seqlens must be an integer tensor, got {type(cu_seqlens).__name__}")
            cu_seqlens = cu_seqlens.to(cpu)
            segments = segments_from_cu_seqlens(cu_seqlens, batch, length, None, cpu)  # checks B = 1, the bounds
            if position_ids is None:
                position_ids = torch.cat([torch.arange(span.length) for span in segments.spans])[None]
            mask = torch.ones(batch, length, dtype=torch.bool)
        else:
            if attention_mask is None:
                mask = torch.ones(batch, length, dtype=torch.bool)
            else:
                mask = _as_bool_mask("attention_mask", attention_mask, (batch, length))
            segments = segments_from_mask(mask, batch, length, None, cpu)  # checks one contiguous span per row
            if position_ids is None:
                position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
        segments = segments.with_response(response)   # checks the response is a suffix of each sequence
        self._check_fits_model(input_ids, mask, position_ids)
        if not bool(mask.all()):
            # Padding ids are never attended to, so any value may stand there (-100, a tokenizer's pad id out of
            # the model's vocabulary): 0 goes to the embedding instead, which leaves every real position as is.
            input_ids = input_ids.masked_fill(~mask.to(input_ids.device), 0)
        return input_ids, mask, position_ids, segments

    def _check_fits_model(self, input_ids, mask, position_ids) -> None:
        """Token ids inside the embedding and positions below max_position_embeddings, on the real positions
        (one host sync), so a bad batch fails here naming the argument instead of deep inside the model."""
        embedding = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        vocab = getattr(embedding, "num_embeddings", None)
        max_positions = getattr(_text_config(self.model), "max_position_embeddings", None)
        real_ids = input_ids.cpu()[mask]
        checks = torch.stack([real_ids.min(), real_ids.max(), position_ids[mask].max()]).tolist()
        low, high, top_position = checks
        if low < 0 or (vocab is not None and high >= vocab):
            bad = low if low < 0 else high
            raise ValueError(f"input_ids holds token id {bad} on a real (attention_mask) position, outside the "
                             f"model's vocabulary [0, {vocab})")
        if isinstance(max_positions, int) and top_position >= max_positions:
            raise ValueError(f"input_ids: a sequence reaches position {top_position} but the model's "
                             f"max_position_embeddings is {max_positions} (sequences of at most {max_positions} "
                             "tokens; split or truncate longer ones)")

    # -- one micro-batch ----------------------------------------------------------------------------------------
    def _score_chunk(self, capture, spans, input_ids, position_ids, *, packed, with_entropy) -> TokenSignals:
        """TokenSignals of the sequences ``spans`` (of the input layout). With ``batch_invariant`` (the default)
        each sequence runs in a forward of its own, [1, n] over exactly its n tokens, so every number computed
        for it is a function of its tokens alone (docs/definitions.md section 7, batch invariance); otherwise
        one forward covers them all. Head groups are chosen over the micro-batch either way (per sequence, or
        the fixed grouping's first micro-batch)."""
        forwards = [[span] for span in spans] if self.config.batch_invariant else [list(spans)]
        sequences = [seq for group in forwards for seq in self._forward(capture, group, input_ids, position_ids,
                                                                         packed=packed, with_entropy=with_entropy)]
        return self._signals_of(sequences)

    def _forward(self, capture, spans, input_ids, position_ids, *, packed, with_entropy):
        """One forward over the part of the input the sequences ``spans`` cover: packed, the columns [lo, hi) of
        the one row; padded, their rows and the columns [lo, hi) that hold any of their real tokens; a single
        sequence as [1, n] with no attention mask in both layouts (the same call whatever its layout).
        Returns one :class:`_SequenceMetrics` per span (with its entropies when ``with_entropy``)."""
        device = self.device
        lo, hi = min(span.start for span in spans), max(span.end for span in spans)
        rows = [0] if packed else [span.row for span in spans]
        shift = lambda span, row: Span(row, span.start - lo, span.end - lo, span.response_start - lo)  # noqa: E731
        local = Segments.from_spans([shift(span, 0 if packed else j) for j, span in enumerate(spans)],
                                    (len(rows), hi - lo))
        ids, pos = input_ids[rows, lo:hi], position_ids[rows, lo:hi]
        model_mask = None if packed or len(spans) == 1 else \
            local.from_rows(torch.ones(local.count, local.max_len, dtype=torch.long))
        request = CaptureRequest(
            layers=tuple(self.layers), segments=local.to(device), window=self.config.window,
            horizon=self.config.horizon, backend=self.config.backend, validate=self.config.validate,
            stop_after_last=not with_entropy)
        inputs = dict(input_ids=ids.to(device), attention_mask=None if model_mask is None else model_mask.to(device),
                      position_ids=pos.to(device))
        forward = self._decoder_forward if with_entropy else None
        result = capture.run(request, forward=forward, **inputs)
        entropy = self._entropy(result.output, ids.shape) if with_entropy else None
        return self._sequence_metrics(result.records, local, entropy)

    def signals(self, records, segments: Segments) -> TokenSignals:
        """Per-token signals of one recorded forward, one row per sequence.

        records: {layer: AttentionMetrics} of the sampled layers (``Capture.run``), in the forward's layout.
        segments: that layout's ``Segments`` (one Span per sequence on its T axis).
        Returns :class:`TokenSignals` of CPU tensors [n_seq, L_max] (head groups -1 and signals 0 on sequences
        with an empty response)."""
        return self._signals_of(self._sequence_metrics(records, segments))

    def _sequence_metrics(self, records, segments: Segments, entropy: torch.Tensor | None = None) \
            -> list["_SequenceMetrics"]:
        """Each sequence's per-head metrics of the sampled layers, copied out of the forward's layout onto its own
        n positions (contiguous [n_heads, n], heads flattened in (layer, head) order), so that nothing computed
        from them depends on the layout's width or on where the sequence sat in it. entropy: float32 [B, T] of
        the forward's layout (``_entropy``), or None."""
        stack = lambda name: torch.cat([getattr(records[l], name) for l in self.layers], dim=1).float().cpu()  # noqa
        per_head = {name: stack(name) for name in ("distance", "waad", "fai")}
        fai_valid = records[self.layers[0]].fai_valid[:, 0].cpu()
        out = []
        for span in segments.spans:
            own = None
            if entropy is not None:
                own = entropy[span.row, span.start:span.end].clone()
                own[:1] = 0.0  # a sequence's first token was not sampled from this model
            out.append(_SequenceMetrics(**{name: x[span.row, :, span.start:span.end].contiguous()
                                           for name, x in per_head.items()},
                                        fai_valid=fai_valid[span.row, span.start:span.end].clone(),
                                        prompt_length=span.prompt_length, entropy=own))
        return out

    def _signals_of(self, sequences: list["_SequenceMetrics"]) -> TokenSignals:
        """TokenSignals [n_seq, L_max] of sequences' per-head metrics: d(l, h) per sequence, head groups over
        them (``grouping``), then per-token WAAD / FAI, each sequence on its own n positions."""
        count, width = len(sequences), max(s.length for s in sequences)
        has_response = torch.tensor([s.length > s.prompt_length for s in sequences])
        d = torch.cat([mean_response_distance(s.distance[None], s.response[None]) for s in sequences])  # [n, H]
        groups = self._groups(d, has_response).broadcast(count)
        waad, fai = torch.zeros(count, width), torch.zeros(count, width)
        fai_valid = torch.zeros(count, width, dtype=torch.bool)
        response = torch.zeros(count, width, dtype=torch.bool)
        entropy = None if sequences[0].entropy is None else torch.zeros(count, width)
        for i, s in enumerate(sequences):
            response[i, :s.length] = s.response
            if entropy is not None:
                entropy[i, :s.length] = s.entropy
            if not bool(has_response[i]):
                continue   # no response: signals 0, fai_valid False, head groups -1
            own = HeadGroups(groups.local[i:i + 1], groups.global_[i:i + 1])
            waad_tok, fai_tok = token_signals(s.waad[None], s.fai[None], own)
            waad[i, :s.length], fai[i, :s.length], fai_valid[i, :s.length] = waad_tok[0], fai_tok[0], s.fai_valid
        keep = has_response[:, None]
        return TokenSignals(
            waad=waad, fai=fai, fai_valid=fai_valid, response=response, head_distance=d,
            groups=HeadGroups(torch.where(keep, groups.local, -1), torch.where(keep, groups.global_, -1)),
            entropy=entropy)

    def _groups(self, d: torch.Tensor, has_response: torch.Tensor) -> HeadGroups:
        if self.config.grouping == "per_sequence":
            return select_head_groups(d, self.config.head_fraction)
        if self.fixed_groups is None:
            if not bool(has_response.any()):
                return select_head_groups(d, self.config.head_fraction)  # rows are zeroed anyway
            self.fixed_groups = fixed_head_groups(d, has_response, self.config.head_fraction)
        return HeadGroups(self.fixed_groups.local.cpu(), self.fixed_groups.global_.cpu())

    # -- entropy: the whole model, LM head applied in chunks ------------------------------------------------------
    def _decoder_forward(self, **inputs):
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if decoder is None or decoder is self.model:
            return self.model(**inputs, use_cache=False, output_hidden_states=True).hidden_states[-1]
        return decoder(**inputs, use_cache=False).last_hidden_state

    def _entropy(self, hidden: torch.Tensor, shape) -> torch.Tensor:
        """entropy [b, t] with entropy[:, t] = H(softmax(logits[:, t - 1])) (0 at t = 0), float32 on CPU."""
        head = self.model.get_output_embeddings()
        softcap = getattr(_text_config(self.model), "final_logit_softcapping", None)
        batch, length = shape
        out = torch.zeros(batch, length, dtype=torch.float32)
        step = 512
        for a in range(0, length - 1, step):
            b = min(a + step, length - 1)
            logits = head(hidden[:, a:b]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            logits = logits / self.config.temperature      # the distribution that sampled the token
            logp = torch.log_softmax(logits, dim=-1)
            out[:, a + 1: b + 1] = -(logp.exp() * logp).sum(-1).cpu()
        return out


@dataclass(frozen=True)
class _SequenceMetrics:
    """One sequence's per-head metrics of the sampled layers on its own n positions (prompt and response).

    distance, waad, fai: float32 [n_heads, n] (heads flattened in (layer, head) order); fai_valid: bool [n];
    prompt_length: the positions before its response (a suffix of length n - prompt_length); entropy:
    float32 [n] (0 at the first token) or None.
    """

    distance: torch.Tensor
    waad: torch.Tensor
    fai: torch.Tensor
    fai_valid: torch.Tensor
    prompt_length: int
    entropy: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.fai_valid.numel())

    @property
    def response(self) -> torch.Tensor:
        """bool [n]: True on the response positions."""
        return torch.arange(self.length) >= self.prompt_length


@dataclass
class Recording:
    """A padded batch set up for recording inside the caller's own forward (:meth:`RhythmScorer.recording`).

    request: the CaptureRequest to pass to ``Capture.run`` (metrics_only, rows = the recorded rows).
    segments: Segments [n, T] of the recorded rows (row j = the j-th recorded row).
    rows: LongTensor [n], the recorded rows of the forward's batch.
    """

    request: CaptureRequest
    segments: Segments
    rows: torch.Tensor

    @property
    def response_mask(self) -> torch.Tensor:
        """bool [n, T]: the response positions of the recorded rows."""
        return self.segments.from_rows(self.segments.response_rows(), fill=False)


def _concat_rows(parts: list[TokenSignals], width: int) -> TokenSignals:
    """The micro-batches' TokenSignals (each as wide as its own longest sequence) as one [n_seq, width] set."""
    def cat(name, fill):
        xs = [getattr(part, name) for part in parts]
        if xs[0] is None:
            return None
        out = torch.full((sum(x.shape[0] for x in xs), width), fill, dtype=xs[0].dtype)
        first = 0
        for x in xs:
            out[first:first + x.shape[0], : x.shape[1]] = x
            first += x.shape[0]
        return out

    return TokenSignals(
        waad=cat("waad", 0.0), fai=cat("fai", 0.0), fai_valid=cat("fai_valid", False), response=cat("response", False),
        head_distance=torch.cat([part.head_distance for part in parts]),
        groups=HeadGroups(torch.cat([part.groups.local for part in parts]),
                          torch.cat([part.groups.global_ for part in parts])),
        entropy=cat("entropy", 0.0))


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _as_bool_mask(name: str, mask, shape) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool or 0/1 integer tensor of shape {list(shape)}, got "
                        f"{type(mask).__name__}")
    if mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool or 0/1 integer tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} (like input_ids), got {list(mask.shape)}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 values")
    return mask.bool().cpu()


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
