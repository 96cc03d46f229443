"""What the ``rhythm`` commands share: user errors, the console (messages and progress bars), the model
source (its path, config and cheap checks, read once per command), loading, torch threads, and the trainer
batch layout.

Conventions: a user error is a :class:`UsageError` (one line on stderr, exit code 2), raised before any model
loads wherever the check can be made without it; progress bars only on a terminal and never when quiet;
messages go to stderr, results to stdout.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rhythm.report.terminal import escape_controls


DEFAULT_STRATEGIES = ("coupled", "local", "global")   # the gamma columns `rhythm score` writes by default


class UsageError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


# ---- console ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Console:
    """Messages and progress bars on stderr. ``quiet``: errors only."""

    quiet: bool = False

    def info(self, message: str) -> None:
        if not self.quiet:
            print(escape_controls(message), file=sys.stderr)

    @property
    def bars(self) -> bool:
        """Progress bars are drawn only on a terminal and without --quiet."""
        return not self.quiet and sys.stderr.isatty()

    def progress(self, **kwargs):
        """A tqdm bar on stderr (disabled off a terminal and when quiet)."""
        from tqdm.auto import tqdm

        return tqdm(file=sys.stderr, disable=not self.bars, **kwargs)


# ---- the model -----------------------------------------------------------------------------------------------

def check_device(text: str | None) -> None:
    """``--device``: a torch device that exists here."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available here (no GPU, or torch built without CUDA); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {text}: MPS is not available here; use --device cpu")


