"""Muon as an optax `GradientTransformation` (any pytree; no Flax).

For a hidden weight W with gradient G (Keller Jordan, KellerJordan/Muon `muon.py`; Moonlight,
arXiv 2502.16982 §2; Kimi K2 arXiv 2507.20534 uses the same Muon plus QK-Clip):

    momentum   m ← β·m + (1-β)·G      ("ema", [KJ])   or   m ← β·m + G   ("sum", [ML] Eq. 1)
    direction  u = β·m + (1-β)·G  /  u = β·m + G   with Nesterov, else u = m
    orthogonal O = NS(u)            Newton–Schulz, see `newton_schulz.py`
    scaling    s = sqrt(max(1, fan_out/fan_in))  ("shape", [KJ] in optax's (in, out) layout)
               s = target_rms·sqrt(max(fan_in, fan_out))  ("rms_match", [ML] Eq. 4, target 0.2)
    step       W ← W·(1 - η·λ) - η·s·O          (decoupled weight decay with the unadjusted η)

The two momentum forms give directions that differ only by the factor (1-β), which the
Frobenius normalisation inside NS removes. ``bias_correction=True`` reproduces optax.contrib's
Adam-style bias correction of the Nesterov direction (for parity; it changes early steps).

Speed: same-shape matrices from all leaves (and from every layer of a stacked leaf) are
oriented wide (rows <= cols, so [D, F] and [F, D] share a stack), concatenated and run through
one batched Newton–Schulz call instead of one small matmul chain per leaf.

NaN/Inf gradients: they are not filtered. A non-finite gradient entry makes its matrix's update
NaN (the Frobenius normalisation spreads it over that matrix) and stays in that leaf's momentum;
other matrices -- including other layers of the same stacked leaf -- are unaffected. Wrap the
optimizer in `optax.apply_if_finite` to skip such steps instead.
"""

import dataclasses
import functools
import math
import operator
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optimizers.labels import (
    DEFAULT_RULES,
    MuonDimensionNumbers,
    MuonRules,
    dimension_numbers_lookup,
    format_path,
    muon_labels,
    path_names,
)
from optimizers.newton_schulz import Implementation, newton_schulz, ns_schedule

Scaling = Literal["rms_match", "shape", "none"]
Momentum = Literal["ema", "sum"]


class MuonState(NamedTuple):
    """State of `scale_by_muon`: step count (int32 []) and the momentum tree."""

    count: jax.Array
    mu: optax.Updates


def _static_steps(ns_steps: Any) -> int | None:
    if ns_steps is None:
        return None
    try:
        return operator.index(ns_steps)
    except Exception:  # a tracer (inject_hyperparams under jit) or a float
        raise TypeError(
            f"ns_steps must be a static Python int, got {ns_steps!r}. Under "
            "optax.inject_hyperparams pass static_args=('ns_steps',)."
        ) from None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {choices}")


def update_scale(fan_in: int, fan_out: int, scaling: Scaling, target_rms: Any = 0.2) -> Any:
    """Multiplier of the orthogonalised update of one fan_in x fan_out matrix.

    "shape": sqrt(max(1, fan_out/fan_in)) ([KJ]; optax's default width scaling).
    "rms_match": target_rms·sqrt(max(fan_in, fan_out)) ([ML] Eq. 4): an exact polar factor of
    a full-rank matrix has RMS 1/sqrt(max(fan_in, fan_out)) ([ML] Lemma 1), so the update RMS
    becomes target_rms, like AdamW's (~0.2), and AdamW's learning rate and decay carry over.
    "none": 1.
    """
    if scaling == "shape":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if scaling == "rms_match":
        return target_rms * math.sqrt(max(fan_in, fan_out))
    return 1.0


class _Matrix(NamedTuple):
    """How one leaf maps to a stack of wide matrices [count, rows <= cols]."""

    perm: tuple[int, ...]  # leaf -> batch + reduction + output axes
    stacked_shape: tuple[int, ...]  # shape after the permutation
    count: int
    fan_in: int
    fan_out: int
    transposed: bool  # fan_in > fan_out: stored as [count, fan_out, fan_in]


