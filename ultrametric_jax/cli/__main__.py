import sys

from ultrametric_jax.cli.app import main

sys.exit(main())
