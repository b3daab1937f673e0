"""`sequencer demo`: the example campaigns on the local stack, watched until every lead ends.

The demo plays the parts of the outside world that a real deployment gets from elsewhere: it
completes the call tasks as a sales rep would, and, on a stack without an IMAP server, reports
the late bounce of the `late-bounce` lead as a mail system would. The local stack plays the
rest: its SMTP server sends the late bounce, and the `reply` lead's reply, into the sender's
IMAP mailbox (Dovecot), where the worker's mailbox poller finds them; its LinkedIn sandbox
accepts invitations 10 seconds after they are sent (so the LinkedIn messages wait for them);
and its SMTP server refuses the email-only campaign's sender for 20 seconds (so those leads
pause, and resume by themselves once the account's health check finds the inbox working again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from sequencer.campaign import load_campaign
from sequencer.channels import EnrollmentStatus, StepStatus
from sequencer.cli import print_activity, print_stats, styled_status
from sequencer.config import Settings
from sequencer.leads import read_leads
from sequencer.models import StepState
from sequencer.service import LaunchReport, Sequencer, ServiceError
from sequencer.stack import LocalStack, StackPorts, running_stack
from sequencer.storage import EnrollmentRow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_CAMPAIGNS = (
    ("mixed-outreach.yaml", "mixed-outreach-leads.csv"),
    ("email-only.yaml", "email-only-leads.csv"),
)
# Seconds between the late-bounce lead's first email and the bounce the demo reports for it.
LATE_BOUNCE_DELAY = 3.0
TASK_DELAY = 2.0


async def run_demo(settings: Settings, console: Console, timeout: float) -> None:
    stack: LocalStack | None = None
    running = running_stack(settings)
    if running:
        console.print(f"Using the local stack already running (UI {running.get('ui_url')})")
    else:
        console.print(
            "Starting the local stack (Temporal dev server, SMTP, LinkedIn sandbox, worker)..."
        )
        stack = LocalStack(settings, StackPorts())
        await stack.start()
        settings = stack.settings
        console.print(f"Temporal UI: {stack.ui_url}")
    smtp_url = stack.smtp_url if stack else running.get("smtp_url")
    service = Sequencer(settings)
    if settings.imap_url:
        console.print(f"Senders' mailboxes are read over IMAP at {settings.imap_url}")
    try:
        await _run(service, console, timeout, smtp_url)
    finally:
        service.close()
        if stack:
            await stack.stop()


async def _run(service: Sequencer, console: Console, timeout: float, smtp_url: str | None) -> None:
    run_id = datetime.now(UTC).strftime("%m%d%H%M%S")
    reports: list[LaunchReport] = []
    for campaign_file, leads_file in DEMO_CAMPAIGNS:
        campaign_path = EXAMPLES / campaign_file
        campaign_id = f"{load_campaign(campaign_path).id}-{run_id}"
        # An earlier demo unsubscribed the bouncing addresses. Re-subscribe them, as an
        # operator would, so that this run shows the bounces again.
        for lead in read_leads(EXAMPLES / leads_file).leads:
            if lead.lead.email and service.store.unsuppress(lead.lead.email):
                console.print(f"Re-subscribed {lead.lead.email} from an earlier demo run")
        # A sender of its own for each run, so that the SMTP server's outage for outage-*
        # senders happens again even when the stack has been up for a while.
        sender = load_campaign(campaign_path).sender
        sender_email = None
        if sender and sender.email.startswith("outage"):
            local, _, domain = sender.email.partition("@")
            sender_email = f"{local}-{run_id}@{domain}"
        report = await service.launch(
            campaign_path,
            EXAMPLES / leads_file,
            campaign_id=campaign_id,
            smtp_url=smtp_url,
            sender_email=sender_email,
        )
        reports.append(report)
        imported = report.import_report
        console.print(
            f"Launched [bold]{report.campaign.name}[/bold] as {campaign_id}: "
            f"{len(report.enrolled)} leads enrolled"
            + f", {sum(bool(lead.warnings) for lead in imported.leads)} with warnings",
            highlight=False,
        )
        for lead in imported.leads:
            for warning in lead.warnings:
                console.print(
                    f"  [yellow]row {lead.row} {lead.lead.key}: {warning}[/yellow]", highlight=False
                )

    deadline = time.monotonic() + timeout
    late_bounced: set[str] = set()
    sent_at: dict[str, float] = {}
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            snapshot = _snapshot(service, reports)
            table, all_ended = _progress(reports, snapshot)
            live.update(table)
            if all_ended:
                break
            if time.monotonic() > deadline:
                console.print(
                    f"[red]The demo timed out after {timeout:.0f}s with leads still running; "
                    "check the worker's log lines above, or rerun with --timeout.[/red]"
                )
                break
            await _play_world(service, reports, snapshot, late_bounced, sent_at, console)
            await asyncio.sleep(0.5)

    # Stop reading the demo senders' mailboxes: each run has an outage sender of its own,
    # which would otherwise be polled for good. The next launch for a sender reads it again.
    for report in reports:
        if report.mailbox and report.campaign.sender:
            with contextlib.suppress(ServiceError):
                await service.mailbox_signal(report.campaign.sender.email, "stop")

    for report in reports:
        console.print()
        console.rule(f"{report.campaign.name}")
        print_stats(service.stats(report.campaign.id))
        for row in service.enrollments(report.campaign.id):
            print_activity(service.activity(report.campaign.id, row.lead_key), compact=True)


# Per campaign id, each enrollment with its steps, read once per refresh of the progress view.
Snapshot = dict[str, list[tuple[EnrollmentRow, list[StepState]]]]


def _snapshot(service: Sequencer, reports: list[LaunchReport]) -> Snapshot:
    return {
        report.campaign.id: [
            (row, service.store.step_states(row.workflow_id, report.campaign))
            for row in service.enrollments(report.campaign.id)
        ]
        for report in reports
    }


def _progress(reports: list[LaunchReport], snapshot: Snapshot) -> tuple[Group, bool]:
    """Build one table per campaign: each lead's status and each step's status."""
    tables = []
    all_ended = True
    for report in reports:
        campaign = report.campaign
        table = Table(title=f"{campaign.name} ({campaign.id})", title_justify="left")
        table.add_column("lead", no_wrap=True)
        table.add_column("status", no_wrap=True)
        for number, step in enumerate(campaign.steps, start=1):
            table.add_column(f"{number} {step.type.removeprefix('linkedin_')}")
        for row, steps in snapshot[campaign.id]:
            table.add_row(
                row.lead_key,
                styled_status(row.status),
                *(styled_status(s.status.value) for s in steps),
            )
            if not EnrollmentStatus(row.status).is_final:
                all_ended = False
        tables.append(table)
    return Group(*tables), all_ended


async def _play_world(
    service: Sequencer,
    reports: list[LaunchReport],
    snapshot: Snapshot,
    late_bounced: set[str],
    sent_at: dict[str, float],
    console: Console,
) -> None:
    """Report the late bounce and complete open tasks, as the outside world would.

    With an IMAP server in the stack, the bounce arrives in the sender's mailbox instead, and
    the demo only prints when the worker applied it.
    """
    now = time.monotonic()
    for report in reports:
        campaign = report.campaign
        for row, steps in snapshot[campaign.id]:
            if not row.lead_key.startswith("late-bounce") or row.workflow_id in late_bounced:
                continue
            if report.mailbox:
                if any(s.status == StepStatus.BOUNCED for s in steps):
                    late_bounced.add(row.workflow_id)
                    console.print(
                        f"[magenta]mailbox:[/magenta] {row.lead_key}: a bounce arrived in the "
                        f"mailbox of {campaign.sender.email if campaign.sender else 'the sender'} "
                        "and the worker applied it",
                        highlight=False,
                    )
                continue
            first_email = next(
                (s for s in steps if s.channel == "email" and s.status == StepStatus.SENT), None
            )
            if first_email is None:
                continue
            key = f"{row.workflow_id}:{first_email.step}"
            sent_at.setdefault(key, now)
            if now - sent_at[key] >= LATE_BOUNCE_DELAY:
                late_bounced.add(row.workflow_id)
                message = await service.report_failure(
                    campaign.id,
                    row.lead_key,
                    first_email.step,
                    "bounce",
                    True,
                    "550 5.1.1 mailbox does not exist (reported late by the demo)",
                )
                console.print(f"[magenta]mail system:[/magenta] {message}", highlight=False)
    demo_campaigns = {report.campaign.id for report in reports}
    open_tasks = [t for t in service.tasks("open") if t.campaign_id in demo_campaigns]
    for task in open_tasks:
        opened = task.created_at.timestamp()
        if datetime.now(UTC).timestamp() - opened >= TASK_DELAY:
            message = await service.close_task(task.id, "done", "called by the demo")
            console.print(
                f"[magenta]sales rep:[/magenta] {task.lead_key}: {message}", highlight=False
            )