def _plan(path: tuple[str, ...], shape: tuple[int, ...], dims) -> _Matrix:
    """Layout of one leaf; a 2-D leaf without dimension numbers is a plain [in, out] matrix."""
    if dims is None and len(shape) == 2:
        dims = MuonDimensionNumbers((0,), (1,))
    if dims is None:
        raise ValueError(
            f"Muon got leaf {format_path(path)!r} with shape {shape}, which has no matrix "
            "layout: it is not 2-D and no dimension numbers cover it. Give it AdamW through "
            "the labels, or pass dimension_numbers (a MuonDimensionNumbers tree or a "
            "function of (path, shape)) saying which axes are the input and output."
        )
    batch, red, out = dims.resolve(len(shape))
    perm = batch + red + out
    count, fan_in, fan_out = dims.matrix_shape(shape)
    return _Matrix(
        perm=perm,
        stacked_shape=tuple(shape[a] for a in perm),
        count=count,
        fan_in=fan_in,
        fan_out=fan_out,
        transposed=fan_in > fan_out,
    )


def _to_wide(x: jax.Array, m: _Matrix) -> jax.Array:
    x = jnp.transpose(x, m.perm).reshape(m.count, m.fan_in, m.fan_out)
    return jnp.swapaxes(x, -1, -2) if m.transposed else x


def _from_wide(x: jax.Array, m: _Matrix) -> jax.Array:
    if m.transposed:
        x = jnp.swapaxes(x, -1, -2)
    inverse = tuple(sorted(range(len(m.perm)), key=lambda i: m.perm[i]))
    return jnp.transpose(x.reshape(m.stacked_shape), inverse)


def orthogonalize_leaves(
    leaves: list[jax.Array],
    plans: list[_Matrix],
    ns: Callable[[jax.Array], jax.Array],
    batch_leaves: bool = True,
) -> list[jax.Array]:
    """Applies `ns` ([B, m, n] -> [B, m, n]) to every matrix of every leaf.

    With `batch_leaves`, matrices of equal (oriented) shape and dtype from all leaves are
    concatenated into one [B, m, n] stack so each shape costs one batched call.
    """
    wide = [_to_wide(x, m) for x, m in zip(leaves, plans, strict=True)]
    out: list[jax.Array | None] = [None] * len(wide)
    if not batch_leaves:
        out = [ns(w) for w in wide]
    else:
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(wide):
            groups.setdefault((w.shape[1:], w.dtype), []).append(i)
        for members in groups.values():
            if len(members) == 1:
                out[members[0]] = ns(wide[members[0]])
                continue
            result = ns(jnp.concatenate([wide[i] for i in members], axis=0))
            start = 0
            for i in members:
                out[i] = result[start : start + wide[i].shape[0]]
                start += wide[i].shape[0]
    return [_from_wide(o, m) for o, m in zip(out, plans, strict=True)]


