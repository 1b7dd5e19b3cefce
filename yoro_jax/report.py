"""Plain-text reporting shared by the CLIs and benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table; floats with two decimals unless already formatted."""

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def timed_in_turn(
    runs: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Best wall seconds of each run over ``repeats`` rounds after a warm-up (compile) round,
    and each run's last output. The runs alternate within a round, so a drift in machine
    load hits all of them alike: side-by-side ratios stay honest on a noisy machine."""
    best = dict.fromkeys(runs, float("inf"))
    outputs: dict[str, Any] = {}
    for repeat in range(repeats + 1):
        for label, run in runs.items():
            start = time.perf_counter()
            outputs[label] = run()
            if repeat:
                best[label] = min(best[label], time.perf_counter() - start)
    return best, outputs
