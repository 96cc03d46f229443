"""Rhythm credit inside verl's PPO/GRPO loop, legacy and v1 trainers - no fork of verl.

Importing this module changes nothing. :func:`install` applies the patches (each one now if its verl module is
loaded, otherwise the moment that module is imported, through a post-import hook on ``sys.meta_path``);
:func:`uninstall` removes them. verl runs :func:`install` in every process when told to import
``rhythm.integrations.verl.plugin`` (whose import is that one call):

- ``VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl.plugin``: ``verl/__init__.py`` imports each listed
  module right after ``verl.protocol`` - in the driver and in every Ray worker that imports verl (workers
  inherit the variable from a local driver's environment, or from ``ray_kwargs.ray_init.runtime_env.env_vars``).
- ``actor_rollout_ref.model.external_lib=rhythm.integrations.verl.plugin``: ``HFModelConfig.__post_init__``
  imports it in every process that builds the model config (the workers).

Configuration (driver only; it travels to the workers inside each request): the ``rhythm`` block of verl's
Hydra config (``+rhythm.strategy=coupled ...`` on the command line, or a ``rhythm:`` block in a config file;
keys = the fields of :class:`RhythmCreditConfig` plus ``enable``), shown in verl's logged run config; without
the block, ``$RHYTHM_CREDIT_CONFIG`` (JSON of the same fields), else the defaults. ``rhythm.enable=false`` or
``RHYTHM_CREDIT=0`` turns the credit off. The config and the run mode are checked when the trainer is built,
before any worker starts.

What the patches do (verl 0.9.1):

1. worker - ``verl.workers.engine_workers.ActorRolloutRefWorker.compute_log_prob`` (the actor's old-log-prob
   pass): when the batch carries the driver's request (non-tensor ``rhythm_credit`` in the legacy TensorDict,
   ``extra_info["rhythm_credit"]`` of the v1 ``KVBatchMeta``), the request is removed (the engine never sees
   it) and the method runs with :func:`rhythm.integrations.verl.capture.recording_forward` active: the metrics
   are recorded inside that same forward (fused on the sampled layers, sdpa elsewhere, no early exit) and the
   output gains ``rhythm_gamma``, nested like ``log_probs``. Without the request the method is untouched (the
   ref pass, the LoRA ref pass, RHYTHM_CREDIT=0).
2. legacy driver - ``RayPPOTrainer._compute_old_log_prob`` sends the request and puts ``rhythm_gamma``
   [B, R_len] (response-aligned) into the ``DataProto`` it returns; ``random`` / ``entropy`` need no model and
   are computed there. ``verl.trainer.ppo.ray_trainer.compute_advantage`` (and aliases bound by ``from ...
   import``) applies gamma right after the estimator, once (:func:`rhythm.integrations.verl.credit.apply_rhythm_gamma`
   marks the batch).
3. v1 driver - ``verl.trainer.ppo.v1.trainer_base.PPOTrainer._compute_old_log_prob`` puts the request into
   ``batch.extra_info`` for the actor's call (and takes it out again before the ref pass);
   ``PPOTrainer._compute_advantage`` fetches a fixed field list, so right after it the wrapper reads
   ``advantages``, ``response_mask`` and ``rhythm_gamma`` (written by the workers through TransferQueue) and
   writes the shaped advantages back, once per call.
4. both - the trainers' ``__init__`` validate the config and refuse modes where no gamma could be recorded
   (rollout-correction bypass mode, engines other than FSDP/FSDP2, Ulysses sequence parallelism without
   remove-padding). Ulysses with remove-padding is recorded exactly (:mod:`rhythm.integrations.verl.ulysses`).
"""
from __future__ import annotations

import functools
import importlib.abc
import json
import os
import sys
import time
import torch

from rhythm.credit.gamma import compute_gamma, gamma_metrics, gamma_sums, trainer_row_ids
from rhythm.integrations.config import RhythmCreditConfig
from rhythm.integrations.verl.credit import (GAMMA_KEY, apply_rhythm_gamma, clear_shaped, compute_rhythm_gamma, response_gamma)

__all__ = ["install", "uninstall", "installed", "resolve_config", "check_run_mode", "config_from_env", "auto_config",
           "wrap_trainer_init", "wrap_compute_advantage", "wrap_compute_log_prob", "wrap_compute_old_log_prob",
           "wrap_v1_compute_old_log_prob", "wrap_v1_compute_advantage", "v1_shape_advantages", "CONFIG_ENV",
           "ENABLE_ENV", "REQUEST_KEY", "HYDRA_KEY", "TARGET", "WORKERS_TARGET", "V1_TARGET"]

