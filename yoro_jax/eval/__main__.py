"""``python -m yoro_jax.eval``: lm-eval's own CLI with the ``yoro-jax`` backend registered.

Takes every ``lm_eval run`` flag. Defaults: ``--model yoro-jax``, and the offline tasks
(``yoro_mc``, ``yoro_qa``, ``yoro_text``, group ``yoro_offline``) on the include path
beside any ``--include_path`` given::

    python -m yoro_jax.eval --model_args model=smollm2 --tasks yoro_offline
    python -m yoro_jax.eval --model_args yoro=runs/smollm2-cpu,mode=yoro --tasks yoro_mc \
        --output_path results --log_samples
"""

from __future__ import annotations

import sys

from yoro_jax.eval import TASKS_DIR, enable_compilation_cache

DEFAULT_BATCH_SIZE = 8


def _batch_size_flag(argv: list[str]) -> list[str]:
    """lm-eval passes ``--batch_size`` (default 1) to the backend beside ``--model_args``, so
    a ``batch_size=`` inside the model args would clash: move it to the flag; default 8."""
    if "--batch_size" in argv or "-b" in argv:
        return argv
    size = str(DEFAULT_BATCH_SIZE)
    if "--model_args" in argv and argv.index("--model_args") + 1 < len(argv):
        at = argv.index("--model_args") + 1
        kept = []
        for item in argv[at].split(","):
            key, _, value = item.partition("=")
            if key.strip() == "batch_size":
                size = value.strip()
            else:
                kept.append(item)
        argv[at] = ",".join(kept)
    return [*argv, "--batch_size", size]


def main(argv: list[str] | None = None) -> int:
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from yoro_jax.eval.lm import ModelArgsError  # (importing registers the backend)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        argv = ["run", "--help"]
    elif not argv or argv[0] != "run":
        argv.insert(0, "run")
    if "--model" not in argv:
        argv[1:1] = ["--model", "yoro-jax"]
    argv = _batch_size_flag(argv)
    setup_logging()
    enable_compilation_cache()
    cli = HarnessCLI()
    args = cli._parser.parse_args(argv)
    if hasattr(args, "include_path"):
        given = args.include_path
        args.include_path = [str(TASKS_DIR), given] if given else str(TASKS_DIR)
    try:
        cli.execute(args)
    except ModelArgsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
