#!/usr/bin/env bash
# GRPO with attention-rhythm credit in verl 0.9 (in the style of verl's examples/grpo_trainer/*.sh).
#
#   bash examples/verl_rhythm_grpo.sh                          # train (GPUs, vLLM, the GSM8K parquet files)
#   bash examples/verl_rhythm_grpo.sh --cfg job                # check and print the composed config (rhythm
#                                                              # block included) and exit: runs anywhere
#   bash examples/verl_rhythm_grpo.sh +rhythm.strategy=random  # any override: verl's or the rhythm block's
#
# The data: verl's examples/data_preprocess/gsm8k.py writes $HOME/data/gsm8k/{train,test}.parquet.
# The rhythm block (rhythm.<key>=..., with or without a leading + or ++; keys =
# rhythm.integrations.config.RhythmCreditConfig's fields and `enable`) is part of verl's own run config,
# logged with it; your overrides of it replace the defaults below. rhythm.integrations.verl.launch composes
# verl's config with every override first and refuses an unknown key or value (one line, exit 2) before
# verl starts - with --cfg job too; Hydra flags (--cfg job, ...) may stand anywhere. Works with verl's
# default v1 trainer and with trainer.use_v1=False.
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${DATA:-$HOME/data/gsm8k}
N_GPUS=${N_GPUS:-8}
PYTHON=${PYTHON:-python3}

# Every process that imports verl (driver, Ray workers) installs the hooks.
export VERL_USE_EXTERNAL_MODULES=rhythm.integrations.verl.plugin

exec "$PYTHON" -m rhythm.integrations.verl.launch \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=256 \
    data.max_prompt_length=512 \
    data.max_response_length=1024 \
    data.filter_overlong_prompts=True \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.external_lib=rhythm.integrations.verl.plugin \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
    +rhythm.strategy=coupled \
    +rhythm.sign=both \
    +rhythm.q=0.4 \
    +rhythm.gamma_amp=1.5 \
    +rhythm.window=10 \
    "+rhythm.horizon=[10,100]" \
    trainer.logger='["console"]' \
    trainer.project_name=attention_rhythm \
    trainer.experiment_name=gsm8k_grpo_rhythm_coupled \
    trainer.n_gpus_per_node="$N_GPUS" \
    trainer.nnodes=1 \
    trainer.total_epochs=15 \
    "$@"
