"""Subcommands of the `ultrametric` CLI; each module exposes `main(argv) -> int`."""
