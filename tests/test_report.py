"""The reporting helpers the benchmarks share."""

from yoro_jax.report import markdown_table, timed_in_turn


def test_timed_in_turn_alternates_runs_and_skips_the_warm_up_round():
    calls = []
    runs = {"a": lambda: calls.append("a") or len(calls), "b": lambda: calls.append("b") or -1}
    best, outputs = timed_in_turn(runs, repeats=2)
    assert calls == ["a", "b"] * 3  # one warm-up round, then two timed rounds, in turn
    assert outputs == {"a": 5, "b": -1}  # each run's last output
    assert set(best) == {"a", "b"} and all(0 <= t < 1 for t in best.values())


def test_markdown_table_formats_floats_with_two_decimals():
    assert markdown_table(["x", "y"], [[1.234, "s"]]) == "| x | y |\n|---|---|\n| 1.23 | s |"
