"""Study 1 (KV cache per token): our cache pytrees reproduce the published byte counts."""

import pytest

from experiments.studies import kv_cache

# /work/shared/reference/attention.md §8.1: DeepSeek-V3 dims, 61 layers, bf16.
PUBLISHED = {
    "MHA (V3 dims, 128 heads x 128)": 3_997_696,
    "GQA (V3 dims, 8 kv heads x 128)": 249_856,
    "MLA (DeepSeek-V3)": 70_272,
    "MLA (Kimi K2)": 70_272,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_cache_bytes_per_token_match_published(name):
    config = kv_cache.architectures()[name]()
    context = 4096
    per_token = kv_cache.cache_bytes(config, context) / context
    # Each layer also stores one int32 fill counter: 61 x 4 B over the whole context.
    assert per_token == pytest.approx(PUBLISHED[name] + 61 * 4 / context, abs=1e-9)


def test_indexer_adds_one_128_value_key_per_layer():
    archs = kv_cache.architectures()
    context = 4096
    mla = kv_cache.cache_bytes(archs["MLA (DeepSeek-V3)"](), context)
    v32 = kv_cache.cache_bytes(archs["MLA + DSA indexer (DeepSeek-V3.2)"](), context)
    assert v32 - mla == 61 * 128 * 2 * context


def test_kimi_linear_keeps_about_a_quarter_of_the_all_mla_cache_at_1m():
    """Kimi Linear: "KV cache reduced up to 75 %": 7 of 27 layers keep a KV cache (7/27 = 25.9 %),
    plus the 20 KDA layers' constant fp32 states, which vanish per token at long context."""
    archs = kv_cache.architectures()
    context = 1 << 20
    hybrid = kv_cache.cache_bytes(archs["KDA:MLA 3:1 (Kimi-Linear-48B)"](), context)
    all_mla = kv_cache.cache_bytes(archs["all-MLA (Kimi-Linear-48B dims)"](), context)
    state = 20 * 32 * 128 * 128 * 4  # KDA layers x heads x H x J x fp32
    assert hybrid / all_mla == pytest.approx(7 / 27 + state / all_mla, rel=1e-3)
    assert 0.25 < hybrid / all_mla < 0.27
