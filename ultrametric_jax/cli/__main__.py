import sys

from ultrametric_jax.cli.main import main

sys.exit(main())
