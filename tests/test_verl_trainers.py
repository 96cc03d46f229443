"""verl's trainers with the hooks installed: gamma recorded inside the actor's own old-log-prob forward.

verl 0.9.1's real methods run on stand-in objects (tests/verl_standins.py): the actor's
``ActorRolloutRefWorker.compute_log_prob`` -> ``TrainingWorker.infer_batch`` -> ``FSDPEngineWithLMHead``'s
``forward_backward_batch`` / ``forward_step`` over a tiny fp32 Llama (world size 1 gloo, no FSDP, CPU), the
legacy ``RayPPOTrainer._compute_old_log_prob`` and ``compute_advantage``, and the v1 ``PPOTrainer``'s
``_compute_old_log_prob`` / ``_compute_advantage`` over a dict-backed stand-in of TransferQueue.
Oracle: the separate-pass scorer, every sequence scored alone (``per_row_gamma``), and verl's plain advantages.
"""
import json

import pytest

verl = pytest.importorskip("verl")
pytest.importorskip("tensordict")

import torch  # noqa: E402

from rhythm.integrations.config import RhythmCreditConfig  # noqa: E402
from rhythm.integrations.verl.credit import response_gamma  # noqa: E402

from tests.oracle_check import random_baseline  # noqa: E402

from .verl_standins import (P_MAX, PROMPT_LENS, R_MAX, RESPONSE_LENS, SMALL, SMALL_ENV, StandInWorkerGroup,  # noqa: E402
                            algo_config, no_padding, cpu_device, engine_worker, ensure_process_group, per_row_gamma,
                            plain_advantages, tiny_llama, verl_batch)

CFG = RhythmCreditConfig(strategy="coupled", **SMALL)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ray_trainer():
    try:
        from verl.trainer.ppo import ray_trainer as module
        from verl.workers import engine_workers  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"verl's legacy trainer / engine workers do not import: {exc}")
    return module


@pytest.fixture
def hooks(ray_trainer, monkeypatch):
    from rhythm.integrations.verl import hooks as verl_hooks

    ensure_process_group()
    cpu_device(monkeypatch)
    monkeypatch.delenv("RHYTHM_CREDIT", raising=False)
    monkeypatch.setenv("RHYTHM_CREDIT_CONFIG", SMALL_ENV % "coupled")
    verl_hooks.install()
    yield verl_hooks
    verl_hooks.uninstall()


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("use_remove_padding,use_dynamic_bsz", [(True, False), (False, False), (True, True)])
def test_worker_records_gamma_inside_its_log_prob_forward(model, hooks, use_remove_padding, use_dynamic_bsz):
    """The actor's real compute_log_prob, asked for gamma: the same number of model forwards as without it,
    the same log-probs and entropies (fp32: within 1e-5; the sampled layers' attention comes from the fused
    metrics pass instead of sdpa), and rhythm_gamma equal to the separate-pass scorer's, in verl's
    remove-padding and padded layouts and with dynamic micro-batches (reordered, then restored by verl)."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = engine_worker(model, use_remove_padding=use_remove_padding, use_dynamic_bsz=use_dynamic_bsz)
    calls, handle = _count_forwards(model)
    try:
        plain = ActorRolloutRefWorker.compute_log_prob(worker, no_padding(verl_batch()))
        plain_calls = len(calls)
        request = no_padding(verl_batch(), CFG)
        fused = ActorRolloutRefWorker.compute_log_prob(worker, request)
    finally:
        handle.remove()
    assert len(calls) == 2 * plain_calls  # no extra pass: one forward per micro-batch, as without gamma
    assert plain_calls == (3 if not use_dynamic_bsz else plain_calls) and plain_calls >= 2
    assert "rhythm_credit" not in request.keys() and "rhythm_gamma" not in plain.keys()
    for name in ("log_probs", "entropy"):
        torch.testing.assert_close(fused[name].values(), plain[name].values(), rtol=0, atol=1e-5)
    lengths = verl_batch().batch["attention_mask"][:, -R_MAX:].sum(-1)
    gamma = response_gamma(fused["rhythm_gamma"], lengths, R_MAX)
    torch.testing.assert_close(gamma, per_row_gamma(model, verl_batch(), CFG), rtol=0, atol=0)
    assert bool((gamma > 1).any())
    assert fused["metrics"]["rhythm/credit_time_s"] > 0


def test_worker_without_request_is_untouched(model, hooks):
    """No request (the ref pass, the LoRA ref pass, credit off): verl's method runs exactly as it is."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = engine_worker(model, use_remove_padding=True)
    engine = worker.actor.engine
    output = ActorRolloutRefWorker.compute_log_prob(worker, no_padding(verl_batch()))
    assert "rhythm_gamma" not in output.keys() and "_rhythm_scorer" not in worker.__dict__
    assert "forward_step" not in vars(engine)  # the engine's own method, not left patched