TARGET = "verl.trainer.ppo.ray_trainer"
WORKERS_TARGET = "verl.workers.engine_workers"
V1_TARGET = "verl.trainer.ppo.v1.trainer_base"
CONFIG_ENV = "RHYTHM_CREDIT_CONFIG"
ENABLE_ENV = "RHYTHM_CREDIT"
REQUEST_KEY = "rhythm_credit"  # what the driver adds to the actor's compute_log_prob batch (JSON)
HYDRA_KEY = "rhythm"           # the block of verl's Hydra config
SUPPORTED_STRATEGIES = ("fsdp", "fsdp2")
_ON = ("", "1", "on", "true", "yes")    # unset or empty: on
_OFF = ("0", "off", "false", "no")


# ---- configuration ------------------------------------------------------------------------------------------

def config_from_env() -> RhythmCreditConfig:
    """RhythmCreditConfig from the JSON object in ``$RHYTHM_CREDIT_CONFIG`` (e.g. '{"strategy": "coupled",
    "sign": "positive"}'); defaults when unset."""
    text = os.environ.get(CONFIG_ENV, "").strip()
    if not text:
        return RhythmCreditConfig()
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"${CONFIG_ENV} must be a JSON object of RhythmCreditConfig fields: {exc}") from None
    return _build_config(values, f"${CONFIG_ENV}")


def credit_enabled() -> bool:
    """``$RHYTHM_CREDIT``: unset, empty, 1 / on / true / yes = on; 0 / off / false / no = off (any case);
    anything else is refused (a typo must not decide whether a run trains with the credit)."""
    raw = os.environ.get(ENABLE_ENV, "")
    value = raw.strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"${ENABLE_ENV} must be unset, 1/on/true/yes (credit on) or 0/off/false/no (credit off), "
                     f"got {raw!r}")


def auto_config() -> RhythmCreditConfig | None:
    """The environment's config, or None when ``$RHYTHM_CREDIT`` turns the credit off."""
    if not credit_enabled():
        return None
    return config_from_env()


def _build_config(values, where: str) -> RhythmCreditConfig:
    """The one definition of the knobs (rhythm.config) checks names, types and ranges. ``credit_pass`` (a
    TRL setting) is accepted as "fused" only: verl's hooks record inside the actor's own forward."""
    if isinstance(values, dict) and "credit_pass" in values:
        values = dict(values)
        credit_pass = values.pop("credit_pass")
        if credit_pass != "fused":
            raise ValueError(f"{where}: credit_pass={credit_pass!r} - verl records the metrics inside the actor's "
                             "old-log-prob forward, the fused pass only ('fused' or no key); a separate scorer pass "
                             "is RhythmScorer + compute_rhythm_gamma in a trainer of your own (docs/integrations.md, "
                             "manual pieces)")
    return RhythmCreditConfig.from_mapping(values, where=where)


def resolve_config(trainer_config=None) -> RhythmCreditConfig | None:
    """The run's config: the ``rhythm`` block of verl's Hydra config when present, else the environment's.
    None when the credit is off (``rhythm.enable=false`` or ``RHYTHM_CREDIT=0``)."""
    block = _get(trainer_config, HYDRA_KEY) if trainer_config is not None else None
    if not credit_enabled():
        return None
    if block is None:
        return config_from_env()
    try:
        from omegaconf import OmegaConf

        values = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    except ImportError:
        values = dict(block)
    enable = values.pop("enable", True)
    if not isinstance(enable, bool):
        raise ValueError(f"rhythm.enable must be true or false, got {enable!r}")
    if not enable:
        return None
    return _build_config(values, "verl config block `rhythm`")