def scale_by_muon(
    beta: float = 0.95,
    *,
    nesterov: bool = True,
    momentum: Momentum = "ema",
    bias_correction: bool = False,
    ns_coeffs: str | tuple = "standard",
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    eps: float = 1e-7,
    scaling: Scaling = "rms_match",
    target_rms: float = 0.2,
    mu_dtype: Any = None,
    dimension_numbers: Any = None,
    per_head: bool | None = None,
    rules: MuonRules | None = None,
    batch_leaves: bool = True,
    ns_implementation: Implementation = "auto",
    precision: jax.lax.PrecisionLike = None,
) -> optax.GradientTransformation:
    """Muon's direction: momentum, Newton–Schulz orthogonalisation and update scaling.

    Every leaf it sees gets Muon (use `optax.partition` / `muon` to route others to AdamW).
    Chain it with `optax.add_decayed_weights` and `optax.scale_by_learning_rate` for the step.

    Args:
      beta: momentum coefficient μ (0.95 in [KJ], [ML], DeepSeek-V4).
      nesterov: use the Nesterov direction (default in all references).
      momentum: "ema" (m ← βm + (1-β)G, [KJ], optax) or "sum" (m ← βm + G, [ML], DeepSeek-V4).
      bias_correction: divide the EMA momentum by (1 - β^t) as optax.contrib does (Nesterov:
        β·m/(1-β^(t+1)) + (1-β)·G/(1-β^t)); only with momentum="ema".
      ns_coeffs: Newton–Schulz schedule: "standard", "polar_express", "deepseek_v4", "dion",
        one (a, b, c) triple or a sequence of per-step triples.
      ns_steps: number of Newton–Schulz steps (None: the schedule's default). Static.
      ns_dtype: matmul dtype of Newton–Schulz ("bfloat16" as in [KJ]/[ML] for speed on
        accelerators, "float32"); None uses the update's dtype. Pass a string (or add it to
        `static_args`) under `optax.inject_hyperparams`, which treats callables as schedules.
      eps: added to the Frobenius norm before Newton–Schulz (1e-7 [KJ]/[ML]; 1e-8 optax).
      scaling: "rms_match" ([ML]: target_rms·sqrt(max(fan_in, fan_out))), "shape" ([KJ]:
        sqrt(max(1, fan_out/fan_in))) or "none".
      target_rms: RMS of the update under "rms_match" (0.2 [ML]; 0.18 DeepSeek-V4).
      mu_dtype: dtype of the momentum (None: the parameter dtype).
      dimension_numbers: None (name rules of `labels.py`), a function (path, shape) ->
        MuonDimensionNumbers | None, or a pytree like the params with MuonDimensionNumbers
        (ours or optax.contrib's) or None leaves. A leaf without dimension numbers is taken
        as a plain [in, out] matrix if it is 2-D; otherwise update raises a ValueError naming
        its path and shape.
      per_head: with the default rules, orthogonalise attention kernels per head.
      rules: `MuonRules` for the default dimension numbers.
      batch_leaves: run same-shape matrices of all leaves in one Newton–Schulz call.
      ns_implementation: "batched", "map" or "auto" (see `newton_schulz`): how a stack of
        matrices is iterated; the maths is the same.
      precision: matmul precision of Newton–Schulz.

    Returns:
      A GradientTransformation with state `MuonState`.
    """
    _check_choice("momentum", momentum, ("ema", "sum"))
    _check_choice("scaling", scaling, ("rms_match", "shape", "none"))
    if bias_correction and momentum != "ema":
        raise ValueError("bias_correction=True needs momentum='ema' (as optax.contrib.muon)")
    steps = _static_steps(ns_steps)
    schedule = ns_schedule(ns_coeffs, steps)  # validates now, not at the first update
    ns_dtype = None if ns_dtype is None else jnp.dtype(ns_dtype)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    rules = rules or DEFAULT_RULES
    if per_head is not None and per_head != rules.per_head:
        rules = dataclasses.replace(rules, per_head=per_head)
    lookup = dimension_numbers_lookup(dimension_numbers, rules)

    def ns(x):
        return newton_schulz(
            x,
            coeffs=schedule,
            compute_dtype=ns_dtype,
            eps=eps,
            precision=precision,
            implementation=ns_implementation,
        )

    def init_fn(params):
        return MuonState(
            count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype)
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        g_scale = (1 - beta) if momentum == "ema" else 1.0
        mu = jax.tree.map(lambda m, g: beta * m + g_scale * g, state.mu, updates)
        if bias_correction:  # optax.contrib: bc(x, k) = x / (1 - β^k)
            t = count.astype(jnp.float32)
            c_g = 1 - beta**t
            c_mu = 1 - beta ** (t + 1) if nesterov else c_g
        else:
            c_mu = c_g = 1.0
        if nesterov:
            direction = jax.tree.map(lambda m, g: beta * m / c_mu + g_scale * g / c_g, mu, updates)
        else:
            direction = jax.tree.map(lambda m: m / c_mu, mu)

        flat, treedef = jax.tree_util.tree_flatten_with_path(direction)
        plans = []
        for key_path, x in flat:
            path, shape = path_names(key_path), tuple(x.shape)
            plans.append(_plan(path, shape, lookup(path, shape)))
        leaves = orthogonalize_leaves([x for _, x in flat], plans, ns, batch_leaves)
        grads = jax.tree.leaves(updates)
        scaled = [
            (o * update_scale(p.fan_in, p.fan_out, scaling, target_rms)).astype(g.dtype)
            for o, p, g in zip(leaves, plans, grads, strict=True)
        ]
        new_mu = jax.tree.map(lambda new, old: new.astype(old.dtype), mu, state.mu)
        return jax.tree.unflatten(treedef, scaled), MuonState(count=count, mu=new_mu)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    momentum: Momentum = "ema",
    bias_correction: bool = False,
    ns_coeffs: str | tuple = "standard",
    ns_steps: int | None = None,
    ns_dtype: Any = None,
    eps: float = 1e-7,
    scaling: Scaling = "rms_match",
    target_rms: float = 0.2,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    per_head: bool | None = None,
    rules: MuonRules | None = None,
    labels: Any = None,
    dimension_numbers: Any = None,
    batch_leaves: bool = True,
    ns_implementation: Implementation = "auto",
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.95,
    adam_eps: float = 1e-8,
    adam_weight_decay: float | None = None,
) -> optax.GradientTransformation:
    """Muon for hidden matrices + AdamW for the rest, as one optax optimizer.

    Muon leaves: ``chain(scale_by_muon, add_decayed_weights(weight_decay), scale_by_lr(η))``,
    i.e. W ← W·(1 - ηλ) - η·s·O, with the decay on the unadjusted η as in Moonlight
    (arXiv 2502.16982 Eq. 3-4 and `examples/toy_train.py`). With the default
    ``scaling="rms_match"`` the Muon update RMS is 0.2, so one learning rate and one weight
    decay serve both groups, as in Moonlight and Kimi K2. Other leaves: `optax.adamw`
    (β = (0.9, 0.95) as [KJ], [ML] and DeepSeek-V4).

    Routing uses `optax.partition` with `labels`: None (the name rules of `labels.py`:
    embeddings, head, norms, biases, 1-D and HC/mHC parameters get AdamW), a label pytree
    (``"muon"``/``"adam"``) or a function params -> label pytree.

    Args (those not of `scale_by_muon`):
      learning_rate: η, a float or an optax schedule.
      weight_decay: λ for the Muon leaves (and for AdamW unless `adam_weight_decay` is set).
      weight_decay_mask: optional mask (pytree or function of the params) for both groups.
      labels: see above.
      adam_learning_rate / adam_b1 / adam_b2 / adam_eps / adam_weight_decay: the AdamW group
        (None: the Muon learning rate and weight decay).

    Under `optax.inject_hyperparams` the numeric arguments become injectable; list callables
    that are not schedules (labels, dimension_numbers, weight_decay_mask) and ns_steps in
    `static_args`.
    """
    rules = rules or DEFAULT_RULES
    if per_head is not None and per_head != rules.per_head:
        rules = dataclasses.replace(rules, per_head=per_head)
    if labels is None:
        labels = functools.partial(muon_labels, rules=rules)

    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    if adam_weight_decay is None:
        adam_weight_decay = weight_decay
    muon_tx = optax.chain(
        scale_by_muon(
            beta,
            nesterov=nesterov,
            momentum=momentum,
            bias_correction=bias_correction,
            ns_coeffs=ns_coeffs,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            eps=eps,
            scaling=scaling,
            target_rms=target_rms,
            mu_dtype=mu_dtype,
            dimension_numbers=dimension_numbers,
            rules=rules,
            batch_leaves=batch_leaves,
            ns_implementation=ns_implementation,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    adam_tx = optax.adamw(
        adam_learning_rate,
        b1=adam_b1,
        b2=adam_b2,
        eps=adam_eps,
        weight_decay=adam_weight_decay,
        mask=weight_decay_mask,
        mu_dtype=mu_dtype,
    )
    return optax.partition({"muon": muon_tx, "adam": adam_tx}, labels)
