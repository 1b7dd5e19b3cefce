"""Plain-text reporting shared by the CLIs and benchmark scripts."""

from __future__ import annotations

from typing import Any


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table; floats with two decimals unless already formatted."""

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
