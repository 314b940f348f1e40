"""Attention kinds. Importing this package registers every built-in kind."""

from jaxmodels.attention import (
    gqa,  # noqa: F401
    mla,  # noqa: F401
)
