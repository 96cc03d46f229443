"""TRL adapter: ``RhythmGRPOTrainer``, a ``trl.GRPOTrainer`` whose advantages carry per-token rhythm credit.

Where the metrics come from (``credit_pass``):

- ``"fused"`` (default): inside a forward TRL runs anyway, over the same rows, with the same weights - no extra
  forward. The sampled layers keep their normal attention (sdpa, with its gradient) and the metrics come from a
  metrics-only pass on detached q, k beside it (:mod:`rhythm.capture.recording`, ``metrics_only``).
  * When TRL runs a no-grad forward for the old log-probs (``steps_per_generation`` or ``num_iterations`` make
    generation and optimisation steps misaligned, or vLLM importance sampling), the metrics are recorded there,
    for every row of the generation batch (TRL computes the rewards after that forward, so which advantages are
    0 is not known yet), and the advantages leave ``_generate_and_score_completions`` already shaped (B, C).
  * Otherwise the first training forward over the rows records them: the advantages stay (B,) until
    ``_compute_loss`` runs the policy forward; right after it, gamma is computed and the advantages that the
    loss reads are replaced by the shaped (B, C) ones, before the loss is reduced. Rows whose advantage gamma
    cannot change (0, or of the sign ``sign`` leaves alone) are never measured: gamma 1. With gradient
    checkpointing the layers are recomputed in the backward, after the recording: nothing is recorded twice.
  Whose attention: the policy's in the first forward over the batch - the old-log-prob forward (the weights
  that generated it) when TRL runs one, else the training forward of the micro-step that uses the rows
  (with TRL's aligned defaults, also the generating weights: no optimizer step happens in between).
- ``"scorer"``: one extra no-grad early-exit forward of the current policy per generation batch
  (:class:`rhythm.RhythmScorer`, only over the rows that need credit), right after generation. Kept for
  comparison and for setups where the fused path cannot run (it needs the policy's full weights on each rank:
  no FSDP / ZeRO-3).

gamma [B, P + C] is mapped to the completion tensor (B, C): completion token i multiplied by the gamma of its
own position P + i (docs/definitions.md section 6: log-probs are shifted, metrics are not); padding keeps the
sequence advantage. ``GRPOTrainer._compute_loss`` unsqueezes advantages only when they are 1-D, so (B, C)
advantages flow token by token into every supported loss type; buffering and shuffling split the batch along
dim 0 only.

TRL internals this relies on (checked against TRL 1.14.2 and 1.16.0, see docs/integrations.md):
``_generate_and_score_completions`` (returns the batch dict with ``advantages`` (B,)), ``_compute_loss(model,
inputs)`` (reads ``inputs["advantages"]`` after its policy forward), ``_get_per_token_logps_and_entropies(model,
input_ids, attention_mask, logits_to_keep, batch_size=None, **kwargs)`` (every log-prob forward goes through it)
and the rule that decides whether the old log-probs are computed (:func:`computes_old_logps`).

Logged (mode "train"): ``rhythm/frac_amplified`` (share of loss tokens with gamma > 1), ``rhythm/gamma_mean``
(mean gamma over loss tokens), ``rhythm/added_time_s`` (host wall time of the metrics and the credit per
shaped batch; the scorer path includes its forward), ``rhythm/frac_rows_measured`` (rows whose metrics were
computed).

Unsupported (ValueError at init): vision-language models, loss types outside :data:`SUPPORTED_LOSS_TYPES`, and
with ``credit_pass="scorer"`` DeepSpeed ZeRO-3 and FSDP.
"""
from __future__ import annotations

import functools
import time
from dataclasses import field, make_dataclass

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from rhythm.capture.recording import Capture, check_capturable
from rhythm.config import (CREDIT_KNOBS, CREDIT_PASSES, ConfigError, check, dataclass_fields, default, from_prefixed,
                           horizon_from_text)
