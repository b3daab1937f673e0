"""Long enrollments continue as new, on the time-skipping server, with nothing lost on the way.

The threshold is lowered to a few dozen history events so that a lead with months of waits and
a stream of operator actions and stray events crosses it several times.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from sequencer.models import EnrollmentInput, LateFailure, OperatorAction
from tests.test_interruptions import DAY, Channels, Run, campaign, email, lead, result
from workflows.lead_sequence import RELEASE, LeadSequenceWorkflow

SAVE_HISTORIES = os.environ.get("SEQUENCER_SAVE_HISTORIES")
THRESHOLD = 40
ROUNDS = 12


async def start(run: Run, threshold: int) -> WorkflowHandle:
    handle = await run.env.client.start_workflow(
        LeadSequenceWorkflow.run,
        EnrollmentInput(
            campaign=campaign(email("30d"), email("60d"), email()),
            lead=lead(),
            continue_as_new_after=threshold,
            release=RELEASE,
        ),
        id=f"lead-{uuid.uuid4()}",
        task_queue=run.task_queue,
    )
    run.leads.append(handle)
    return handle


async def runs_of(client: Client, handle: WorkflowHandle, save: bool = False) -> list[int]:
    """Return the history length of each run of the workflow, oldest first.

    With `save` and SEQUENCER_SAVE_HISTORIES=DIR, the first two runs are saved there for the
    replay tests.
    """
    lengths = []
    run_id = handle.first_execution_run_id
    while run_id:
        history = await client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        if save and SAVE_HISTORIES and len(lengths) < 2:
            path = Path(SAVE_HISTORIES) / f"continued_as_new_run_{len(lengths) + 1}.json"
            path.write_text(history.to_json())
        lengths.append(len(history.events))
        last = history.events[-1]
        continued = last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
        run_id = (
            last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
            if continued
            else ""
        )
    return lengths


async def test_long_enrollment_loses_nothing(time_skipping_env):
    env = time_skipping_env
    channels = Channels()
    async with Run(env, channels) as run:
        handle = await start(run, THRESHOLD)
        answers = []
        for _ in range(ROUNDS):
            answers.append(
                await handle.execute_update(
                    LeadSequenceWorkflow.control, OperatorAction(action="pause")
                )
            )
            # A bounce for a step not sent yet is ignored, and listed once.
            await handle.signal(
                LeadSequenceWorkflow.report_failure, LateFailure(step=3, reason="bounce")
            )
            await env.sleep(DAY)
            answers.append(
                await handle.execute_update(
                    LeadSequenceWorkflow.control, OperatorAction(action="resume")
                )
            )
        done = await result(handle)
        lengths = await runs_of(env.client, handle, save=True)

    assert len(lengths) > 2, lengths
    # Each run ends soon after the threshold: the history stays short.
    assert max(lengths) < 3 * THRESHOLD, lengths
    assert done.status == "completed"
    assert [s.status.value for s in done.steps] == ["sent", "sent", "sent"]
    assert channels.senders == ["rep@acme.test"] * 3
    assert len(answers) == 2 * ROUNDS
    events = [e.status for e in done.log if e.kind == "event"]
    assert events.count("paused") == ROUNDS
    assert events.count("resumed") == ROUNDS
    assert [e.seq for e in done.log] == list(range(1, len(done.log) + 1))
    assert len(done.ignored) == ROUNDS
    # The waits were never cut short: each pause only made them longer.
    assert done.steps[1].at - done.steps[0].at >= 30 * DAY
    assert done.steps[2].at - done.steps[1].at >= 60 * DAY


async def test_short_enrollment_runs_once(time_skipping_env):
    env = time_skipping_env
    async with Run(env, Channels()) as run:
        handle = await start(run, 2000)
        done = await result(handle)
        lengths = await runs_of(env.client, handle)

    assert done.status == "completed"
    assert len(lengths) == 1
