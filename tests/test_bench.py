"""The benchmark harness at a tiny scale, so that `python -m bench` keeps working."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run import main

pytestmark = pytest.mark.stack


async def test_bench_writes_report(tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"

    await main(
        [
            *("--leads", "4", "--runs", "1", "--reaction", "5"),
            *("--sleeping", "5", "10", "--import-rows", "20", "--output", str(output)),
        ]
    )

    report = output.read_text()
    assert "| 4 | " in report
    assert "**billable actions**" in report
    # The engine's leads ran every step: five channel activities at least, per lead.
    counts = {
        cells[0]: (float(cells[1]), float(cells[2]))
        for line in report.splitlines()
        if line.startswith("| ")
        and len(cells := [c.strip() for c in line.strip("|").split("|")]) == 3
        and cells[1].replace(".", "").isdigit()
    }
    # Per step of a lead that never waits, the engine runs its channel activity, which books
    # the slot in the database first. The last one also writes the log and the lead's end.
    # Search attributes are upserted once per lead, for the final status. No patch is called,
    # so no marker is recorded, and no update goes to a sender account's workflow.
    assert counts["activity"] == (1.0, 1.0)
    assert counts["search attribute update"] == (0.2, 0.0)
    for none in ("marker (patch)", "update (sender accounts)", "events (sender accounts)"):
        assert counts.get(none, (0.0, 0.0)) == (0.0, 0.0)
    assert "| **billable actions** | **1.40** | **1.20** |" in report
    # Every lead reacted to its bounce: the visit started after the bounce was sent.
    engine_reaction = next(line for line in report.splitlines() if line.startswith("| engine |"))
    p50, p99, longest = (float(cell) for cell in engine_reaction.strip("|").split("|")[1:4])
    assert 0 < p50 <= p99 <= longest
    # The worker's memory was read at both counts of sleeping leads.
    assert "| 5 | " in report
    assert "| 10 | " in report
    # One import run: the launch and the bare loop each started every row's workflow.
    runs = [line for line in report.splitlines() if line.startswith("| 1 | ")]
    cells = [float(cell) for cell in runs[-1].strip("|").split("|")[1:]]
    launch_seconds, launch_rate, _, _, bare_seconds, bare_rate, _, _ = cells
    assert min(launch_seconds, launch_rate, bare_seconds, bare_rate) > 0
