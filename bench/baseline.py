"""The baseline: the least a Temporal workflow can do for the same work.

One no-op activity per step and, when the engine's leads start timers, the same number of
zero-length timers, on the same server and with the same worker settings. Every figure of the
engine is reported as a ratio to this workflow's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow


@dataclass
class BaselinePlan:
    steps: int
    timers: int = 0


@activity.defn(name="bench_noop")
async def noop(step: int) -> int:
    """Return the step number: the cheapest activity that still round-trips a payload."""
    return step


@workflow.defn(name="BaselineLead")
class BaselineLead:
    @workflow.run
    async def run(self, plan: BaselinePlan) -> int:
        for step in range(plan.steps):
            await workflow.execute_activity(noop, step, start_to_close_timeout=timedelta(minutes=2))
        for _ in range(plan.timers):
            # One millisecond: the shortest timer the server records as a timer.
            await workflow.sleep(timedelta(milliseconds=1))
        return plan.steps
