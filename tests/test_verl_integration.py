"""verl adapter: gamma from a verl batch (padded and remove-padding layouts), the post-multiply after verl's real
``compute_advantage`` (grpo and a token-level estimator), and the registration through
``VERL_USE_EXTERNAL_MODULES`` (a fresh interpreter, as a Ray worker would start).

Batches follow verl's layout: input_ids = prompt (left-padded) + response (right-padded), position_ids =
cumsum(attention_mask) - 1, responses [B, R_len] = the tail of input_ids.
"""
import math
import os
import subprocess
import sys

import pytest

verl = pytest.importorskip("verl")
pytest.importorskip("tensordict")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from verl import DataProto  # noqa: E402

from rhythm import RhythmScorer  # noqa: E402
from rhythm.integrations.config import RhythmCreditConfig  # noqa: E402
from rhythm.integrations.verl import (apply_rhythm_gamma, compute_rhythm_gamma, pack_batch,  # noqa: E402
                                      rhythm_gamma_packed)

SMALL = dict(window=4, horizon=(2, 100))
PROMPT_LENS = [5, 9, 7, 3, 8, 6]
RESPONSE_LENS = [14, 20, 9, 20, 0, 17]  # one empty response; two rows fill the response window
P_MAX, R_MAX = 10, 20


