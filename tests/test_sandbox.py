"""The workflow sandbox that workers and tests run: what it checks and what it caches."""

from __future__ import annotations

import uuid

import pytest
from temporalio import workflow
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import RestrictedWorkflowAccessError

from sequencer import temporal
from sequencer.temporal import CompiledSandboxRunner, workflow_runner


@workflow.defn(sandboxed=True)
class OpensAFile:
    """Call `open` on a path that does not exist and return what happened."""

    @workflow.run
    async def run(self, path: str) -> str:
        try:
            open(path)  # noqa: SIM115 - the call is what the test is about
        except RestrictedWorkflowAccessError:
            return "stopped by the sandbox"
        except FileNotFoundError:
            return "ran"
        return "opened"


async def run_once(client, runner, path: str) -> str:
    queue = f"sandbox-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[OpensAFile], workflow_runner=runner):
        return await client.execute_workflow(
            OpensAFile.run, path, id=f"opens-{uuid.uuid4().hex[:8]}", task_queue=queue
        )


@pytest.mark.parametrize(
    ("strict", "expected"),
    [(True, "stopped by the sandbox"), (False, "ran")],
    ids=["strict", "worker"],
)
async def test_only_strict_runners_stop_open(time_skipping_env, tmp_path, strict, expected):
    """Strict runners (replay tests, what-if runs) stop `open`. Workers' runners leave the
    built-in functions as they are, which spares a wrapper around every `isinstance`."""
    runner = workflow_runner(strict=strict)
    assert isinstance(runner, CompiledSandboxRunner)
    path = str(tmp_path / "absent.txt")
    assert await run_once(time_skipping_env.client, runner, path) == expected


async def test_sandbox_snippets_compile_once(time_skipping_env, tmp_path):
    """Each workflow task runs the same few snippets: after the first, they are not compiled."""
    runner = workflow_runner()
    await run_once(time_skipping_env.client, runner, str(tmp_path / "absent.txt"))
    before = temporal._compiled.cache_info()
    for _ in range(3):
        await run_once(time_skipping_env.client, runner, str(tmp_path / "absent.txt"))
    after = temporal._compiled.cache_info()
    assert after.misses == before.misses
    assert after.hits > before.hits
    assert after.currsize == before.currsize
