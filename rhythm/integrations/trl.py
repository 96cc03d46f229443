"""TRL adapter: ``RhythmGRPOTrainer``, a ``trl.GRPOTrainer`` whose advantages carry per-token rhythm credit.

Where it hooks (TRL >= 1.16, read from ``trl/trainer/grpo_trainer.py``):

- ``GRPOTrainer._generate_and_score_completions`` generates, scores the rewards and returns a dict with
  ``prompt_ids`` (left-padded), ``completion_ids`` (right-padded), their masks and ``advantages`` of shape
  (B,) - one group-normalised value per completion. The subclass calls it, then runs one extra no-grad pass
  of the *current policy* over prompt + completion (:class:`rhythm.RhythmScorer`), turns the per-token signals
  into gamma [B, P + C] and replaces ``advantages`` by ``shape_advantages(advantages, gamma[:, P:])``:
  shape (B, C), completion token i multiplied by the gamma of its own position P + i (docs/definitions.md section 6: no
  shift; log-probs are shifted, metrics are not), padding left at the sequence advantage (gamma = 1 there).
- ``GRPOTrainer._compute_loss`` unsqueezes advantages only when they are 1-D; (B, C) advantages flow into
  every supported loss type token by token. Buffering (``steps_per_generation``, ``num_iterations``) and
  shuffling split the dict along dim 0 only, so (B, C) tensors travel with their rows.

Logged through the trainer's metrics (mode "train"): ``rhythm/frac_amplified`` (share of loss tokens with
gamma > 1), ``rhythm/gamma_mean`` (mean gamma over loss tokens), ``rhythm/scorer_time_s`` (wall time of the
scoring pass and the credit, per generation batch).

Unsupported (ValueError at init): DeepSpeed ZeRO-3 and FSDP (the scorer needs each rank's full weights),
vision-language models (``ProcessorMixin`` processing classes; the scorer is text-only), loss types outside
:data:`SUPPORTED_LOSS_TYPES`.
"""
from __future__ import annotations

import time

import torch
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from ..credit import credit_multipliers, shape_advantages
from ..scorer import RhythmScorer, to_response_tensor
from .config import RhythmCreditConfig

__all__ = ["RhythmCreditConfig", "RhythmGRPOTrainer", "SUPPORTED_LOSS_TYPES", "check_grpo_args"]

# Loss types of TRL 1.16 whose advantage term is elementwise in the token axis (A broadcast as (B, 1) or taken
# as (B, C)): every one multiplies or clips A_t per token, and the sequence-level pieces (VESPO's phi, the
# off-policy mask) read only the sign of A, which gamma > 0 preserves.
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")


def check_grpo_args(args) -> None:
    """Raise ValueError for GRPOConfig / accelerate settings the adapter does not support."""
    if args is None:
        return
    loss_type = getattr(args, "loss_type", "grpo")
    if loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(f"RhythmGRPOTrainer: loss_type={loss_type!r} is not supported (its advantage handling has "
                         f"not been checked for per-token advantages); supported: {SUPPORTED_LOSS_TYPES}")
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        raise ValueError("RhythmGRPOTrainer does not support DeepSpeed ZeRO-3: the rhythm scorer runs a plain forward "
                         "of the policy and needs its full (ungathered) weights on each rank; use ZeRO-1/2 or DDP")
    if getattr(args, "fsdp", None):
        raise ValueError("RhythmGRPOTrainer does not support FSDP: the rhythm scorer needs each rank's full weights; "
                         "use DDP or DeepSpeed ZeRO-1/2")


class RhythmGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with per-token attention-rhythm credit: (B, C) advantages A_i * gamma_i.

    Same arguments as ``trl.GRPOTrainer`` plus ``rhythm_config`` (:class:`RhythmCreditConfig`, default: the
    paper's coupled rhythm credit with the default settings) and ``apply_in_eval`` (shape the eval-mode advantages
    too; default False: the eval loss stays plain GRPO). The model must be a transformers causal LM whose
    attention goes through ``AttentionInterface`` (any model the scorer supports).
    """

    def __init__(self, *args, rhythm_config: RhythmCreditConfig | None = None, apply_in_eval: bool = False,
                 **kwargs):
        if rhythm_config is None:
            rhythm_config = RhythmCreditConfig()
        if not isinstance(rhythm_config, RhythmCreditConfig):
            raise TypeError(f"rhythm_config must be a RhythmCreditConfig, got {type(rhythm_config).__name__}")
        # Fail before the parent loads models or starts generation servers when the options are visible now.
        check_grpo_args(kwargs.get("args", args[2] if len(args) > 2 else None))
        super().__init__(*args, **kwargs)
        check_grpo_args(self.args)
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError("RhythmGRPOTrainer does not support FSDP: the rhythm scorer needs each rank's full "
                             "weights; use DDP or DeepSpeed ZeRO-1/2")
        if getattr(self, "_is_vlm", False):
            raise ValueError("RhythmGRPOTrainer does not support vision-language models (a ProcessorMixin "
                             "processing_class): the rhythm scorer captures text-only causal LMs")
        self.rhythm_config = rhythm_config
        self.rhythm_apply_in_eval = bool(apply_in_eval)
        self._rhythm_scorer: RhythmScorer | None = None
        self._rhythm_calls = 0

    # -- the hook ---------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        if mode == "eval" and not self.rhythm_apply_in_eval:
            return output
        if "pixel_values" in output or "num_images" in output:
            raise ValueError("RhythmGRPOTrainer does not support multimodal batches (the scorer is text-only)")
        start = time.perf_counter()
        gamma = self.rhythm_gamma(output)
        output["advantages"] = shape_advantages(output["advantages"], gamma.to(output["advantages"].device),
                                                sign=self.rhythm_config.sign)
        self._rhythm_log(mode, gamma, output, time.perf_counter() - start)
        return output

    # -- gamma of one generation batch ------------------------------------------------------------------------
    @torch.no_grad()
    def rhythm_gamma(self, batch: dict) -> torch.Tensor:
        """gamma float32 (B, C) for the completions of ``batch`` (the dict of ``_generate_and_score_completions``):
        entry i is gamma at position P + i of ``prompt_ids + completion_ids``; 1 on completion padding."""
        cfg = self.rhythm_config
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).bool()
        response_mask = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1).bool()
        width = completion_ids.size(1)
        seed = cfg.step_seed(self.state.global_step, self.accelerator.process_index, self._rhythm_calls)
        self._rhythm_calls += 1
        options = cfg.credit_kwargs(seed=seed)
        if cfg.strategy == "random":
            gamma = credit_multipliers(None, None, response_mask, strategy="random", **options)
        elif cfg.strategy == "entropy":
            entropy = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
            entropy[:, -width:] = self._rhythm_entropy(input_ids, attention_mask, width)
            gamma = credit_multipliers(None, None, response_mask, strategy="entropy", entropy=entropy, **options)
        else:
            model = self._rhythm_policy()
            with disable_gradient_checkpointing(model, self.args.gradient_checkpointing_kwargs):
                scores = self.rhythm_scorer.score(input_ids, attention_mask, response_mask)
            gamma = scores.gamma(cfg.strategy, **options)
        return to_response_tensor(gamma, width, response_mask.to(gamma.device), fill=1.0)

    @property
    def rhythm_scorer(self) -> RhythmScorer:
        """The scorer bound to the live policy weights (built on first use)."""
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
            _, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask.long(), width,
                batch_size=self.rhythm_config.micro_batch_size or self.args.per_device_train_batch_size,
                compute_entropy=True)
        return entropies.float()

    def _rhythm_log(self, mode: str, gamma: torch.Tensor, batch: dict, seconds: float) -> None:
        mask = batch["completion_mask"].bool()
        if "tool_mask" in batch:
            mask = mask & batch["tool_mask"].bool()
        gamma = gamma.to(mask.device)
        stats = torch.stack([(gamma > 1).logical_and(mask).sum().float(), (gamma * mask).sum().float(),
                             mask.sum().float()])
        total = self.accelerator.gather(stats.reshape(1, 3)).reshape(-1, 3).sum(0)
        count = max(float(total[2]), 1.0)
        self._metrics[mode]["rhythm/frac_amplified"].append(float(total[0]) / count)
        self._metrics[mode]["rhythm/gamma_mean"].append(float(total[1]) / count)
        self._metrics[mode]["rhythm/scorer_time_s"].append(seconds)
