"""Record the metrics inside the forward verl already runs for the old log-probs (no extra pass).

verl 0.9's actor computes old log-probs with ``engine.infer_batch`` -> ``forward_backward_batch`` ->
``engine.forward_step(micro_batch)`` per micro-batch (``verl.workers.engine.fsdp.transformer_impl``), each one
calling the FSDP-wrapped model once. :func:`recording_forward` replaces ``engine.forward_step`` on that engine
instance for the duration of one ``compute_log_prob`` call: every micro-batch forward runs inside a
:class:`rhythm.capture.recording.Capture` (fused mode on the sampled layers - the layer gets the attention output O from
the same pass that records lse/distance/waad/fai -, sdpa on the others, no early exit), and the per-sequence
gamma is added to the micro-batch's ``model_output`` as ``rhythm_gamma``: a jagged nested tensor over each
sequence's real tokens (prompt + response), the layout of ``log_probs``. verl's own ``postprocess_batch_func``
then concatenates it across micro-batches and undoes the dynamic-batch reordering exactly as it does for the
log-probs, so gamma comes back with the log-probs, row for row.

Micro-batch layouts (verl's no-padding TensorDict: nested ``input_ids`` [b, j]):

- ``use_remove_padding=True``: the model sees ``[1, N]`` packed tokens, sequence i at
  ``input_ids.offsets()[i]:offsets()[i+1]``; the capture gets those offsets as ``cu_seqlens``.
- ``use_remove_padding=False``: the model sees ``[b, max_len]`` right-padded rows (each sequence left-aligned,
  ``build_attention_mask_from_nested``); the capture gets that mask.
- Ulysses sequence parallelism (``ulysses_sequence_parallel_size`` sp > 1, remove-padding only): every rank of
  the group holds the same micro-batch, verl pads the packed row to a multiple of sp and gives each rank T/sp
  of it. The capture does verl's all-to-all itself on every layer (:mod:`rhythm.integrations.verl.ulysses`),
  all-gathers the sampled layers' per-head metrics, and every rank computes the same gamma for all rows
  (``log_probs`` is all-gathered by verl too).

The response length of each sequence comes from ``response_mask``: nested (the v1 trainer's layout) -> its
offsets; padded [b, R_len] (the legacy trainer's) -> ``attention_mask[:, -R_len:].sum(-1)`` (tool-masked
tokens inside a response stay part of the response span, as in the scorer). Gamma of response token i is that
of its own position (docs/definitions.md section 6: no shift, unlike log-probs).
"""
from __future__ import annotations

import contextlib
import time

import torch

from rhythm_kernels.segments import Segments, segments_from_cu_seqlens, segments_from_mask

from rhythm.capture.recording import Capture, CaptureRequest
from rhythm.credit.gamma import compute_gamma
from rhythm.integrations.verl.credit import GAMMA_KEY

__all__ = ["micro_batch_segments", "recording_forward", "response_lengths", "sequence_parallel_size"]


def _non_tensor(data, key, default=None):
    if key not in data.keys():
        return default
    value = data[key]
    return getattr(value, "data", value)


def response_lengths(data) -> torch.Tensor:
    """LongTensor [b]: number of response tokens of each sequence of a verl (micro-)batch TensorDict."""
    if "response_mask" not in data.keys():
        raise ValueError("rhythm credit needs the batch's response_mask (verl's compute_response_mask) to know "
                         "where each response starts")
    response_mask = data["response_mask"]
    if response_mask.is_nested:
        return response_mask.offsets().diff().long().cpu()
    if "attention_mask" not in data.keys():
        raise ValueError("a padded response_mask [b, R_len] needs the padded attention_mask [b, T] beside it")
    attention_mask = data["attention_mask"]
    return attention_mask[:, -response_mask.shape[1]:].long().sum(-1).cpu()


def micro_batch_segments(micro_batch, use_remove_padding: bool) -> Segments:
    """The model-input layout of one verl micro-batch: Segments (on the CPU) of ``[1, N]`` packed tokens
    (``use_remove_padding``) or ``[b, max_len]`` right-padded rows, one Span per sequence, the response its
    last ``response_lengths`` tokens."""
    input_ids = micro_batch["input_ids"]
    if not input_ids.is_nested:
        raise ValueError("rhythm credit expects verl's no-padding micro-batch (nested input_ids)")
    if "position_ids" in micro_batch.keys() and micro_batch["position_ids"].dim() == 3:
        raise ValueError("multi-axis rope position ids (Qwen2-VL style [b, 3|4, j]) are not supported")
    offsets = input_ids.offsets().long().cpu()
    lengths = offsets.diff()
    responses = response_lengths(micro_batch)
    if responses.shape != lengths.shape or bool((responses > lengths).any()):
        raise ValueError(f"response lengths {responses.tolist()} do not fit the sequence lengths {lengths.tolist()}")
    if use_remove_padding:
        return segments_from_cu_seqlens(offsets, 1, int(offsets[-1]), offsets[1:] - responses, "cpu")
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return segments_from_mask(mask, len(lengths), width, lengths - responses, "cpu")


