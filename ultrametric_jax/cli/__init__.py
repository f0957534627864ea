"""The `ultrametric` command line: thin commands over ultrametric_jax.run."""
from ultrametric_jax.cli.main import main

__all__ = ["main"]
