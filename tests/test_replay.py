"""Replay saved workflow histories: a change to the workflow's control flow must not break
leads that are already running."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from sequencer.temporal import workflow_runner
from workflows.lead_sequence import LeadSequenceWorkflow
from workflows.mailbox import MailboxWorkflow
from workflows.sender_account import SenderAccountWorkflow

ROOT = Path(__file__).parent / "histories"
HISTORIES = sorted(ROOT.rglob("*.json"))


@pytest.mark.parametrize(
    "path", HISTORIES, ids=[str(p.relative_to(ROOT).with_suffix("")) for p in HISTORIES]
)
async def test_history_replays(path):
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(
        workflows=[LeadSequenceWorkflow, SenderAccountWorkflow, MailboxWorkflow],
        data_converter=pydantic_data_converter,
        # Strict: the sandbox checks every call the workflow code makes while replaying.
        workflow_runner=workflow_runner(strict=True),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None


def test_histories_present():
    assert HISTORIES, "tests/histories has no saved workflow history to replay"


def test_strict_runner_sandboxes_workflow_modules():
    """Workers pass the workflow modules through for speed; a strict runner checks them."""
    assert "workflows" in workflow_runner().restrictions.passthrough_modules
    assert "workflows" not in workflow_runner(strict=True).restrictions.passthrough_modules
