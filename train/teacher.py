"""``python -m train.teacher --config C``: write a run's teacher data (the full model's
answers, top-k and frozen features; :mod:`train.teacher_data`) without training."""

from __future__ import annotations

import sys

from train.prepare import prepare_run
from yoro_jax.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train.teacher", description=__doc__)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args(argv)
    try:
        prepare_run(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
