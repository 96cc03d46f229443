"""Import this module in every verl process to get rhythm credit in verl's PPO/GRPO loop - no fork of verl.

How verl reaches it (verl 0.9, read from its source):

- ``VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl_hooks``: ``verl/__init__.py`` splits the variable on
  commas and ``importlib.import_module``s each entry right after ``verl.protocol`` is loaded - in the driver
  and in every Ray worker that imports verl (workers inherit the variable from the driver's environment or
  from ``ray_kwargs.ray_init.runtime_env.env_vars``).
- ``actor_rollout_ref.model.external_lib=rhythm.integrations.verl_hooks``: ``HFModelConfig.__post_init__``
  passes it to ``verl.utils.import_utils.import_external_libs`` in every process that builds the model
  config (the workers; the driver only when it builds one, so prefer the variable).

What the import does (:func:`install`; each patch applied now if its module is loaded, otherwise the moment
it is imported, through a post-import hook on ``sys.meta_path``):

1. worker side - ``verl.workers.engine_workers.ActorRolloutRefWorker.compute_log_prob`` (the actor's
   old-log-prob pass of the legacy ``RayPPOTrainer``; verl 0.9 has no ``fsdp_workers.py`` any more) is
   wrapped: when the incoming TensorDict carries the request ``rhythm_credit`` (put there by 2.), the
   wrapper runs the original method, then scores the same batch with a :class:`rhythm.RhythmScorer` over the
   actor's module (``self.actor.engine.module``, FSDP-wrapped: its forward gathers the shards, inside the
   engine's ``eval_mode`` so offloaded parameters are loaded) and returns ``rhythm_gamma`` [b, R_len] next to
   ``log_probs`` / ``entropy``. The batch arrives in verl's no-padding layout (nested ``input_ids`` /
   ``position_ids``); with ``use_remove_padding`` the scorer runs on the packed layout, otherwise padded.
   Without the request the method is untouched (the ref pass of a LoRA actor, the v1 trainer, ...).
2. driver side - ``verl.trainer.ppo.ray_trainer.RayPPOTrainer._compute_old_log_prob`` is wrapped: for the
   attention strategies (coupled / local / global) it adds the request to the TensorDict it sends to
   ``actor_rollout_wg.compute_log_prob`` and puts the returned ``rhythm_gamma`` into the ``DataProto`` it
   returns (verl's own code keeps only ``old_log_probs`` / ``entropys`` of the worker output); the trainer
   then ``union``s it into the batch. ``random`` and ``entropy`` need no model: they are computed right
   there on the driver (entropy from the ``entropys`` of the same pass; random seeded by the global step).
3. ``verl.trainer.ppo.ray_trainer.compute_advantage`` is wrapped (aliases bound by ``from ... import
   compute_advantage`` before the patch are rebound): after the estimator (any: grpo, gae, rloo, ...), if
   the batch carries ``rhythm_gamma`` [B, R_len], the advantages are multiplied by it on ``response_mask``
   tokens (:func:`rhythm.integrations.verl.apply_rhythm_gamma`). Batches without the key pass through.

Switches: importing the module enables 1.-3. with the default :class:`RhythmCreditConfig` (the paper's
coupled credit, sign "both"); ``RHYTHM_CREDIT_CONFIG`` (JSON of the config) changes it, read by the driver
only (the config travels to the workers inside the request); ``RHYTHM_CREDIT=0`` (or off/false/no) turns
the automatic gamma of 1.-2. off and leaves only 3. (for a trainer that computes ``rhythm_gamma`` itself).
Sign mode of 3.: ``data.meta_info["rhythm_sign"]``, else the config's ``sign``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import json
import os
import sys
import time

from .config import RhythmCreditConfig
from .verl import GAMMA_KEY, apply_rhythm_gamma, compute_rhythm_gamma, padded_from_no_padding

__all__ = ["install", "uninstall", "wrap_compute_advantage", "wrap_compute_log_prob", "wrap_compute_old_log_prob",
           "config_from_env", "auto_config", "worker_rhythm_gamma", "CONFIG_ENV", "ENABLE_ENV", "REQUEST_KEY",
           "TARGET", "WORKERS_TARGET"]

TARGET = "verl.trainer.ppo.ray_trainer"
WORKERS_TARGET = "verl.workers.engine_workers"
CONFIG_ENV = "RHYTHM_CREDIT_CONFIG"
ENABLE_ENV = "RHYTHM_CREDIT"
REQUEST_KEY = "rhythm_credit"  # non-tensor entry of the TensorDict sent to compute_log_prob (JSON)


def config_from_env() -> RhythmCreditConfig:
    """RhythmCreditConfig from the JSON object in ``$RHYTHM_CREDIT_CONFIG`` (e.g. '{"strategy": "coupled",
    "sign": "positive"}'); defaults when unset. The same variable reaches the Ray workers."""
    text = os.environ.get(CONFIG_ENV, "").strip()
    return RhythmCreditConfig(**json.loads(text)) if text else RhythmCreditConfig()


