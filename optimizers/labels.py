"""Which parameters get Muon, and how each Muon leaf is viewed as a batch of matrices.

Works on any pytree from its key paths and leaf shapes (no Flax import). The default rules
follow the naming conventions of this library's Linen models:

* dense kernels are leaves named ``kernel``; embeddings ``embedding`` (module ``embed``); norm
  gains ``scale``; biases ``bias``; the output head module is ``lm_head``;
* hyper-connection / mHC parameters live under modules whose name contains ``hc`` or
  ``residual``;
* ``nn.scan`` over layers puts every leaf under a module named ``layers`` and gives it a
  leading stacked axis [L, ...];
* per-head attention kernels are 3-D: q/k/v projections [D, N, H] (in, heads, head_dim), the
  output projection [N, H, D]; MLA ``q_b_proj`` [C_q, N, H_nope+R], ``kv_b_proj``
  [C, N, H_nope+H_v], ``o_proj`` [N, H_v, D];
* expert stacks [E, in, out] live under a module whose name contains ``expert``.

What gets AdamW (KellerJordan/Muon README; Moonlight arXiv 2502.16982; DeepSeek-V4 §2.4):
embeddings, the output head, norm gains, biases, gates and other 1-D tensors, mHC/HC
parameters, depthwise convolution filters (modules whose name contains ``conv``), and any
tensor whose layout the rules do not understand (with a warning). Every other matrix gets Muon.

`MuonDimensionNumbers` says which axes of a leaf are the matrix's input (reduction) axes and
output axes; every other axis is a batch axis (one independent matrix per index), like
optax.contrib's `MuonDimensionNumbers`. Leading stacked axes (``layers``, experts) are batch
axes. Attention per-head kernels are orthogonalised as one fused [D, N·H] matrix by default
(as Moonlight does) or one [D, H] matrix per head with ``per_head=True`` (Kimi K3 / GLM-5
practice).
"""

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax

MUON = "muon"
ADAM = "adam"

