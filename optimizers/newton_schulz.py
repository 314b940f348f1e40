"""Newton–Schulz orthogonalisation with coefficient schedules (pure JAX, no Flax).

Muon replaces an update matrix G = U·S·Vᵀ by (approximately) its polar factor U·Vᵀ. The
Newton–Schulz iteration gets there with matmuls only: after Frobenius pre-normalisation
(which puts every singular value in [0, 1]) each step applies the odd quintic

    X ← a·X + b·(X·Xᵀ)·X + c·(X·Xᵀ)²·X,

which maps every singular value s to f(s) = a·s + b·s³ + c·s⁵ and keeps the singular vectors.
A schedule is the list of (a, b, c) used at each step.

Schedules (see `reference/optimizers_and_residuals.md` §1.2, §4.2, §5):

* ``"standard"``: Keller Jordan's quintic (3.4445, -4.7750, 2.0315), 5 steps by default
  (KellerJordan/Muon `muon.py`, `zeropower_via_newtonschulz5`; Moonlight arXiv 2502.16982 Eq. 2).
  Not convergent: singular values land in about [0.68, 1.13] for inputs in [0.01, 1].
* ``"polar_express"``: per-step minimax coefficients of Amsel, Persson, Musco, Gower,
  "The Polar Express" (arXiv 2505.16932, Algorithm 1: degree 5, lower bound 1e-3), every triple
  but the last divided by the safety factor 1.01 (a/1.01, b/1.01³, c/1.01⁵). 5 steps by default;
  step 8 onwards repeats the last triple (1.875, -1.25, 0.375).
* ``"deepseek_v4"``: DeepSeek-V4's hybrid (Eq. 28): 8 standard steps "to drive rapid
  convergence", then 2 steps of (2, -1.5, 0.5), which has f(1) = 1 and f'(1) = 0.
* ``"dion"``: You Jiacheng's 5 per-step triples, as shipped by optax (`_DION_NS_COEFFS`).
* an explicit sequence of (a, b, c) triples, one per step.
"""

import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Coeffs = tuple[float, float, float]

