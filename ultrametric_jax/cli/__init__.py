"""The `ultrametric` command line: thin commands over ultrametric_jax.run."""
from ultrametric_jax.cli.app import main

__all__ = ["main"]