def check_run_mode(trainer_config, config: RhythmCreditConfig | None) -> None:
    """Refuse, before any worker starts, a run whose mode would give no gamma (plain GRPO without a word)."""
    if config is None or trainer_config is None:
        return
    if _get(trainer_config, "algorithm", "rollout_correction", "bypass_mode"):
        raise ValueError("rhythm credit records inside the old-log-prob forward, which "
                         "algorithm.rollout_correction.bypass_mode=True skips: set bypass_mode=False, or turn the "
                         "credit off (rhythm.enable=false / RHYTHM_CREDIT=0)")
    if not config.needs_scorer:
        return
    strategy = _get(trainer_config, "actor_rollout_ref", "actor", "strategy")
    if strategy is not None and strategy not in SUPPORTED_STRATEGIES:
        raise ValueError(f"rhythm credit records inside the FSDP/FSDP2 engine's forward; "
                         f"actor_rollout_ref.actor.strategy={strategy!r} is not supported: use one of "
                         f"{SUPPORTED_STRATEGIES}, or strategy random / entropy")
    sp = _get(trainer_config, "actor_rollout_ref", "actor", "ulysses_sequence_parallel_size")
    remove_padding = _get(trainer_config, "actor_rollout_ref", "model", "use_remove_padding")
    if sp is not None and int(sp) > 1 and remove_padding is False:
        raise ValueError(f"rhythm credit under Ulysses sequence parallelism (ulysses_sequence_parallel_size={sp}) "
                         "records on verl's packed layout: set actor_rollout_ref.model.use_remove_padding=True, or "
                         "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1")


def _get(obj, *path, default=None):
    """obj.a.b... through attributes or mapping keys (a worker, an OmegaConf DictConfig, a dict)."""
    for name in path:
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if obj is None:
            return default
    return obj


_UNSET = object()


def _trainer_config(trainer) -> RhythmCreditConfig | None:
    config = trainer.__dict__.get("_rhythm_config", _UNSET)
    if config is _UNSET:  # a trainer built before install()
        config = resolve_config(getattr(trainer, "config", None))
        check_run_mode(getattr(trainer, "config", None), config)
        trainer.__dict__["_rhythm_config"] = config
    return config


def _wrapper(make):
    """Decorator for the ``wrap_*`` functions below: ``make(fn)`` returns the replacement of verl's ``fn``; the
    decorated ``wrap_*(fn)`` returns ``fn`` itself when it is already wrapped (idempotent), else the replacement
    with ``fn``'s name, docstring and attributes (verl's ``register`` dispatch marks) and two marks of its own:
    ``__rhythm_wrapped__`` and ``__rhythm_original__`` (what :func:`uninstall` restores)."""
    @functools.wraps(make)
    def wrap(fn):
        if getattr(fn, "__rhythm_wrapped__", False):
            return fn
        replacement = functools.wraps(fn)(make(fn))
        replacement.__rhythm_wrapped__ = True
        replacement.__rhythm_original__ = fn
        return replacement
    return wrap


@_wrapper
def wrap_trainer_init(fn):
    """``__init__`` of a trainer -> validate the config and the mode first, keep the config on the trainer."""
    def __init__(self, *args, **kwargs):
        trainer_config = kwargs.get("config", args[0] if args else None)
        config = resolve_config(trainer_config)
        check_run_mode(trainer_config, config)
        self.__dict__["_rhythm_config"] = config
        fn(self, *args, **kwargs)

    return __init__


# ---- worker side: ActorRolloutRefWorker.compute_log_prob ----------------------------------------------------

def _actor_module(worker):
    """The actor's engine and torch module on a verl 0.9 engine worker: ``worker.actor.engine.module``
    (FSDP/FSDP2-wrapped transformers model, possibly PEFT). Megatron engines hold a list of modules: refused."""
    engine = _get(worker, "actor", "engine")
    module = getattr(engine, "module", None)
    if module is None or isinstance(module, (list, tuple)) or not hasattr(module, "config"):
        raise ValueError("rhythm credit records inside the actor's transformers model (FSDP / FSDP2 engines); this "
                         f"worker's engine ({type(engine).__name__}) holds {type(module).__name__}")
    return engine, module


def _worker_scorer(worker, module, config: RhythmCreditConfig):
    """One RhythmScorer per worker (and module / config), built on first use: the sampled layers, the head
    grouping and the window / horizon of the recording."""
    from rhythm.scoring.scorer import RhythmScorer

    kwargs = config.scorer_kwargs()
    key = (id(module), json.dumps(kwargs, sort_keys=True, default=str))
    cached = worker.__dict__.get("_rhythm_scorer")
    if cached is None or cached[0] != key:
        cached = (key, RhythmScorer(module, **kwargs))
        worker.__dict__["_rhythm_scorer"] = cached
    return cached[1]


