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
    # The reaction benchmark: after the steps, sleep this long unless the `wake` signal comes
    # first, then run `after_wait` more activities.
    wait: timedelta | None = None
    after_wait: int = 0


@activity.defn(name="bench_noop")
async def noop(step: int) -> int:
    """Return the step number: the cheapest activity that still round-trips a payload."""
    return step


@workflow.defn(name="BaselineLead")
class BaselineLead:
    def __init__(self) -> None:
        self._woken = False

    @workflow.run
    async def run(self, plan: BaselinePlan) -> int:
        for step in range(plan.steps):
            await workflow.execute_activity(noop, step, start_to_close_timeout=timedelta(minutes=2))
        for _ in range(plan.timers):
            # One millisecond: the shortest timer the server records as a timer.
            await workflow.sleep(timedelta(milliseconds=1))
        if plan.wait is not None:
            try:
                await workflow.wait_condition(lambda: self._woken, timeout=plan.wait)
            except TimeoutError:
                pass
            for step in range(plan.after_wait):
                await workflow.execute_activity(
                    noop, plan.steps + step, start_to_close_timeout=timedelta(minutes=2)
                )
        return plan.steps + plan.after_wait

    @workflow.signal
    def wake(self) -> None:
        self._woken = True