from rhythm.credit.gamma import compute_gamma, gamma_metrics, gamma_sums, sequence_starts, trainer_row_ids
from rhythm.credit.shaping import rows_needing_credit, shape_advantages
from rhythm.scoring.scorer import RhythmScorer, to_response_tensor
from rhythm.integrations.config import RhythmCreditConfig

__all__ = ["CREDIT_PASSES", "RhythmCreditConfig", "RhythmGRPOConfig", "RhythmGRPOTrainer", "SUPPORTED_LOSS_TYPES",
           "check_grpo_args", "computes_old_logps"]

# Loss types of TRL 1.16 whose advantage term is elementwise in the token axis (A broadcast as (B, 1) or taken
# as (B, C)): every one multiplies or clips A_t per token, and the sequence-level pieces (VESPO's phi, the
# off-policy mask) read only the sign of A, which gamma > 0 preserves.
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")


# ---- RhythmGRPOConfig: GRPOConfig + rhythm_* fields ------------------------------------------------------------
# The fields come from rhythm.config (one definition of names, defaults, help and checks). TRL's parser
# (HfArgumentParser) passes a field's metadata to argparse as keywords and parses simple types only, so the
# fields carry just the help, and the two sequence knobs get command-line friendly annotations
# (``--rhythm_horizon 10 100`` or ``10 end``; ``--rhythm_layers 9 12 15``); __post_init__ checks everything.
_CLI_ANNOTATIONS = {"horizon": "list[str]", "layers": "list[int] | None", "micro_batch_size": "int | None"}


def _rhythm_fields() -> list:
    out = []
    for name, annotation, spec in dataclass_fields(CREDIT_KNOBS + ("credit_pass",),
                                                    defaults={"micro_batch_size": None}):
        knob, value = spec.metadata["knob"], spec.default
        value_kw = {"default_factory": (lambda v=value: list(v))} if isinstance(value, tuple) else {"default": value}
        help_text = spec.metadata["help"]
        if knob == "micro_batch_size":
            help_text = "scorer path: sequences per scorer forward (default: the per-device train batch size)"
        out.append((name, _CLI_ANNOTATIONS.get(knob, annotation), field(metadata={"help": help_text}, **value_kw)))
    out.append(("rhythm_apply_in_eval", "bool", field(default=False, metadata={
        "help": "shape the eval-mode advantages too (default: the eval loss stays plain GRPO)"})))
    return out


def _horizon_from_text(value):
    """``--rhythm_horizon 10 end`` arrives as ['10', 'end']: each text item through the one parser
    (:func:`rhythm.config.horizon_from_text`); items it cannot read are left for the knob's check to refuse."""
    if not isinstance(value, (list, tuple)):
        return value
    out = []
    for item in value:
        if isinstance(item, str):
            try:
                item = horizon_from_text(item)
            except ValueError:
                pass
        out.append(item)
    return tuple(out)


def _config_post_init(self) -> None:
    GRPOConfig.__post_init__(self)
    self.rhythm_horizon = _horizon_from_text(self.rhythm_horizon)
    try:
        self.rhythm_credit_pass = check("credit_pass", self.rhythm_credit_pass)
    except ConfigError as e:
        raise ConfigError(f"RhythmGRPOConfig.rhythm_{e}") from None
    if not isinstance(self.rhythm_apply_in_eval, bool):
        raise ConfigError(f"RhythmGRPOConfig.rhythm_apply_in_eval must be a bool, got {self.rhythm_apply_in_eval!r}")
    self.rhythm_credit_config()   # every credit knob checked now, naming the rhythm_* field


def _rhythm_credit_config(self) -> RhythmCreditConfig:
    """The :class:`RhythmCreditConfig` of the ``rhythm_*`` fields."""
    return from_prefixed(self, RhythmCreditConfig)