def _pop_request(data):
    """The driver's request from a legacy TensorDict (non-tensor entry) or a v1 KVBatchMeta (extra_info)."""
    extra = getattr(data, "extra_info", None)
    if isinstance(extra, dict):
        value = extra.pop(REQUEST_KEY, None)
    elif data is not None and hasattr(data, "keys") and REQUEST_KEY in data.keys():
        value = data.pop(REQUEST_KEY)
    else:
        return None
    value = getattr(value, "data", value)  # NonTensorData -> str
    if value is None:
        return None
    return json.loads(value) if isinstance(value, str) else dict(value)


@_wrapper
def wrap_compute_log_prob(fn):
    """``ActorRolloutRefWorker.compute_log_prob`` -> the same method, recording the metrics inside its forward
    and returning ``rhythm_gamma`` with the log-probs when the batch carries the driver's request
    (idempotent; keeps verl's ``register`` attributes, which the worker group dispatches by)."""
    def compute_log_prob(self, data, *args, **kwargs):
        request = _pop_request(data)  # before the engine sees the batch
        if request is None:
            return fn(self, data, *args, **kwargs)
        from rhythm.integrations.verl.capture import recording_forward

        config = RhythmCreditConfig(**request["config"])
        engine, module = _actor_module(self)
        scorer = _worker_scorer(self, module, config)
        stats = {}
        with recording_forward(engine, scorer, config, stats=stats):
            output = fn(self, data, *args, **kwargs)
        if not stats.get("micro_batches"):
            raise RuntimeError("rhythm: the actor's compute_log_prob ran no forward through the engine's forward_step "
                               f"({type(engine).__name__}); this engine is not supported")
        metrics = output.get("metrics", None) if hasattr(output, "get") and hasattr(output, "keys") else None
        metrics = getattr(metrics, "data", metrics)
        if isinstance(metrics, dict):
            metrics["rhythm/credit_time_s"] = stats.get("credit_time_s", 0.0)
        return output

    return compute_log_prob


# ---- legacy driver: RayPPOTrainer._compute_old_log_prob, compute_advantage --------------------------------------

def _request(config: RhythmCreditConfig) -> str:
    return json.dumps({"config": config.to_dict()})


@_wrapper
def wrap_compute_old_log_prob(fn):
    """``RayPPOTrainer._compute_old_log_prob`` -> the same, with ``rhythm_gamma`` [B, R_len] in the returned
    ``DataProto`` (recorded by the actor workers, or computed here for random / entropy)."""
    def _compute_old_log_prob(self, batch, *args, **kwargs):
        config = _trainer_config(self)
        if config is None:
            return fn(self, batch, *args, **kwargs)
        step = int(getattr(self, "global_steps", 0) or 0)
        if not config.needs_scorer:  # random / entropy: no model needed
            result = fn(self, batch, *args, **kwargs)
            out = result[0] if isinstance(result, tuple) else result
            inputs = {k: batch.batch[k] for k in ("input_ids", "attention_mask", "responses")}
            if config.strategy == "entropy":
                inputs["entropys"] = out.batch["entropys"]
            rows = trainer_row_ids(step, 0, range(len(batch)))    # the step's whole batch is on the driver
            out.batch[GAMMA_KEY] = compute_rhythm_gamma(None, inputs, config, row_ids=rows)
            out.meta_info["rhythm_sign"] = config.sign
            return result
        worker_group = self.actor_rollout_wg
        call = worker_group.compute_log_prob
        own = "compute_log_prob" in vars(worker_group)
        captured = []
        request = _request(config)

        def compute_log_prob(data, *a, **k):
            from verl.utils import tensordict_utils as tu

            tu.assign_non_tensor(data, **{REQUEST_KEY: request})
            output = call(data, *a, **k)
            captured.append(output)
            return output

        worker_group.compute_log_prob = compute_log_prob
        try:
            result = fn(self, batch, *args, **kwargs)
        finally:
            if own:
                worker_group.compute_log_prob = call
            else:
                del worker_group.compute_log_prob
        out = result[0] if isinstance(result, tuple) else result
        if not captured or captured[-1] is None or GAMMA_KEY not in captured[-1].keys():
            raise RuntimeError(_NO_WORKER_GAMMA)
        width = batch.batch["responses"].shape[1]
        lengths = batch.batch["attention_mask"][:, -width:].long().sum(-1)
        out.batch[GAMMA_KEY] = response_gamma(captured[-1][GAMMA_KEY], lengths, width)
        out.meta_info["rhythm_sign"] = config.sign  # DataProto.union carries it to compute_advantage
        return result

    return _compute_old_log_prob


