"""Attention-rhythm credit in verl: the hooks, and a CPU run of the data path with verl's real DataProto.

In a verl job (driver and Ray workers), make every process import the hooks module:

    export VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl_hooks      # read by `import verl`
    export RHYTHM_CREDIT_CONFIG='{"strategy": "coupled", "sign": "both"}' # optional, JSON of RhythmCreditConfig
    python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo ... \
        actor_rollout_ref.model.external_lib=rhythm.integrations.verl_hooks   # alternative hook (workers)

With the legacy trainer (trainer.use_v1=False) that is all: the hooks make the driver's
RayPPOTrainer._compute_old_log_prob ask the actor workers for gamma, ActorRolloutRefWorker.compute_log_prob
(wrapped in each worker) scores the batch with the actor's module and returns batch["rhythm_gamma"] [B, R_len],
and the wrapped compute_advantage multiplies the advantages of any estimator by it on response tokens
(docs/integrations.md, "verl"; tests/test_verl_integration.py runs that path on stand-in workers).

This script runs the same data path by hand on CPU (what a custom trainer would call): a tiny random 3-layer
Llama stands in for the actor, gamma comes from rhythm.integrations.verl.compute_rhythm_gamma - padded
batches or verl's remove-padding layout (use_remove_padding=True) - and verl's wrapped compute_advantage
applies it.

    .venv/bin/python examples/verl_rhythm.py
"""
import os

os.environ.setdefault("VERL_USE_EXTERNAL_MODULES", "rhythm.integrations.verl_hooks")

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from verl import DataProto  # importing verl imports the hooks (VERL_USE_EXTERNAL_MODULES)

from rhythm import RhythmScorer
from rhythm.integrations.config import RhythmCreditConfig
from rhythm.integrations.verl import GAMMA_KEY, compute_rhythm_gamma


def rollout_batch(prompt_lens, response_lens, p_max=8, r_max=24, vocab=128, seed=0):
    """A verl rollout batch: prompt left-padded + response right-padded, GRPO groups by uid."""
    g = torch.Generator().manual_seed(seed)
    b = len(prompt_lens)
    input_ids = torch.zeros(b, p_max + r_max, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    rewards = torch.zeros(b, r_max)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        input_ids[i, p_max - p:p_max + r] = torch.randint(1, vocab, (p + r,), generator=g)
        attention_mask[i, p_max - p:p_max + r] = 1
        rewards[i, r - 1] = float(i % 2)  # outcome reward on the last response token
    return DataProto.from_dict(
        tensors=dict(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=(attention_mask.cumsum(-1) - 1).clamp_min(0), responses=input_ids[:, p_max:],
                     response_mask=attention_mask[:, p_max:], token_level_rewards=rewards),
        non_tensors=dict(uid=np.array(["q0"] * 4 + ["q1"] * 4, dtype=object)))


def main():
    torch.manual_seed(0)
    actor = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    config = RhythmCreditConfig(strategy="coupled", window=4, horizon=(2, 100))  # short toy responses
    scorer = RhythmScorer(actor, **config.scorer_kwargs())
    batch = rollout_batch([5, 8, 3, 6, 7, 4, 8, 2], [24, 11, 18, 20, 9, 24, 15, 13])

    # (a) worker side, e.g. next to the actor's compute_log_prob; remove-padding layout as the actor runs it
    gamma, metrics = compute_rhythm_gamma(scorer, batch, config, use_remove_padding=True, return_metrics=True)
    assert torch.equal(gamma, compute_rhythm_gamma(scorer, batch, config))  # same as the padded layout
    batch.batch[GAMMA_KEY] = gamma

    # (b)+(c) driver side: verl's own compute_advantage, wrapped by the hooks, applies gamma after GRPO
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    assert getattr(compute_advantage, "__rhythm_wrapped__", False), "hooks not installed"
    plain = compute_advantage(rollout_batch([5, 8, 3, 6, 7, 4, 8, 2], [24, 11, 18, 20, 9, 24, 15, 13]),
                              adv_estimator="grpo", config=AlgoConfig(adv_estimator="grpo"))
    shaped = compute_advantage(batch, adv_estimator="grpo", config=AlgoConfig(adv_estimator="grpo"))
    mask = batch.batch["response_mask"].bool()
    ratio = shaped.batch["advantages"][mask] / plain.batch["advantages"][mask]
    print(f"gamma on {int(mask.sum())} response tokens: amplified {metrics['rhythm/frac_amplified']:.2f}, "
          f"mean {metrics['rhythm/gamma_mean']:.3f}, scorer {metrics['rhythm/scorer_time_s'] * 1e3:.0f} ms")
    print(f"shaped / GRPO advantage on response tokens: values {sorted(set(ratio.round(decimals=3).tolist()))}")
    print(f"logged: {shaped.meta_info['metrics']}")


if __name__ == "__main__":
    main()
