"""`deepseek-v32-tiny`: DeepSeek-V3.2's sparse attention (MLA + lightning indexer + top-k) at a
size that trains and decodes on a CPU in minutes.

    python -m experiments.train --preset deepseek-v32-tiny-warmup --workdir runs/dsa-warmup
    python -m experiments.train --preset deepseek-v32-tiny --train.init_from=runs/dsa-warmup

The second command (workdir `runs/deepseek-v32-tiny`) starts the sparse stage from the warm-up
run's newest checkpoint: its parameters (main model and indexer; both stages have the same
parameter tree), with a fresh optimizer state, step 0 and the data from the start
(`train.init_from`). Re-running it resumes its own workdir; `init_from` applies only to a fresh
one.

Every layer is DSA (V3.2 makes every layer DSA): MLA with q-LoRA, 4 indexer heads of 32 dims
with 8 rope dims first, and top-32 of the up to 128 tokens of a training sequence, so that the
later half of each sequence attends sparsely. Stages (DeepSeek_V3_2.pdf §2.1):

* `deepseek-v32-tiny-warmup`: dense MLA attention; the indexer learns the KL to the head-summed
  attention (sown as `losses/indexer_kl`, added by the train step). From scratch there is no
  trained dense model to freeze, so the main model trains on the LM loss at the same time; the
  two never interact (detached indexer input, stopped target). To freeze everything but the
  indexer as the paper does, wrap the optimizer with
  `jaxmodels.attention.dsa.dsa_freeze(optimizer, "dense_warmup")`.
* `deepseek-v32-tiny`: the sparse stage — top-k sparse attention, indexer KL on the selected set.
"""

import dataclasses

from experiments.config import OptimizerConfig, RunConfig, TrainConfig
from experiments.data import DataConfig
from experiments.presets import register_preset
from jaxmodels.attention.dsa import DSAConfig
from jaxmodels.config import ModelConfig, RopeConfig

DSA_TINY = DSAConfig(
    num_heads=4,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=8,
    v_head_dim=32,
    rope=RopeConfig(layout="interleaved"),
    index_n_heads=4,
    index_head_dim=32,
    index_topk=32,
    indexer_stage="sparse",
    index_block_q=64,
    index_prefix_chunks=2,
)


def _run(stage: str) -> RunConfig:
    return RunConfig(
        model=ModelConfig(
            hidden_size=128,
            intermediate_size=352,
            num_layers=4,
            layer_pattern=("dsa",),
            attention={"dsa": dataclasses.replace(DSA_TINY, indexer_stage=stage)},
        ),
        data=DataConfig(seq_len=128, batch_size=16, val_batches=8),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=30),
        train=TrainConfig(steps=320, eval_every=80, checkpoint_every=80, log_every=10),
    )


def deepseek_v32_tiny() -> RunConfig:
    """DeepSeek-V3.2 DSA, sparse stage (MLA + indexer, top-32 of 128), 4 layers of 128."""
    return _run("sparse")


def deepseek_v32_tiny_warmup() -> RunConfig:
    """DeepSeek-V3.2 DSA, dense warm-up stage (dense MLA, indexer learns the KL), 4 x 128."""
    return _run("dense_warmup")


register_preset("deepseek-v32-tiny", deepseek_v32_tiny)
register_preset("deepseek-v32-tiny-warmup", deepseek_v32_tiny_warmup)