_NO_WORKER_GAMMA = ("the actor workers returned no rhythm_gamma: install the hooks in the Ray workers too "
                    "(VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl.plugin in their environment, or "
                    "actor_rollout_ref.model.external_lib=rhythm.integrations.verl.plugin), or turn the credit off "
                    "(rhythm.enable=false / RHYTHM_CREDIT=0)")


@_wrapper
def wrap_compute_advantage(fn):
    """``compute_advantage`` -> the estimator (fresh advantages: the batch's shaped mark is cleared), then the
    gamma post-multiply when the batch carries ``rhythm_gamma`` - exactly once per call (idempotent)."""
    def compute_advantage(data, *args, **kwargs):
        clear_shaped(data)
        data = fn(data, *args, **kwargs)
        if GAMMA_KEY in data.batch.keys():
            sign = (data.meta_info or {}).get("rhythm_sign") or (auto_config() or RhythmCreditConfig()).sign
            apply_rhythm_gamma(data, sign=sign)
        return data

    return compute_advantage


# ---- v1 driver: PPOTrainer._compute_old_log_prob, _compute_advantage ------------------------------------------

@_wrapper
def wrap_v1_compute_old_log_prob(fn):
    """v1 ``PPOTrainer._compute_old_log_prob(batch: KVBatchMeta, metrics)`` -> the same, with the request in
    ``batch.extra_info`` for the actor's call only (the attention strategies)."""
    def _compute_old_log_prob(self, batch, *args, **kwargs):
        config = _trainer_config(self)
        if config is None or not config.needs_scorer:
            return fn(self, batch, *args, **kwargs)
        batch.extra_info[REQUEST_KEY] = _request(config)
        try:
            result = fn(self, batch, *args, **kwargs)
        finally:
            batch.extra_info.pop(REQUEST_KEY, None)  # the ref / LoRA-ref pass that follows must not record
        extra = getattr(result, "extra_info", None)
        if isinstance(extra, dict):
            extra.pop(REQUEST_KEY, None)
        return result

    return _compute_old_log_prob


def _padded(nested: torch.Tensor, width: int, fill=0) -> torch.Tensor:
    rows = nested.unbind()
    out = torch.full((len(rows), width), fill, dtype=nested.dtype)
    for b, row in enumerate(rows):
        out[b, : row.shape[0]] = row.cpu()
    return out


def v1_shape_advantages(tq, batch, config: RhythmCreditConfig, *, row_ids) -> dict:
    """Multiply the advantages the v1 trainer just wrote to TransferQueue by gamma, once, and write them back.

    Reads ``advantages`` and ``response_mask`` (nested [b, r_b]) and ``rhythm_gamma`` (nested [b, j_b], from the
    actor workers; attention strategies), ``entropy`` (nested [b, r_b], from the old-log-prob pass; strategy
    entropy) or ``prompts`` (nested [b, p_b]: where each sequence starts; strategy random, drawn per row from
    ``row_ids``, one per key of ``batch.keys``) for ``batch.keys``. Returns the rhythm/* metrics."""
    from verl.workers.utils.padding import response_to_nested

    names = ["advantages", "response_mask"]
    extra = {"entropy": "entropy", "random": "prompts"}.get(config.strategy, GAMMA_KEY)
    names.append(extra)
    try:
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=names)
    except Exception as exc:  # noqa: BLE001 - the store's own error for a missing field, made actionable
        if config.needs_scorer:
            raise RuntimeError(f"{_NO_WORKER_GAMMA} (reading {names} from TransferQueue failed: {exc})") from exc
        raise
    missing = [name for name in names if name not in data.keys()]
    if missing:
        raise RuntimeError(_NO_WORKER_GAMMA if GAMMA_KEY in missing else
                           f"rhythm: TransferQueue holds no {missing} for this batch")
    response_mask = data["response_mask"]
    lengths = response_mask.offsets().diff().long().cpu()
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    advantages = _padded(data["advantages"], width, 0.0)
    mask = _padded(response_mask, width, 0).bool()
    span = torch.arange(width)[None, :] < lengths[:, None]  # each response's tokens (tool tokens included)
    if config.needs_scorer:
        gamma = response_gamma(data[GAMMA_KEY], lengths, width)
    elif config.strategy == "entropy":
        gamma = compute_gamma("entropy", span, entropy=_padded(data["entropy"], width, 0.0).float(),
                              **config.credit_kwargs())
    else:   # the response-aligned span starts p_b tokens into sequence b
        prompt_lengths = data["prompts"].offsets().diff().long().cpu()
        gamma = compute_gamma("random", span, row_ids=row_ids, sequence_start=-prompt_lengths,
                              **config.credit_kwargs())
    shaped = {"advantages": advantages, "response_mask": mask}
    apply_rhythm_gamma(shaped, gamma, sign=config.sign)
    nested = response_to_nested(shaped["advantages"], response_mask)
    from tensordict import TensorDict

    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                    fields=TensorDict({"advantages": nested}, batch_size=len(lengths)))
    return gamma_metrics(gamma_sums(gamma, mask))