class StandInLegacyTrainer:
    """What RayPPOTrainer._compute_old_log_prob reads from ``self``, with a ``rhythm`` block in its config."""

    def __init__(self, worker_group, rhythm=None):
        from omegaconf import OmegaConf

        self.actor_rollout_wg, self.global_steps = worker_group, 3
        config = {"actor_rollout_ref": {"actor": {"strategy": "fsdp"}}}
        if rhythm is not None:
            config["rhythm"] = rhythm
        self.config = OmegaConf.create(config)


def _legacy_step(ray_trainer, trainer, batch):
    """The legacy fit loop around the old-log-prob pass: _compute_old_log_prob, pop entropys, union."""
    old_log_prob, _ = ray_trainer.RayPPOTrainer._compute_old_log_prob(trainer, batch)
    assert old_log_prob.batch["old_log_probs"].shape == batch.batch["responses"].shape
    entropys = old_log_prob.batch.pop("entropys")
    return batch.union(old_log_prob), entropys


def _with_flops(worker):
    """The driver reads metrics['mfu']: a flops counter (verl builds one from the model config)."""
    worker.actor.flops_counter = type("Flops", (), {"estimate_flops": lambda self, n, t, **k: (1.0, 2.0)})()
    return worker


@pytest.mark.parametrize("use_remove_padding", [True, False])
def test_legacy_trainer_shapes_advantages_once_with_gamma_from_the_forward(model, hooks, ray_trainer,
                                                                          use_remove_padding):
    """Real RayPPOTrainer._compute_old_log_prob over two dp ranks of real workers, configured by the Hydra
    ``rhythm`` block (which wins over $RHYTHM_CREDIT_CONFIG), then the real compute_advantage: advantages =
    GRPO's * gamma, once, also when compute_advantage runs again on the same batch."""
    workers = [_with_flops(engine_worker(model, use_remove_padding=use_remove_padding, micro_batch_size=3))
               for _ in range(2)]
    hooks_env = SMALL_ENV % "local"  # the env says local: the Hydra block (coupled) must win
    import os

    os.environ["RHYTHM_CREDIT_CONFIG"] = hooks_env
    trainer = StandInLegacyTrainer(StandInWorkerGroup(workers), rhythm={"strategy": "coupled", "window": 4,
                                                                       "horizon": [2, 8], "sign": "both"})
    data = verl_batch()
    data.meta_info.update(global_token_num=data.batch["attention_mask"].sum(-1).tolist(), temperature=1.0)
    batch, _ = _legacy_step(ray_trainer, trainer, data)
    expected = per_row_gamma(model, verl_batch(), CFG)
    torch.testing.assert_close(batch.batch["rhythm_gamma"], expected, rtol=0, atol=0)
    assert all(len(w.actor.engine.__dict__) and "forward_step" not in vars(w.actor.engine) for w in workers)
    base = plain_advantages(ray_trainer)
    for _ in range(2):  # recomputed advantages carry gamma once, never squared
        batch = ray_trainer.compute_advantage(batch, adv_estimator="grpo", config=algo_config("grpo"))
        torch.testing.assert_close(batch.batch["advantages"], base * expected)
    mask = verl_batch().batch["response_mask"].bool()
    assert bool((base[mask] != 0).any()) and bool((expected[mask] > 1).any())
    assert batch.meta_info["metrics"]["rhythm/frac_amplified"] > 0