@pytest.fixture(scope="module")
def ray_trainer():
    try:
        from verl.trainer.ppo import ray_trainer as module
    except ImportError as exc:  # verl installed without the modules its trainer imports
        pytest.skip(f"verl.trainer.ppo.ray_trainer does not import: {exc}")
    return module


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def verl_batch(seed=0):
    """A DataProto as verl's rollout hands it to compute_log_prob / compute_advantage (GRPO groups of 3)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(PROMPT_LENS)
    prompts = torch.zeros(batch, P_MAX, dtype=torch.long)
    responses = torch.zeros(batch, R_MAX, dtype=torch.long)
    attention_mask = torch.zeros(batch, P_MAX + R_MAX, dtype=torch.long)
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        prompts[b, P_MAX - p:] = torch.randint(1, 97, (p,), generator=g)
        responses[b, :r] = torch.randint(1, 97, (r,), generator=g)
        attention_mask[b, P_MAX - p:P_MAX + r] = 1
    input_ids = torch.cat([prompts, responses], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    response_mask = attention_mask[:, -R_MAX:].clone()
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.0])
    token_level_rewards = torch.zeros(batch, R_MAX)
    for b, r in enumerate(RESPONSE_LENS):
        token_level_rewards[b, max(r - 1, 0)] = scores[b] if r else 0.0
    return DataProto.from_dict(
        tensors=dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, prompts=prompts,
                     responses=responses, response_mask=response_mask, token_level_rewards=token_level_rewards),
        non_tensors=dict(uid=np.array(["a", "a", "a", "b", "b", "b"], dtype=object)))


def per_row_gamma(model, data, cfg):
    """Reference: every sequence scored alone, unpadded (B = 1), gamma of its response tokens."""
    scorer = RhythmScorer(model, **cfg.scorer_kwargs())
    out = torch.ones(len(PROMPT_LENS), R_MAX)
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids = data.batch["input_ids"][b, P_MAX - p:P_MAX + r][None]
        response = torch.zeros_like(ids, dtype=torch.bool)
        response[:, p:] = True
        gamma = scorer.score(ids, torch.ones_like(ids), response).gamma(cfg.strategy)
        out[b, :r] = gamma[0, p:]
    return out


@pytest.mark.parametrize("strategy", ["coupled", "local", "global"])
def test_gamma_aligned_to_responses_padded_and_remove_padding(model, strategy):
    cfg = RhythmCreditConfig(strategy=strategy, **SMALL)
    data = verl_batch()
    scorer = RhythmScorer(model, **cfg.scorer_kwargs(4))
    reference = per_row_gamma(model, data, cfg)
    padded, metrics = compute_rhythm_gamma(scorer, data, cfg, return_metrics=True)
    packed = compute_rhythm_gamma(scorer, data, cfg, use_remove_padding=True)
    assert padded.shape == data.batch["responses"].shape and padded.dtype == torch.float32
    torch.testing.assert_close(padded, reference, rtol=0, atol=0)
    torch.testing.assert_close(packed, reference, rtol=0, atol=0)
    mask = data.batch["response_mask"].bool()
    assert bool((padded[~mask] == 1).all())  # response padding (and the empty response) untouched
    assert bool((padded[mask] > 1).any())
    assert 0 < metrics["rhythm/frac_amplified"] < 1 and metrics["rhythm/gamma_mean"] > 1
    # gamma of response token i is that of its own position, not the one before (SPEC section 6)
    shifted = torch.ones_like(reference)
    shifted[:, 1:] = reference[:, :-1]
    assert not torch.equal(padded, shifted)


def test_packed_layout_directly(model):
    """verl's remove-padding input as the worker holds it: B = 1, attention_mask None, position ids resetting."""
    cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
    data = verl_batch()
    mask = data.batch["attention_mask"].bool()
    ids, pos, cu, indices = pack_batch(data.batch["input_ids"], mask, data.batch["position_ids"])
    assert ids.shape == (1, int(mask.sum())) and cu.tolist()[-1] == int(mask.sum())
    assert bool((pos[0, cu[:-1]] == 0).all())  # every sequence restarts at position 0
    window = torch.zeros_like(mask)
    window[:, -R_MAX:] = True
    response = (mask & window).flatten()[indices][None]
    scorer = RhythmScorer(model, **cfg.scorer_kwargs())
    # boundaries from position_ids alone (cu_seqlens=None), as verl's flash-attn varlen path infers them
    gamma = rhythm_gamma_packed(scorer, ids, pos, response, cfg)
    assert gamma.shape == ids.shape
    full = torch.ones(mask.numel())
    full[indices] = gamma[0]
    torch.testing.assert_close(full.view(mask.shape)[:, -R_MAX:], per_row_gamma(model, data, cfg), rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_plus_plus"])
def test_post_multiply_after_real_compute_advantage(model, ray_trainer, estimator):
    cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
    data = verl_batch()
    gamma = compute_rhythm_gamma(RhythmScorer(model, **cfg.scorer_kwargs()), data, cfg)
    plain = ray_trainer.compute_advantage(verl_batch(), adv_estimator=estimator, config=_algo_config(estimator))
    shaped = ray_trainer.compute_advantage(data, adv_estimator=estimator, config=_algo_config(estimator))
    apply_rhythm_gamma(shaped, gamma)
    mask = data.batch["response_mask"].bool()
    base, adv = plain.batch["advantages"], shaped.batch["advantages"]
    assert bool((base[mask] != 0).any())
    torch.testing.assert_close(adv[mask], base[mask] * gamma[mask])
    torch.testing.assert_close(adv[~mask], base[~mask])  # off the response: untouched
    assert shaped.meta_info["metrics"]["rhythm/frac_amplified"] > 0


def test_sign_modes_and_random_entropy_baselines(ray_trainer):
    data = verl_batch()
    mask = data.batch["response_mask"].bool()
    plain = ray_trainer.compute_advantage(verl_batch(), adv_estimator="grpo", config=_algo_config("grpo"))
    base = plain.batch["advantages"]
    assert bool((base > 0).any()) and bool((base < 0).any())
    gamma = compute_rhythm_gamma(None, data, RhythmCreditConfig(strategy="random"), seed=3)
    for b, r in enumerate(RESPONSE_LENS):
        assert int((gamma[b] > 1).sum()) == math.ceil(0.4 * r)
    assert not torch.equal(gamma, compute_rhythm_gamma(None, data, RhythmCreditConfig(strategy="random"), seed=4))
    for sign in ("positive", "negative"):
        shaped = ray_trainer.compute_advantage(verl_batch(), adv_estimator="grpo", config=_algo_config("grpo"))
        apply_rhythm_gamma(shaped, gamma, sign=sign)
        adv = shaped.batch["advantages"]
        allowed = mask & ((base >= 0) if sign == "positive" else (base < 0))
        torch.testing.assert_close(adv[allowed], base[allowed] * gamma[allowed])
        torch.testing.assert_close(adv[~allowed], base[~allowed])
    # entropy baseline: verl's per-token entropys [B, R_len] from the log-prob pass
    entropys = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)) + 0.1
    data.batch["entropys"] = entropys * mask
    gamma = compute_rhythm_gamma(None, data, RhythmCreditConfig(strategy="entropy"))
    for b, r in enumerate(RESPONSE_LENS):
        chosen = gamma[b] > 1
        assert int(chosen.sum()) == math.ceil(0.4 * r)
        if 0 < int(chosen.sum()) < r:
            assert float(entropys[b][chosen].min()) >= float(entropys[b][mask[b] & ~chosen].max())
    with pytest.raises(ValueError, match="entropys"):
        compute_rhythm_gamma(None, verl_batch(), RhythmCreditConfig(strategy="entropy"))


