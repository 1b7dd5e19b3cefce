"""How much of HellaSwag's continuation tokens the scoring pads away: each ending (lm-eval's
own ``process_docs``, target delimiter " ") is tokenised and rounded up to its width
bucket (``scoring.continuation_bucket``), as the batch planner does before batching.

    python logs/lm_eval/padding.py [--docs 200]   # from the repo root, after a first eval
"""

from __future__ import annotations

import argparse

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs

from yoro_jax.eval.scoring import continuation_bucket
from yoro_jax.eval.standard import fetch_standard_data
from yoro_jax.models import load_model, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200)
    args = parser.parse_args()
    path = fetch_standard_data() / "hellaswag" / "validation.jsonl"
    docs = process_docs(datasets.load_dataset("json", data_files=str(path), split="train"))
    tokenizer = load_model(model_dir("smollm2")).tokenizer
    real = padded = 0
    for doc in docs.select(range(args.docs)):
        for ending in doc["choices"]:
            n = len(tokenizer(" " + ending)["input_ids"])
            real, padded = real + n, padded + continuation_bucket(n)
    print(f"{args.docs} documents: {real} ending tokens, {padded} after bucketing")
    print(f"result: padding_share={1 - real / padded:.3f}")


if __name__ == "__main__":
    main()
