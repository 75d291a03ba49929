"""The version of the distribution (igpt and igpt_kernels), written here and nowhere else:
``pyproject.toml`` reads it at build time (``[tool.setuptools.dynamic]``), ``igpt.__version__``
and ``igpt_kernels.__version__`` at import. A module of its own, so that modules inside the
package can read it without importing the package (which imports them)."""

VERSION = "0.1.0"
