"""`harden bench --repeat N`: the modes run N times interleaved (order rotated per round), the speed-up reported as the
median over rounds with its spread, and where the time goes (inside forwards vs the rest). No timed asserts: the
checks are on structure, determinism of the counts and the arithmetic of the summary."""

import json
import re
import statistics

import pytest
import torch
from typer.testing import CliRunner

from harden.cli import app


@pytest.mark.slow
def test_repeat_interleaves_rounds_and_reports_the_median_speedup(tmp_path):
    threads = torch.get_num_threads()
    try:
        out = CliRunner().invoke(app, ["bench", "--model", "planted", "--prompts", "1", "--seeds", "4", "--threads",
                                       "1", "--repeat", "3", "--json", str(tmp_path / "b.json")])
    finally:
        torch.set_num_threads(threads)
    assert out.exit_code == 0, out.output
    rounds = re.findall(r"^round (\d) of 3: (.+)$", out.output, re.M)
    assert rounds == [("1", "reference, exact, fast"), ("2", "exact, fast, reference"), ("3", "fast, reference, exact")]
    assert re.search(r"^exact +speed-up over 3 interleaved rounds: median \d+\.\d\dx \(min ", out.output, re.M)
    report = json.loads((tmp_path / "b.json").read_text())
    summary = report["repeat"]
    assert summary["rounds"] == 3
    for mode, m in summary["modes"].items():
        assert m["same_counts"], mode  # every round did exactly the same forwards
        assert len(m["seconds"]) == len(m["ms_per_sample"]) == 3
        assert all(f <= t for f, t in zip(m["forward_ms_per_sample"], m["ms_per_sample"]))
    ref = summary["modes"]["reference"]["seconds"]
    for mode in ("exact", "fast"):
        sp = summary["speedup"][mode]
        ratios = [r / s for r, s in zip(ref, summary["modes"][mode]["seconds"])]
        assert sp["rounds"] == ratios and sp["median"] == statistics.median(ratios)
        assert sp["min"] <= sp["median"] <= sp["max"]
        cost = [m / r for r, m in zip(summary["modes"]["reference"]["ms_per_sample"],
                                      summary["modes"][mode]["ms_per_sample"])]
        assert sp["sample_cost_vs_reference"] == statistics.median(cost)
    total = report["modes"]["exact"]["total"]  # the first round's full result is kept
    assert 0 < total["forward_seconds"] <= total["seconds"] and total["cpu_seconds"] > 0
    # (seconds are rounded to the millisecond in the report)
    assert abs(total["ms_per_sample"] - 1000 * total["seconds"] / total["sample_forwards"]) <= 0.5 / total[
        "sample_forwards"] + 1e-3
