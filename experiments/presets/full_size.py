"""Full-size, shape-only presets with the published dimensions, for `python -m experiments.compile`
(AOT compilation for a TPU topology). NEVER initialise them on a CPU: tens of billions of
parameters.

The library has no mixture-of-experts layer yet, so each feed-forward block is a dense SwiGLU of
the model's *activated* width, (routed top-k + shared experts) x moe_intermediate_size, which is
also the published dense-layer width of V3/K2 (18432): FLOPs per token match the published model,
total parameters do not (the experts are missing). `NOTES` says so in every report.

Dimensions (`/work/shared/reference/attention.md` §1.3, §2.4; Hugging Face configs):
  deepseek-v3-attn: 61 MLA layers, d 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128,
    rope 64 (YaRN factor 40, original 4096), v 128, vocab 129280; FFN 18432 (8 routed + 1 shared
    x 2048 = the V3 dense intermediate_size).
  kimi-k2-attn: V3 with 64 heads, vocab 163840, rope theta 50000, YaRN factor 32 (beta 1/1).
  deepseek-v4-flash-attn: 43 layers, d 4096, 64 heads of 512 (rope 64), q_lora 1024, o_groups 8,
    o_lora 1024, window 128, compress_ratios [0, 0, 4, 128, ..., 4] (2 window, 21 CSA, 20 HCA),
    indexer 64 x 128 top-512, compress rope theta 160000 + YaRN 16 (original 65536), mHC
    hc_mult 4 with 20 Sinkhorn iterations, vocab 129280; FFN 7 x 2048 = 14336 (top-6 + 1 shared).
  kimi-linear-48b-attn: 27 layers at d 2304, MLA at 1-indexed layers 4, 8, ..., 24, 27 (the
    other 20 are KDA, 32 heads x 128, conv 4); MLA 32 heads, no q-LoRA, kv_lora 512, nope 128,
    rope dims 64 unrotated (NoPE), v 128; vocab 163840; FFN 9 x 1024 = 9216 (top-8 + 1 shared).

All use bf16 activations, fp32 parameters (the optimizer's master copy), full remat, and a
scanned layer stack where the pattern allows it (one compiled body: fast compilation).
"""

from __future__ import annotations

from experiments.config import OptimizerConfig, RunConfig, TrainConfig
from experiments.data import DataConfig
from experiments.presets import register_preset
from jaxmodels.attention.kda import KDAConfig
from jaxmodels.attention.mla import REFERENCE_CONFIGS, MLAConfig
from jaxmodels.attention.v4 import V4Config, layer_pattern_from_ratios
from jaxmodels.config import ModelConfig
from jaxmodels.residual.mhc import MHCConfig

_DENSE = "dense FFN of the activated width {f} ({k} routed + {s} shared experts x {m}) replaces "
_DENSE += "the published {e}-expert MoE"
NOTES: dict[str, list[str]] = {}


def _run(model: ModelConfig, seq: int = 4096, batch: int = 256) -> RunConfig:
    return RunConfig(
        model=model,
        data=DataConfig(seq_len=seq, batch_size=batch, val_batches=1),
        optimizer=OptimizerConfig(learning_rate=2.2e-4, warmup_steps=2000),
        train=TrainConfig(steps=100_000, mesh="fsdp=-1"),
    )


def _mla_stack(mla: MLAConfig, *, vocab: int, layers: int = 61, ffn: int = 18432) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=7168,
        intermediate_size=ffn,
        num_layers=layers,
        layer_pattern=("mla",),
        attention={"mla": mla},
        dtype="bfloat16",
        param_dtype="float32",
        scan_layers=True,
        remat="full",
    )


def deepseek_v3_attn() -> RunConfig:
    """DeepSeek-V3 attention stack: 61 MLA layers at d=7168, dense FFN (no MoE); shape only."""
    return _run(_mla_stack(REFERENCE_CONFIGS["deepseek-v3"], vocab=129280))


def kimi_k2_attn() -> RunConfig:
    """Kimi K2 attention stack: 61 MLA layers, 64 heads, vocab 163840, dense FFN; shape only."""
    return _run(_mla_stack(REFERENCE_CONFIGS["kimi-k2"], vocab=163840))


def deepseek_v4_flash_attn() -> RunConfig:
    """DeepSeek-V4-Flash: 43 window/CSA/HCA layers + mHC at d=4096, dense FFN; shape only."""
    base = V4Config(
        num_attention_heads=64,
        head_dim=512,
        qk_rope_head_dim=64,
        q_lora_rank=1024,
        o_groups=8,
        o_lora_rank=1024,
        sliding_window=128,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=512,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        yarn_factor=16.0,
        original_max_position_embeddings=65536,
        beta_fast=32.0,
        beta_slow=1.0,
    )
    ratios = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(41)]
    pattern, attention = layer_pattern_from_ratios(ratios, base)
    model = ModelConfig(
        vocab_size=129280,
        hidden_size=4096,
        intermediate_size=7 * 2048,
        num_layers=len(pattern),
        layer_pattern=pattern,
        attention=attention,
        residual=MHCConfig(hc_mult=4, hc_sinkhorn_iters=20),
        dtype="bfloat16",
        param_dtype="float32",
        scan_layers=False,
        remat="full",
    )
    return _run(model)


def kimi_linear_48b_attn() -> RunConfig:
    """Kimi-Linear-48B-A3B: 20 KDA + 7 NoPE MLA layers at d=2304, dense FFN; shape only."""
    mla = REFERENCE_CONFIGS["kimi-linear"]
    kda = KDAConfig(num_heads=32, head_dim=128, conv_kernel_size=4)
    full_attention = {4, 8, 12, 16, 20, 24, 27}  # 1-indexed (HF `full_attn_layers`)
    pattern = tuple("mla" if i in full_attention else "kda" for i in range(1, 28))
    model = ModelConfig(
        vocab_size=163840,
        hidden_size=2304,
        intermediate_size=9 * 1024,
        num_layers=len(pattern),
        layer_pattern=pattern,
        attention={"kda": kda, "mla": mla},
        dtype="bfloat16",
        param_dtype="float32",
        scan_layers=False,
        remat="full",
    )
    return _run(model)


register_preset("deepseek-v3-attn", deepseek_v3_attn)
NOTES["deepseek-v3-attn"] = [
    _DENSE.format(f=18432, k=8, s=1, m=2048, e=256),
    "all 61 layers use the same FFN (V3's first 3 layers are dense with this width anyway)",
]
register_preset("kimi-k2-attn", kimi_k2_attn)
NOTES["kimi-k2-attn"] = [_DENSE.format(f=18432, k=8, s=1, m=2048, e=384)]
register_preset("kimi-linear-48b-attn", kimi_linear_48b_attn)
NOTES["kimi-linear-48b-attn"] = [
    _DENSE.format(f=9216, k=8, s=1, m=1024, e=256),
    "the first layer's dense FFN is modelled at the same width",
]

register_preset("deepseek-v4-flash-attn", deepseek_v4_flash_attn)
NOTES["deepseek-v4-flash-attn"] = [
    _DENSE.format(f=14336, k=6, s=1, m=2048, e=256),
    "the MTP layer and V4's hash-routed first layers are not modelled",
]