def test_hooks_wrap_compute_advantage_in_process(model, ray_trainer):
    from rhythm.integrations import verl_hooks  # importing it installs the wrapper

    assert ray_trainer.compute_advantage.__rhythm_wrapped__
    verl_hooks.uninstall()
    original = ray_trainer.compute_advantage
    assert not getattr(original, "__rhythm_wrapped__", False)
    sys.modules["_rhythm_early_user"] = type(sys)("_rhythm_early_user")
    sys.modules["_rhythm_early_user"].compute_advantage = original  # bound before install (an alias)
    try:
        verl_hooks.install()
        wrapped = ray_trainer.compute_advantage
        assert wrapped.__rhythm_wrapped__ and sys.modules["_rhythm_early_user"].compute_advantage is wrapped
        verl_hooks.install()  # idempotent
        assert ray_trainer.compute_advantage is wrapped
        cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
        data = verl_batch()
        data.batch["rhythm_gamma"] = compute_rhythm_gamma(RhythmScorer(model, **cfg.scorer_kwargs()), data, cfg)
        out = ray_trainer.compute_advantage(data, adv_estimator="grpo", config=_algo_config("grpo"))
        base = original(verl_batch(), adv_estimator="grpo", config=_algo_config("grpo")).batch["advantages"]
        torch.testing.assert_close(out.batch["advantages"], base * out.batch["rhythm_gamma"])
        untouched = ray_trainer.compute_advantage(verl_batch(), adv_estimator="grpo", config=_algo_config("grpo"))
        torch.testing.assert_close(untouched.batch["advantages"], base)  # no gamma in the batch: plain GRPO
    finally:
        verl_hooks.uninstall()
        del sys.modules["_rhythm_early_user"]
    assert ray_trainer.compute_advantage is original


def test_hooks_reach_a_fresh_process_through_verl_env_var(tmp_path):
    """VERL_USE_EXTERNAL_MODULES makes `import verl` import the hooks; a later import of the trainer module (and
    any `from ... import compute_advantage`) sees the wrapped function - what a Ray worker or driver does."""
    (tmp_path / "late_user.py").write_text("from verl.trainer.ppo.ray_trainer import compute_advantage\n")
    code = ("import sys, verl\n"
            "assert 'rhythm.integrations.verl_hooks' in sys.modules\n"
            "import verl.trainer.ppo.ray_trainer as rt, late_user\n"
            "assert rt.compute_advantage.__rhythm_wrapped__ and late_user.compute_advantage is rt.compute_advantage\n"
            "print('wrapped')\n")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rhythm.integrations.verl_hooks",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0 and "No module named" in result.stderr and "rhythm" not in result.stderr:
        pytest.skip(f"verl's trainer module does not import here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrapped" in result.stdout


def _algo_config(estimator):
    from verl.trainer.config import AlgoConfig

    return AlgoConfig(adv_estimator=estimator)
