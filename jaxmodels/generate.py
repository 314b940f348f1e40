"""Autoregressive generation with caches: prefill, then token-by-token decode; sampling rules."""

import functools

import jax
import jax.numpy as jnp

from jaxmodels.config import ModelConfig
from jaxmodels.model import Decoder, init_caches


def sample_logits(
    logits_BV: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Draws one token per row. temperature 0 is greedy (argmax).

    top_k keeps the k largest logits; top_p keeps the smallest set of tokens whose probability
    mass reaches p (always at least the most likely token). Returns int32 [B].
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    if top_p is not None and top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_index = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1
        threshold = jnp.take_along_axis(sorted_BV, cutoff_index, axis=-1)
        logits_BV = jnp.where(logits_BV < threshold, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "temperature", "top_k", "top_p", "max_length"),
)
def generate(
    params,
    prompt_BT: jax.Array,
    rng: jax.Array,
    *,
    config: ModelConfig,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_length: int | None = None,
) -> jax.Array:
    """Samples `max_new_tokens` continuations of equal-length prompts.

    Args:
      params: the model's parameters (`{"params": ...}` as returned by init, unboxed).
      prompt_BT: int32 [B, T] prompts (all of length T).
      rng: PRNG key.
      config: the model config (static).
      max_length: cache capacity (default T + max_new_tokens).

    Returns:
      int32 [B, max_new_tokens] generated tokens.
    """
    batch, prompt_len = prompt_BT.shape
    max_length = max_length or prompt_len + max_new_tokens
    if max_length < prompt_len + max_new_tokens:
        raise ValueError(
            f"max_length={max_length} < prompt length {prompt_len} + max_new_tokens "
            f"{max_new_tokens}"
        )
    model = Decoder(config)
    caches = init_caches(config, batch, max_length)
    positions_BT = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    logits_BTV, caches = model.apply(params, prompt_BT, positions_BT, caches)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    first = sample(logits_BTV[:, -1], jax.random.fold_in(rng, 0))

    def step(carry, i):
        token_B, caches = carry
        positions = jnp.full((batch, 1), prompt_len + i, jnp.int32)
        logits, caches = model.apply(params, token_B[:, None], positions, caches)
        next_B = sample(logits[:, -1], jax.random.fold_in(rng, i + 1))
        return (next_B, caches), token_B

    (_, _), tokens_NB = jax.lax.scan(step, (first, caches), jnp.arange(max_new_tokens))
    return tokens_NB.T
