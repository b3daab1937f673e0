"""MailboxWorkflow: reads a sender account's IMAP mailbox for bounces and replies, for good.

One workflow per mailbox runs the `poll_mailbox` activity, which fetches the messages that
arrived since the last poll, applies each one to the leads it is about, and heartbeats its
progress. The workflow keeps the cursor (UIDVALIDITY and last UID) that the activity returns,
so a worker restart, a retried activity or a continue-as-new never reads a message twice.
The engine also records every applied message once, by Message-ID, so the one message that a
crash may leave between applying and heartbeating changes nothing when read again.

Between polls the workflow sleeps `poll_interval`; the `poll_now` signal wakes it early, and
the `stop` signal ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from sequencer.durations import format_duration
    from sequencer.models import (
        TASK_QUEUE,
        MailboxInput,
        MailboxStatus,
        PollRequest,
        PollResult,
    )

MAILBOX_WORKFLOW_TYPE = "MailboxWorkflow"
# A new poller also reads the messages of the day before it started, so that it finds the
# bounces of the first sends. Older mail is left alone.
FIRST_POLL_LOOKBACK = timedelta(days=1)
POLL_TIMEOUT = timedelta(minutes=30)
# The activity heartbeats after each message and between IMAP commands.
POLL_HEARTBEAT_TIMEOUT = timedelta(minutes=2)
# An unreachable server or a refused login is retried, with the error shown on the pending
# activity in the Temporal UI, until it works again.
POLL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
)


def mailbox_workflow_id(address: str, task_queue: str = TASK_QUEUE) -> str:
    """Return the workflow id of a mailbox poller; queues other than production get their own."""
    base = f"mailbox-{address.lower()}"
    return base if task_queue == TASK_QUEUE else f"{task_queue}/{base}"


@workflow.defn(name=MAILBOX_WORKFLOW_TYPE)
class MailboxWorkflow:
    def __init__(self) -> None:
        self._input: MailboxInput | None = None
        self._poll_now = False
        self._stopping = False

    @workflow.run
    async def run(self, input: MailboxInput) -> str:
        self._input = input
        if input.since is None:
            input.since = (workflow.now() - FIRST_POLL_LOOKBACK).date()

        for _ in range(input.polls_per_run):
            moved = await self._poll(input)
            # A poll cut short by a new IMAP URL runs again at once on the new one.
            self._poll_now = moved
            self._publish(input)
            if not self._stopping and not moved:
                with contextlib.suppress(asyncio.TimeoutError):
                    await workflow.wait_condition(
                        lambda: self._poll_now or self._stopping, timeout=input.poll_interval
                    )
            if self._stopping:
                return f"stopped after {input.totals.messages} message(s)"
            if workflow.info().is_continue_as_new_suggested():
                break

        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(input)

    async def _poll(self, input: MailboxInput) -> bool:
        """Run one poll, and return True when a new IMAP URL cut it short.

        A `stop`, or a new IMAP URL, cancels a poll still being retried.
        """
        assert input.since is not None
        imap_url = input.imap_url
        handle = workflow.start_activity(
            "poll_mailbox",
            PollRequest(
                address=input.address,
                imap_url=imap_url,
                since=input.since,
                cursor=input.cursor,
            ),
            result_type=PollResult,
            start_to_close_timeout=POLL_TIMEOUT,
            heartbeat_timeout=POLL_HEARTBEAT_TIMEOUT,
            retry_policy=POLL_RETRY,
            cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL,
            summary=f"Read new mail of {input.address}",
        )
        await workflow.wait_condition(
            lambda: handle.done() or self._stopping or input.imap_url != imap_url
        )
        if not handle.done():
            handle.cancel()
        totals = input.totals
        try:
            result = await handle
        except (ActivityError, asyncio.CancelledError) as error:
            if input.imap_url != imap_url:
                return True
            if not self._stopping:
                # A non-retryable failure, such as a server without STARTTLS. The next poll
                # tries again, unless the URL is changed or the poller stopped meanwhile.
                totals.last_error = _failure_message(error)
                workflow.logger.warning("Mailbox %s: %s", input.address, totals.last_error)
            return False
        if input.imap_url != imap_url:
            # The poll ended before its cancellation: its cursor belongs to the old server.
            return True

        input.cursor = result.cursor
        totals.last_error = None
        totals.polls += 1
        totals.messages += result.messages
        totals.failed += len(result.failed_uids)
        totals.last_poll_at = workflow.now()
        summary = f"{result.messages} new message(s)"
        if result.failed_uids:
            summary += f", {len(result.failed_uids)} not applied (UIDs {result.failed_uids})"
        if result.uidvalidity_changed:
            summary += ", mailbox recreated (UIDVALIDITY changed): read again"
        totals.last_summary = summary
        if result.messages or result.failed_uids:
            workflow.logger.info("Mailbox %s: %s", input.address, summary)
        return False

    def _publish(self, input: MailboxInput) -> None:
        totals = input.totals
        lines = [
            f"Reads **{input.imap_url}** every {format_duration(input.poll_interval)}",
            f"{totals.messages} message(s) read in {totals.polls} poll(s), "
            f"{totals.failed} not applied; UIDVALIDITY {input.cursor.uidvalidity}, "
            f"last UID {input.cursor.last_uid}",
        ]
        if totals.last_error:
            lines.append(f"Last error: {totals.last_error}")
        workflow.set_current_details("\n\n".join(lines))

    @workflow.signal
    def poll_now(self) -> None:
        self._poll_now = True

    @workflow.signal
    def stop(self) -> None:
        self._stopping = True

    @workflow.signal
    def set_imap_url(self, imap_url: str) -> None:
        """Read the mailbox at another IMAP URL from the next poll on."""
        assert self._input is not None
        if imap_url != self._input.imap_url:
            self._input.imap_url = imap_url
            self._input.totals.last_error = None
            self._poll_now = True

    @workflow.query
    def status(self) -> MailboxStatus:
        assert self._input is not None
        return MailboxStatus(
            address=self._input.address,
            imap_url=self._input.imap_url,
            poll_interval=self._input.poll_interval,
            cursor=self._input.cursor,
            totals=self._input.totals,
        )


def _failure_message(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "the poll was cancelled"
    cause = error.cause if isinstance(error, ActivityError) else None
    return str(getattr(cause, "message", None) or cause or error)
