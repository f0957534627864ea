"""What the experiments that read a trained run share: their command line (--toy, --run-dir,
and --config.KEY=VALUE overrides passed through to the config) and the run they restore (a
tiny random one built on the spot with --toy and no run)."""
from __future__ import annotations

import argparse
import tempfile


def run_parser(description: str, config, out, *, several_runs: bool = False):
    """The parser of --toy, --run-dir (repeatable with several_runs), --config and --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--toy", action="store_true",
                        help="toy sizes; without --run-dir a tiny random run is built here")
    if several_runs:
        parser.add_argument("--run-dir", action="append", default=[],
                            help="a surgery run's --workdir (repeat for several densities)")
    else:
        parser.add_argument("--run-dir", default="", help="a surgery run's --workdir")
    parser.add_argument("--config", default=str(config))
    parser.add_argument("--out", default=str(out))
    return parser


def parse_run_args(parser, argv, *, has_run):
    """(args, overrides): parser's options, and the --config.KEY=VALUE flags left over; an
    unrecognised argument, or neither a run (has_run(args)) nor --toy, is a usage error."""
    args, rest = parser.parse_known_args(argv)
    bad = [x for x in rest if not x.startswith("--config.") or "=" not in x]
    if bad:
        parser.error(f"unrecognised arguments {bad} (overrides are --config.KEY=VALUE)")
    if not args.toy and not has_run(args):
        parser.error("give --run-dir RUN (or --toy)")
    return args, rest


def restore_or_build(run_dir: str, toy: bool, prefix: str):
    """(restored run, its directory): run_dir's newest checkpoint, or with toy and no run_dir
    a tiny random run trained here; toy routers are scattered at random (two toy training
    steps leave them collapsed)."""
    from bench_model_routes import build_toy_run, checkpoints_of, perturb_routers
    from ultrametric_jax.run.pipeline import restore_run
    run_dir = run_dir or build_toy_run(tempfile.mkdtemp(prefix=prefix))
    restored = restore_run(checkpoints_of(run_dir))
    if toy:
        perturb_routers(restored.model)
    return restored, run_dir
