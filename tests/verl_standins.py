"""Shared pieces of the verl tests: verl-layout batches, and stand-in objects on which verl's real methods run.

Batches follow verl's layout: input_ids = prompt (left-padded) + response (right-padded), position_ids =
cumsum(attention_mask) - 1, responses [B, R_len] = the tail of input_ids, GRPO groups by uid.

The stand-ins carry exactly the attributes verl 0.9.1's real methods read, so the methods themselves run
unchanged: ``FSDPEngineWithLMHead.forward_backward_batch / forward_step / prepare_model_inputs /
prepare_model_outputs`` (a tiny Llama instead of an FSDP module, world size 1 gloo), ``TrainingWorker.infer_batch``
and ``ActorRolloutRefWorker.compute_log_prob``. Nothing of verl's code is copied.
"""
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
import pytest
import torch

from rhythm.integrations.config import RhythmCreditConfig

PROMPT_LENS = [5, 9, 7, 3, 8, 6]
RESPONSE_LENS = [14, 20, 9, 20, 0, 17]  # one empty response; two rows fill the response window
P_MAX, R_MAX = 10, 20
SMALL = dict(window=4, horizon=(2, 8))  # H_hi = 8 cuts inside the rows
SMALL_ENV = '{"strategy": "%s", "window": 4, "horizon": [2, 8]}'


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def verl_batch(seed=0, scores=(1.0, 0.0, 0.5, 2.0, 1.0, 0.0)):
    """A DataProto as verl's rollout hands it to compute_log_prob / compute_advantage (GRPO groups of 3)."""
    from verl import DataProto

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
    token_level_rewards = torch.zeros(batch, R_MAX)
    for b, r in enumerate(RESPONSE_LENS):
        token_level_rewards[b, max(r - 1, 0)] = scores[b] if r else 0.0
    return DataProto.from_dict(
        tensors=dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, prompts=prompts,
                     responses=responses, response_mask=response_mask, token_level_rewards=token_level_rewards),
        non_tensors=dict(uid=np.array(["a", "a", "a", "b", "b", "b"], dtype=object)))


def per_row_gamma(model, data, cfg):
    """Reference: every sequence scored alone, unpadded (B = 1) by the separate-pass scorer."""
    from rhythm import RhythmScorer

    scorer = RhythmScorer(model, **cfg.scorer_kwargs())
    out = torch.ones(len(PROMPT_LENS), R_MAX)
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        ids = data.batch["input_ids"][b, P_MAX - p:P_MAX + r][None]
        response = torch.zeros_like(ids, dtype=torch.bool)
        response[:, p:] = True
        gamma = scorer.score(ids, torch.ones_like(ids), response).gamma(cfg.strategy)
        out[b, :r] = gamma[0, p:]
    return out


def no_padding(data, request: RhythmCreditConfig | None = None):
    """The TensorDict the legacy driver sends to compute_log_prob (its steps 1-3)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False, temperature=1.0)
    if request is not None:
        tu.assign_non_tensor(td, rhythm_credit=json.dumps({"config": request.to_dict(), "seed": 0}))
    return td


def algo_config(estimator="grpo"):
    from verl.trainer.config import AlgoConfig

    return AlgoConfig(adv_estimator=estimator)


def plain_advantages(ray_trainer, estimator="grpo"):
    """verl's own compute_advantage (the unwrapped one) on a fresh batch."""
    fn = getattr(ray_trainer.compute_advantage, "__rhythm_original__", ray_trainer.compute_advantage)
    return fn(verl_batch(), adv_estimator=estimator, config=algo_config(estimator)).batch["advantages"]


def run_fresh(code: str, what: str, env=None, extra_path=None) -> str:
    """Run ``code`` in a fresh interpreter (what a Ray worker or driver process does); returns its stdout.
    Skips when verl's ``what`` module cannot import here."""
    env = dict(os.environ, **(env or {}))
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0 and "No module named" in result.stderr and "rhythm" not in result.stderr:
        pytest.skip(f"verl's {what} module does not import here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


# ---- verl's real engine / worker methods on stand-in objects -------------------------------------------------

def ensure_process_group():
    """World size 1 gloo group: verl's forward_backward_batch all-reduces the token count."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(prefix="verl_pg_"), rank=0,
                                world_size=1)


def cpu_device(monkeypatch):
    """verl picks its device from the accelerator platform (CUDA when none is found): CPU for these tests."""
    from verl.utils import seqlen_balancing
    from verl.workers.engine import base
    from verl.workers.engine.fsdp import transformer_impl

    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    for module in (transformer_impl, base, seqlen_balancing):
        monkeypatch.setattr(module, "get_device_name", lambda: "cpu")


def engine_worker(model, *, use_remove_padding, use_dynamic_bsz=False, micro_batch_size=2, max_token_len=40):
    """An ActorRolloutRefWorker whose actor is a real TrainingWorker over a real FSDPEngineWithLMHead (the
    module: ``model``, unsharded, fp32), built without their __init__ (which start device meshes and FSDP)."""
    import verl.utils.torch_functional as verl_F
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

    engine_config = types.SimpleNamespace(
        entropy_checkpointing=False, entropy_from_logits_with_chunking=False, fsdp_size=1, forward_only=True,
        use_dynamic_bsz=use_dynamic_bsz, infer_max_token_len_per_gpu=max_token_len,
        infer_micro_batch_size_per_gpu=micro_batch_size, use_fused_kernels=False)
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.__dict__.update(
        module=model, engine_config=engine_config, ulysses_sequence_parallel_size=1, use_ulysses_sp=False,
        ulysses_device_mesh=None, ulysses_parallel_group=None, pad_to_length=False, pad_to_length_bucket=None,
        _autocast_dtype=torch.float32, scaler=None, mode=None, _is_offload_param=False, _is_offload_optimizer=False,
        compute_entropy_from_logits=verl_F.entropy_from_logits)
    actor = object.__new__(TrainingWorker)
    actor.__dict__.update(engine=engine, model_config={"use_remove_padding": use_remove_padding},
                          engine_config=engine_config, loss_fn=None, flops_counter=None, device_name="cpu")
    worker = object.__new__(ActorRolloutRefWorker)
    worker.__dict__.update(actor=actor, enable_routing_replay=False)
    return worker


class StandInWorkerGroup:
    """RayWorkerGroup as the legacy driver uses it: ``compute_log_prob`` bound on the instance, the TensorDict
    split in equal chunks over the dp ranks and the outputs concatenated (``make_nd_compute_dataproto_dispatch_fn``),
    each rank running the class's (wrapped) method."""

    def __init__(self, workers, method=None):
        from verl.workers.engine_workers import ActorRolloutRefWorker

        self.workers = workers
        self.method = method or ActorRolloutRefWorker.compute_log_prob
        self.compute_log_prob = self._dispatch

    def _dispatch(self, data):
        from verl.utils import tensordict_utils as tu

        chunks = tu.chunk_tensordict(data, len(self.workers))
        return tu.concat_tensordict([self.method(w, c) for w, c in zip(self.workers, chunks)])
