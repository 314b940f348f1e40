"""Residual kinds. Importing this package registers every built-in kind."""

from jaxmodels.residual import prenorm  # noqa: F401
