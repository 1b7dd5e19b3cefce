"""Held-out top-1 against training tokens seen, default variant (E2 C2 Lc2, "exact"), at
three data sizes: the splits run (320 prompts), the ablation's "all levers" (the main
job's 768 prompts), the long config (2,000 prompts). Each run is scored on its own seeded
held-out prompts (32, 32, 64), so read the curves' shapes, not 0.01 differences.

    python logs/plot_data_scaling.py      # -> docs/img/data_scaling.png
"""

import json
from pathlib import Path

from train.ablation import plot

LOGS = Path(__file__).parent


def val_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r["split"] == "val"]


ablation = {r["name"]: r for r in json.loads((LOGS / "ablation.json").read_text())}
runs = [
    {
        "name": "320 prompts (splits run)",
        "curve": val_rows(LOGS / "splits-metrics/E2-C2-Lc2.jsonl"),
    },
    {"name": "768 prompts (ablation, all levers)", "curve": ablation["all levers"]["curve"]},
    {"name": "2,000 prompts (long config)", "curve": val_rows(LOGS / "long-run-metrics.jsonl")},
]
plot(runs, LOGS.parent / "docs" / "img" / "data_scaling.png")
