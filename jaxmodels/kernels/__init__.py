"""Pallas kernels (TPU / Mosaic lowering) for ops whose pure-JAX form lives in `jaxmodels/ops`.

Each kernel is the fast form of an op and is selected by that op's `implementation=` argument;
the pure-JAX form stays the reference and the default. Every kernel also runs in Pallas
interpret mode (`interpret=True`) on any backend, which is how the CPU tests check it.

Modules (import them by path; this package imports nothing, so that Pallas loads only when
a kernel is used):

* `jaxmodels.kernels.mla_decode`: MLA absorbed decode over the latent cache (flash-decoding
  with an online softmax), the fast form of `jaxmodels.ops.mla.absorbed_decode_attention`.
"""
