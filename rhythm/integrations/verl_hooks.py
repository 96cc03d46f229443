"""Import this module in every verl process to post-multiply advantages by rhythm gamma - no fork of verl.

How verl reaches it (verl 0.9, read from its source):

- ``VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl_hooks``: ``verl/__init__.py`` splits the variable on
  commas and ``importlib.import_module``s each entry right after ``verl.protocol`` is loaded - in the driver
  and in every Ray worker that imports verl (workers inherit the variable from the driver's environment or
  from ``ray_kwargs.ray_init.runtime_env.env_vars``).
- ``actor_rollout_ref.model.external_lib=rhythm.integrations.verl_hooks``: ``HFModelConfig.__post_init__``
  passes it to ``verl.utils.import_utils.import_external_libs`` in every process that builds the model
  config (the workers).

What the import does: :func:`install` wraps ``verl.trainer.ppo.ray_trainer.compute_advantage`` (now if the
module is loaded, otherwise the moment it is imported, through a post-import hook on ``sys.meta_path``, so
``from verl.trainer.ppo.ray_trainer import compute_advantage`` elsewhere - the v1 trainer's utils, the
experimental trainers - binds the wrapped function; aliases bound earlier are rebound too). The wrapper runs
the original estimator and then, if the batch carries ``batch["rhythm_gamma"]`` [B, R_len] (computed on the
workers by :func:`rhythm.integrations.verl.compute_rhythm_gamma`), multiplies the advantages by it on
``response_mask`` tokens (:func:`rhythm.integrations.verl.apply_rhythm_gamma`). Batches without the key
pass through untouched. Sign mode: ``data.meta_info["rhythm_sign"]``, else the ``sign`` of the JSON config in
``RHYTHM_CREDIT_CONFIG`` (see :func:`config_from_env`), else "both".
"""
from __future__ import annotations

import functools
import importlib.abc
import json
import os
import sys

from .config import RhythmCreditConfig
from .verl import GAMMA_KEY, apply_rhythm_gamma

__all__ = ["install", "uninstall", "wrap_compute_advantage", "config_from_env", "CONFIG_ENV", "TARGET"]

TARGET = "verl.trainer.ppo.ray_trainer"
CONFIG_ENV = "RHYTHM_CREDIT_CONFIG"


def config_from_env() -> RhythmCreditConfig:
    """RhythmCreditConfig from the JSON object in ``$RHYTHM_CREDIT_CONFIG`` (e.g. '{"strategy": "coupled",
    "sign": "positive"}'); defaults when unset. The same variable reaches the Ray workers."""
    text = os.environ.get(CONFIG_ENV, "").strip()
    return RhythmCreditConfig(**json.loads(text)) if text else RhythmCreditConfig()


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


def _patch(module) -> None:
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
        if name != TARGET:
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


def install() -> None:
    """Wrap ``compute_advantage`` now (module loaded) or on its import. Safe to call many times."""
    module = sys.modules.get(TARGET)
    if module is not None and "compute_advantage" in module.__dict__:
        _patch(module)
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Undo :func:`install` (tests): restore the original function and its aliases, drop the hook."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    module = sys.modules.get(TARGET)
    wrapped = module.__dict__.get("compute_advantage") if module is not None else None
    original = getattr(wrapped, "__rhythm_original__", None)
    if original is None:
        return
    for other in list(sys.modules.values()):
        namespace = getattr(other, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("compute_advantage") is wrapped:
            namespace["compute_advantage"] = original


install()