def torch_dtype(name: str):
    """``--dtype`` name -> torch dtype (None for "auto": the checkpoint's)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


@dataclass
class ModelSource:
    """A local model named by ``--model`` (None: the bundled SmolLM2): its resolved path, the files it is read
    from (a GGUF file's cached conversion, made once) and its transformers config, each found at most once per
    command."""

    path: str | None
    console: Console = field(default_factory=Console)
    _files: Path | None = field(default=None, init=False, repr=False)
    _config: object = field(default=None, init=False, repr=False)

    @property
    def label(self) -> str:
        return self.path or "bundled SmolLM2"

    def resolve(self) -> tuple[Path, dict]:
        """(folder, from_pretrained kwargs); UsageError naming --model when the path is unusable."""
        from rhythm.models import resolve_model_path

        try:
            return resolve_model_path(self.path)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--model: {e}") from None

    def model_id(self) -> str:
        """The absolute path of the checkpoint (the GGUF file itself for GGUF), as stored with outputs."""
        folder, kwargs = self.resolve()
        return str(((folder / kwargs["gguf_file"]) if "gguf_file" in kwargs else folder).resolve())

    def files(self) -> Path:
        """The model directory to read (for a GGUF file its cached conversion, made now when missing)."""
        if self._files is None:
            from rhythm.models import model_files

            self.resolve()
            self._files = model_files(self.path, quiet=self.console.quiet)
        return self._files

    def config(self):
        """The model's transformers config, read without loading the weights (UsageError when unreadable)."""
        if self._config is None:
            files = self.files()
            try:
                from transformers import AutoConfig

                kwargs = {"gguf_file": files.name} if files.suffix == ".gguf" else {}
                folder = files.parent if files.suffix == ".gguf" else files
                self._config = AutoConfig.from_pretrained(str(folder), local_files_only=True, **kwargs)
            except Exception as e:   # an unknown model type, a broken config.json, ...
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UsageError(f"--model {self.label}: cannot read its config ({first})") from None
        return self._config

    def check_architecture(self) -> None:
        """Refuse a model type the capture was not taught about from its config, before the weights load or a
        token is generated (the capture refuses it again on the loaded model)."""
        from rhythm.capture.architectures import UnsupportedModelError, check_config_types
        from rhythm.models import causal_lm_configs

        cfg = self.config()
        try:
            check_config_types(causal_lm_configs(cfg), f"checkpoint {self.label}")
        except UnsupportedModelError as e:
            raise UsageError(str(e)) from None

    def _text_config(self):
        cfg = self.config()
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def limits(self) -> tuple[int | None, int | None]:
        """(vocab_size, max_position_embeddings) from the config (None where it does not say)."""
        cfg = self._text_config()
        return getattr(cfg, "vocab_size", None), getattr(cfg, "max_position_embeddings", None)

    def check_layers(self, layers) -> None:
        """``--layers`` against the model's layer count (from the config, before the weights load)."""
        count = getattr(self._text_config(), "num_hidden_layers", None)
        if not count:
            return
        count = int(count)
        if layers is None and count < 3:
            raise UsageError(f"--layers: {self.label} has {count} layer(s); the default middle-third sampling "
                             "needs at least 3, pass --layers explicitly")
        if layers is not None and max(layers) >= count:
            raise UsageError(f"--layers {max(layers)}: {self.label} has {count} layers (indices 0 to {count - 1})")

    def check(self, layers) -> None:
        """Every check that reads the config: the architecture and ``--layers``."""
        self.check_architecture()
        self.check_layers(layers)

    def load_tokenizer(self):
        """The tokenizer (cheap: the weights are not read)."""
        from rhythm.models import load_tokenizer

        return load_tokenizer(self.files(), quiet=self.console.quiet)

    def load(self, *, device: str | None, dtype: str, tokenizer=None):
        """(model, tokenizer), offline, with a progress bar on a terminal."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.utils import logging as hf_logging

        from rhythm.models import load_model

        if not self.console.bars:    # transformers' own bars (loading weights) follow the same rule
            hf_logging.disable_progress_bar()
        with self.console.progress(total=1, desc="loading model", unit="model", leave=False) as bar:
            model, tokenizer = load_model(self.files(), device=device, dtype=torch_dtype(dtype), tokenizer=tokenizer,
                                          quiet=self.console.quiet)
            bar.update(1)
        return model, tokenizer


# ---- files ----------------------------------------------------------------------------------------------------

def check_writable_dir(folder: Path, flag: str, *, create: bool = False) -> None:
    """``folder`` exists (or can be made, with ``create``) and a file can be created in it."""
    import tempfile

    probe = folder
    while create and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag}: {folder} is not a directory" if probe == folder else
                         f"{flag}: {probe} is not a directory, so {folder} cannot be created")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".rhythm-write-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag}: cannot write in {probe} ({e.strerror or e})") from None


# ---- tokens and batches -------------------------------------------------------------------------------------------

def chat_ids(tokenizer, prompt: str):
    """The prompt as one user message through the tokenizer's chat template (with the generation prompt), or
    plainly tokenized when it has none: int64 [1, P]."""
    import torch

    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def pad_id(tokenizer) -> int:
    """The padding token id (the EOS token, or 0, when the tokenizer has no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def trainer_batch(pairs, pad: int):
    """input_ids, attention_mask, response_mask [B, P + R] in the trainer layout (prompt left-padded, response
    right-padded) for (prompt_ids, response_ids) pairs."""
    import torch

    from rhythm.scoring.scorer import trainer_response_mask

    p_len, r_len = max(len(p) for p, _ in pairs), max(len(r) for _, r in pairs)
    ids = torch.full((len(pairs), p_len + r_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(pairs):
        ids[i, p_len - len(p): p_len] = torch.tensor(p, dtype=torch.long)
        ids[i, p_len: p_len + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, p_len - len(p): p_len + len(r)] = 1
    return ids, mask, trainer_response_mask(mask, r_len)


# ---- flags shared by the commands ---------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def add_threads(parser) -> None:
    """``--threads N``: torch's CPU threads for the command (read back with :func:`apply_threads`)."""
    parser.add_argument("--threads", type=positive_int, default=None,
                        help=f"torch CPU threads (torch.set_num_threads; default: torch's own choice, "
                             f"{os.cpu_count()} cores here)")


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads (None: leave torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