@_wrapper
def wrap_v1_compute_advantage(fn):
    """v1 ``PPOTrainer._compute_advantage(batch, metrics)`` -> the estimator, then gamma applied once to the
    advantages it wrote (:func:`v1_shape_advantages`)."""
    def _compute_advantage(self, batch, metrics, *args, **kwargs):
        config = _trainer_config(self)
        result = fn(self, batch, metrics, *args, **kwargs)
        if config is None:
            return result
        start = time.perf_counter()
        rows = trainer_row_ids(int(getattr(self, "global_steps", 0) or 0),
                               int(getattr(self, "local_trigger_step", 0) or 0), range(len(batch.keys)))
        tq = sys.modules[V1_TARGET].tq
        metrics.update(v1_shape_advantages(tq, batch, config, row_ids=rows))
        metrics["rhythm/shaping_time_s"] = time.perf_counter() - start
        return result

    return _compute_advantage


# ---- patching -------------------------------------------------------------------------------------------------

def _wrap_method(cls, name, wrapper) -> None:
    original = cls.__dict__.get(name) if cls is not None else None
    if original is not None and not getattr(original, "__rhythm_wrapped__", False):
        setattr(cls, name, wrapper(original))


def _unwrap_method(cls, name) -> None:
    current = cls.__dict__.get(name) if cls is not None else None
    original = getattr(current, "__rhythm_original__", None)
    if original is not None:
        setattr(cls, name, original)


_METHODS = {
    WORKERS_TARGET: [("ActorRolloutRefWorker", "compute_log_prob", wrap_compute_log_prob)],
    TARGET: [("RayPPOTrainer", "__init__", wrap_trainer_init),
             ("RayPPOTrainer", "_compute_old_log_prob", wrap_compute_old_log_prob)],
    V1_TARGET: [("PPOTrainer", "__init__", wrap_trainer_init),
                ("PPOTrainer", "_compute_old_log_prob", wrap_v1_compute_old_log_prob),
                ("PPOTrainer", "_compute_advantage", wrap_v1_compute_advantage)],
}


def _patch(module) -> None:
    for cls_name, name, wrapper in _METHODS[module.__name__]:
        _wrap_method(module.__dict__.get(cls_name), name, wrapper)
    if module.__name__ != TARGET:
        return
    original = module.__dict__.get("compute_advantage")
    if original is None or getattr(original, "__rhythm_wrapped__", False):
        return
    wrapped = wrap_compute_advantage(original)
    module.compute_advantage = wrapped
    for other in list(sys.modules.values()):  # rebind `from ... import compute_advantage` done before the patch
        namespace = getattr(other, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("compute_advantage") is original:
            namespace["compute_advantage"] = wrapped


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _METHODS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_FINDER = _PostImportFinder()
_STATE = {"installed": False}


def installed() -> bool:
    """Whether :func:`install` is in effect in this process."""
    return _STATE["installed"]


def install() -> None:
    """Apply the patches now (modules loaded) or on their import. Safe to call many times."""
    for name in _METHODS:
        module = sys.modules.get(name)
        if module is not None:
            _patch(module)  # tolerates a module still initializing (what is not defined yet is not patched)
    if any(name not in sys.modules for name in _METHODS) and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    _STATE["installed"] = True


def uninstall() -> None:
    """Undo :func:`install`: restore the original functions, methods and aliases, drop the import hook."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    _STATE["installed"] = False
    for name, methods in _METHODS.items():
        module = sys.modules.get(name)
        if module is not None:
            for cls_name, method, _ in methods:
                _unwrap_method(module.__dict__.get(cls_name), method)
    module = sys.modules.get(TARGET)
    wrapped = module.__dict__.get("compute_advantage") if module is not None else None
    original = getattr(wrapped, "__rhythm_original__", None)
    if original is None:
        return
    for other in list(sys.modules.values()):
        namespace = getattr(other, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("compute_advantage") is wrapped:
            namespace["compute_advantage"] = original