RhythmGRPOConfig = make_dataclass(
    "RhythmGRPOConfig", _rhythm_fields(), bases=(GRPOConfig,),
    namespace={"__post_init__": _config_post_init, "rhythm_credit_config": _rhythm_credit_config,
               "__doc__": "``trl.GRPOConfig`` with the rhythm credit settings as ``rhythm_*`` fields (strategy, sign, "
                          "q, gamma_amp, alpha, k, seed, window, horizon, head_fraction, layers, grouping, "
                          "micro_batch_size, backend, credit_pass, apply_in_eval): ``TrlParser((RhythmGRPOConfig,))`` "
                          "reads them from the command line (``--rhythm_q 0.3``) and YAML (``rhythm_q: 0.3``). "
                          "Defaults and checks: :mod:`rhythm.config`."})
RhythmGRPOConfig.__module__ = __name__   # picklable (the Trainer saves its args with torch.save)


def check_grpo_args(args, credit_pass: str = "fused") -> None:
    """Raise ValueError for GRPOConfig / accelerate settings the adapter does not support."""
    credit_pass = check("credit_pass", credit_pass, "RhythmGRPOTrainer")
    if args is None:
        return
    check_parallelism(getattr(args, "parallelism_config", None))
    loss_type = getattr(args, "loss_type", "grpo")
    if loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"RhythmGRPOTrainer: loss_type={loss_type!r} is not supported (its advantage handling has "
                         f"not been checked for per-token advantages); supported: {SUPPORTED_LOSS_TYPES}")
    if credit_pass != "scorer":
        return
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        raise ValueError("RhythmGRPOTrainer(credit_pass='scorer') does not support DeepSpeed ZeRO-3: the scorer runs "
                         "a plain forward of the policy and needs its full weights on each rank; use the fused pass")
    if getattr(args, "fsdp", None):
        raise ValueError("RhythmGRPOTrainer(credit_pass='scorer') does not support FSDP: the scorer needs each "
                         "rank's full weights; use the fused pass (credit_pass='fused')")


def check_parallelism(parallelism_config) -> None:
    """Refuse accelerate's context parallelism (``cp_size > 1``: torch's ring attention, each rank holds T/cp of
    every row and the attention is summed over ranks) and sequence parallelism (``sp_size > 1``: DeepSpeed
    ALST Ulysses, its all-to-all lives in the attention function the capture replaces): the metrics need every
    key position of a row. Exact Ulysses credit is built for verl (docs/parallelism.md)."""
    for name, what in (("cp_size", "context parallelism (ring attention)"),
                       ("sp_size", "sequence parallelism (DeepSpeed Ulysses / ALST)")):
        size = getattr(parallelism_config, name, None) if parallelism_config is not None else None
        if size is not None and int(size) > 1:
            raise ValueError(f"RhythmGRPOTrainer does not support accelerate's {what}: parallelism_config.{name}="
                             f"{size}; set {name}=1 (shard the model with FSDP / ZeRO instead). Exact credit under "
                             "Ulysses sequence parallelism is supported in verl "
                             "(actor_rollout_ref.actor.ulysses_sequence_parallel_size); see docs/parallelism.md")


def computes_old_logps(trainer) -> bool:
    """Whether ``GRPOTrainer._generate_and_score_completions`` runs the no-grad old-log-prob forward (TRL 1.16:
    generation and optimisation steps misaligned, or vLLM importance-sampling correction)."""
    args = trainer.args
    generate_every = args.steps_per_generation * trainer.num_iterations
    return bool(args.gradient_accumulation_steps % generate_every != 0
                or (getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction",
                                                                    False)))


class RhythmGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with per-token attention-rhythm credit: (B, C) advantages A_i * gamma_i.

    Same arguments as ``trl.GRPOTrainer``. The rhythm settings come either from ``args`` when it is a
    :class:`RhythmGRPOConfig` (its ``rhythm_*`` fields), or from the keywords ``rhythm_config``
    (:class:`RhythmCreditConfig`, default: the paper's coupled rhythm credit), ``credit_pass`` ("fused" (default)
    or "scorer", see the module docstring) and ``apply_in_eval`` (shape the eval-mode advantages too; default
    False: the eval loss stays plain GRPO) - not both.
    The model must be a transformers causal LM whose attention goes through ``AttentionInterface``.
    """

    def __init__(self, *args, rhythm_config: RhythmCreditConfig | None = None, credit_pass: str | None = None,
                 apply_in_eval: bool | None = None, **kwargs):
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if isinstance(grpo_args, RhythmGRPOConfig):
            given = [n for n, v in (("rhythm_config", rhythm_config), ("credit_pass", credit_pass),
                                    ("apply_in_eval", apply_in_eval)) if v is not None]
            if given:
                raise ValueError(f"RhythmGRPOTrainer: args is a RhythmGRPOConfig, which carries the rhythm settings; "
                                 f"do not pass {given} as well (set the rhythm_* fields instead)")
            rhythm_config = grpo_args.rhythm_credit_config()
            credit_pass, apply_in_eval = grpo_args.rhythm_credit_pass, grpo_args.rhythm_apply_in_eval
        if rhythm_config is None:
            rhythm_config = RhythmCreditConfig()
        if not isinstance(rhythm_config, RhythmCreditConfig):
            raise TypeError(f"rhythm_config must be a RhythmCreditConfig, got {type(rhythm_config).__name__}")
        credit_pass = default("credit_pass") if credit_pass is None else credit_pass
        apply_in_eval = False if apply_in_eval is None else apply_in_eval
        # Fail before the parent loads models or starts generation servers when the options are visible now.
        check_grpo_args(grpo_args, credit_pass)
        super().__init__(*args, **kwargs)
        check_grpo_args(self.args, credit_pass)
        check_parallelism(getattr(getattr(self, "accelerator", None), "parallelism_config", None))
        if credit_pass == "scorer" and getattr(self, "is_fsdp_enabled", False):
            raise ValueError("RhythmGRPOTrainer(credit_pass='scorer') does not support FSDP: the scorer needs each "
                             "rank's full weights; use the fused pass (credit_pass='fused')")
        if getattr(self, "_is_vlm", False):
            raise ValueError("RhythmGRPOTrainer does not support vision-language models (a ProcessorMixin "
                             "processing_class): the rhythm capture handles text-only causal LMs")
        self.rhythm_config = rhythm_config
        self.rhythm_credit_pass = credit_pass
        self.rhythm_apply_in_eval = bool(apply_in_eval)
        self.rhythm_added_seconds = 0.0   # running total of rhythm/added_time_s (benchmarks read it)
        self._rhythm_scorer: RhythmScorer | None = None
        self._rhythm_calls = 0
        self._rhythm_job: dict | None = None     # what the next policy log-prob forward records (see _record)
        if rhythm_config.needs_scorer:
            # The capture's refusals (an untaught architecture, a layer list the model does not have) now, not
            # after the first generation.
            policy = self._rhythm_policy()
            check_capturable(policy)
            RhythmScorer(policy, **rhythm_config.scorer_kwargs(self.args.per_device_train_batch_size))  # the layers

    # -- where credit happens ------------------------------------------------------------------------------------
    def _rhythm_active(self, mode: str) -> bool:
        return mode == "train" or self.rhythm_apply_in_eval

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        if not self._rhythm_active(mode):
            return super()._generate_and_score_completions(inputs)
        cfg = self.rhythm_config
        fused = cfg.needs_scorer and self.rhythm_credit_pass == "fused"
        fused_old = fused and computes_old_logps(self)
        job = {"kind": "old", "gamma": None, "seconds": 0.0, "measured": 0}
        if fused_old:
            self._rhythm_job = job
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rhythm_job = None
        if "pixel_values" in output or "num_images" in output:
            raise ValueError("RhythmGRPOTrainer does not support multimodal batches (the capture is text-only)")
        if fused_old:
            if job["gamma"] is None or "old_per_token_logps" not in output:
                raise RuntimeError("RhythmGRPOTrainer: TRL did not run the old-log-prob forward this TRL version was "
                                   "expected to run (see computes_old_logps); the fused credit cannot be recorded")
            start = time.perf_counter()
            needed = rows_needing_credit(output["advantages"], cfg.sign).to(job["gamma"].device)
            gamma = torch.where(needed[:, None], job["gamma"], 1.0)
            self._rhythm_shape(mode, output, gamma, job["seconds"] + time.perf_counter() - start,
                               measured=job["measured"])
        elif fused:
            if "old_per_token_logps" in output:
                raise RuntimeError("RhythmGRPOTrainer: TRL ran an old-log-prob forward this TRL version was not "
                                   "expected to run (see computes_old_logps); the fused credit would miss it")
            # recorded in the training forward: the advantages stay (B,) until _compute_loss
        else:
            start = time.perf_counter()
            gamma = self.rhythm_gamma(output)
            measured = int(rows_needing_credit(output["advantages"], cfg.sign).sum()) if cfg.needs_scorer else 0
            self._rhythm_shape(mode, output, gamma, time.perf_counter() - start, measured=measured)
        return output

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        recording = (self._rhythm_active(mode) and self.rhythm_config.needs_scorer
                     and self.rhythm_credit_pass == "fused" and inputs["advantages"].dim() == 1)
        if recording:
            inputs = dict(inputs)   # TRL's buffered batch stays unshaped; only this loss sees (B, C)
            self._rhythm_job = {"kind": "train", "inputs": inputs, "mode": mode}
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._rhythm_job = None
        if recording and inputs["advantages"].dim() == 1:
            raise RuntimeError("RhythmGRPOTrainer: _compute_loss ran no policy forward through "
                               "_get_per_token_logps_and_entropies; this TRL version is not supported by the fused "
                               "credit (use credit_pass='scorer')")
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           **kwargs):
        job = self._rhythm_job
        unwrap = self.accelerator.unwrap_model
        if job is None or unwrap(model) is not unwrap(self.model):
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size=batch_size, **kwargs)
        self._rhythm_job = None   # the first policy forward over the batch records; later ones (PEFT's ref) do not
        return self._record(job, model, input_ids, attention_mask, logits_to_keep, batch_size, kwargs)

    # -- the fused recording -------------------------------------------------------------------------------------
    def _record(self, job, model, input_ids, attention_mask, logits_to_keep, batch_size, kwargs):
        """Run TRL's log-prob forward in chunks of ``batch_size`` rows with the capture recording the rows that
        need credit; returns what TRL's own method returns and leaves gamma / the shaped advantages in ``job``.

        Added time = the wall time of this call minus TRL's own forwards (timed around each call, the recording
        inside them excluded): setup, the metrics, the signals and the credit."""
        started = time.perf_counter()
        forward_seconds = 0.0
        parent = super()._get_per_token_logps_and_entropies
        cfg = self.rhythm_config
        batch, length = input_ids.shape
        width = int(logits_to_keep)
        response = attention_mask.bool().clone()
        response[:, : length - width] = False      # completion tokens: positions P + i, i < C
        if job["kind"] == "train":
            needed = rows_needing_credit(job["inputs"]["advantages"], cfg.sign).cpu()
        else:
            needed = torch.ones(batch, dtype=torch.bool)  # rewards are computed after this forward
        gamma = torch.ones(batch, width, dtype=torch.float32, device=input_ids.device)
        measured = 0
        scorer = self.rhythm_scorer
        results = []
        step = int(batch_size or batch)
        with Capture(self._rhythm_policy()) as capture:
            for first in range(0, batch, step):
                chunk = slice(first, min(first + step, batch))
                chunk_kwargs = _chunk_kwargs(kwargs, chunk, batch)
                rows = torch.nonzero(needed[chunk]).reshape(-1)
                recording = scorer.recording(attention_mask[chunk], response[chunk], rows=rows) if rows.numel() else None
                start = time.perf_counter()
                if recording is None:
                    results.append(parent(model, input_ids[chunk], attention_mask[chunk], logits_to_keep,
                                          batch_size=None, **chunk_kwargs))
                    forward_seconds += time.perf_counter() - start
                    continue
                result = capture.run(recording.request, forward=lambda: parent(
                    model, input_ids[chunk], attention_mask[chunk], logits_to_keep, batch_size=None, **chunk_kwargs))
                forward_seconds += time.perf_counter() - start - result.metrics_seconds
                results.append(result.output)
                rows_gamma = scorer.scores_from(recording, result.records).gamma(cfg.strategy, **cfg.credit_kwargs())
                rows_gamma = to_response_tensor(rows_gamma, width, recording.response_mask, fill=1.0)
                gamma[first + rows.to(gamma.device)] = rows_gamma.to(gamma.device)
                measured += rows.numel()
        logps = torch.cat([r[0] for r in results], dim=0)
        entropies = torch.cat([r[1] for r in results], dim=0) if results[0][1] is not None else None
        aux = torch.stack([r[2] for r in results]).mean() if results[0][2] is not None else None
        seconds = time.perf_counter() - started - forward_seconds
        if job["kind"] == "old":
            job.update(gamma=gamma, seconds=seconds, measured=measured)
        else:
            self._rhythm_shape(job["mode"], job["inputs"], gamma, seconds, measured=measured)
        return logps, entropies, aux

    # -- shaping and logs ----------------------------------------------------------------------------------------
    def _rhythm_shape(self, mode: str, batch: dict, gamma: torch.Tensor, seconds: float, measured: int) -> None:
        """batch["advantages"] (B,) -> (B, C) = A * gamma where the sign allows; logs."""
        start = time.perf_counter()
        batch["advantages"] = shape_advantages(batch["advantages"], gamma.to(batch["advantages"].device),
                                               sign=self.rhythm_config.sign)
        shaped_at = time.perf_counter()
        seconds += shaped_at - start
        self._rhythm_log(mode, gamma, batch, seconds, measured)
        self.rhythm_added_seconds += seconds + time.perf_counter() - shaped_at   # the logging counts too

    # -- the scorer path and the baselines: gamma of one generation batch ----------------------------------------
    @torch.no_grad()
    def rhythm_gamma(self, batch: dict) -> torch.Tensor:
        """gamma float32 (B, C) for the completions of ``batch`` (the dict of ``_generate_and_score_completions``)
        with a separate pass (the scorer, only over the rows that need credit) or the baselines: entry i is gamma
        at position P + i of ``prompt_ids + completion_ids``; 1 on completion padding and on rows whose
        advantage gamma cannot change."""
        cfg = self.rhythm_config
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).bool()
        response_mask = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1).bool()
        width = completion_ids.size(1)
        if not cfg.needs_scorer:    # the baselines: no model pass
            entropy = None
            if cfg.strategy == "entropy":
                entropy = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
                entropy[:, -width:] = self._rhythm_entropy(input_ids, attention_mask, width)
            gamma = compute_gamma(cfg.strategy, response_mask, entropy=entropy,
                                  row_ids=self._rhythm_row_ids(len(input_ids)),
                                  sequence_start=sequence_starts(attention_mask), **cfg.credit_kwargs())
        else:
            rows = torch.nonzero(rows_needing_credit(batch["advantages"], cfg.sign)).reshape(-1).to(input_ids.device)
            gamma = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
            if rows.numel():
                model = self._rhythm_policy()
                with disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs):
                    scores = self.rhythm_scorer.score(input_ids[rows], attention_mask[rows], response_mask[rows])
                gamma[rows] = scores.gamma(cfg.strategy, **cfg.credit_kwargs()).to(gamma.device)
        return to_response_tensor(gamma, width, response_mask.to(gamma.device), fill=1.0)

    @property
    def rhythm_scorer(self) -> RhythmScorer:
        """The scorer bound to the live policy weights (built on first use): runs the scorer path, and turns the
        fused path's records into signals."""
        if self._rhythm_scorer is None:
            kwargs = self.rhythm_config.scorer_kwargs(self.args.per_device_train_batch_size)
            self._rhythm_scorer = RhythmScorer(self._rhythm_policy(), **kwargs)
        return self._rhythm_scorer

    def _rhythm_policy(self) -> torch.nn.Module:
        """The current policy as a plain transformers model (DDP unwrapped; PEFT: the base model with the
        adapters injected and active)."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
        return model

    def _rhythm_entropy(self, input_ids, attention_mask, width) -> torch.Tensor:
        """Per-token entropy (B, C) of the distribution that sampled each completion token (TRL's own pass, at
        the sampling temperature)."""
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            _, entropies, _ = super()._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask.long(), width,
                batch_size=self.rhythm_config.micro_batch_size or self.args.per_device_train_batch_size,
                compute_entropy=True)
        return entropies.float()

    def _rhythm_row_ids(self, batch: int) -> list[str]:
        """The random baseline's identities of this process's generation batch (``trainer_row_ids``): the
        training step, the generation batch of this run and the row's index in the all-process batch."""
        call, self._rhythm_calls = self._rhythm_calls, self._rhythm_calls + 1
        first = self.accelerator.process_index * batch
        return trainer_row_ids(self.state.global_step, call, range(first, first + batch))

    def _rhythm_log(self, mode: str, gamma: torch.Tensor, batch: dict, seconds: float, measured: int) -> None:
        mask = batch["completion_mask"].bool()
        if "tool_mask" in batch:
            mask = mask & batch["tool_mask"].bool()
        sums = torch.cat([gamma_sums(gamma, mask), torch.tensor([float(measured), float(mask.shape[0])],
                                                                 dtype=torch.float64)])
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.gather(sums.to(self.accelerator.device)[None]).reshape(-1, 5).sum(0).cpu()
        for name, value in gamma_metrics(sums[:3]).items():
            self._metrics[mode][name].append(value)
        self._metrics[mode]["rhythm/frac_rows_measured"].append(float(sums[3]) / max(float(sums[4]), 1.0))
        self._metrics[mode]["rhythm/added_time_s"].append(seconds)


