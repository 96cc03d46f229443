"""Attention-rhythm credit in verl: the manual pieces on CPU, with verl's real DataProto and compute_advantage.

A verl training job does not need this script: `bash examples/verl_rhythm_grpo.sh` (GPUs, vLLM, verl's data)
installs the hooks in every process through VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl.plugin, configures
them with a `rhythm` block of verl's Hydra config, and the actor records the metrics inside its own old-log-prob
forward (docs/integrations.md, "verl"; tests/test_verl_trainers.py runs that path on CPU stand-ins).

This script is the documented "manual pieces" recipe, for a trainer of your own: a tiny random 3-layer Llama
stands in for the actor, gamma comes from rhythm.integrations.verl.credit.compute_rhythm_gamma (a separate no-grad
pass over the padded batch), verl's own compute_advantage computes GRPO advantages and
apply_rhythm_gamma multiplies them by gamma - once (a second application is refused).

    .venv/bin/python examples/verl_rhythm.py
"""
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from verl import DataProto

from rhythm import RhythmScorer
from rhythm.integrations.config import RhythmCreditConfig
from rhythm.integrations.verl.credit import GAMMA_KEY, apply_rhythm_gamma, compute_rhythm_gamma


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

    # (a) worker side, e.g. next to the actor's compute_log_prob
    gamma, metrics = compute_rhythm_gamma(scorer, batch, config, return_metrics=True)
    batch.batch[GAMMA_KEY] = gamma

    # (b) driver side: verl's own compute_advantage (GRPO), then gamma applied once
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    plain = compute_advantage(rollout_batch([5, 8, 3, 6, 7, 4, 8, 2], [24, 11, 18, 20, 9, 24, 15, 13]),
                              adv_estimator="grpo", config=AlgoConfig(adv_estimator="grpo"))
    shaped = compute_advantage(batch, adv_estimator="grpo", config=AlgoConfig(adv_estimator="grpo"))
    apply_rhythm_gamma(shaped, sign="both")
    try:
        apply_rhythm_gamma(shaped, sign="both")
        raise AssertionError("a second application must be refused")
    except ValueError as exc:
        print(f"second apply_rhythm_gamma refused: {str(exc)[:60]}...")
    mask = batch.batch["response_mask"].bool() & (plain.batch["advantages"] != 0)
    ratio = shaped.batch["advantages"][mask] / plain.batch["advantages"][mask]
    print(f"gamma on {int(batch.batch['response_mask'].sum())} response tokens: amplified {metrics['rhythm/frac_amplified']:.2f}, "
          f"mean {metrics['rhythm/gamma_mean']:.3f}, scorer {metrics['rhythm/scorer_time_s'] * 1e3:.0f} ms")
    print(f"shaped / GRPO advantage on response tokens: values {sorted(set(ratio.round(decimals=3).tolist()))}")
    print(f"logged: {shaped.meta_info['metrics']}")


if __name__ == "__main__":
    main()