STANDARD: Coeffs = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic: maximal slope at zero (f'(0) = 3.4445), f(1) = 0.701."""

STABILISING: Coeffs = (2.0, -1.5, 0.5)
"""DeepSeek-V4's last two steps: f(1) = 1, f'(1) = 0 (singular values settle at 1)."""

# Polar Express, arXiv 2505.16932 Algorithm 1 (degree 5, l = 1e-3), before the safety factor.
_POLAR_EXPRESS_RAW: tuple[Coeffs, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS: tuple[Coeffs, ...] = tuple(
    (a / _POLAR_EXPRESS_SAFETY, b / _POLAR_EXPRESS_SAFETY**3, c / _POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)
"""Polar Express per-step triples with the paper's 1.01 safety factor (last triple exact)."""

DION: tuple[Coeffs, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
"""You Jiacheng's 5-step schedule (optax preset ``'dion'``)."""

SCHEDULES = ("standard", "polar_express", "deepseek_v4", "dion")
_DEFAULT_STEPS = {"standard": 5, "polar_express": 5, "deepseek_v4": 10, "dion": 5}


def ns_schedule(
    coeffs: str | Sequence[Sequence[float]] = "standard", steps: int | None = None
) -> tuple[Coeffs, ...]:
    """Resolves a schedule name (or explicit triples) to one (a, b, c) triple per step.

    Args:
      coeffs: a name in `SCHEDULES`, one triple (repeated `steps` times, default 5) or a
        sequence of triples (one per step).
      steps: number of steps; None takes the schedule's default (standard 5, polar_express 5,
        deepseek_v4 10, dion 5). For ``"deepseek_v4"``, `steps` counts all steps and the last
        two are the stabilising ones (steps=10 is the paper's 8 + 2). For ``"polar_express"``
        steps past the 8th repeat the last triple. For an explicit sequence, `steps` must be
        None or its length.

    Returns:
      A tuple of Python-float triples.
    """
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
            raise TypeError(
                f"steps must be a Python int (a static value), got {type(steps).__name__}. "
                "Under optax.inject_hyperparams pass it through static_args=('ns_steps',)."
            )
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(coeffs, str):
        if coeffs not in SCHEDULES:
            raise ValueError(
                f"unknown Newton-Schulz schedule {coeffs!r}; expected one of {SCHEDULES}"
            )
        n = _DEFAULT_STEPS[coeffs] if steps is None else steps
        if coeffs == "standard":
            return (STANDARD,) * n
        if coeffs == "polar_express":
            return POLAR_EXPRESS[:n] + (POLAR_EXPRESS[-1],) * max(0, n - len(POLAR_EXPRESS))
        if coeffs == "dion":
            if n != len(DION):
                raise ValueError(f"the 'dion' schedule has exactly {len(DION)} steps, got {n}")
            return DION
        if n < 2:
            raise ValueError(f"'deepseek_v4' needs steps >= 2 (2 stabilising steps), got {n}")
        return (STANDARD,) * (n - 2) + (STABILISING,) * 2
    triples = np.asarray(coeffs, dtype=np.float64)
    if triples.shape == (3,):
        return (tuple(float(v) for v in triples),) * (5 if steps is None else steps)
    if triples.ndim != 2 or triples.shape[1] != 3 or triples.shape[0] < 1:
        raise ValueError(
            f"coeffs must be a schedule name, one (a, b, c) triple or a sequence of triples; "
            f"got an array of shape {triples.shape}"
        )
    if steps is not None and steps != triples.shape[0]:
        raise ValueError(
            f"steps={steps} but {triples.shape[0]} coefficient triples were given; "
            "pass steps=None with an explicit per-step schedule"
        )
    return tuple(tuple(float(v) for v in row) for row in triples)


Implementation = Literal["auto", "batched", "map"]


def newton_schulz(
    x: jax.Array,
    *,
    coeffs: str | Sequence[Sequence[float]] = "standard",
    steps: int | None = None,
    compute_dtype: jnp.dtype | str | None = None,
    eps: float = 1e-7,
    precision: jax.lax.PrecisionLike = None,
    implementation: Implementation = "auto",
) -> jax.Array:
    """Approximate polar factor U·Vᵀ of each matrix in `x` by Newton–Schulz iteration.

    Follows Keller Jordan's `zeropower_via_newtonschulz5` (KellerJordan/Muon `muon.py`) and
    Moonlight (arXiv 2502.16982 Eq. 2): Frobenius pre-normalisation X₀ = G/(‖G‖_F + eps), the
    quintic step of the schedule, and a transpose so that the Gram matrix X·Xᵀ is the small side.

    Args:
      x: [..., m, n]; leading axes are batch axes (each matrix is treated independently).
      coeffs: schedule name or explicit triples (see `ns_schedule`).
      steps: number of steps (see `ns_schedule`).
      compute_dtype: dtype of the matmul operands (e.g. jnp.bfloat16 as in [KJ]/[ML], or
        jnp.float32). None uses the input dtype. The normalisation and the polynomial's
        scalar arithmetic are always done in at least float32 (matmuls accumulate in float32),
        so the coefficients are never rounded to bf16.
      eps: added to the Frobenius norm (1e-7 in [KJ]/[ML], 1e-8 in optax). A zero matrix maps
        to zero.
      precision: passed to the matmuls (None: JAX's default for the backend).
      implementation: how leading batch axes are run (same maths either way):
        "batched": batched matmuls over all matrices at once (fast on GPU/TPU);
        "map": `lax.map` of the 2-D iteration over the matrices (XLA:CPU's 2-D matmul is
        much faster than its batched one); "auto": "map" on CPU, "batched" elsewhere.

    Returns:
      [..., m, n] in the dtype of `x`. Singular values of matrix i are f_k∘…∘f_1(s/‖s‖₂), the
      schedule's polynomials composed on the normalised input singular values.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz expects [..., m, n] matrices, got shape {x.shape}")
    if implementation not in ("auto", "batched", "map"):
        raise ValueError(f"implementation={implementation!r}; expected 'auto', 'batched' or 'map'")
    if implementation == "auto":
        implementation = "map" if jax.default_backend() == "cpu" else "batched"
    schedule = ns_schedule(coeffs, steps)
    out_dtype = x.dtype
    cdtype = jnp.dtype(out_dtype if compute_dtype is None else compute_dtype)
    acc_dtype = jnp.promote_types(cdtype, jnp.float32)
    table = jnp.asarray(schedule, dtype=acc_dtype)  # [steps, 3]

    def mm(a, b):  # [..., i, j] @ [..., j, k] with float32 accumulation
        return jnp.matmul(a, b, precision=precision, preferred_element_type=acc_dtype)

    def step(x_c, abc):
        a, b, c = abc[0], abc[1], abc[2]
        gram = mm(x_c, jnp.swapaxes(x_c, -1, -2))  # [..., m, m], m the small side
        gram_c = gram.astype(cdtype)
        poly = b * gram + c * mm(gram_c, gram_c)
        x_new = a * x_c.astype(acc_dtype) + mm(poly.astype(cdtype), x_c)
        return x_new.astype(cdtype), None

    def iterate(g):  # [..., m, n] with m <= n
        g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
        norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=(-2, -1), keepdims=True))
        g = (g / (norm + eps)).astype(cdtype)
        g, _ = jax.lax.scan(step, g, table)
        return g.astype(out_dtype)

    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = jnp.swapaxes(x, -1, -2)
    count = math.prod(x.shape[:-2])
    if count == 1:
        out = iterate(x.reshape(x.shape[-2:])).reshape(x.shape)
    elif implementation == "map":
        out = jax.lax.map(iterate, x.reshape(count, *x.shape[-2:])).reshape(x.shape)
    else:
        out = iterate(x)
    if transposed:
        out = jnp.swapaxes(out, -1, -2)
    return out


def polar_factor(x: jax.Array) -> jax.Array:
    """Exact polar factor U·Vᵀ by SVD (reference for tests; [..., m, n] → [..., m, n])."""
    u, _, vt = jnp.linalg.svd(x, full_matrices=False)
    return jnp.matmul(u, vt, precision=jax.lax.Precision.HIGHEST)
