"""Capture: record the per-head docs/definitions.md section 2 metrics from inside a transformers model's forward.

A :class:`Capture` registers one attention function under a name of ours in transformers'
``AttentionInterface`` (and sdpa's mask function under the same name in ``AttentionMaskInterface``, otherwise
the model builds no mask for an unknown implementation), and switches the model's attention implementation
to that name for the duration of a ``with`` block. Nothing stays registered or switched afterwards.

Inside the block, every attention call arrives at :meth:`Capture._attention_forward` with post-RoPE
``query [B, Hq, T, D]`` and unrepeated ``key``/``value [B, Hkv, T, D]``:

- on a sampled layer (``module.layer_idx`` in ``request.layers``) it runs ``attention_metrics(query, key,
  value, ...)`` in fused mode: one pass gives the attention output O (returned to the model, so the layer
  behaves as with any other attention) and the per-head lse/distance/waad/fai, which are recorded;
- every other layer goes to transformers' own sdpa function, with the 4-D mask sdpa's mask function built
  (or to the model's eager function and eager mask when the model was loaded eager or lacks sdpa support,
  as softcapping and sink models do). The model builds one mask per layer type, so a non-sampled sliding or
  chunked layer keeps its window or chunks.

What to record comes in a frozen :class:`CaptureRequest` (checked on construction), and
``Capture.run(request, forward=None, **inputs)`` returns a :class:`CaptureResult` (``records {layer:
AttentionMetrics}``, the forward's ``output``); the per-pass state in between is the capture's own. The padding
and response layout comes from the request the caller (the scorer) sets up, not from the 4-D mask:
``attention_mask [B, T]`` and ``response_start``, ``cu_seqlens`` for a packed batch, or ``segments`` already
built. A packed batch that arrives without a layout in the request (B = 1, no mask) is read from the
``cu_seq_lens_q`` kwarg (verl's remove-padding path) or from the resets of ``position_ids``.

Every path (fused, training-forward, sequence parallel) records a sampled layer through one step,
:meth:`Capture._record`: describe the layer, check the call, one dtype, the recorded rows, the pass's layout,
the mask check, ``attention_metrics``. ``Capture(model, observe=f)`` calls ``f(SampledLayer)`` there with
the q, k, v the metrics are computed from (the public hook :class:`rhythm.report.band.QKCapture` uses).

Sequence parallelism (Ulysses, ``CaptureRequest.sequence_parallel``): each rank holds T/sp positions of the
packed row, so an attention function sees only its chunk. Every layer then does the framework's all-to-all
itself (q, k, v to all T positions of the rank's Hq/sp heads; KV heads repeated when sp > Hkv, as the
framework does), runs its attention there (fused metrics on a sampled layer, causal attention within each
packed segment elsewhere) and sends the output back. The metrics are per query head and every query head
lives on exactly one rank, so all-gathering the sampled layers' per-head maps ([B, Hq/sp, T] -> [B, Hq, T])
gives every rank the records of the unsharded pass; the head grouping and gamma then run unchanged, and every
rank gets the same gamma for all rows.

Stopping early: after the last sampled layer is recorded, the attention function raises a private
exception (:class:`StopForward`) that :meth:`Capture.run` catches. The upper layers and the LM head never
run. This was chosen over re-running the decoder layers by hand because it keeps every model's own forward
(rotary embedding, mask construction, per-layer kwargs, accelerate hooks, sliding/full layer types) exactly
as the model wrote it: the capture only needs the model to route attention through the interface. The
exception is raised from inside the no-grad forward; nothing stateful (no KV cache: ``use_cache=False``)
is left half-updated.

Each sampled layer's attention is described from the model itself (:mod:`rhythm.capture.architectures`): the
configuration gives its sliding window (``layer_types``, ``sliding_window``, ``use_sliding_window`` /
``max_window_layers``), its chunks (``attention_chunk_size``), its logit softcap and its sink logits, and the
metrics are computed on exactly that attention (``attention_metrics(..., layer=LayerAttention)``). The
description is cross-checked against the call's keywords (``sliding_window``, ``softcap``, ``s_aux``,
``scaling``) and against the 4-D mask the model built for the layer (compared on device, checked once at the
end of the pass). What it cannot describe raises :class:`UnsupportedModelError` instead of returning wrong
numbers: an architecture it was not taught (an allow-list), non-causal attention, a position bias or any
attention keyword it does not understand, a mask that disagrees with the description, a KV cache, attention
dropout in training mode, or a model that bypasses the attention interface (nothing recorded).
Training-forward recording (``CaptureRequest.metrics_only``): to record inside a forward the trainer runs
anyway (its log-prob forward, with or without gradients), a sampled layer returns the output the other layers
get (sdpa/eager/flash on the live q, k, v: the layer's autograd graph and its values are exactly those without
the capture) and records the metrics from a metrics-only pass (no v, no output) on detached q, k, under
no_grad, for the batch rows in ``request.rows`` (the metrics describe the attention before any dropout). A
sampled layer is recorded once per pass: when activation checkpointing recomputes it (inside the backward, or
a second call within the pass), only the attention itself runs.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from rhythm_kernels.segments import Segments, segments_from_cu_seqlens, segments_from_mask

from rhythm.capture import flash

from rhythm.metrics import validation
from rhythm.metrics.attention import AttentionMetrics, attention_metrics
from rhythm.capture.architectures import (UnsupportedModelError, check_call, check_layout, check_model,
                                          check_sequence_parallel, describe_layer,
                                          mask_disagreement)

_NAME_PREFIX = "rhythm_capture"
_counter = itertools.count()


class StopForward(Exception):
    """Raised from the attention function after the last sampled layer; caught by :meth:`Capture.run`."""


@dataclass(frozen=True, eq=False)
class CaptureRequest:
    """What one forward records, and the sequence layout of its batch (immutable; checked on construction).

    layers: sampled decoder layer indices (0-based, ``module.layer_idx``); stored sorted.
    attention_mask: bool [B, T] (True on real tokens, one contiguous span per row) or None.
    response_start: LongTensor [B] (or [n_segments] with cu_seqlens), absolute T index of each sequence's
        first response token; None = every position is a response position.
    cu_seqlens: LongTensor [n_segments + 1] for a packed batch (B = 1, attention_mask None), or None.
    segments: the layout already built (``rhythm_kernels.segments.Segments`` of the forward's [B, T], or of the
        n recorded rows with ``rows``), instead of attention_mask / response_start / cu_seqlens.
    window, horizon, backend, validate: passed to ``attention_metrics``.
    stop_after_last: raise StopForward after the last sampled layer (False to let the forward finish, e.g.
        when the LM head is needed for entropies).
    metrics_only: record inside a forward whose outputs are used (a trainer's training or log-prob forward):
        see "Training-forward recording" in the module docstring. Needs ``stop_after_last=False``.
    rows: LongTensor [n] of batch rows whose metrics are recorded (None = all); ``attention_mask`` and
        ``response_start`` then describe these n rows only. Only with ``metrics_only``.
    sequence_parallel: a :class:`SequenceParallel` exchange when each rank holds T/sp positions of every row
        (Ulysses): every layer's attention then runs over all T positions for the rank's heads (see
        "Sequence parallelism" in the module docstring). ``segments`` then describes the whole T axis. Fused
        mode only (not with ``metrics_only``).

    What a pass produced is returned by :meth:`Capture.run` as a :class:`CaptureResult`; a request can be
    run any number of times.
    """

    layers: tuple[int, ...]
    attention_mask: torch.Tensor | None = None
    response_start: torch.Tensor | int | None = None
    cu_seqlens: torch.Tensor | None = None
    segments: Segments | None = None
    window: int = 10
    horizon: tuple[int, int | None] = (10, 100)
    backend: str = "auto"
    validate: bool = False
    stop_after_last: bool = True
    metrics_only: bool = False
    rows: torch.Tensor | None = None
    sequence_parallel: "SequenceParallel | None" = None

    def __post_init__(self):
        if len(self.layers) == 0:
            raise ValueError("CaptureRequest.layers must name at least one layer")
        if self.metrics_only and self.stop_after_last:
            raise ValueError("CaptureRequest: metrics_only records inside a forward whose outputs are used; "
                             "pass stop_after_last=False")
        if self.sequence_parallel is not None and (self.metrics_only or self.segments is None):
            raise ValueError("CaptureRequest.sequence_parallel records in fused mode over the whole T axis: pass "
                             "segments (the layout of all T positions) and metrics_only=False")
        if self.rows is not None and not self.metrics_only:
            raise ValueError("CaptureRequest.rows (a subset of the batch) needs metrics_only=True")
        object.__setattr__(self, "layers", tuple(sorted(int(x) for x in self.layers)))
        if self.segments is not None and not (self.attention_mask is None and self.response_start is None
                                              and self.cu_seqlens is None):
            raise ValueError("CaptureRequest: segments replaces attention_mask, response_start and cu_seqlens; "
                             "pass one or the other")

    @property
    def last_layer(self) -> int:
        return self.layers[-1]


@dataclass
class CaptureResult:
    """What one forward recorded (:meth:`Capture.run`).

    records: layer index -> AttentionMetrics (lse / distance / waad / fai float32 [B, Hq, T], fai_valid bool
        [B, Hq, T]; ``out`` dropped) for every sampled layer, in the request's layout (the n recorded rows with
        ``rows``; every head with ``sequence_parallel``).
    output: the forward's return value (logits, hidden states, a trainer's loss and outputs), None when the
        forward was stopped after the last sampled layer.
    metrics_seconds: host wall time of the recording steps in the pass (checks, layout, metrics; in fused mode
        this includes the layer's attention output, which the same pass computes; on CUDA the launch time
        unless the caller synchronises).
    """

    records: dict[int, AttentionMetrics]
    output: object = None
    metrics_seconds: float = 0.0


@dataclass(frozen=True, eq=False)
class SampledLayer:
    """What :attr:`Capture.observe` receives on each sampled layer of a pass, once per layer (also when
    activation checkpointing recomputes it): the tensors the metrics are computed from, after the capture's
    checks.

    layer: the layer index. query [B, Hq, T, D] post-RoPE, key / value [B, Hkv, T, D] unrepeated, in one
        dtype (as sdpa sees them); the n recorded rows with ``CaptureRequest.rows``; this rank's heads over all
        T positions with ``sequence_parallel``. Live tensors of the forward (detach to keep them).
    scale: the softmax scale the metrics use (the call's ``scaling``, else 1/sqrt(D)).
    attention: the layer's :class:`rhythm.metrics.attention.LayerAttention` (window, chunks, softcap, sinks).
    segments: the pass's layout (``Segments`` of [B, T]).
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float
    attention: object
    segments: Segments


@dataclass
class _Pass:
    """Per-pass state of one :meth:`Capture.run` (private): the request, what the recording steps produced,
    and what the first layer that needs it builds for the others."""

    request: CaptureRequest
    records: dict[int, AttentionMetrics] = field(default_factory=dict)
    layout: Segments | None = None          # built by the first layer of the pass that needs it
    mask_checks: list = field(default_factory=list)   # per sampled layer: (layer, device bool, True = disagrees)
    packed_bounds: list | None = None       # sequence parallel: cu_seqlens of all T, for the non-sampled layers
    metrics_seconds: float = 0.0


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed segment boundaries from position ids [1, T] (or [T]): a new segment starts wherever the
    position does not continue the previous one (the rule transformers' packed-sequence masks use).
    Returns LongTensor [n_segments + 1] on the device of position_ids."""
    pos = position_ids.reshape(-1)
    if pos.numel() == 0:
        raise ValueError("position_ids is empty")
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    idx = torch.nonzero(starts).reshape(-1)
    end = torch.tensor([pos.numel()], device=pos.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int64)


class SequenceParallel:
    """The exchange a sequence-parallel (Ulysses) group does around attention (implemented by an integration,
    e.g. :class:`rhythm.integrations.verl.ulysses.VerlUlysses` with verl's own all-to-all helpers).

    gather(q, k, v): [B, H, T/sp, D] each (this rank's positions, every head) -> [B, H/sp, T, D] (every
        position, this rank's heads; KV heads repeated as the framework does when sp > Hkv).
    scatter(out): [B, T, Hq/sp, D] -> [B, T/sp, Hq, D].
    gather_heads(x): [B, Hq/sp, T] -> [B, Hq, T] on every rank (heads in global order).
    gather_positions(position_ids): [1, T/sp] -> [1, T].
    """

    def gather(self, query, key, value):
        raise NotImplementedError

    def scatter(self, out):
        raise NotImplementedError

    def gather_heads(self, x):
        raise NotImplementedError

    def gather_positions(self, position_ids):
        raise NotImplementedError


def segment_causal_attention(query, key, value, bounds, scaling) -> torch.Tensor:
    """Causal attention within each packed segment (flash-attn varlen semantics, no [T, T] mask).

    query [1, Hq, T, D], key/value [1, Hkv, T, D] (GQA), bounds: cu_seqlens as a list (0 .. T) -> out
    [1, T, Hq, D]."""
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        parts.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1]))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


def _module_config_list(model: torch.nn.Module) -> list:
    """Every distinct config object of the model and its sub-models (by identity, outermost first)."""
    configs, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            configs.append(config)
    return configs


def check_capturable(model: torch.nn.Module) -> list:
    """Refuse (UnsupportedModelError) a model the capture cannot record: no transformers config with an
    attention implementation, or a (sub-)config whose type the capture was not taught about. Returns the
    model's configs (outermost first). ``Capture`` runs it on entry; trainers run it at construction."""
    configs = _module_config_list(model)
    if not configs:
        raise UnsupportedModelError(
            f"model ({type(model).__name__}) has no transformers config with an attention implementation"
        )
    check_model(model, configs)
    return configs


def is_registered(name: str) -> bool:
    """Whether an attention function or mask function is registered under ``name`` (for tests)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    return name in AttentionInterface._global_mapping or name in AttentionMaskInterface._global_mapping


def _common_dtype(query, key, value):
    """One dtype for q, k, v, as sdpa would see them. Under autocast (TRL/accelerate ``bf16=True`` on fp32
    weights) RoPE promotes q and k to fp32 while v stays bf16: use the autocast dtype, as sdpa does;
    otherwise promote."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return query.to(dtype), key.to(dtype), value.to(dtype)


class Capture:
    """Context manager that routes a model's attention through the metrics for one or more forwards.

    Usage::

        with Capture(model) as capture:
            result = capture.run(CaptureRequest(layers=(4, 5)), input_ids=..., attention_mask=...,
                                 position_ids=...)
        result.records[4].waad          # float32 [B, Hq, T]

    ``run`` calls ``model(**inputs, use_cache=False)`` (or ``forward=`` a callable of your choice) with the
    request active, stops after the last sampled layer (unless ``request.stop_after_last`` is False), checks
    that every sampled layer was recorded and returns a :class:`CaptureResult`.

    observe: optional callable(:class:`SampledLayer`), called on each sampled layer of every pass with the
        query / key / value the metrics are computed from (e.g. :class:`rhythm.report.band.QKCapture` keeps q
        and k for the report's attention bands). It runs inside the forward: it must not change the tensors.
    """

    def __init__(self, model: torch.nn.Module, observe=None):
        self.model = model
        self.observe = observe
        self.name = f"{_NAME_PREFIX}_{next(_counter)}"
        self._pass: _Pass | None = None
        self._saved: list[tuple[object, object]] = []
        self._delegate_name = "sdpa"
        self._active = False

    # -- registration -------------------------------------------------------------------------------------
    def __enter__(self) -> "Capture":
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        configs = check_capturable(self.model)
        # Other layers keep what the model can run: sdpa, or the model's own eager function when it was loaded
        # eager or does not support sdpa (e.g. softcapping models). The mask function follows the delegate.
        original = configs[0]._attn_implementation
        supports_sdpa = getattr(self.model, "_supports_sdpa", True)
        self._delegate_name = "eager" if original == "eager" or not supports_sdpa else "sdpa"
        AttentionInterface.register(self.name, self._attention_forward)
        AttentionMaskInterface.register(self.name, AttentionMaskInterface._global_mapping[self._delegate_name])
        try:
            for config in configs:
                self._saved.append((config, config._attn_implementation))
            for config in configs:
                config._attn_implementation = self.name
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        # Restore innermost first: the config setter propagates to sub-configs, so the outer value last
        # would overwrite a sub-config's own saved value; restoring every config afterwards fixes that.
        for config, value in reversed(self._saved):
            config._attn_implementation = value
        for config, value in self._saved:
            if config._attn_implementation != value:
                config._attn_implementation_internal = value
        self._saved = []
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)
        self._active = False
        self._pass = None

    # -- one forward ----------------------------------------------------------------------------------------
    def run(self, request: CaptureRequest, forward=None, **inputs) -> CaptureResult:
        """Run one forward with ``request`` active; returns its :class:`CaptureResult` (records {layer:
        AttentionMetrics} for every sampled layer, the forward's output unless it was stopped early).

        forward: callable receiving ``**inputs`` (default: the model itself with ``use_cache=False``).
        """
        if not self._active:
            raise RuntimeError("Capture.run must be called inside `with Capture(model) as capture:`")
        if not isinstance(request, CaptureRequest):
            raise TypeError(f"Capture.run takes a CaptureRequest, got {type(request).__name__}")
        state = self._pass = _Pass(request)
        output = None
        call = forward if forward is not None else (lambda **kw: self.model(**kw, use_cache=False))
        try:
            output = call(**inputs)
        except StopForward:
            pass
        finally:
            self._pass = None
        missing = [layer for layer in request.layers if layer not in state.records]
        if missing:
            raise UnsupportedModelError(
                f"no attention call was recorded for sampled layer(s) {missing} of {type(self.model).__name__}: "
                "the model does not route its attention through transformers' AttentionInterface (or its "
                "attention modules carry no `layer_idx`), so its attention cannot be captured"
            )
        self._check_masks(state)
        return CaptureResult(records=state.records, output=output, metrics_seconds=state.metrics_seconds)

    # -- the attention function -----------------------------------------------------------------------------
    def _attention_forward(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           is_causal=None, **kwargs):
        """transformers attention-function signature: query [B, Hq, T, D], key/value [B, Hkv, S, D] ->
        (out [B, T, Hq, D], None). Routes the call: outside a pass to the delegate; under sequence parallelism
        through the exchange; a metrics-only pass runs the delegate and records beside it; a fused pass records
        (and returns the output of) a sampled layer and runs every other layer per sequence."""
        state = self._pass
        if state is None:
            return self._passthrough(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
        request = state.request
        layer = getattr(module, "layer_idx", None)
        sampled = layer is not None and int(layer) in request.layers
        if request.sequence_parallel is not None:
            return self._sequence_parallel_forward(state, module, query, key, value, dropout, scaling, is_causal,
                                                   kwargs, sampled)
        if request.metrics_only:
            out = self._passthrough(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
            if sampled and int(layer) not in state.records:   # not again when checkpointing recomputes the layer
                with torch.no_grad():
                    # Dropout is the output's business: the metrics describe the attention before it.
                    self._record(state, module, int(layer), query.detach(), key.detach(), value.detach(),
                                 attention_mask, dropout=0.0, scaling=scaling, is_causal=is_causal, kwargs=kwargs,
                                 output=False)
            return out
        if not sampled:
            return self._per_sequence(state, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                      kwargs)
        out = self._record(state, module, int(layer), query, key, value, attention_mask, dropout=dropout,
                           scaling=scaling, is_causal=is_causal, kwargs=kwargs, output=True)
        if request.stop_after_last and int(layer) == request.last_layer:
            raise StopForward()
        return out, None

    def _record(self, state: _Pass, module, layer: int, query, key, value, attention_mask, *, dropout, scaling,
                is_causal, kwargs, output: bool) -> torch.Tensor | None:
        """The one recording step of a sampled layer, for every path (fused, metrics-only, sequence parallel).

        query [B, Hq, T, D], key / value [B, Hkv, T, D] (sequence parallel: all T positions of this rank's
        heads); attention_mask: the model's 4-D mask for the layer, or None (checked against the layer's
        description on device, except under sequence parallelism, where it describes the rank's chunk).
        output: compute the attention output O in the same pass (fused) or only the metrics (metrics-only:
        no v). Stores ``state.records[layer]`` (per-head maps all-gathered over a sequence-parallel group) and
        returns O [B, T, Hq, D] (None when not ``output``).

        Steps: describe the layer from the model, refuse a call that disagrees with it, one dtype for q, k, v,
        the recorded rows, the pass's layout (built once), the mask check, then
        ``attention_metrics(q, k, v | None, window, horizon, scale, segments, layer=description)``."""
        start = time.perf_counter()
        request = state.request
        description = describe_layer(module)
        check_call(module, description, query, key, dropout=dropout, scaling=scaling, is_causal=is_causal,
                   kwargs=kwargs)
        query, key, value = _common_dtype(query, key, value)
        if request.rows is not None:
            rows = request.rows.to(query.device)
            query, key, value = query.index_select(0, rows), key.index_select(0, rows), value.index_select(0, rows)
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[0] > 1:
                attention_mask = attention_mask.index_select(0, rows)
        layout = self._pass_layout(state, module, query, kwargs)
        if request.sequence_parallel is None:
            disagreement = mask_disagreement(attention_mask, description, layout, query.shape[2])
            if disagreement is not None:
                state.mask_checks.append((layer, disagreement))
        if self.observe is not None:
            scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
            self.observe(SampledLayer(layer, query, key, value, scale, description, layout))
        metrics = attention_metrics(
            query, key, value if output else None, window=request.window, horizon=request.horizon, scale=scaling,
            segments=layout, backend=request.backend, validate=request.validate, layer=description,
        )
        out, metrics.out = metrics.out, None
        if request.sequence_parallel is not None:
            metrics = AttentionMetrics(**{name: request.sequence_parallel.gather_heads(getattr(metrics, name))
                                          for name in ("lse", "distance", "waad", "fai", "fai_valid")})
        state.records[layer] = metrics
        state.metrics_seconds += time.perf_counter() - start
        return out

    def _sequence_parallel_forward(self, state, module, query, key, value, dropout, scaling, is_causal, kwargs,
                                   sampled):
        """Ulysses: query [B, Hq, T/sp, D], key/value [B, Hkv, T/sp, D] (this rank's positions, every head) ->
        out [B, T/sp, Hq, D]. The exchange gives this rank all T positions of its Hq/sp query heads (and their
        KV heads); a sampled layer records their metrics in fused mode and all-gathers the per-head maps over
        the group (records hold every head, as without sequence parallelism); any other layer runs causal
        attention within each packed segment (the boundaries from the gathered position ids, as flash-attn's
        varlen path reads them). The output goes back to this rank's positions."""
        sp = state.request.sequence_parallel
        if dropout:
            raise UnsupportedModelError(f"sequence-parallel capture needs attention dropout 0, got {dropout}")
        query, key, value = _common_dtype(query, key, value)
        q, k, v = sp.gather(query, key, value)
        if sampled:
            out = self._record(state, module, int(module.layer_idx), q, k, v, None, dropout=dropout, scaling=scaling,
                               is_causal=is_causal, kwargs=kwargs, output=True)
        else:
            for name in ("sliding_window", "softcap", "s_aux", "sinks", "position_bias"):
                if kwargs.get(name) is not None:
                    raise UnsupportedModelError(f"sequence-parallel capture runs plain causal attention on the "
                                                f"layers it does not sample; this layer passes {name}")
            if state.packed_bounds is None:
                position_ids = kwargs.get("position_ids")
                if position_ids is None:
                    raise UnsupportedModelError("sequence-parallel capture needs the position_ids the model passes "
                                                "to its attention (where each packed sequence starts)")
                state.packed_bounds = cu_seqlens_from_position_ids(sp.gather_positions(position_ids)).tolist()
            out = segment_causal_attention(q, k, v, state.packed_bounds, scaling)
        return sp.scatter(out), None

    def _passthrough(self, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
        """The attention of a layer whose output we do not compute: flash-attn where usable, else the delegate."""
        if flash.usable(query, attention_mask, dropout, kwargs, value):   # FA2 where it imports (rhythm.capture.flash)
            return flash.attention(query, key, value, scaling=scaling, sliding_window=kwargs.get("sliding_window"),
                                   softcap=kwargs.get("softcap")), None
        return self._delegate(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    def _per_sequence(self, state, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
        """A scoring pass's layer that is not sampled: the delegate (sdpa / the model's eager function) run on
        each sequence alone, [1, H, n, D] with the sequence's own [1, 1, n, n] mask, so that no sequence's hidden
        states, and hence no sampled layer's metrics, depend on what else is in the micro-batch or on its
        padding (docs/definitions.md section 7, batch invariance). The mask is the model's own, cut to the
        sequence (its window / chunks kept); where the model built none (no padding), the causal one the
        model's mask would hold, in the same form, so that both cases take the same kernel. Padding rows of
        the output are 0 (no real row reads them)."""
        layout = self._pass_layout(state, module, query, kwargs)
        delegate = self._delegate(module)
        eager = delegate.__name__ != "sdpa_attention_forward"
        out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
        for b, start, end, _ in layout.spans:
            piece = lambda x: x[b:b + 1, :, start:end].contiguous()  # noqa: E731
            mask = self._sequence_mask(attention_mask, b, start, end, query, eager)
            result, _ = delegate(module, piece(query), piece(key), piece(value), mask, dropout=dropout,
                                 scaling=scaling, is_causal=is_causal, **kwargs)
            out[b, start:end] = result[0]
        return out, None

    @staticmethod
    def _sequence_mask(attention_mask, b, start, end, query, eager) -> torch.Tensor:
        """[1, 1, n, n] mask of the sequence at [start, end) of batch row b: the model's 4-D mask cut to it, or
        the causal mask (bool for sdpa; 0 / the dtype's min for an eager function) where the model built none."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            row = b if attention_mask.shape[0] > 1 else 0
            return attention_mask[row:row + 1, :1, start:end, start:end].contiguous()
        n = end - start
        causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril_()[None, None]
        if not eager:
            return causal
        return torch.zeros(causal.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~causal, torch.finfo(query.dtype).min)

    def _delegate(self, module):
        """The attention function of a layer we do not record: transformers' sdpa, or the eager function
        defined next to the module's class (each transformers model file has one)."""
        if self._delegate_name == "eager":
            import sys

            eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
            if eager is not None:
                return eager
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward

    def _pass_layout(self, state: _Pass, module, query: torch.Tensor, kwargs) -> Segments:
        """The pass's Segments of [B, T], built by the first layer that needs it and shared by the others (the
        layout is the same for every layer: one host sync per pass). A built layout is checked against the
        architecture (hybrid models refuse packed rows, and sequence parallelism); under sequence parallelism it
        is the request's ``segments`` of all T positions, checked against the gathered shape."""
        request = state.request
        if request.sequence_parallel is not None:
            if state.layout is None:
                check_sequence_parallel(module)
                state.layout = request.segments.to(query.device)
            if state.layout.shape != (query.shape[0], query.shape[2]):
                raise ValueError(f"CaptureRequest.segments describe {state.layout.shape}, the gathered sequence "
                                 f"is {(query.shape[0], query.shape[2])} (B, T): pass the layout of all T positions")
            return state.layout
        if state.layout is None:
            state.layout = self._layout(request, query, kwargs)
            check_layout(module, state.layout)
        return state.layout

    def _layout(self, request: CaptureRequest, query: torch.Tensor, kwargs) -> Segments:
        """Segments of this pass: the request's padding mask or packed boundaries, else (B = 1, no mask) the
        packed layout the model's own kwargs describe."""
        batch, _, length, _ = query.shape
        if request.segments is not None:
            return request.segments.to(query.device)
        mask, cu_seqlens = request.attention_mask, request.cu_seqlens
        if cu_seqlens is None and mask is None and batch == 1:
            cu_seqlens = self._packed_boundaries(kwargs)
        for name, x in (("attention_mask", mask), ("cu_seqlens", cu_seqlens),
                        ("response_start", request.response_start)):
            validation.check_mask_device(name, x, query.device)
        if cu_seqlens is not None:
            if mask is not None:
                raise ValueError("CaptureRequest: attention_mask must be None with cu_seqlens")
            return segments_from_cu_seqlens(cu_seqlens, batch, length, request.response_start, query.device)
        return segments_from_mask(mask, batch, length, request.response_start, query.device)

    @staticmethod
    def _packed_boundaries(kwargs) -> torch.Tensor | None:
        """Packed layout of a B = 1 batch from the kwargs the model forwards: ``cu_seq_lens_q`` (flash/verl)
        or the resets of ``position_ids``. None when neither says the row is packed."""
        cu = kwargs.get("cu_seq_lens_q")
        if cu is not None:
            return cu.to(torch.int64)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.dim() <= 2 and position_ids.reshape(-1).shape[0] > 1:
            cu = cu_seqlens_from_position_ids(position_ids)
            if cu.numel() > 2:
                return cu
        return None

    def _check_masks(self, state: _Pass) -> None:
        """One host synchronisation per pass: refuse the records if the mask the model built for a sampled
        layer disagrees with the layer's description (an unknown mask: the metrics would describe other
        attention than the model's)."""
        if not state.mask_checks:
            return
        flags = torch.stack([flag for _, flag in state.mask_checks]).cpu()
        bad = [layer for (layer, _), flag in zip(state.mask_checks, flags.tolist()) if flag]
        if bad:
            state.records.clear()
            raise UnsupportedModelError(
                f"the attention mask {type(self.model).__name__} "
                f"({', '.join(sorted({str(getattr(c, 'model_type', None)) for c, _ in self._saved}))}) built for "
                f"sampled layer(s) {bad} differs from the window/chunks/layout read from its configuration: an "
                "attention pattern the capture does not understand (e.g. a custom 4-D mask, or a packed row that "
                "this model does not split at position_ids resets: score it as a padded batch)")