def test_legacy_trainer_without_hooked_workers_fails_loudly(model, hooks, ray_trainer):
    """Hooks on the driver but not in the workers: a clear error, never plain GRPO in silence."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = _with_flops(engine_worker(model, use_remove_padding=True, micro_batch_size=3))
    bare = StandInWorkerGroup([worker], method=ActorRolloutRefWorker.compute_log_prob.__rhythm_original__)
    data = verl_batch()
    data.meta_info.update(global_token_num=data.batch["attention_mask"].sum(-1).tolist(), temperature=1.0)
    with pytest.raises(RuntimeError, match="external_lib"):
        _legacy_step(ray_trainer, StandInLegacyTrainer(bare), data)


@pytest.mark.parametrize("rhythm,env,match", [
    ({"strategy": "coupled", "windw": 4}, {}, r"no setting 'windw' \(did you mean 'window'\?\)"),
    ({"q": 0}, {}, r"RhythmCreditConfig.q must be a number in \(0, 1\]"),
    ({"enable": "yes"}, {}, "rhythm.enable must be true or false"),
    (None, {"RHYTHM_CREDIT_CONFIG": '{"strategy": "best"}'}, "strategy must be one of"),
    (None, {"RHYTHM_CREDIT_CONFIG": '{strategy: coupled}'}, "must be a JSON object"),
])
def test_trainer_init_validates_the_config_before_any_work(ray_trainer, hooks, monkeypatch, rhythm, env, match):
    """The real RayPPOTrainer(config=...) refuses a bad rhythm block / environment in its (wrapped) __init__,
    before verl's own __init__ runs (which would need workers, tokenizer, ...)."""
    from omegaconf import OmegaConf

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = {"actor_rollout_ref": {"actor": {"strategy": "fsdp"}}}
    if rhythm is not None:
        config["rhythm"] = rhythm
    with pytest.raises(ValueError, match=match):
        ray_trainer.RayPPOTrainer(config=OmegaConf.create(config))


def test_config_sources_and_switches(hooks, monkeypatch):
    """The Hydra block wins over the environment; enable=false / RHYTHM_CREDIT=0 turn the credit off."""
    from omegaconf import OmegaConf

    monkeypatch.setenv("RHYTHM_CREDIT_CONFIG", SMALL_ENV % "local")
    assert hooks.resolve_config(OmegaConf.create({})).strategy == "local"
    block = OmegaConf.create({"rhythm": {"strategy": "global", "sign": "positive", "horizon": [2, None]}})
    config = hooks.resolve_config(block)
    assert (config.strategy, config.sign, config.horizon, config.window) == ("global", "positive", (2, None), 10)
    assert hooks.resolve_config(OmegaConf.create({"rhythm": {"enable": False}})) is None
    monkeypatch.setenv("RHYTHM_CREDIT", "0")
    assert hooks.resolve_config(block) is None


@pytest.mark.parametrize("override,match", [
    ({"algorithm": {"rollout_correction": {"bypass_mode": True}}}, "bypass_mode"),
    ({"actor_rollout_ref": {"actor": {"strategy": "megatron"}}}, "strategy='megatron'"),
    ({"actor_rollout_ref": {"actor": {"strategy": "fsdp", "ulysses_sequence_parallel_size": 2},
                            "model": {"use_remove_padding": False}}},
     "use_remove_padding=True, or actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"),
])
def test_modes_without_a_log_prob_forward_are_refused(hooks, override, match):
    """Modes where no gamma could be recorded fail at trainer construction with what to set."""
    from omegaconf import OmegaConf

    config = OmegaConf.create({"rhythm": {"strategy": "coupled"}, **override})
    with pytest.raises(ValueError, match=match):
        hooks.check_run_mode(config, hooks.resolve_config(config))