def _refuse_plain_trainer(init):
    """``GRPOTrainer.__init__`` -> the same, refusing a :class:`RhythmGRPOConfig` unless the trainer is a
    :class:`RhythmGRPOTrainer`: a plain GRPOTrainer would ignore the rhythm_* fields and train plain GRPO
    without a word. Installed once, when this module is imported (the only way to get a RhythmGRPOConfig)."""
    if getattr(init, "__rhythm_wrapped__", False):
        return init

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if isinstance(grpo_args, RhythmGRPOConfig) and not isinstance(self, RhythmGRPOTrainer):
            raise TypeError(f"{type(self).__name__} got a RhythmGRPOConfig but does not apply the rhythm credit (it "
                            "would train plain GRPO): use rhythm.integrations.trl.RhythmGRPOTrainer, or a plain "
                            "trl.GRPOConfig for plain GRPO")
        init(self, *args, **kwargs)

    __init__.__rhythm_wrapped__ = True
    return __init__


GRPOTrainer.__init__ = _refuse_plain_trainer(GRPOTrainer.__init__)


def _chunk_kwargs(kwargs: dict, chunk: slice, batch: int) -> dict:
    """The extra arguments of ``_get_per_token_logps_and_entropies`` for rows ``chunk``: per-row tensors sliced,
    flags and None kept; anything else (multimodal inputs) refused."""
    out = {}
    for name, value in kwargs.items():
        if value is None or isinstance(value, bool):
            out[name] = value
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            out[name] = value[chunk]
        else:
            raise ValueError(f"RhythmGRPOTrainer: the fused credit cannot split the log-prob forward's argument "
                             f"{name!r} by rows (multimodal inputs are not supported)")
    return out
