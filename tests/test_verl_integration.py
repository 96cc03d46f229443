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
    # gamma of response token i is that of its own position, not the one before (docs/definitions.md section 6)
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
    assert "wrapped" in _run_with_verl_hooks(code, "trainer", extra_path=tmp_path)


def _run_with_verl_hooks(code: str, what: str, extra_path=None) -> str:
    """Run ``code`` in a fresh interpreter with VERL_USE_EXTERNAL_MODULES naming our hooks (what a Ray worker
    or driver process does); returns its stdout. Skips when verl's ``what`` module cannot import here."""
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rhythm.integrations.verl_hooks")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0 and "No module named" in result.stderr and "rhythm" not in result.stderr:
        pytest.skip(f"verl's {what} module does not import here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _algo_config(estimator):
    from verl.trainer.config import AlgoConfig

    return AlgoConfig(adv_estimator=estimator)


# ---- worker side, wired automatically: ActorRolloutRefWorker.compute_log_prob + RayPPOTrainer._compute_old_log_prob

SMALL_ENV = '{"strategy": "%s", "window": 4, "horizon": [2, 100]}'


@pytest.fixture
def hooks(ray_trainer):
    """The hooks installed on verl's real classes (engine_workers imports on CPU: no GPU-only dependency)."""
    try:
        from verl.workers import engine_workers
    except ImportError as exc:
        pytest.skip(f"verl.workers.engine_workers does not import: {exc}")
    from rhythm.integrations import verl_hooks

    verl_hooks.install()
    assert engine_workers.ActorRolloutRefWorker.compute_log_prob.__rhythm_wrapped__
    assert ray_trainer.RayPPOTrainer._compute_old_log_prob.__rhythm_wrapped__
    return verl_hooks


class _StandInEngine:
    """FSDPEngine as the wrapper reads it: ``module`` (here the bare model) and ``eval_mode()``."""

    def __init__(self, module):
        self.module, self.eval_entered = module, 0

    def eval_mode(self, **kwargs):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.eval_entered += 1
            self.module.eval()
            yield

        return ctx()


class _StandInTrainingWorker:
    """TrainingWorker.infer_batch's output: nested log_probs / entropy over every sequence (prompt + response,
    as verl's engine returns them) and the metrics dict."""

    def __init__(self, module, use_remove_padding):
        self.engine, self.seen_keys, self.use_remove_padding = _StandInEngine(module), [], use_remove_padding

    def infer_batch(self, data):
        from verl.utils import tensordict_utils as tu

        self.seen_keys.append(set(data.keys()))
        if "use_remove_padding" not in data.keys():  # as verl's TrainingWorker.infer_batch: the model config's flag
            tu.assign_non_tensor(data, use_remove_padding=self.use_remove_padding)
        ids = data["input_ids"]
        assert ids.is_nested  # verl's no-padding layout reaches the worker
        g = torch.Generator().manual_seed(int(ids.values().sum()))
        values = torch.rand(ids.values().numel(), generator=g) + 0.1
        nested = lambda v: torch.nested.nested_tensor_from_jagged(v, offsets=ids.offsets())  # noqa: E731
        return tu.get_tensordict({"log_probs": nested(-values), "entropy": nested(values)},
                                 non_tensor_dict={"metrics": {"mfu": 0.5}})


class StandInActorWorker:
    """Exactly the attributes that verl's ActorRolloutRefWorker.compute_log_prob (with its decorators) and the
    rhythm wrapper read: no ``profiler`` (DistProfiler.annotate then calls through), ``enable_routing_replay``,
    ``actor.infer_batch`` / ``actor.engine.{module, eval_mode}``, ``config.model.use_remove_padding``,
    ``config.rollout.log_prob_micro_batch_size_per_gpu``."""

    def __init__(self, module, use_remove_padding):
        from omegaconf import OmegaConf

        self.actor = _StandInTrainingWorker(module, use_remove_padding)
        self.enable_routing_replay = False
        self.config = OmegaConf.create({"model": {"use_remove_padding": use_remove_padding},
                                        "rollout": {"log_prob_micro_batch_size_per_gpu": 2}})


class StandInWorkerGroup:
    """RayWorkerGroup as the driver uses it: ``compute_log_prob`` bound on the instance (``_bind_worker_method``),
    the TensorDict split in equal chunks over the dp ranks and the outputs concatenated (the dispatch / collect
    of ``make_nd_compute_dataproto_dispatch_fn``), each rank running the class's (wrapped) method."""

    def __init__(self, workers, method=None):
        from verl.workers.engine_workers import ActorRolloutRefWorker

        self.workers = workers
        self.method = method or ActorRolloutRefWorker.compute_log_prob
        self.compute_log_prob = self._dispatch

    def _dispatch(self, data):
        from verl.utils import tensordict_utils as tu

        chunks = tu.chunk_tensordict(data, len(self.workers))
        return tu.concat_tensordict([self.method(w, c) for w, c in zip(self.workers, chunks)])


class StandInTrainer:
    """What RayPPOTrainer._compute_old_log_prob reads from ``self``."""

    def __init__(self, worker_group):
        from omegaconf import OmegaConf

        self.actor_rollout_wg, self.global_steps = worker_group, 3
        self.config = OmegaConf.create({"actor_rollout_ref": {"actor": {}}})


def _old_log_prob_step(ray_trainer, trainer, batch):
    """The legacy fit loop around the old-log-prob pass: _compute_old_log_prob, pop entropys, union."""
    old_log_prob, mfu = ray_trainer.RayPPOTrainer._compute_old_log_prob(trainer, batch)
    assert mfu == 0.5 and old_log_prob.batch["old_log_probs"].shape == batch.batch["responses"].shape
    entropys = old_log_prob.batch.pop("entropys")
    return batch.union(old_log_prob), entropys


@pytest.mark.parametrize("use_remove_padding", [False, True])
def test_worker_method_adds_gamma_padded_and_remove_padding(model, hooks, ray_trainer, monkeypatch,
                                                            use_remove_padding):
    """verl's real (wrapped) ActorRolloutRefWorker.compute_log_prob on a stand-in worker, called through the real
    (wrapped) RayPPOTrainer._compute_old_log_prob: the batch carries rhythm_gamma equal to compute_rhythm_gamma's,
    and the wrapped compute_advantage(grpo) gives GRPO's advantages times gamma."""
    from rhythm.integrations import verl as verl_adapter

    monkeypatch.setenv("RHYTHM_CREDIT_CONFIG", SMALL_ENV % "coupled")
    monkeypatch.delenv("RHYTHM_CREDIT", raising=False)
    packed_calls = []
    real_packed = verl_adapter.rhythm_gamma_packed
    monkeypatch.setattr(verl_adapter, "rhythm_gamma_packed",
                        lambda *a, **k: packed_calls.append(a[1].shape) or real_packed(*a, **k))
    workers = [StandInActorWorker(model, use_remove_padding) for _ in range(2)]  # two dp ranks, 3 rows each
    trainer = StandInTrainer(StandInWorkerGroup(workers))
    batch, _ = _old_log_prob_step(ray_trainer, trainer, verl_batch())
    assert "compute_log_prob" in vars(trainer.actor_rollout_wg)  # the worker group's own binding is restored
    assert trainer.actor_rollout_wg.compute_log_prob == trainer.actor_rollout_wg._dispatch

    cfg = RhythmCreditConfig(strategy="coupled", **SMALL)
    expected = compute_rhythm_gamma(RhythmScorer(model, **cfg.scorer_kwargs()), verl_batch(), cfg)
    gamma = batch.batch["rhythm_gamma"]
    assert gamma.dtype == torch.float32
    torch.testing.assert_close(gamma, expected, rtol=0, atol=0)
    torch.testing.assert_close(gamma, per_row_gamma(model, verl_batch(), cfg), rtol=0, atol=0)
    assert bool((gamma > 1).any())
    assert len(packed_calls) == (2 if use_remove_padding else 0)  # one packed [1, N] pass per rank
    assert all(shape[0] == 1 for shape in packed_calls)
    for worker in workers:
        assert worker.actor.engine.eval_entered == 1  # scored inside the engine's eval mode
        assert all("rhythm_credit" not in keys for keys in worker.actor.seen_keys)  # request never reaches the engine
        assert worker.__dict__["_rhythm_scorer"][1].config.micro_batch_size == 2  # log_prob micro batch size

    # a second step reuses each worker's scorer
    scorers = [w.__dict__["_rhythm_scorer"][1] for w in workers]
    _old_log_prob_step(ray_trainer, trainer, verl_batch())
    assert [w.__dict__["_rhythm_scorer"][1] for w in workers] == scorers

    out = ray_trainer.compute_advantage(batch, adv_estimator="grpo", config=_algo_config("grpo"))
    hooks.uninstall()
    try:
        base = ray_trainer.compute_advantage(verl_batch(), adv_estimator="grpo", config=_algo_config("grpo"))
    finally:
        hooks.install()
    mask = verl_batch().batch["response_mask"].bool()
    assert bool((base.batch["advantages"][mask] != 0).any())
    torch.testing.assert_close(out.batch["advantages"], base.batch["advantages"] * expected)


def test_worker_method_untouched_without_request(model, hooks, ray_trainer, monkeypatch):
    """No request in the batch (the ref pass of a LoRA actor, the v1 trainer, RHYTHM_CREDIT=0): no scoring."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.workers.utils.padding import left_right_2_no_padding

    worker = StandInActorWorker(model, True)
    output = ActorRolloutRefWorker.compute_log_prob(worker, left_right_2_no_padding(verl_batch().to_tensordict()))
    assert "rhythm_gamma" not in output.keys() and worker.actor.engine.eval_entered == 0
    assert "_rhythm_scorer" not in worker.__dict__ and tu.get(output, "metrics") == {"mfu": 0.5}

    monkeypatch.setenv("RHYTHM_CREDIT", "0")
    trainer = StandInTrainer(StandInWorkerGroup([worker]))
    batch, _ = _old_log_prob_step(ray_trainer, trainer, verl_batch())
    assert "rhythm_gamma" not in batch.batch.keys() and worker.actor.engine.eval_entered == 0

    # hooks enabled on the driver but not imported in the workers: a clear error, not silent plain GRPO
    monkeypatch.delenv("RHYTHM_CREDIT")
    bare = StandInWorkerGroup([worker], method=ActorRolloutRefWorker.compute_log_prob.__rhythm_original__)
    with pytest.raises(RuntimeError, match="external_lib"):
        _old_log_prob_step(ray_trainer, StandInTrainer(bare), verl_batch())


@pytest.mark.parametrize("strategy", ["random", "entropy"])
def test_random_and_entropy_computed_on_the_driver(model, hooks, ray_trainer, monkeypatch, strategy):
    monkeypatch.setenv("RHYTHM_CREDIT_CONFIG", SMALL_ENV % strategy)
    workers = [StandInActorWorker(model, True) for _ in range(2)]
    trainer = StandInTrainer(StandInWorkerGroup(workers))
    batch, entropys = _old_log_prob_step(ray_trainer, trainer, verl_batch())
    assert all(w.actor.engine.eval_entered == 0 and "_rhythm_scorer" not in w.__dict__ for w in workers)
    cfg = RhythmCreditConfig(strategy=strategy, **SMALL)
    reference = verl_batch().batch
    inputs = {k: reference[k] for k in ("input_ids", "attention_mask", "responses")}
    inputs["entropys"] = entropys
    expected = compute_rhythm_gamma(None, inputs, cfg, seed=cfg.step_seed(trainer.global_steps))
    torch.testing.assert_close(batch.batch["rhythm_gamma"], expected, rtol=0, atol=0)
    for b, r in enumerate(RESPONSE_LENS):
        assert int((batch.batch["rhythm_gamma"][b] > 1).sum()) == math.ceil(0.4 * r)


def test_hooks_wrap_the_worker_method_in_a_fresh_process():
    """VERL_USE_EXTERNAL_MODULES, as a Ray worker process starts: importing verl's engine workers after `import
    verl` gives the wrapped compute_log_prob, with verl's register() dispatch attributes kept (the worker group
    binds methods by them), and the wrapped RayPPOTrainer._compute_old_log_prob."""
    code = ("import verl\n"
            "from verl.single_controller.base.decorator import MAGIC_ATTR\n"
            "from verl.workers.engine_workers import ActorRolloutRefWorker as W\n"
            "from verl.trainer.ppo.ray_trainer import RayPPOTrainer\n"
            "m = W.compute_log_prob\n"
            "assert m.__rhythm_wrapped__ and getattr(m, MAGIC_ATTR) == getattr(m.__rhythm_original__, MAGIC_ATTR)\n"
            "assert RayPPOTrainer._compute_old_log_prob.__rhythm_wrapped__\n"
            "print('worker wrapped', getattr(m, MAGIC_ATTR)['dispatch_mode'])\n")
    assert "worker wrapped" in _run_with_verl_hooks(code, "worker")
