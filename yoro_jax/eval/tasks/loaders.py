"""Datasets of the offline tasks: local JSON-lines files read with ``datasets``' json builder.

lm-eval resolves ``!function loaders.NAME`` relative to the YAML files, and these loaders
resolve the data relative to themselves, so the tasks work from any working directory
with no hub access.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"


def _local(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(DATA_DIR / f"{name}.jsonl")})


def yoro_mc(**_: Any) -> datasets.DatasetDict:
    return _local("yoro_mc")


def yoro_qa(**_: Any) -> datasets.DatasetDict:
    return _local("yoro_qa")


def yoro_text(**_: Any) -> datasets.DatasetDict:
    return _local("yoro_text")
