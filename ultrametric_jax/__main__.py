"""`python -m ultrametric_jax ...`: the `ultrametric` command where no console script is on PATH
(subprocesses of sweeps, machines with a bare PYTHONPATH)."""
import sys

from ultrametric_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