def test_ulysses_with_remove_padding_is_accepted(hooks):
    """Ulysses sequence parallelism on verl's packed layout is recorded exactly (tests/test_ulysses.py)."""
    from omegaconf import OmegaConf

    config = OmegaConf.create({"rhythm": {"strategy": "coupled"}, "actor_rollout_ref": {
        "actor": {"strategy": "fsdp2", "ulysses_sequence_parallel_size": 4}, "model": {"use_remove_padding": True}}})
    hooks.check_run_mode(config, hooks.resolve_config(config))


# ---- the v1 trainer (verl's default): TransferQueue between the driver and the workers ---------------------------

@pytest.fixture(scope="module")
def v1():
    try:
        from verl.trainer.ppo.v1 import trainer_base
    except ImportError as exc:
        pytest.skip(f"verl's v1 trainer does not import here (it needs verl's declared dependencies and "
                    f"TransferQueue; scripts/test_verl_pins.sh runs these tests): {exc}")
    return trainer_base


class StandInTransferQueue:
    """``kv_batch_get`` / ``kv_batch_put`` over a dict: per-sample fields, variable-length ones returned as jagged
    nested tensors (as the v1 trainer reads them: ``.offsets()``, ``to_padded_tensor()``), strings as a
    NonTensorStack; fields that no requested sample has are left out, a field only some have is an error."""

    def __init__(self):
        self.rows = {}

    def kv_batch_put(self, keys, partition_id, fields, tags=None):
        from transfer_queue import KVBatchMeta

        for i, key in enumerate(keys):
            row = self.rows.setdefault((partition_id, key), {})
            for name in fields.keys():
                value = fields.get(name)
                if isinstance(value, torch.Tensor):
                    row[name] = (value.unbind()[i] if value.is_nested else value[i], value.is_nested)
                else:
                    row[name] = (value.tolist()[i] if hasattr(value, "tolist") else value[i], False)
        return KVBatchMeta(keys=list(keys), partition_id=partition_id, tags=tags or [{} for _ in keys])

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from tensordict import NonTensorStack, TensorDict

        rows = [self.rows[(partition_id, key)] for key in keys]
        names = select_fields if select_fields is not None else list(rows[0])
        out = {}
        for name in names:
            have = [name in row for row in rows]
            if not any(have):
                continue
            if not all(have):
                raise ValueError(f"field {name!r} is empty for some samples")
            values = [row[name][0] for row in rows]
            if not isinstance(values[0], torch.Tensor):
                out[name] = NonTensorStack(*values)
            elif rows[0][name][1]:
                out[name] = torch.nested.as_nested_tensor(list(values), layout=torch.jagged)
            else:
                out[name] = torch.stack(values)
        return TensorDict(out, batch_size=[len(keys)])


def _v1_bridge(monkeypatch, store):
    """verl's tqbridge (``register``'s wrapper) against the stand-in store: the worker fetches its samples' fields
    plus ``extra_info`` as non-tensor entries, and its output tensors are written back under the same keys."""
    import copy

    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.utils import transferqueue_utils as bridge

    def realdata(meta):
        data = store.kv_batch_get(meta.keys, meta.partition_id)
        tu.assign_non_tensor(data, **copy.deepcopy(meta.extra_info))
        return data

    def update(output: TensorDict, meta, func_name=None):
        names = [k for k in output.keys() if isinstance(output.get(k), torch.Tensor)]
        store.kv_batch_put(meta.keys, meta.partition_id, output.select(*names))
        return meta

    monkeypatch.setattr(bridge, "TQ_INITIALIZED", True)
    monkeypatch.setattr(bridge, "kv_batch_meta2batch_meta", lambda meta: meta)
    monkeypatch.setattr(bridge, "batch_meta2kv_batch_meta", lambda meta: meta)
    monkeypatch.setattr(bridge, "_meta_to_realdata", realdata)
    monkeypatch.setattr(bridge, "_update_meta_with_output", update)
    monkeypatch.setattr(bridge, "_compute_need_collect", lambda *a, **k: True)
    monkeypatch.setattr(type(store), "size", property(lambda self: 0), raising=False)


