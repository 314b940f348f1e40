"""Attention kinds. Importing this package registers every built-in kind."""

from jaxmodels.attention import (
    dsa,  # noqa: F401
    gqa,  # noqa: F401
    kda,  # noqa: F401
    mla,  # noqa: F401
    moba,  # noqa: F401
    nsa,  # noqa: F401
    v4,  # noqa: F401
)
