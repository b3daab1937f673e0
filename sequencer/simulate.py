"""What-if runs: the real workflow on the time-skipping test server, with scripted outcomes.

Every channel's outcome comes from an outcomes file instead of the real world, so a user sees
what a campaign does under failure before launching it:

    ann@example.com:              # a lead, by email (or by LinkedIn URL when it has no email)
      steps: {1: bounce}          # per step: sent (default) | bounce (email only) | fail
                                  # | invite_pending (linkedin_invite only)
      events:                     # later events, offsets from enrollment
        - {after: 1d, type: bounce, step: 1}
        - {after: 2d, type: invite_accepted}             # or invite_declined
        - {after: 3h, type: account_disconnected, account: email}
        - {after: 5h, type: account_reconnected, account: email}

A task (call, manual task) is done as soon as it is due, unless the file fails it or gives it
a task_done, task_failed or task_skipped event. An invitation counts as accepted at once
unless its step is invite_pending; it then waits for an invite event or the campaign's
invite_timeout. Account events act on the lead's sender account, which all leads share.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import temporalio.exceptions
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from temporalio import activity
from temporalio.client import (
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowHistory,
    WorkflowUpdateFailedError,
)
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from sequencer.addresses import InvalidEmailError, normalize_email
from sequencer.campaign import Campaign, describe_yaml_error
from sequencer.channels import (
    TASK_STEP_TYPES,
    Channel,
    EnrollmentStatus,
    Reason,
    StepStatus,
    StepType,
)
from sequencer.durations import format_duration, parse_duration
from sequencer.linkedin_urls import parse_linkedin_url
from sequencer.models import (
    AccountRef,
    EnrollmentInput,
    EnrollmentResult,
    InvitationAnswer,
    LateFailure,
    Lead,
    RecordInput,
    Reply,
    StepInput,
    StepOutcome,
    TaskOutcome,
    workflow_id_for,
)
from sequencer.temporal import CORE_LOGGER, find_binary, lead_worker, register_search_attributes
from workflows.lead_machine import Ignored, LeadSequence, plan_from_steps
from workflows.lead_sequence import RELEASE, LeadSequenceWorkflow

EventType = Literal[
    "bounce",
    "fail",
    "reply",
    "task_done",
    "task_failed",
    "task_skipped",
    "invite_accepted",
    "invite_declined",
    "account_disconnected",
    "account_reconnected",
]
# Events about the lead as a whole, or about its sender account: they take no step number.
_STEPLESS_EVENTS = {
    "reply",
    "invite_accepted",
    "invite_declined",
    "account_disconnected",
    "account_reconnected",
}


class OutcomesError(ValueError):
    """An invalid outcomes file."""


class ScriptedEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    after: timedelta
    type: EventType
    step: int | None = None
    reason: str | None = None
    # For account events: which of the lead's sender accounts.
    account: Literal["email", "linkedin"] | None = None

    @field_validator("after", mode="before")
    @classmethod
    def _parse_after(cls, value: Any) -> timedelta:
        return parse_duration(value)


class LeadScript(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # invite_pending: the invitation is sent and the lead has not responded yet. Without it, a
    # simulated invitation counts as accepted at once.
    steps: dict[int, Literal["sent", "bounce", "fail", "invite_pending"]] = Field(
        default_factory=dict
    )
    events: list[ScriptedEvent] = Field(default_factory=list)


def load_outcomes(path: str | Path, campaign: Campaign, leads: list[Lead]) -> dict[str, LeadScript]:
    """Read an outcomes file and check it against the campaign and the leads.

    Returns scripts keyed by lead key. Raises OutcomesError naming the lead, step and fix.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except FileNotFoundError:
        raise OutcomesError(f"outcomes file {path} not found; check the path") from None
    except yaml.YAMLError as error:
        raise OutcomesError(f"invalid outcomes file {path}: {describe_yaml_error(error)}") from None
    if not isinstance(data, dict):
        raise OutcomesError(f"outcomes file {path}: expected a mapping of leads to outcomes")
    keys = {lead.key for lead in leads}
    scripts: dict[str, LeadScript] = {}
    problems: list[str] = []
    for raw_key, raw_script in data.items():
        key = _lead_key(str(raw_key))
        if key not in keys:
            problems.append(
                f"{raw_key}: not a lead of the leads file; use its email or LinkedIn URL"
            )
            continue
        try:
            script = LeadScript.model_validate(raw_script or {})
        except ValidationError as error:
            problems += [f"{raw_key}: {_describe_error(item)}" for item in error.errors()]
            continue
        problems += _check_script(str(raw_key), script, campaign)
        scripts[key] = script
    if problems:
        raise OutcomesError(
            f"invalid outcomes file {path}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return scripts


def _describe_error(error: dict[str, Any]) -> str:
    """Turn a pydantic error into a sentence with 1-based step and event numbers."""
    location = list(error["loc"])
    parts = []
    if location[:1] == ["steps"] and len(location) > 1:
        parts.append(f"step {location[1]}")
        location = location[2:]
    elif location[:1] == ["events"] and len(location) > 1 and isinstance(location[1], int):
        parts.append(f"event {location[1] + 1}")
        location = location[2:]
    parts += [str(part) for part in location]
    kind = error["type"]
    if kind == "extra_forbidden" and error["loc"][:1] == ("events",):
        message = "unknown field; use after, type, step, reason and account"
    elif kind == "extra_forbidden":
        message = "unknown field; give a lead `steps` and `events`"
    elif kind == "missing":
        message = "missing"
    elif kind == "literal_error":
        expected = error["msg"].removeprefix("Input should be ")
        message = f"invalid value {error['input']!r}: expected {expected}"
    else:
        message = error["msg"].removeprefix("Value error, ")
    return ": ".join([*parts, message])


def _lead_key(raw: str) -> str:
    try:
        return normalize_email(raw)
    except InvalidEmailError:
        parsed = parse_linkedin_url(raw)
        return parsed.normalised or raw.strip()


def _check_script(lead: str, script: LeadScript, campaign: Campaign) -> list[str]:
    problems = []
    count = len(campaign.steps)
    for number, outcome in script.steps.items():
        if not 1 <= number <= count:
            problems.append(
                f"{lead}: step {number} does not exist (the campaign has {count} steps)"
            )
        elif outcome == "bounce" and campaign.steps[number - 1].channel != Channel.EMAIL:
            problems.append(f"{lead}: step {number} is not an email step: use fail, not bounce")
        elif outcome == "invite_pending" and campaign.steps[number - 1].type != "linkedin_invite":
            problems.append(
                f"{lead}: step {number} is not a linkedin_invite step: invite_pending applies "
                "only to invitations"
            )
    for event in script.events:
        if event.type.startswith("account_"):
            if event.account is None:
                problems.append(
                    f"{lead}: an {event.type} event needs `account: email` or `account: linkedin`"
                )
            elif event.account == "email" and campaign.sender is None:
                problems.append(f"{lead}: the campaign has no email sender to disconnect")
            continue
        if event.type in _STEPLESS_EVENTS:
            if event.step is not None and event.type != "reply":
                problems.append(f"{lead}: a {event.type} event takes no step number: remove `step`")
            continue
        if event.step is None:
            problems.append(f"{lead}: a {event.type} event needs a step number")
        elif not 1 <= event.step <= count:
            problems.append(f"{lead}: event step {event.step} does not exist ({count} steps)")
        elif (
            event.type.startswith("task_")
            and StepType(campaign.steps[event.step - 1].type) not in TASK_STEP_TYPES
        ):
            problems.append(f"{lead}: step {event.step} is not a call or manual task")
        elif event.type == "bounce" and campaign.steps[event.step - 1].channel != Channel.EMAIL:
            problems.append(f"{lead}: step {event.step} is not an email step: use fail")
    return problems


class SimulatedChannels:
    """Channel activities that return the scripted outcome instead of contacting anyone."""

    def __init__(self, scripts: dict[str, LeadScript]) -> None:
        self._scripts = scripts

    def _scripted(self, input: StepInput) -> str:
        script = self._scripts.get(input.lead.key)
        return script.steps.get(input.step_number, "sent") if script else "sent"

    @activity.defn(name="send_email")
    async def send_email(self, input: StepInput) -> StepOutcome:
        if not input.lead.email:
            return StepOutcome(status=StepStatus.FAILED, reason=Reason.NO_EMAIL_ADDRESS)
        outcome = self._scripted(input)
        if outcome == "bounce":
            return StepOutcome(status=StepStatus.BOUNCED, reason="bounce", detail="simulated")
        if outcome == "fail":
            return StepOutcome(status=StepStatus.FAILED, reason="failed", detail="simulated")
        return StepOutcome(status=StepStatus.SENT, detail="simulated")

    @activity.defn(name="linkedin_step")
    async def linkedin_step(self, input: StepInput) -> StepOutcome:
        if not input.lead.linkedin_url:
            return StepOutcome(status=StepStatus.FAILED, reason=Reason.NO_LINKEDIN_URL)
        outcome = self._scripted(input)
        if outcome == "fail":
            return StepOutcome(status=StepStatus.FAILED, reason="failed", detail="simulated")
        if input.step.type == StepType.LINKEDIN_INVITE:
            return StepOutcome(
                status=StepStatus.SENT,
                detail="simulated",
                invitation="pending" if outcome == "invite_pending" else "accepted",
            )
        return StepOutcome(status=StepStatus.SENT, detail="simulated")

    @activity.defn(name="create_task")
    async def create_task(self, input: StepInput) -> StepOutcome:
        if input.step.type == StepType.CALL and not input.lead.phone:
            return StepOutcome(status=StepStatus.FAILED, reason=Reason.NO_PHONE_NUMBER)
        if self._scripted(input) == "fail":
            return StepOutcome(status=StepStatus.FAILED, reason="task_failed", detail="simulated")
        script = self._scripts.get(input.lead.key)
        answered_later = script and any(
            e.type.startswith("task_") and e.step == input.step_number for e in script.events
        )
        if answered_later:
            return StepOutcome(status=StepStatus.WAITING, detail="simulated task")
        return StepOutcome(status=StepStatus.SENT, detail="simulated task, done when due")

    @activity.defn(name="record_activity")
    async def record_activity(self, record: RecordInput) -> int:
        return len(record.entries)

    def activities(self) -> list:
        return [self.send_email, self.linkedin_step, self.create_task, self.record_activity]


def _signal_for(event: ScriptedEvent) -> tuple[str, Any]:
    if event.type == "bounce":
        return "report_failure", LateFailure(
            step=event.step, reason=event.reason or "bounce", bounced=True
        )
    if event.type == "fail":
        return "report_failure", LateFailure(step=event.step, reason=event.reason or "failed")
    if event.type == "reply":
        return "report_reply", Reply(channel="simulated")
    outcome = event.type.removeprefix("task_")
    return "report_task", TaskOutcome(step=event.step, outcome=outcome, reason=event.reason)


async def run_simulation(
    campaign: Campaign,
    leads: Iterable[Lead],
    scripts: dict[str, LeadScript],
    environment: WorkflowEnvironment | None = None,
    histories: dict[str, WorkflowHistory] | None = None,
) -> dict[str, Any]:
    """Run every lead through the real workflow on the time-skipping server.

    Returns the report that `sequencer simulate --json` prints. When `histories` is given, it
    receives each lead's workflow history by lead key, for the replay tests.
    """
    leads = list(leads)
    if environment is None:
        # The test server lacks capabilities that the worker checks for. Its warnings are
        # about the test server, not the campaign.
        CORE_LOGGER.setLevel(logging.ERROR)
        # Ignored events come back in the report's warnings, in the user's terms.
        logging.getLogger("temporalio.workflow").setLevel(logging.ERROR)
        async with await WorkflowEnvironment.start_time_skipping(
            test_server_existing_path=str(find_binary("temporal-test-server")),
            data_converter=pydantic_data_converter,
        ) as started:
            return await run_simulation(campaign, leads, scripts, started, histories)

    client = environment.client
    await register_search_attributes(client)
    task_queue = f"simulate-{uuid.uuid4()}"
    channels = SimulatedChannels(scripts)
    notes: list[str] = []
    async with lead_worker(
        client,
        task_queue,
        channels.activities(),
        account_check_interval=None,
        end_accounts=True,
        # What-if runs check every call of the workflow code, as the scenario tests rely on.
        strict_sandbox=True,
    ) as worker:
        handles: dict[str, WorkflowHandle] = {}
        for lead in leads:
            handles[lead.key] = await client.start_workflow(
                LeadSequenceWorkflow.run,
                EnrollmentInput(campaign=campaign, lead=lead, release=RELEASE),
                id=f"{workflow_id_for(campaign.id, lead.key)}-{uuid.uuid4().hex[:8]}",
                task_queue=task_queue,
            )

        timeline = sorted(
            (event.after, key, event)
            for key, script in scripts.items()
            for event in script.events
            if key in handles
        )
        elapsed = timedelta(0)
        environment_start = await environment.get_current_time()
        after_end: dict[str, list[tuple[datetime, Any]]] = {}
        for after, key, event in timeline:
            if after > elapsed:
                await environment.sleep(after - elapsed)
                elapsed = after
            if event.type.startswith("account_"):
                refused = await _account_event(worker, campaign, task_queue, event)
                if refused:
                    notes.append(f"{key}: {event.type} at {_offset(after)}: {refused}")
                continue
            if event.type.startswith("invite_"):
                refused = await _invitation_event(handles[key], event)
                if refused:
                    notes.append(f"{key}: {event.type} at {_offset(after)}: {refused}")
                continue
            name, argument = _signal_for(event)
            try:
                await handles[key].signal(name, argument)
            except RPCError as error:
                if error.status != RPCStatusCode.NOT_FOUND:
                    raise
                # The enrollment already ended: a late failure is still recorded.
                after_end.setdefault(key, []).append((environment_start + after, argument))

        results = []
        for lead in leads:
            result = await _final_state(handles[lead.key])
            for at, argument in after_end.get(lead.key, []):
                result = _apply_after_end(campaign, result, argument, at)
            results.append(result)
            if histories is not None:
                histories[lead.key] = await handles[lead.key].fetch_history()
    # `warnings` is not part of the JSON report: the CLI prints it to stderr.
    return {
        "campaign": campaign.name,
        "leads": [
            _lead_report(lead.key, result) for lead, result in zip(leads, results, strict=True)
        ],
        "warnings": notes
        + [
            f"{lead.key}: {message}"
            for lead, result in zip(leads, results, strict=True)
            for message in result.ignored
        ],
    }


async def _account_event(
    worker: Any, campaign: Campaign, task_queue: str, event: ScriptedEvent
) -> str | None:
    """Disconnect or reconnect one of the campaign's sender accounts; return why it was refused."""
    if event.account == "email":
        assert campaign.sender is not None
        account = AccountRef(id=campaign.sender.account_id, channel="email", sender=campaign.sender)
    else:
        account = AccountRef(id=campaign.linkedin.account_id, channel="linkedin")
    name = "disconnect" if event.type == "account_disconnected" else "reconnect"
    try:
        await worker.accounts.update_account(
            account, task_queue, name, event.reason or f"simulated {name}"
        )
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        return cause.message if isinstance(cause, ApplicationError) else str(cause)
    return None


async def _invitation_event(handle: WorkflowHandle, event: ScriptedEvent) -> str | None:
    answer = InvitationAnswer(accepted=event.type == "invite_accepted", detail=event.reason)
    try:
        await handle.execute_update("answer_invitation", answer, result_type=str)
    except WorkflowUpdateFailedError as error:
        cause = error.cause
        return cause.message if isinstance(cause, ApplicationError) else str(cause)
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
        return "the enrollment had already ended"
    return None


def _offset(after: timedelta) -> str:
    return format_duration(after)


def _apply_after_end(
    campaign: Campaign, result: EnrollmentResult, event: Any, at: datetime
) -> EnrollmentResult:
    if not isinstance(event, LateFailure):
        return result  # a reply or task outcome after the end changes nothing
    sequence = LeadSequence.restore(
        plan_from_steps(campaign.steps),
        result.steps,
        EnrollmentStatus(result.status),
        result.unsubscribed,
        result.enrolled_at,
    )
    outcome = sequence.late_failure(
        event.step, event.reason, at, bounced=event.bounced, detail=event.detail
    )
    ignored = list(result.ignored)
    if isinstance(outcome, Ignored):
        kind = "bounce" if event.bounced else "failure"
        ignored.append(f"{kind} of step {event.step} after the end: {outcome.message}")
    return EnrollmentResult(
        status=sequence.status.value,
        unsubscribed=sequence.unsubscribed,
        steps=sequence.steps,
        enrolled_at=result.enrolled_at,
        ignored=ignored,
    )


async def _final_state(handle: WorkflowHandle) -> EnrollmentResult:
    # A lead left waiting for a person (its task event came before the task existed) never
    # finishes, so the report shows its current state. The workflow is then terminated: left
    # running, it would stop the test server's clock once the worker is gone.
    try:
        return await asyncio.wait_for(handle.result(), timeout=30)
    except TimeoutError:
        state = await handle.query("activity", result_type=EnrollmentResult)
        await handle.terminate("simulation finished")
        return state
    except WorkflowFailureError as error:
        if not isinstance(error.cause, temporalio.exceptions.TimeoutError):
            raise
        # A lead paused for good (an account never reconnected) has no timer left, so the
        # test server skips to the end of the workflow's allowed run time. Report its state.
        return await handle.query("activity", result_type=EnrollmentResult)


def _lead_report(key: str, result: EnrollmentResult) -> dict[str, Any]:
    enrolled = result.enrolled_at
    return {
        "lead": key,
        "status": result.status,
        "unsubscribed": result.unsubscribed,
        "steps": [
            {
                "step": step.step,
                "type": step.type,
                "channel": step.channel,
                "status": step.status.value,
                "at_seconds": (
                    round((step.at - enrolled).total_seconds()) if step.at and enrolled else None
                ),
                "reason": step.reason,
            }
            for step in result.steps
        ],
    }
