"""``RhythmScorer``: one no-grad pass over rollouts -> per-token WAAD / FAI and credit multipliers.

Data flow: input_ids + masks -> :class:`rhythm.capture.recording.Capture` (per-head
lse / distance / waad / fai of the sampled layers, the forward stopped after the last one) -> head groups
(``rhythm.credit.heads``) -> per-token signals -> ``credit_multipliers`` on demand (``RhythmScores.gamma``).

Two input layouts, one output layout ``[B, T]`` matching the input:

- padded: ``input_ids [B, T]``, ``attention_mask [B, T]`` (left and/or right padding, one contiguous real
  span per row), ``response_mask [B, T]`` (a suffix of each row's real span);
- packed (verl's remove-padding path): ``B = 1`` and ``attention_mask=None`` with ``cu_seqlens
  [n_seq + 1]`` and/or ``position_ids [1, T]`` whose resets mark where each sequence starts.

Inside, every sequence is a *segment* (row, start, end, response start on the T axis); head groups and
credit are computed per segment, so a packed row holding several rollouts is scored like a padded batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from rhythm_kernels.segments import segments_from_cu_seqlens, segments_from_mask

from rhythm.config import GAMMA_KNOBS, SCORER_KNOBS, ConfigError, knob_dataclass
from rhythm.capture.recording import Capture, CaptureContext, cu_seqlens_from_position_ids
from rhythm.credit.shaping import credit_multipliers
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


@dataclass
class RhythmScores:
    """Per-token signals of one scored batch, in the layout of the input ([B, T]; B = 1 when packed).

    waad, fai: float32 [B, T] per token after head grouping, on every real position (prompt included),
        0 on padding and on every position of a sequence whose response is empty.
    fai_valid: bool [B, T], False on padding and where FAI's horizon holds no response row.
    response_mask, attention_mask: bool [B, T] (attention_mask: the real positions).
    entropy: float32 [B, T] or None; entropy[t] of the distribution that sampled token t (0 on each
        sequence's first token and on padding).
    layers: the sampled layer indices. heads_per_layer: query heads per layer.
    groups: HeadGroups, local/global_ long [n_seq, n_sel] indices into the flattened (layer, head) axis
        (``rhythm.credit.heads.head_to_layer`` maps them back); -1 on sequences with an empty response.
    head_distance: float32 [n_seq, n_heads], d(l, h) = mean response distance per head.
    segments: one (row, start, end, response_start) per sequence (n_seq = B when padded).
    config: the scorer's ScorerConfig (defaults of gamma()).
    """

    waad: torch.Tensor
    fai: torch.Tensor
    fai_valid: torch.Tensor
    response_mask: torch.Tensor
    attention_mask: torch.Tensor
    layers: list[int]
    heads_per_layer: int
    groups: HeadGroups
    head_distance: torch.Tensor
    segments: tuple[tuple[int, int, int, int], ...]
    config: ScorerConfig
    entropy: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return len(self.segments) != self.waad.shape[0]

    def gamma(self, strategy: str = "coupled", **overrides) -> torch.Tensor:
        """Credit multipliers gamma float32 [B, T] (``rhythm.credit_multipliers`` per sequence).

        overrides: any of q, gamma_amp, alpha, k, seed (defaults from the scorer's config).
        """
        unknown = sorted(set(overrides) - set(GAMMA_OVERRIDES))
        if unknown:
            raise TypeError(f"gamma() got unknown override(s) {unknown}; allowed: {GAMMA_OVERRIDES}")
        options = {name: overrides.get(name, getattr(self.config, name)) for name in GAMMA_OVERRIDES}
        if strategy == "entropy" and self.entropy is None:
            raise ValueError("strategy='entropy' needs per-token entropies: score(..., with_entropy=True)")
        rows = [self.waad, self.fai, self.response_mask, self.fai_valid]
        if self.entropy is not None:
            rows.append(self.entropy)
        if self.packed:
            rows = [to_rows(x, self.segments) for x in rows]
        entropy = rows[4] if len(rows) > 4 else None
        gamma = credit_multipliers(rows[0], rows[1], rows[2], strategy=strategy, fai_valid=rows[3],
                                   entropy=entropy, **options)
        if self.packed:
            gamma = from_rows(gamma, self.segments, self.waad.shape, fill=1.0)
        return gamma

    def _repr_html_(self) -> str:
        """Notebook view: head groups, top anchors / preplan tokens with their values, WAAD / FAI strips."""
        from rhythm.report.html import scores_html

        return scores_html(self)

    def selection(self, **overrides):
        """The preplan / anchor / dominated / intro masks (``rhythm.credit.selection.rhythm_selection``) in the
        padded layout [n_seq, L] (for a padded batch: [B, T], the input layout)."""
        from rhythm.credit.selection import rhythm_selection

        q = overrides.get("q", self.config.q)
        k = overrides.get("k", self.config.k)
        rows = [self.waad, self.fai, self.response_mask, self.fai_valid]
        if self.packed:
            rows = [to_rows(x, self.segments) for x in rows]
        return rhythm_selection(rows[0], rows[1], rows[2], rows[3], q=q, k=k)


# ---- layout helpers ---------------------------------------------------------------------------------------

def to_rows(x: torch.Tensor, segments, *, fill=0) -> torch.Tensor:
    """[B, ..., T] (padded or packed) -> [n_seq, ..., L_max]: each segment's positions, left-aligned."""
    width = max(end - start for _, start, end, _ in segments)
    out = torch.full((len(segments), *x.shape[1:-1], width), fill, dtype=x.dtype, device=x.device)
    for i, (row, start, end, _) in enumerate(segments):
        out[i, ..., : end - start] = x[row, ..., start:end]
    return out


def from_rows(rows: torch.Tensor, segments, shape, *, fill=0) -> torch.Tensor:
    """Inverse of :func:`to_rows`: [n_seq, L_max] -> a tensor of ``shape`` [B, T], ``fill`` elsewhere."""
    out = torch.full(tuple(shape), fill, dtype=rows.dtype, device=rows.device)
    for i, (row, start, end, _) in enumerate(segments):
        out[row, start:end] = rows[i, : end - start]
    return out


def trainer_response_mask(attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """response_mask [B, T] of a trainer batch ``input_ids = prompt (left-padded) + response (right-padded)``
    whose response tensors have width ``response_length``: real positions in [T - R_len, T)."""
    batch, length = attention_mask.shape
    if not 0 <= response_length <= length:
        raise ValueError(f"response_length must be in [0, T = {length}], got {response_length}")
    cols = torch.arange(length, device=attention_mask.device)
    return attention_mask.bool() & (cols >= length - response_length)[None, :]


def to_response_tensor(x: torch.Tensor, response_length: int, response_mask: torch.Tensor | None = None,
                       fill=None) -> torch.Tensor:
    """Map a scorer tensor [B, T] to a trainer's response tensor [B, R_len] (docs/definitions.md section 6).

    The trainer's response tensors cover positions [T - R_len, T) of ``prompt (left-padded) + response
    (right-padded)``; entry i multiplies the advantage of response token i, the token *at* position
    T - R_len + i (no shift: unlike log-probs, which are sliced [-R_len-1:-1] of the logits because logits
    predict the next token, the metrics are defined on the token's own position).

    response_mask [B, T] (optional): checked to lie inside the window, so nothing is silently dropped.
    fill: value written where the trainer's response is padding (None = keep x's value there).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [B, T], got shape {tuple(x.shape)}")
    length = x.shape[1]
    if isinstance(response_length, bool) or not isinstance(response_length, int) or not 0 <= response_length <= length:
        raise ValueError(f"response_length must be an int in [0, T = {length}], got {response_length!r}")
    out = x[:, length - response_length:]
    if response_mask is not None:
        if tuple(response_mask.shape) != tuple(x.shape):
            raise ValueError(f"response_mask must have shape {tuple(x.shape)}, got {tuple(response_mask.shape)}")
        if bool(response_mask[:, : length - response_length].any()):
            raise ValueError(f"response_mask marks positions before T - response_length = {length - response_length}: "
                             "the response tensors would miss them (is the prompt left-padded and the response "
                             "right-padded?)")
        if fill is not None:
            out = torch.where(response_mask[:, length - response_length:].bool(), out,
                              torch.as_tensor(fill, dtype=out.dtype, device=out.device))
    return out


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
        if self.config.layers is None:
            if self.num_layers < 3:
                raise ValueError(f"the model has {self.num_layers} layer(s); the middle-third layer sampling "
                                 "(docs/definitions.md section 3) needs "
                                 "at least 3 (pass layers=... explicitly)")
            self.layers = sample_layers(self.num_layers)
        else:
            self.layers = sorted({int(x) for x in self.config.layers})
            if not self.layers or self.layers[0] < 0 or self.layers[-1] >= self.num_layers:
                raise ValueError(f"layers must be non-empty indices in [0, {self.num_layers}), got {self.config.layers}")
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
        input_ids, mask, response, position_ids, segments, packed = self._prepare(
            input_ids, attention_mask, response_mask, position_ids, cu_seqlens)
        batch, length = input_ids.shape
        out_device = input_ids.device
        n_heads = len(self.layers) * self.heads_per_layer
        n_sel = math.ceil(self.config.head_fraction * n_heads)
        waad = torch.zeros(batch, length, dtype=torch.float32)
        fai = torch.zeros(batch, length, dtype=torch.float32)
        fai_valid = torch.zeros(batch, length, dtype=torch.bool)
        entropy = torch.zeros(batch, length, dtype=torch.float32) if with_entropy else None
        local = torch.full((len(segments), n_sel), -1, dtype=torch.long)
        global_ = torch.full((len(segments), n_sel), -1, dtype=torch.long)
        distance_d = torch.zeros(len(segments), n_heads, dtype=torch.float32)

        model = self.model
        was_training = model.training
        model.eval()
        try:
            # no_grad rather than inference_mode: the policy's parameters stay ordinary tensors, so training
            # wrappers that version them (FSDP2's unshard) work during and after the pass.
            with torch.no_grad(), Capture(model) as capture:
                size = self.config.micro_batch_size
                for first in range(0, len(segments), size):
                    chunk = list(range(first, min(first + size, len(segments))))
                    result = self._score_chunk(capture, [segments[i] for i in chunk], input_ids, mask,
                                               position_ids, packed=packed, with_entropy=with_entropy)
                    for j, i in enumerate(chunk):
                        row, start, end, _ = segments[i]
                        waad[row, start:end] = result["waad"][j, : end - start]
                        fai[row, start:end] = result["fai"][j, : end - start]
                        fai_valid[row, start:end] = result["fai_valid"][j, : end - start]
                        local[i], global_[i] = result["local"][j], result["global_"][j]
                        distance_d[i] = result["d"][j]
                        if with_entropy:
                            entropy[row, start:end] = result["entropy"][j, : end - start]
                    if progress is not None:
                        progress(len(chunk))
        finally:
            model.train(was_training)
        to = lambda x: None if x is None else x.to(out_device)  # noqa: E731
        return RhythmScores(
            waad=to(waad), fai=to(fai), fai_valid=to(fai_valid), response_mask=to(response),
            attention_mask=to(mask), layers=list(self.layers), heads_per_layer=self.heads_per_layer,
            groups=HeadGroups(local=to(local), global_=to(global_)), head_distance=to(distance_d),
            segments=tuple(segments), config=replace(self.config, fixed_groups=self.fixed_groups),
            entropy=to(entropy))

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
                capture.run(rec.context, forward=lambda: trainer_forward(...))
            scores = scorer.scores_from(rec)          # RhythmScores of the n recorded rows, [n, T]
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
        segments = _padded_segments(mask, response)
        device = self.device
        context = CaptureContext(
            layers=tuple(self.layers), attention_mask=mask.to(device),
            response_start=torch.tensor([r for _, _, _, r in segments], dtype=torch.long, device=device),
            window=self.config.window, horizon=self.config.horizon, backend=self.config.backend,
            validate=self.config.validate, stop_after_last=False, metrics_only=True, rows=rows.to(device))
        return Recording(context=context, segments=segments, rows=rows, attention_mask=mask, response_mask=response)

    def scores_from(self, recording: "Recording") -> RhythmScores:
        """RhythmScores [n, T] of the recorded rows, from the records a forward left in ``recording.context``."""
        missing = [layer for layer in self.layers if layer not in recording.context.records]
        if missing:
            raise RuntimeError(f"no metrics recorded for sampled layer(s) {missing}: run a forward with "
                               "recording.context inside Capture.run first")
        result = self.signals(recording.context.records, recording.segments)
        n, length = recording.attention_mask.shape
        waad = torch.zeros(n, length)
        fai = torch.zeros(n, length)
        fai_valid = torch.zeros(n, length, dtype=torch.bool)
        for j, (_, start, end, _) in enumerate(recording.segments):
            waad[j, start:end] = result["waad"][j, : end - start]
            fai[j, start:end] = result["fai"][j, : end - start]
            fai_valid[j, start:end] = result["fai_valid"][j, : end - start]
        return RhythmScores(
            waad=waad, fai=fai, fai_valid=fai_valid, response_mask=recording.response_mask,
            attention_mask=recording.attention_mask, layers=list(self.layers), heads_per_layer=self.heads_per_layer,
            groups=HeadGroups(local=result["local"], global_=result["global_"]), head_distance=result["d"],
            segments=tuple(recording.segments), config=replace(self.config, fixed_groups=self.fixed_groups))

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
            segs = segments_from_cu_seqlens(cu_seqlens, batch, length, None, cpu)  # checks B = 1 and the bounds
            if position_ids is None:
                position_ids = torch.cat([torch.arange(e - s) for _, s, e, _ in segs.host])[None]
            mask = torch.ones(batch, length, dtype=torch.bool)
            spans = [(0, s, e) for _, s, e, _ in segs.host]
        else:
            if attention_mask is None:
                mask = torch.ones(batch, length, dtype=torch.bool)
            else:
                mask = _as_bool_mask("attention_mask", attention_mask, (batch, length))
            segs = segments_from_mask(mask, batch, length, None, cpu)  # checks one contiguous span per row
            spans = [(b, s, e) for b, s, e, _ in segs.host]
            if position_ids is None:
                position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
        segments = _response_segments(mask, response, spans, packed)
        self._check_fits_model(input_ids, mask, position_ids)
        return input_ids, mask, response, position_ids, segments, packed

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
    def _score_chunk(self, capture, segments, input_ids, mask, position_ids, *, packed, with_entropy):
        device = self.device
        if packed:
            lo, hi = segments[0][1], segments[-1][2]
            ids = input_ids[:1, lo:hi]
            pos = position_ids[:1, lo:hi]
            cu = torch.tensor([s - lo for _, s, _, _ in segments] + [hi - lo], dtype=torch.long)
            model_mask, ctx_mask = None, None
            local_segments = [(0, s - lo, e - lo, r - lo) for _, s, e, r in segments]
        else:
            rows = [row for row, _, _, _ in segments]
            lo, hi = min(s for _, s, _, _ in segments), max(e for _, _, e, _ in segments)
            ids, pos = input_ids[rows, lo:hi], position_ids[rows, lo:hi]
            ctx_mask = mask[rows, lo:hi]
            model_mask = ctx_mask.long()
            cu = None
            local_segments = [(j, s - lo, e - lo, r - lo) for j, (_, s, e, r) in enumerate(segments)]
        response_start = torch.tensor([r for _, _, _, r in local_segments], dtype=torch.long, device=device)
        context = CaptureContext(
            layers=tuple(self.layers), attention_mask=None if ctx_mask is None else ctx_mask.to(device),
            response_start=response_start, cu_seqlens=None if cu is None else cu.to(device),
            window=self.config.window, horizon=self.config.horizon, backend=self.config.backend,
            validate=self.config.validate, stop_after_last=not with_entropy)
        inputs = dict(input_ids=ids.to(device), attention_mask=None if model_mask is None else model_mask.to(device),
                      position_ids=pos.to(device))
        forward = self._decoder_forward if with_entropy else None
        records = capture.run(context, forward=forward, **inputs)
        result = self.signals(records, local_segments)
        if with_entropy:
            entropy = self._entropy(context.output, ids.shape)
            result["entropy"] = to_rows(entropy, local_segments)
            result["entropy"][:, 0] = 0.0  # a sequence's first token was not sampled from this model
        return result

    def signals(self, records, segments) -> dict:
        """Per-token signals of one recorded forward, one row per sequence.

        records: {layer: AttentionMetrics} of the sampled layers (``Capture.run``), in the forward's layout.
        segments: one (row, start, end, response_start) per sequence on that layout's T axis.
        Returns float32/bool CPU tensors [n_seq, L_max] (each sequence left-aligned): waad, fai, fai_valid,
        response (the response positions), and d [n_seq, n_heads], local / global_ [n_seq, n_sel] (head
        groups, -1 on sequences with an empty response, whose signals are 0)."""
        # Per-head metrics of the sampled layers, flattened in (layer, head) order: [b, n_heads, t].
        stack = lambda name: torch.cat([getattr(records[l], name) for l in self.layers], dim=1).float().cpu()  # noqa
        per_head = {name: to_rows(stack(name), segments) for name in ("distance", "waad", "fai")}
        fai_valid = to_rows(records[self.layers[0]].fai_valid[:, 0].cpu(), segments, fill=False)
        width = per_head["waad"].shape[-1]
        lengths = torch.tensor([e - s for _, s, e, _ in segments])
        resp_len = torch.tensor([e - r for _, _, e, r in segments])
        cols = torch.arange(width)
        response = (cols[None, :] >= (lengths - resp_len)[:, None]) & (cols[None, :] < lengths[:, None])
        has_response = resp_len > 0
        d = mean_response_distance(per_head["distance"], response)
        groups = self._groups(d, has_response)
        waad_tok, fai_tok = token_signals(per_head["waad"], per_head["fai"], groups)
        groups = groups.broadcast(d.shape[0])
        keep = has_response[:, None]
        return {
            "waad": torch.where(keep, waad_tok, 0.0), "fai": torch.where(keep, fai_tok, 0.0),
            "fai_valid": fai_valid & keep, "response": response, "d": d,
            "local": torch.where(keep, groups.local, -1), "global_": torch.where(keep, groups.global_, -1),
        }

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


@dataclass
class Recording:
    """A padded batch set up for recording inside the caller's own forward (:meth:`RhythmScorer.recording`).

    context: the CaptureContext to pass to ``Capture.run`` (metrics_only, rows = the recorded rows).
    segments: (j, start, end, response_start) per recorded row j on the T axis.
    rows: LongTensor [n], the recorded rows of the forward's batch.
    attention_mask, response_mask: bool [n, T] of the recorded rows.
    """

    context: CaptureContext
    segments: list
    rows: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor


def _response_segments(mask, response, spans, packed=False) -> list[tuple[int, int, int, int]]:
    """(row, start, end, response_start) per real span; checks that the response is a suffix of each span."""
    if bool((response & ~mask).any()):
        raise ValueError("response_mask marks padding positions; it must be a suffix of each sequence's real span")
    segments = []
    for i, (row, start, end) in enumerate(spans):
        n_resp = int(response[row, start:end].sum())
        resp_start = end - n_resp
        if n_resp and not bool(response[row, resp_start:end].all()):
            what = f"row {row}" if not packed else f"packed sequence {i} (positions {start}..{end - 1})"
            raise ValueError(f"response_mask of {what} is not a suffix of its real span [{start}, {end}): the "
                             "response must be the last tokens of each sequence (prompt first, then response)")
        segments.append((row, start, end, resp_start))
    return segments


def _padded_segments(mask: torch.Tensor, response: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Segments of a padded batch (bool [B, T] masks on the CPU), one per row."""
    batch, length = mask.shape
    segs = segments_from_mask(mask, batch, length, None, torch.device("cpu"))  # one contiguous span per row
    return _response_segments(mask, response, [(b, s, e) for b, s, e, _ in segs.host])


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