Path = tuple[str, ...]
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MuonDimensionNumbers:
    """Axes of a leaf that form the matrix x·W = y that Muon orthogonalises.

    Attributes:
      reduction_axes: axes contracted with the input (fan-in); flattened in this order.
      output_axes: axes of the output (fan-out); flattened in this order.
    All remaining axes are batch axes: one matrix per index, orthogonalised independently.
    """

    reduction_axes: tuple[int, ...] = (0,)
    output_axes: tuple[int, ...] = (1,)

    def __post_init__(self):
        for name in ("reduction_axes", "output_axes"):
            value = getattr(self, name)
            if isinstance(value, int):
                object.__setattr__(self, name, (value,))
            elif not value:
                raise ValueError(f"MuonDimensionNumbers.{name} must not be empty")

    def resolve(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(batch, reduction, output) axes as non-negative ints for a leaf of rank `ndim`."""
        try:
            red = tuple(range(ndim)[a] for a in self.reduction_axes)
            out = tuple(range(ndim)[a] for a in self.output_axes)
        except IndexError:
            raise ValueError(f"{self} does not fit a leaf of rank {ndim}") from None
        if len(set(red + out)) != len(red) + len(out):
            raise ValueError(f"{self}: reduction and output axes overlap (rank {ndim})")
        batch = tuple(a for a in range(ndim) if a not in red + out)
        return batch, red, out

    def matrix_shape(self, shape: Shape) -> tuple[int, int, int]:
        """(number of matrices, fan_in, fan_out) of a leaf of this shape."""
        batch, red, out = self.resolve(len(shape))
        return (
            math.prod(shape[a] for a in batch),
            math.prod(shape[a] for a in red),
            math.prod(shape[a] for a in out),
        )


def as_dimension_numbers(spec: Any) -> MuonDimensionNumbers | None:
    """Converts ours, optax.contrib's (reduction_axis, output_axis) or None to ours."""
    if spec is None or isinstance(spec, MuonDimensionNumbers):
        return spec
    if hasattr(spec, "reduction_axis") and hasattr(spec, "output_axis"):
        red, out = spec.reduction_axis, spec.output_axis
        return MuonDimensionNumbers(
            (red,) if isinstance(red, int) else tuple(red),
            (out,) if isinstance(out, int) else tuple(out),
        )
    raise TypeError(f"expected MuonDimensionNumbers or None, got {type(spec).__name__}: {spec!r}")


@dataclasses.dataclass(frozen=True)
class MuonRules:
    """Name rules that route leaves and lay them out as matrices (see the module docstring).

    Attributes:
      per_head: orthogonalise attention per-head kernels per head ([D, H] / [H, D] matrices)
        instead of as one fused [D, N·H] / [N·H, D] matrix.
      adam_leaf_names: leaf names always given to AdamW (norm gains, biases, embeddings).
      adam_module_names: module names (exact) whose whole subtree gets AdamW.
      adam_module_substrings: a module whose name contains one of these gets AdamW (HC/mHC,
        and depthwise short convolutions such as KDA's ``q_conv1d``: one filter per channel,
        not a matrix).
      stack_module_names: modules that stack their subtree on a leading axis (``nn.scan``);
        each occurrence in a path adds one leading batch axis.
      expert_module_substrings: a module whose name contains one of these holds expert stacks:
        a leaf with one axis more than a matrix has a leading expert (batch) axis.
      in_proj_names: modules whose 3-D kernel is [in, heads, head_dim].
      out_proj_names: modules whose 3-D kernel is [heads, head_dim, out].
      min_matrix_dim: matrices with a side smaller than this get AdamW.
      overrides: (regex, label) pairs tried first, in order, against the '/'-joined path;
        the first `re.search` match decides the label (``"muon"`` or ``"adam"``).
    """

    per_head: bool = False
    adam_leaf_names: tuple[str, ...] = ("embedding", "scale", "bias")
    adam_module_names: tuple[str, ...] = ("embed", "lm_head")
    adam_module_substrings: tuple[str, ...] = ("hc", "residual", "conv")
    stack_module_names: tuple[str, ...] = ("layers",)
    expert_module_substrings: tuple[str, ...] = ("expert",)
    in_proj_names: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "q_b_proj",
        "kv_b_proj",
        "query",
        "key",
        "value",
        "wq",
        "wk",
        "wv",
    )
    out_proj_names: tuple[str, ...] = ("o_proj", "out_proj", "out", "wo")
    min_matrix_dim: int = 2
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for pattern, label in self.overrides:
            if label not in (MUON, ADAM):
                raise ValueError(
                    f"override {pattern!r}: label must be 'muon' or 'adam', got {label!r}"
                )
            re.compile(pattern)


DEFAULT_RULES = MuonRules()


