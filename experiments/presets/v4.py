"""`deepseek-v4-tiny`: DeepSeek-V4's hybrid attention (sliding window + CSA + HCA) at a size that
trains and decodes on a CPU in minutes.

    python -m experiments.train --preset deepseek-v4-tiny
    python -m experiments.train --preset deepseek-v4-tiny-warmup   # indexer dense warm-up

Layer pattern as V4-Flash lists its `compress_ratios` (window-only layers first, then CSA and
HCA alternating): [0, 4, 16, 4]. The ratios and window shrink with the 128-token training
sequences so that every mechanism is exercised: window 16, CSA ratio 4 with top-8 of up to 32
entries (the indexer selects), HCA ratio 16 (up to 8 entries, dense). Residual: mHC with 4
streams as V4 ships it, when that residual kind is registered (pre-norm otherwise).

The CSA indexer trains on DeepSeek-V3.2's indexer KL, sown by the CSA layers and added to the
loss by the train step (`losses/indexer_kl`, reported as `aux_loss`):

* `deepseek-v4-tiny`: the sparse stage — top-8 attention, KL over the selected entries;
* `deepseek-v4-tiny-warmup`: the dense warm-up — CSA attends every visible compressed entry,
  the KL runs over all of them. The main model trains on the LM loss at the same time (the
  losses never interact); to freeze all but the indexers as the paper does, wrap the optimizer
  with `jaxmodels.attention.dsa.dsa_freeze(optimizer, "dense_warmup")`. Continue with the
  sparse stage through `--train.init_from=<warm-up workdir>` (same parameter tree).
"""

from experiments.config import OptimizerConfig, RunConfig, TrainConfig
from experiments.data import DataConfig
from experiments.presets import register_preset
from jaxmodels import registry
from jaxmodels.attention.v4 import V4Config, layer_pattern_from_ratios
from jaxmodels.config import ModelConfig

COMPRESS_RATIOS = (0, 4, 16, 4)


def _run(indexer_stage: str) -> RunConfig:
    base = V4Config(
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=64,
        o_groups=2,
        o_lora_rank=32,
        sliding_window=16,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=8,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        query_chunk=128,
        indexer_stage=indexer_stage,
    )
    pattern, attention = layer_pattern_from_ratios(COMPRESS_RATIOS, base, labels={16: "v4_hca"})
    residual = None
    if "mhc" in registry.residual_kinds():
        from jaxmodels.residual.mhc import MHCConfig

        residual = MHCConfig(hc_mult=4)
    return RunConfig(
        model=ModelConfig(
            hidden_size=128,
            intermediate_size=352,
            num_layers=len(pattern),
            layer_pattern=pattern,
            attention=attention,
            residual=residual,
        ),
        data=DataConfig(seq_len=128, batch_size=16, val_batches=8),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=30),
        train=TrainConfig(steps=320, eval_every=80, checkpoint_every=80, log_every=10),
    )


def deepseek_v4_tiny() -> RunConfig:
    """DeepSeek-V4 hybrid attention (window 16 / CSA r=4 top-8 / HCA r=16), 4 layers of 128."""
    return _run("sparse")


def deepseek_v4_tiny_warmup() -> RunConfig:
    """deepseek-v4-tiny in the CSA indexer's dense warm-up stage (all entries, KL over all)."""
    return _run("dense_warmup")


register_preset("deepseek-v4-tiny", deepseek_v4_tiny)
register_preset("deepseek-v4-tiny-warmup", deepseek_v4_tiny_warmup)