class StandInV1WorkerGroup:
    """The actor worker group as the v1 driver calls it: a KVBatchMeta split over the dp ranks (each rank gets
    its keys and a copy of ``extra_info``, as Ray serializes it), the class's real (wrapped) method on each."""

    def __init__(self, workers):
        self.workers = workers

    def compute_log_prob(self, meta):
        import copy

        from transfer_queue import KVBatchMeta
        from verl.workers.engine_workers import ActorRolloutRefWorker

        step = -(-len(meta.keys) // len(self.workers))
        for rank, worker in enumerate(self.workers):
            keys = meta.keys[rank * step:(rank + 1) * step]
            part = KVBatchMeta(keys=keys, partition_id=meta.partition_id, tags=[{} for _ in keys],
                               extra_info=copy.deepcopy(meta.extra_info))
            ActorRolloutRefWorker.compute_log_prob(worker, part)
        return meta


V1_ROWS = [0, 1, 2, 3, 5]  # verl_batch() rows, the empty response left out (an agent loop emits >= 1 token)


def _v1_samples(store):
    """The rollout's samples in TransferQueue, as AgentLoopWorkerTQ writes them; keys {uid}_{session}_{index}."""
    from tensordict import NonTensorStack, TensorDict
    from transfer_queue import KVBatchMeta

    data = verl_batch().batch
    keys, fields = [], {name: [] for name in ("prompts", "responses", "input_ids", "position_ids", "attention_mask",
                                               "response_mask", "loss_mask", "rm_scores")}
    uids = []
    for b in V1_ROWS:
        p, r = int(data["attention_mask"][b, :P_MAX].sum()), int(RESPONSE_LENS[b])
        prompt, response = data["prompts"][b, P_MAX - p:], data["responses"][b, :r]
        ids = torch.cat([prompt, response])
        for name, value in (("prompts", prompt), ("responses", response), ("input_ids", ids),
                            ("position_ids", torch.arange(p + r)), ("attention_mask", torch.ones(p + r, dtype=torch.long)),
                            ("response_mask", torch.ones(r, dtype=torch.long)), ("loss_mask", torch.ones(r, dtype=torch.long)),
                            ("rm_scores", data["token_level_rewards"][b, :r])):
            fields[name].append(value)
        uid = "a" if b < 3 else "b"
        uids.append(uid)
        keys.append(f"{uid}_{b}_0")
    tensors = {name: torch.nested.as_nested_tensor(values, layout=torch.jagged) for name, values in fields.items()}
    store.kv_batch_put(keys, "train", TensorDict({**tensors, "uid": NonTensorStack(*uids)}, batch_size=[len(keys)]))
    return KVBatchMeta(keys=keys, partition_id="train", tags=[{} for _ in keys], extra_info={})


class StandInV1Trainer:
    """What the v1 PPOTrainer's _compute_old_log_prob / _compute_advantage read from ``self``."""

    def __init__(self, worker_group, rhythm):
        from omegaconf import OmegaConf

        self.actor_rollout_wg, self.global_steps, self.local_trigger_step = worker_group, 3, 0
        self.config = OmegaConf.create({
            "algorithm": {"adv_estimator": "grpo", "gamma": 1.0, "lam": 1.0, "use_kl_in_reward": False,
                          "norm_adv_by_std_in_grpo": True, "rollout_correction": None},
            "actor_rollout_ref": {"actor": {"strategy": "fsdp", "loss_agg_mode": "token-mean",
                                            "loss_scale_factor": None},
                                  "rollout": {"temperature": 1.0, "calculate_log_probs": False, "n": 3}},
            **({"rhythm": rhythm} if rhythm is not None else {})})


def _v1_step(v1, model, monkeypatch, rhythm):
    store = StandInTransferQueue()
    _v1_bridge(monkeypatch, store)
    monkeypatch.setattr(v1, "tq", store)
    workers = [engine_worker(model, use_remove_padding=True, micro_batch_size=1) for _ in range(2)]
    trainer = StandInV1Trainer(StandInV1WorkerGroup(workers), rhythm)
    batch = _v1_samples(store)
    metrics = {}
    batch = v1.PPOTrainer._compute_old_log_prob(trainer, batch, metrics=metrics)
    assert "rhythm_credit" not in batch.extra_info  # the ref pass that follows does not record
    batch = v1.PPOTrainer._compute_advantage(trainer, batch, metrics=metrics)
    advantages = store.kv_batch_get(batch.keys, "train", ["advantages"])["advantages"]
    return store, batch, metrics, [row.clone() for row in advantages.unbind()]


def test_v1_trainer_shapes_advantages_once_with_gamma_from_the_forward(model, hooks, v1, monkeypatch):
    """verl's default trainer: the real v1 _compute_old_log_prob sends the request through extra_info, the real
    (wrapped) workers record gamma in their forward and write it to TransferQueue, and the real (wrapped)
    _compute_advantage leaves advantages = GRPO's * gamma on the response tokens - once."""
    hooks.uninstall()
    _, _, _, base = _v1_step(v1, model, monkeypatch, rhythm=None)  # verl's own v1 advantages
    hooks.install()
    store, batch, metrics, shaped = _v1_step(v1, model, monkeypatch, rhythm={"strategy": "coupled", "window": 4,
                                                                             "horizon": [2, 8]})
    expected = per_row_gamma(model, verl_batch(), CFG)
    gamma_nested = store.kv_batch_get(batch.keys, "train", ["rhythm_gamma"])["rhythm_gamma"]
    lengths = torch.tensor([RESPONSE_LENS[b] for b in V1_ROWS])
    torch.testing.assert_close(response_gamma(gamma_nested, lengths, R_MAX), expected[V1_ROWS], rtol=0, atol=0)
    assert any(bool((row != 0).any()) for row in base)
    for i, b in enumerate(V1_ROWS):
        torch.testing.assert_close(shaped[i], base[i] * expected[b, :RESPONSE_LENS[b]])
    assert metrics["rhythm/frac_amplified"] > 0 and "actor/entropy" in metrics


def test_v1_trainer_without_hooked_workers_fails_loudly(model, hooks, v1, monkeypatch):
    from verl.workers.engine_workers import ActorRolloutRefWorker

    monkeypatch.setattr(ActorRolloutRefWorker, "compute_log_prob",
                        ActorRolloutRefWorker.compute_log_prob.__rhythm_original__)
    with pytest.raises(RuntimeError, match="external_lib"):
        _v1_step(v1, model, monkeypatch, rhythm={"strategy": "coupled", **{"window": 4, "horizon": [2, 8]}})


def test_a_separate_scorer_pass_is_refused_in_verl(hooks, monkeypatch):
    """credit_pass is a TRL setting: in verl's block (or $RHYTHM_CREDIT_CONFIG) "fused" is accepted and anything
    else refused with what to do - the check fires from the real config path, before any worker starts."""
    monkeypatch.delenv("RHYTHM_CREDIT_CONFIG", raising=False)
    with pytest.raises(ValueError, match="fused pass only"):
        hooks.resolve_config({"rhythm": {"strategy": "coupled", "credit_pass": "scorer"}})
    monkeypatch.setenv("RHYTHM_CREDIT_CONFIG", '{"credit_pass": "scorer"}')
    with pytest.raises(ValueError, match="fused pass only"):
        hooks.config_from_env()
    assert hooks.resolve_config({"rhythm": {"strategy": "local", "credit_pass": "fused"}}).strategy == "local"


def _random_oracle(rows, seed=5):
    """gamma [n, R_MAX] of verl_batch() rows under the documented random baseline: row i of the step's batch is
    "step 3 batch 0 row i" (the stand-in trainers sit at global step 3), drawn from its prompt's first token."""
    out = torch.ones(len(rows), R_MAX)
    for i, b in enumerate(rows):
        if RESPONSE_LENS[b]:
            out[i, :RESPONSE_LENS[b]] = torch.tensor(random_baseline(seed, f"step 3 batch 0 row {i}", PROMPT_LENS[b],
                                                                     RESPONSE_LENS[b]))
    return out


def test_random_baseline_follows_the_one_rule_in_both_drivers(model, hooks, ray_trainer, v1, monkeypatch):
    """strategy random in the legacy driver (gamma from the padded batch) and in the v1 driver (from
    TransferQueue's response-aligned fields): per row the documented draw, sha256(seed, "step S batch C row I")
    from the sequence's first token - the same rule as `rhythm score` and TRL, whatever the layout."""
    rhythm = {"strategy": "random", "seed": 5}
    trainer = StandInLegacyTrainer(StandInWorkerGroup([_with_flops(engine_worker(model, use_remove_padding=True, micro_batch_size=3))]),
                                   rhythm=rhythm)
    data = verl_batch()
    data.meta_info.update(global_token_num=data.batch["attention_mask"].sum(-1).tolist(), temperature=1.0)
    batch, _ = _legacy_step(ray_trainer, trainer, data)
    assert torch.equal(batch.batch["rhythm_gamma"], _random_oracle(range(len(PROMPT_LENS))))

    hooks.uninstall()
    _, _, _, base = _v1_step(v1, model, monkeypatch, rhythm=None)
    hooks.install()
    _, _, metrics, shaped = _v1_step(v1, model, monkeypatch, rhythm=rhythm)
    want = _random_oracle(V1_ROWS)
    for i, b in enumerate(V1_ROWS):
        torch.testing.assert_close(shaped[i], base[i] * want[i, :RESPONSE_LENS[b]], rtol=0, atol=0)
    tokens = sum(RESPONSE_LENS[b] for b in V1_ROWS)
    assert metrics["rhythm/frac_amplified"] == float((want > 1).sum()) / tokens


# ---- issue 20: architectures beyond Llama ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["olmo3", "qwen3_moe", "qwen3_5", "deepseek_v3"])
def test_worker_records_gamma_on_other_architectures(hooks, kind):
    """The actor's compute_log_prob with gamma on OLMo 3, Qwen3-MoE, Qwen3.5 (hybrid) and DeepSeek-V3 (MLA):
    rhythm_gamma equals the separate-pass scorer's, log-probs unchanged. verl's remove-padding layout packs the
    rows, which the hybrid refuses (its DeltaNet layers would carry state across the boundaries): padded there."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from rhythm.capture.architectures import UnsupportedModelError
    from tests.tiny_architectures import HYBRIDS, tiny_architecture

    model = tiny_architecture(kind, 97)
    if kind in HYBRIDS:
        packed = engine_worker(model, use_remove_padding=True)
        with pytest.raises(UnsupportedModelError, match="packed rows are refused.*use_remove_padding=False"):
            ActorRolloutRefWorker.compute_log_prob(packed, no_padding(verl_batch(), CFG))
    worker = engine_worker(model, use_remove_padding=kind not in HYBRIDS)
    plain = ActorRolloutRefWorker.compute_log_prob(worker, no_padding(verl_batch()))
    fused = ActorRolloutRefWorker.compute_log_prob(worker, no_padding(verl_batch(), CFG))
    torch.testing.assert_close(fused["log_probs"].values(), plain["log_probs"].values(), rtol=0, atol=1e-5)
    lengths = verl_batch().batch["attention_mask"][:, -R_MAX:].sum(-1)
    gamma = response_gamma(fused["rhythm_gamma"], lengths, R_MAX)
    torch.testing.assert_close(gamma, per_row_gamma(model, verl_batch(), CFG), rtol=0, atol=0)
    assert bool((gamma > 1).any())
