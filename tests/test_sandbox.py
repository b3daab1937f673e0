"""The workflow sandbox that workers and tests run: what it checks and what it caches."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import (
    ActivitySerializationContext,
    PayloadCodec,
    SerializationContext,
    WithSerializationContext,
    WorkflowSerializationContext,
)
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import RestrictedWorkflowAccessError
from temporalio.worker.workflow_sandbox._runner import _Instance as _SandboxInstance

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


@activity.defn(name="echo")
async def echo(text: str) -> str:
    return text


@workflow.defn(sandboxed=True)
class RunsAnActivity:
    @workflow.run
    async def run(self, text: str) -> str:
        return await workflow.execute_activity(
            echo, text, start_to_close_timeout=timedelta(seconds=30), summary="echo it"
        )


class ContextCodec(PayloadCodec, WithSerializationContext):
    """Pass payloads through unchanged, noting the context each one was encoded with."""

    def __init__(self, seen: list, context: SerializationContext | None = None) -> None:
        self.seen = seen
        self.context = context

    def with_context(self, context: SerializationContext) -> ContextCodec:
        return ContextCodec(self.seen, context)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        self.seen.extend(self.context for _ in payloads)
        return list(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return list(payloads)


async def test_payload_contexts_skip_sandbox(time_skipping_env, monkeypatch):
    """Codecs still get each payload's context (the activity's for its input), though the
    worker's runner looks it up without running a snippet in the sandbox."""
    entered = []
    original = _SandboxInstance.get_serialization_context

    def counted(self, command_info):
        entered.append(command_info)
        return original(self, command_info)

    monkeypatch.setattr(_SandboxInstance, "get_serialization_context", counted)
    seen: list = []
    env_client = time_skipping_env.client
    converter = dataclasses.replace(env_client.data_converter, payload_codec=ContextCodec(seen))
    client = Client(**{**env_client.config(), "data_converter": converter})
    queue = f"contexts-{uuid.uuid4().hex[:8]}"
    workflow_id = f"contexts-{uuid.uuid4().hex[:8]}"
    async with Worker(
        client,
        task_queue=queue,
        workflows=[RunsAnActivity],
        activities=[echo],
        workflow_runner=workflow_runner(),
    ):
        result = await client.execute_workflow(
            RunsAnActivity.run, "hello", id=workflow_id, task_queue=queue
        )
    assert result == "hello"
    assert entered == []
    activity_contexts = [c for c in seen if isinstance(c, ActivitySerializationContext)]
    assert activity_contexts, seen
    assert {(c.activity_type, c.workflow_id, c.activity_task_queue) for c in activity_contexts} == {
        ("echo", workflow_id, queue)
    }
    assert any(
        isinstance(c, WorkflowSerializationContext) and c.workflow_id == workflow_id for c in seen
    )
