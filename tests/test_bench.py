"""The benchmark harness at a tiny scale, so that `python -m bench` keeps working."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run import main

pytestmark = pytest.mark.stack


async def test_bench_writes_report(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"

    await main(["--leads", "4", "--runs", "1", "--output", str(output)])

    report = output.read_text()
    assert "| 4 | " in report
    assert "**billable actions**" in report
    # The engine's leads ran every step: five channel activities at least, per lead.
    activity_row = next(line for line in report.splitlines() if line.startswith("| activity |"))
    engine, baseline = (float(cell) for cell in activity_row.strip("|").split("|")[1:3])
    assert baseline == 1.0
    assert engine >= 1.0
