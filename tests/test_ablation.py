"""The ablation driver and the held-out evaluation CLI, on the shared smoke run."""

from __future__ import annotations

import json

from conftest import SHARED_DATA, SMOKE

from train import ablation
from train import evaluate as evaluate_cli


def test_ablation_trains_each_variant_on_one_teacher_run(smoke_run, tmp_path, capsys):
    run_dir, _ = smoke_run
    out = tmp_path / "ablation"
    code = ablation.main(
        [
            "--config",
            str(SMOKE),
            "--teacher-from",
            str(run_dir),
            "--out",
            str(out),
            "--steps",
            "4",
            "--variants",
            "all levers",  # one variant: the driver is the same for every one
        ]
    )
    assert code == 0
    results = json.loads((out / "ablation.json").read_text())
    assert [r["name"] for r in results] == ["all levers"]
    for r in results:
        assert r["final"]["step"] == 4 and r["final"]["tokens_seen"] > 0
        assert {f"top1_at_{j}" for j in range(1, 9)} <= set(r["final"])
        assert 0 <= r["repetition"]["yoro"]["repeated_4gram_share"] <= 1
    import yaml

    saved = yaml.safe_load((out / "all-levers" / "config.yaml").read_text())
    assert saved["yoro"]["prompt_context"] == "exact" and saved["loss"]["hidden_weight"] == 1.0
    assert (out / "all-levers" / "teacher").is_symlink()  # shared, not copied
    assert (out / "agreement.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| all levers |" in printed and printed.strip().splitlines()[-1].startswith("result: ")


def test_evaluate_cli_reports_agreement_by_position_and_repetition(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    out = tmp_path / "eval.json"
    prompts = SHARED_DATA / "self_instruct_user_oriented.jsonl"
    code = evaluate_cli.main(
        [
            "--run",
            str(run_dir),
            "--prompts",
            str(prompts),
            "--format",
            "self-instruct",
            "--limit",
            "6",
            "--generations",
            "4",
            "--samples",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 6 and result["generated"] == 4
    after = result["metrics"]["after (export)"]
    assert after["top1_at_1"] >= 0 and "kl" in after and "ce" in after
    assert set(result["repetition"]) == {
        "full",
        "before (initial nets)",
        "after (export)",
        "after (best)",
    }


def test_splits_driver_reports_agreement_and_speed_per_split(tmp_path, capsys):
    from train import splits

    out = tmp_path / "splits"
    code = splits.main(
        [
            "--config",
            str(SMOKE),
            "--splits",
            "1,1,1",
            "2,1,1",
            "--prompts",
            "40",
            "--steps",
            "2",
            "--new-tokens",
            "8",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "splits.json").read_text())
    assert [r["split"] for r in results] == [[1, 1, 1], [2, 1, 1]]
    assert [r["layers_per_token"] for r in results] == [3, 4]
    assert all(r["speedup"] > 0 and 0 <= r["val"]["top1"] <= 1 for r in results)
    assert (out / "splits.png").stat().st_size > 1000
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("result: E1C1Lc1_top1=")