def path_names(path: Sequence[Any]) -> Path:
    """A jax key path (DictKey, GetAttrKey, SequenceKey, ...) as a tuple of strings."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def format_path(path: Path) -> str:
    return "/".join(path) if path else "<root>"


def _num_stack_axes(modules: Path, rules: MuonRules) -> int:
    """Leading stacked axes: one per stack module, unless it is a list ("layers/0/...")."""
    return sum(
        m in rules.stack_module_names and not (i + 1 < len(modules) and modules[i + 1].isdigit())
        for i, m in enumerate(modules)
    )


def leaf_dimension_numbers(
    path: Path, shape: Shape, rules: MuonRules = DEFAULT_RULES
) -> MuonDimensionNumbers | None:
    """The matrix layout of one leaf from its path and shape, or None if not understood.

    Leading stacked axes (one per ``layers`` module in the path) and a leading expert axis
    are batch axes. The remaining core must be 2-D [in, out], or a 3-D attention kernel of a
    known in-projection ([in, N, H]) or out-projection ([N, H, out]) module.
    Returns None for leaves of rank < 2 and for layouts the rules do not know.
    """
    modules = path[:-1]
    lead = _num_stack_axes(modules, rules)
    core = len(shape) - lead
    if core >= 3 and any(s in m for m in modules for s in rules.expert_module_substrings):
        lead, core = lead + 1, core - 1
    if core == 2:
        return MuonDimensionNumbers((lead,), (lead + 1,))
    if core == 3 and modules:
        module = modules[-1]
        if module in rules.in_proj_names:  # [in, N, H]
            if rules.per_head:
                return MuonDimensionNumbers((lead,), (lead + 2,))
            return MuonDimensionNumbers((lead,), (lead + 1, lead + 2))
        if module in rules.out_proj_names:  # [N, H, out]
            if rules.per_head:
                return MuonDimensionNumbers((lead + 1,), (lead + 2,))
            return MuonDimensionNumbers((lead, lead + 1), (lead + 2,))
    return None


def leaf_label(path: Path, shape: Shape, rules: MuonRules = DEFAULT_RULES) -> str:
    """``"muon"`` or ``"adam"`` for one leaf (see the module docstring for the rules)."""
    joined = format_path(path)
    for pattern, label in rules.overrides:
        if re.search(pattern, joined):
            return label
    if not path:
        return ADAM if len(shape) < 2 else MUON
    leaf, modules = path[-1], path[:-1]
    if leaf in rules.adam_leaf_names:
        return ADAM
    if any(m in rules.adam_module_names for m in modules):
        return ADAM
    if any(s in m for m in modules for s in rules.adam_module_substrings):
        return ADAM
    dims = leaf_dimension_numbers(path, shape, rules)
    if dims is None:
        if len(shape) - _num_stack_axes(modules, rules) >= 2:
            warnings.warn(
                f"muon labels: no matrix layout known for {joined} with shape {tuple(shape)}; "
                "it gets AdamW. Add an override or dimension numbers to give it Muon.",
                stacklevel=2,
            )
        return ADAM
    _, fan_in, fan_out = dims.matrix_shape(tuple(shape))
    if min(fan_in, fan_out) < rules.min_matrix_dim:
        return ADAM
    return MUON


def muon_labels(params: Any, rules: MuonRules = DEFAULT_RULES) -> Any:
    """Label tree (``"muon"``/``"adam"`` per leaf) for `optax.partition`; any pytree of arrays."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: leaf_label(path_names(p), tuple(x.shape), rules), params
    )


def muon_dimension_numbers(params: Any, rules: MuonRules = DEFAULT_RULES) -> Any:
    """Tree of `MuonDimensionNumbers` (None where the layout is unknown), one per leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: leaf_dimension_numbers(path_names(p), tuple(x.shape), rules), params
    )


DimensionNumbersSpec = (
    Callable[[Path, Shape], MuonDimensionNumbers | None] | Any  # or a pytree of them
)


def dimension_numbers_lookup(
    spec: DimensionNumbersSpec | None, rules: MuonRules = DEFAULT_RULES
) -> Callable[[Path, Shape], MuonDimensionNumbers | None]:
    """Normalises a dimension-numbers spec to a function (path, shape) -> dims or None.

    `spec` is None (the name rules), a function of (path, shape), or a pytree shaped like the
    params whose leaves are `MuonDimensionNumbers` / optax.contrib's / None (looked up by path,
    so it also applies to the masked trees that `optax.partition` hands its inner transforms).
    """
    if spec is None:
        return lambda path, shape: leaf_dimension_numbers(path, shape, rules)
    if callable(spec) and not isinstance(spec, MuonDimensionNumbers):
        return lambda path, shape: as_dimension_numbers(spec(path, shape))
    if isinstance(spec, MuonDimensionNumbers):
        return lambda path, shape: spec
    leaves = jax.tree_util.tree_flatten_with_path(
        spec,
        is_leaf=lambda x: (
            x is None
            or isinstance(x, MuonDimensionNumbers)
            or (hasattr(x, "reduction_axis") and hasattr(x, "output_axis"))
        ),
    )[0]
    table = {path_names(p): as_dimension_numbers(v) for p, v in leaves}

    def lookup(path, shape):
        del shape
        return table.get(path)

    return lookup