def _gamma_nested(gamma_rows: torch.Tensor, segments: Segments, device) -> torch.Tensor:
    """[n_seq, L] rows -> jagged nested [n_seq, j] over each sequence's real tokens (prompt + response)."""
    parts = [gamma_rows[i, : span.length] for i, span in enumerate(segments.spans)]
    return torch.nested.as_nested_tensor(parts, layout=torch.jagged).to(device)


def sequence_parallel_size(engine) -> int:
    """The engine's Ulysses sequence-parallel size (1 without sequence parallelism)."""
    size = int(getattr(engine, "ulysses_sequence_parallel_size", 1) or 1)
    return max(size, 2) if getattr(engine, "use_ulysses_sp", False) else size


def _check_engine(engine) -> None:
    if sequence_parallel_size(engine) > 1:
        model = getattr(engine.module, "module", engine.module)
        if hasattr(getattr(model, "config", None), "vision_config"):
            raise ValueError("rhythm credit under Ulysses sequence parallelism supports text models only (verl "
                             "slices a vision-language model's inputs after the embedding): set "
                             "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1 for this model")
    if getattr(engine, "pad_to_length", None):
        raise ValueError("rhythm credit does not support the engine's pad_to_length (the packed batch gains "
                         "tokens the segments do not describe): leave it unset")


@contextlib.contextmanager
def recording_forward(engine, scorer, config, *, stats: dict | None = None):
    """Within the block, every ``engine.forward_step(micro_batch, ...)`` also records the metrics of the sampled
    layers and adds ``model_output["rhythm_gamma"]`` (jagged, float32, the layout of ``log_probs``).

    engine: verl's FSDP engine (``module``, ``forward_step``). scorer: a :class:`rhythm.RhythmScorer` over
    ``engine.module`` (its sampled layers, head grouping and window / horizon). config: the
    :class:`RhythmCreditConfig` (strategy local / global / coupled; q, gamma_amp, alpha, k). stats: optional
    dict that receives ``sequences`` and ``micro_batches`` counts and ``credit_time_s`` (head grouping and
    credit after each forward; the metrics themselves run inside the forward)."""
    _check_engine(engine)
    sp = sequence_parallel_size(engine)
    original = engine.forward_step  # bound method of the engine's class (or an instance attribute)
    own = "forward_step" in vars(engine)
    options = config.credit_kwargs()
    module = engine.module

    def forward_step(micro_batch, *args, **kwargs):
        use_remove_padding = bool(_non_tensor(micro_batch, "use_remove_padding", True))
        segments = micro_batch_segments(micro_batch, use_remove_padding)
        device = next(module.parameters()).device
        exchange = None
        if sp > 1:   # Ulysses: the packed row padded to a multiple of sp, each rank holding T/sp of it
            if not use_remove_padding:
                raise ValueError("rhythm credit under Ulysses sequence parallelism needs the packed layout: set "
                                 "actor_rollout_ref.model.use_remove_padding=True")
            from rhythm.integrations.verl.ulysses import VerlUlysses, padded_length

            exchange = VerlUlysses(getattr(engine, "ulysses_parallel_group", None))
            segments = Segments.from_spans(segments.spans, (1, padded_length(segments.shape[1], sp)))
        request = CaptureRequest(
            layers=tuple(scorer.layers), segments=segments.to(device), window=scorer.config.window,
            horizon=scorer.config.horizon, backend=scorer.config.backend, validate=False, stop_after_last=False,
            sequence_parallel=exchange)
        result = capture.run(request, forward=lambda: original(micro_batch, *args, **kwargs))
        loss, output = result.output
        start = time.perf_counter()
        rows = scorer.signals(result.records, segments)
        gamma = compute_gamma(config.strategy, rows.response, waad=rows.waad, fai=rows.fai,
                              fai_valid=rows.fai_valid, **options)
        model_output = output["model_output"]
        reference = model_output.get("log_probs")
        model_output[GAMMA_KEY] = _gamma_nested(gamma.float(), segments,
                                                reference.device if reference is not None else device)
        if stats is not None:
            stats["credit_time_s"] = stats.get("credit_time_s", 0.0) + time.perf_counter() - start
            stats["sequences"] = stats.get("sequences", 0) + segments.count
            stats["micro_batches"] = stats.get("micro_batches", 0) + 1
        return loss, output

    with Capture(module) as capture:
        engine.forward_step = forward_step
        try:
            yield
        finally:
            if own:
                engine.forward_step = original
            else:
                del engine.forward_step
