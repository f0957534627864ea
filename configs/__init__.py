"""The experiment configs (`get_config()` files), shipped in the wheel as
`ultrametric_jax.configs` and named on the command line by file name: `--config tiny_random`."""