def auto_config() -> RhythmCreditConfig | None:
    """The config of the automatic worker-side gamma, or None when ``$RHYTHM_CREDIT`` turns it off."""
    if os.environ.get(ENABLE_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    return config_from_env()


def wrap_compute_advantage(fn):
    """``compute_advantage`` -> the same function followed by the gamma post-multiply (idempotent)."""
    if getattr(fn, "__rhythm_wrapped__", False):
        return fn

    @functools.wraps(fn)
    def compute_advantage(data, *args, **kwargs):
        data = fn(data, *args, **kwargs)
        if GAMMA_KEY in data.batch.keys():
            sign = (data.meta_info or {}).get("rhythm_sign") or config_from_env().sign
            apply_rhythm_gamma(data, sign=sign)
        return data

    compute_advantage.__rhythm_wrapped__ = True
    compute_advantage.__rhythm_original__ = fn
    return compute_advantage


# ---- worker side: ActorRolloutRefWorker.compute_log_prob ----------------------------------------------------

def _get(obj, *path, default=None):
    """obj.a.b... through attributes or mapping keys (a worker, an OmegaConf DictConfig, a dict)."""
    for name in path:
        value = getattr(obj, name, None)
        if value is None and isinstance(obj, dict):
            value = obj.get(name)
        obj = value
        if obj is None:
            return default
    return obj


def _actor_module(worker):
    """The actor's torch module on a verl 0.9 engine worker: ``worker.actor.engine.module`` (FSDP/FSDP2-wrapped
    transformers model, possibly a PEFT model). Megatron engines hold a list of Megatron modules: refused."""
    engine = _get(worker, "actor", "engine")
    module = getattr(engine, "module", None)
    if module is None or isinstance(module, (list, tuple)) or not hasattr(module, "config"):
        raise ValueError("rhythm credit scores with the actor's transformers model (FSDP / FSDP2 engines); this "
                         f"worker's engine ({type(engine).__name__}) holds {type(module).__name__}")
    return engine, module


def _worker_scorer(worker, module, config: RhythmCreditConfig):
    """One RhythmScorer per worker (and module / config), built on first use."""
    from ..scorer import RhythmScorer

    default_mbs = _get(worker, "config", "rollout", "log_prob_micro_batch_size_per_gpu") or 8
    kwargs = config.scorer_kwargs(int(default_mbs))
    key = (id(module), json.dumps(kwargs, sort_keys=True, default=str))
    cached = worker.__dict__.get("_rhythm_scorer")
    if cached is None or cached[0] != key:
        cached = (key, RhythmScorer(module, **kwargs))
        worker.__dict__["_rhythm_scorer"] = cached
    return cached[1]


def worker_rhythm_gamma(worker, data, config: RhythmCreditConfig, *, seed: int | None = None,
                        use_remove_padding: bool | None = None):
    """gamma float32 [b, R_len] (CPU) of the batch ``data`` a verl 0.9 actor worker received for
    ``compute_log_prob`` (no-padding layout or padded), scored with the worker's actor module (no grad, in
    the engine's eval mode). ``use_remove_padding`` None: the request's / batch's flag, else the worker's
    ``config.model.use_remove_padding``."""
    padded = padded_from_no_padding(data)
    if use_remove_padding is None:
        flag = data.get("use_remove_padding", None) if hasattr(data, "get") else None
        flag = getattr(flag, "data", flag)  # NonTensorData
        use_remove_padding = bool(flag if flag is not None else _get(worker, "config", "model", "use_remove_padding"))
    scorer = None
    context = contextlib.nullcontext()
    if config.needs_scorer:
        engine, module = _actor_module(worker)
        scorer = _worker_scorer(worker, module, config)
        if hasattr(engine, "eval_mode"):
            context = engine.eval_mode()
    with context:
        gamma = compute_rhythm_gamma(scorer, padded, config, use_remove_padding=use_remove_padding, seed=seed)
    return gamma.float().cpu()


def _pop_request(data):
    if data is None or not hasattr(data, "keys") or REQUEST_KEY not in data.keys():
        return None
    value = data.pop(REQUEST_KEY)
    value = getattr(value, "data", value)  # NonTensorData -> str
    return json.loads(value) if isinstance(value, str) else dict(value)


def wrap_compute_log_prob(fn):
    """``ActorRolloutRefWorker.compute_log_prob`` -> the same method, plus ``rhythm_gamma`` [b, R_len] in its
    output when the batch carries the driver's request (idempotent; keeps verl's ``register`` attributes)."""
    if getattr(fn, "__rhythm_wrapped__", False):
        return fn

    @functools.wraps(fn)
    def compute_log_prob(self, data, *args, **kwargs):
        request = _pop_request(data)  # before the engine sees the batch
        output = fn(self, data, *args, **kwargs)
        if request is None:
            return output
        start = time.perf_counter()
        config = RhythmCreditConfig(**request["config"])
        # every rank scores its own chunk, collecting or not: the FSDP forward is collective
        gamma = worker_rhythm_gamma(self, data, config, seed=request.get("seed"))
        if output is not None:
            output[GAMMA_KEY] = gamma
            metrics = output.get("metrics", None) if hasattr(output, "get") else None
            metrics = getattr(metrics, "data", metrics)
            if isinstance(metrics, dict):
                metrics["rhythm/scorer_time_s"] = time.perf_counter() - start
        return output

    compute_log_prob.__rhythm_wrapped__ = True
    compute_log_prob.__rhythm_original__ = fn
    return compute_log_prob


# ---- driver side: RayPPOTrainer._compute_old_log_prob ---------------------------------------------------------

def wrap_compute_old_log_prob(fn):
    """``RayPPOTrainer._compute_old_log_prob`` -> the same, with ``rhythm_gamma`` [B, R_len] in the returned
    ``DataProto`` (requested from the actor workers, or computed here for random / entropy)."""
    if getattr(fn, "__rhythm_wrapped__", False):
        return fn

    @functools.wraps(fn)
    def _compute_old_log_prob(self, batch, *args, **kwargs):
        config = auto_config()
        if config is None:
            return fn(self, batch, *args, **kwargs)
        seed = config.step_seed(int(getattr(self, "global_steps", 0) or 0))
        if not config.needs_scorer:  # random / entropy: no model needed
            result = fn(self, batch, *args, **kwargs)
            out = result[0] if isinstance(result, tuple) else result
            inputs = {k: batch.batch[k] for k in ("input_ids", "attention_mask", "responses")}
            if config.strategy == "entropy":
                inputs["entropys"] = out.batch["entropys"]
            out.batch[GAMMA_KEY] = compute_rhythm_gamma(None, inputs, config, seed=seed)
            return result
        worker_group = self.actor_rollout_wg
        call = worker_group.compute_log_prob
        own = "compute_log_prob" in vars(worker_group)
        captured = []
        request = json.dumps({"config": config.to_dict(), "seed": seed})

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
        gamma = None
        if captured and captured[-1] is not None and GAMMA_KEY in captured[-1].keys():
            gamma = captured[-1][GAMMA_KEY]
        if gamma is None:
            raise RuntimeError("the actor workers returned no rhythm_gamma: import rhythm.integrations.verl_hooks in "
                               "the Ray workers too (VERL_USE_EXTERNAL_MODULES in their environment, or "
                               "actor_rollout_ref.model.external_lib), or set RHYTHM_CREDIT=0")
        if gamma.shape[0] != len(batch) or gamma.shape[1] != batch.batch["responses"].shape[1]:
            raise RuntimeError(f"rhythm_gamma from the workers has shape {list(gamma.shape)}, expected "
                               f"[{len(batch)}, {batch.batch['responses'].shape[1]}]")
        out.batch[GAMMA_KEY] = gamma.float()
        return result

    _compute_old_log_prob.__rhythm_wrapped__ = True
    _compute_old_log_prob.__rhythm_original__ = fn
    return _compute_old_log_prob


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


def _patch_workers(module) -> None:
    _wrap_method(module.__dict__.get("ActorRolloutRefWorker"), "compute_log_prob", wrap_compute_log_prob)


def _patch(module) -> None:
    _wrap_method(module.__dict__.get("RayPPOTrainer"), "_compute_old_log_prob", wrap_compute_old_log_prob)
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
        _PATCHES[module.__name__](module)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
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
_PATCHES = {TARGET: _patch, WORKERS_TARGET: _patch_workers}


def install() -> None:
    """Apply the patches now (modules loaded) or on their import. Safe to call many times."""
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)  # tolerates a module still initializing (what is not defined yet is not patched)
    if any(name not in sys.modules for name in _PATCHES) and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Undo :func:`install` (tests): restore the original functions, methods and aliases, drop the hook."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    workers = sys.modules.get(WORKERS_TARGET)
    if workers is not None:
        _unwrap_method(workers.__dict__.get("ActorRolloutRefWorker"), "compute_log_prob")
    module = sys.modules.get(TARGET)
    if module is not None:
        _unwrap_method(module.__dict__.get("RayPPOTrainer"), "_compute_old_log_prob")
    wrapped = module.__dict__.get("compute_advantage") if module is not None else None
    original = getattr(wrapped, "__rhythm_original__", None)
    if original is None:
        return
    for other in list(sys.modules.values()):
        namespace = getattr(other, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("compute_advantage") is wrapped:
            namespace["compute_advantage"] = original


install()
