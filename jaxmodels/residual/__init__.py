"""Residual kinds. Importing this package registers every built-in kind."""

from jaxmodels.residual import (
    attn_res,  # noqa: F401
    hyper_connections,  # noqa: F401
    mhc,  # noqa: F401
    prenorm,  # noqa: F401
)
