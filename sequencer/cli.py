"""The `sequencer` command line."""

from __future__ import annotations

import asyncio
import email.policy
import json
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from temporalio.service import RPCError

from sequencer.campaign import Campaign, CampaignError, load_campaign
from sequencer.codec import (
    MissingPayloadKeyError,
    PayloadCodecError,
    generate_key_entry,
    require_payload_keys,
)
from sequencer.config import Settings, load_settings
from sequencer.durations import format_duration
from sequencer.leads import LeadFileError, read_leads
from sequencer.service import (
    TIMEOUT_STATUSES,
    ActivityReport,
    LaunchReport,
    Sequencer,
    ServiceError,
)
from sequencer.storage import CampaignStats
from sequencer.temporal import exit_without_teardown

app = typer.Typer(
    help="Multichannel outreach sequences on Temporal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
event_app = typer.Typer(help="Report an event for a lead: a bounce, a failed step or a reply.")
task_app = typer.Typer(help="Calls and manual tasks waiting for a person.")
lead_app = typer.Typer(help="Operator controls for one lead: pause, resume, remove, reassign.")
account_app = typer.Typer(help="Sender accounts: their status, limits and outages.")
mailbox_app = typer.Typer(help="Sender mailboxes read for bounces and replies.")
apikey_app = typer.Typer(help="API keys of the HTTP API and the dashboard.")
payload_key_app = typer.Typer(help="Keys that encrypt lead data in Temporal payloads.")
db_app = typer.Typer(help="The reporting database's schema (DATABASE_URL).")
app.add_typer(event_app, name="event")
app.add_typer(task_app, name="task")
app.add_typer(lead_app, name="lead")
app.add_typer(account_app, name="account")
app.add_typer(mailbox_app, name="mailbox")
app.add_typer(apikey_app, name="apikey")
app.add_typer(payload_key_app, name="payload-key")
app.add_typer(db_app, name="db")

console = Console()
errors = Console(stderr=True)

STATUS_STYLE = {
    "sent": "green",
    "completed": "green",
    "failed": "red",
    "bounced": "red",
    "stopped": "red",
    "skipped": "yellow",
    "waiting": "cyan",
    "running": "cyan",
    "paused": "magenta",
    "replied": "blue",
    "removed": "dim",
    "pending": "dim",
}

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def styled_status(status: str) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def _fail(message: str) -> None:
    errors.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def _run(coroutine):
    try:
        return asyncio.run(coroutine)
    except (ServiceError, CampaignError, LeadFileError, PayloadCodecError) as error:
        _fail(str(error))
    except RPCError as error:
        if error.status in TIMEOUT_STATUSES:
            _fail(
                f"the request to the Temporal server timed out ({error.message}). A worker "
                "must run to answer it: check that one runs (`sequencer up` or `sequencer "
                "worker`), and try again once it has caught up with its work"
            )
        # Such as an update to a lead whose workflow task fails on the worker: the cause is
        # in the worker's log, not in this process.
        _fail(
            f"the Temporal server rejected the request ({error.status.name}): {error.message}. "
            "Check the worker's log (for `sequencer up`, the output of that command) for "
            "the cause, such as a payload key the worker does not have"
        )


def _settings() -> Settings:
    """Read the settings, or exit with the invalid setting's name and the fix."""
    try:
        return load_settings()
    except ValueError as error:
        _fail(f"invalid setting: {error}")
        raise


def _service() -> Sequencer:
    return Sequencer(_settings())


# The local stack


@app.command()
def up(
    temporal_port: Annotated[int, typer.Option(help="Temporal frontend port.")] = 7233,
    ui_port: Annotated[int, typer.Option(help="Temporal Web UI port.")] = 8233,
    smtp_port: Annotated[int, typer.Option(help="Local SMTP server port.")] = 2525,
    linkedin_port: Annotated[int, typer.Option(help="LinkedIn sandbox port.")] = 8765,
    webhook_port: Annotated[
        int, typer.Option(help="Port of the HTTP app: dashboard, API and provider webhooks.")
    ] = 8766,
    imap_port: Annotated[
        int, typer.Option(help="Local IMAP server (Dovecot) port, when Dovecot is installed.")
    ] = 1143,
) -> None:
    """Run the local stack in the foreground: Temporal, its UI, SMTP, LinkedIn sandbox, worker.

    Ctrl-C stops everything; the next `up` resumes every sleeping lead.
    """
    from sequencer.stack import LocalStack, StackError, StackPorts

    _configure_logging()
    stack = LocalStack(
        _settings(),
        StackPorts(temporal_port, ui_port, smtp_port, linkedin_port, webhook_port, imap_port),
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stack.start()
        console.print(
            f"[bold]Sequencer local stack is up[/bold] (data in {stack.home})\n"
            f"  Temporal  {stack.settings.temporal_address}   UI {stack.ui_url}\n"
            f"  SMTP      {stack.smtp_url}   mailbox {stack.mailbox}\n"
            f"  LinkedIn  {stack.settings.linkedin_url} (sandbox)\n"
            f"  HTTP      {stack.webhook_url}: dashboard, API (/docs) and webhooks; "
            "create a key with `sequencer apikey create NAME`\n"
            f"  IMAP      {stack.imap_url or 'none (install dovecot-imapd to read mailboxes)'}\n"
            f"  Codec     {stack.codec_url}: for the UI to show lead data, see "
            "docs/security.md\n"
            "Press Ctrl-C to stop.",
            highlight=False,
        )
        waiting = asyncio.create_task(stop.wait())
        worker = asyncio.create_task(stack.wait())
        await asyncio.wait({waiting, worker}, return_when=asyncio.FIRST_COMPLETED)
        console.print("Stopping...")
        await stack.stop()

    try:
        asyncio.run(serve())
    except StackError as error:
        _fail(str(error))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8766,
) -> None:
    """Serve the HTTP API, the dashboard and the webhooks, against TEMPORAL_ADDRESS.

    For production, where the worker runs on its own; `sequencer up` serves the same app.
    """
    import uvicorn

    from sequencer.http_app import create_http_app

    _configure_logging()
    settings = _settings()
    try:
        require_payload_keys(settings)
    except MissingPayloadKeyError as error:
        # One line, unwrapped, as a service's log line should be.
        errors.print(f"[red]error:[/red] cannot start: {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if not settings.payload_encryption:
        logging.getLogger("sequencer.serve").warning(
            "Payload encryption is off (SEQUENCER_PAYLOAD_ENCRYPTION=off): lead data is stored "
            "in Temporal in plaintext"
        )
    service = Sequencer(settings)
    try:
        app = create_http_app(service, settings)
    except ValueError as error:
        _fail(f"invalid setting: {error}")
    uvicorn.run(app, host=host, port=port, log_level="warning")
    service.close()


@app.command()
def worker() -> None:
    """Run only the worker, against TEMPORAL_ADDRESS (same as `python worker.py`)."""
    import worker as worker_module

    worker_module.main()


# Campaigns and leads


@app.command()
def validate(campaign: Annotated[Path, typer.Argument(help="Campaign YAML file.")]) -> None:
    """Check a campaign file and print its steps."""
    try:
        loaded = load_campaign(campaign)
    except CampaignError as error:
        _fail(str(error))
    table = Table(title=f"{loaded.name} ({loaded.id})")
    for column in ("step", "type", "channel", "wait after"):
        table.add_column(column)
    for number, step in enumerate(loaded.steps, start=1):
        wait = "" if number == len(loaded.steps) else format_duration(step.wait_after)
        table.add_row(str(number), step.type, step.channel.value, wait)
    console.print(table)
    for line in _settings_lines(loaded):
        console.print(line, highlight=False)


def _settings_lines(campaign: Campaign) -> list[str]:
    """Describe the campaign's schedule and limits as they were read from the file."""
    lines = [
        "schedule: "
        + (campaign.schedule.describe() if campaign.schedule else "none, steps run when due")
    ]
    if campaign.sender:
        sender = campaign.sender
        lines.append(
            f"sender: {sender.email} via {sender.smtp_url}, at most {sender.daily_limit} emails "
            f"in 24 hours, {format_duration(sender.min_spacing)} between two sends"
        )
    if any(step.channel.value == "linkedin" for step in campaign.steps):
        linkedin = campaign.linkedin
        lines.append(
            f"LinkedIn account: {linkedin.account}, at most {linkedin.daily_invites} "
            f"invitations in 24 hours; messages wait {format_duration(campaign.invite_timeout)} "
            "at most for an invitation to be accepted"
        )
    if campaign.max_new_leads_per_day:
        lines.append(f"new leads: at most {campaign.max_new_leads_per_day} started in 24 hours")
    return lines


@app.command()
def launch(
    campaign: Annotated[Path, typer.Argument(help="Campaign YAML file.")],
    leads: Annotated[Path, typer.Option("--leads", help="Lead CSV file.")],
    as_json: JsonOption = False,
) -> None:
    """Import leads from a CSV file and enroll each valid one in the campaign."""
    service = _service()
    counts = [0, 0]  # leads started so far, leads to start
    with console.status("Enrolling leads...") as status:

        def progress(done: int, total: int) -> None:
            counts[:] = [done, total]
            status.update(f"Enrolling leads... {done}/{total}")

        try:
            report: LaunchReport = _run(service.launch(campaign, leads, progress))
        except KeyboardInterrupt:
            done, total = counts
            if total:
                where = f"after {done} of {total} leads were enrolled"
            else:
                where = "before any lead was enrolled"
            errors.print(
                f"Launch interrupted {where}. Launch the same file again to enroll the "
                "rest; no lead is enrolled twice",
                highlight=False,
            )
            raise typer.Exit(130) from None
    if as_json:
        print(json.dumps(_launch_dict(report), indent=2, default=str))
        return
    _print_import(report)
    sender = report.campaign.sender
    watch = report.mailbox
    if watch and sender:
        console.print(
            f"Reading the mailbox of {sender.email} at {watch.imap_url} for bounces and replies",
            highlight=False,
        )
        if watch.moved_from:
            console.print(f"  (it was read at {watch.moved_from} until now)", highlight=False)
        if watch.problem:
            errors.print(
                f"[yellow]warning:[/yellow] the IMAP server {watch.imap_url}: {watch.problem}. "
                "The poller retries until it answers; see `sequencer mailbox list`",
                highlight=False,
            )
    elif sender and any(step.type == "email" for step in report.campaign.steps):
        console.print(
            f"The mailbox of {sender.email} is not read: set the sender's imap_url or "
            "SEQUENCER_IMAP_URL so that bounces and replies are found without `sequencer event`"
        )


def _launch_dict(report: LaunchReport) -> dict[str, Any]:
    return {
        "campaign": report.campaign.name,
        "campaign_id": report.campaign.id,
        "enrolled": report.enrolled,
        "already_enrolled": report.already_enrolled,
        "mailbox_workflow": report.mailbox.workflow_id if report.mailbox else None,
        "mailbox_problem": report.mailbox.problem if report.mailbox else None,
        **report.import_report.as_dict(),
    }


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _print_import(report: LaunchReport) -> None:
    imported = report.import_report
    console.print(
        f"[bold]{report.campaign.name}[/bold] ({report.campaign.id}): "
        f"{len(report.enrolled)} enrolled, {len(report.already_enrolled)} already enrolled, "
        f"{_count(len(imported.duplicates), 'duplicate row')}, "
        f"{_count(len(imported.rejected), 'rejected row')}",
        highlight=False,
    )
    if report.already_enrolled:
        already = len(report.already_enrolled)
        console.print(
            f"[yellow]{_count(already, 'lead')} {'was' if already == 1 else 'were'} already "
            "enrolled in this campaign and left unchanged.[/yellow]"
        )
    flagged = [lead for lead in imported.leads if lead.warnings]
    if flagged:
        table = Table(title="Leads with warnings")
        table.add_column("row", justify="right")
        table.add_column("lead")
        table.add_column("warning")
        for lead in flagged:
            table.add_row(str(lead.row), lead.lead.key, "\n".join(lead.warnings))
        console.print(table)
    if imported.duplicates:
        table = Table(title="Duplicate rows (merged into the first)")
        table.add_column("row", justify="right")
        table.add_column("line", justify="right")
        table.add_column("duplicate of row", justify="right")
        for duplicate in imported.duplicates:
            table.add_row(str(duplicate.row), str(duplicate.line), str(duplicate.of_row))
        console.print(table)
    if imported.rejected:
        table = Table(title="Rejected rows (not enrolled)")
        table.add_column("row", justify="right")
        table.add_column("line", justify="right")
        table.add_column("reason")
        for rejected in imported.rejected:
            table.add_row(str(rejected.row), str(rejected.line), rejected.reason)
        console.print(table)


@app.command()
def leads(
    campaign: Annotated[str, typer.Argument(help="Campaign id or name.")],
    as_json: JsonOption = False,
) -> None:
    """List a campaign's leads with their enrollment status."""
    service = _service()
    try:
        rows = service.enrollments(campaign)
    except ServiceError as error:
        _fail(str(error))
    if as_json:
        print(
            json.dumps(
                [
                    {"lead": r.lead_key, "status": r.status, "unsubscribed": r.unsubscribed}
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    table = Table(title=f"Leads of {campaign}")
    for column in ("lead", "status", "unsubscribed", "workflow id"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.lead_key,
            styled_status(row.status),
            "yes" if row.unsubscribed else "",
            row.workflow_id,
        )
    console.print(table)


# Reports


@app.command()
def activity(
    campaign: Annotated[str, typer.Argument(help="Campaign id or name.")],
    lead: Annotated[str, typer.Argument(help="The lead's email address or LinkedIn URL.")],
    as_json: JsonOption = False,
) -> None:
    """Show one lead's steps and every event, in time order."""
    service = _service()
    try:
        report = service.activity(campaign, lead)
    except ServiceError as error:
        _fail(str(error))
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
        return
    print_activity(report)


def print_activity(report: ActivityReport, compact: bool = False) -> None:
    """Print a lead's steps, then its timeline. `compact` shows times as offsets only."""
    enrollment = report.enrollment
    started = enrollment.enrolled_at
    console.print(
        f"[bold]{enrollment.lead_key}[/bold] in {report.campaign.name}: "
        + styled_status(enrollment.status)
        + (" [red](unsubscribed)[/red]" if enrollment.unsubscribed else ""),
        highlight=False,
    )
    if report.workflow_url:
        console.print(f"  workflow: {report.workflow_url}", highlight=False, soft_wrap=True)

    when = "when" if compact else "when (UTC)"
    steps = Table(title="Steps", title_justify="left")
    for column in ("step", "type", "channel", "status", when, "reason"):
        steps.add_column(column, no_wrap=column == when)
    for step in report.steps:
        steps.add_row(
            str(step.step),
            step.type,
            step.channel,
            styled_status(step.status.value),
            _when(step.at, started, compact),
            step.reason or "",
        )
    console.print(steps)

    timeline = Table(title="Timeline", title_justify="left")
    timeline.add_column(when, no_wrap=True)
    for column in ("what", "step", "reason", "detail"):
        timeline.add_column(column)
    for entry in report.log:
        timeline.add_row(
            _when(entry.at, started, compact),
            styled_status(entry.status) if entry.kind == "step" else entry.status,
            " ".join(str(part) for part in (entry.step, entry.step_type) if part)
            if entry.step
            else "",
            entry.reason or "",
            _shorten(entry.detail or "", 120),
        )
    console.print(timeline)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(at: datetime | None, start: datetime, compact: bool) -> str:
    """Format a time as its offset from enrollment, after the UTC time unless compact."""
    if at is None:
        return ""
    offset = _human_offset(max(0, round((at - start).total_seconds())))
    return offset if compact else f"{at:%m-%d %H:%M:%S} {offset}"


@app.command()
def stats(
    campaign: Annotated[str, typer.Argument(help="Campaign id or name.")],
    as_json: JsonOption = False,
) -> None:
    """Show a campaign's leads by status and each step's and channel's outcomes."""
    service = _service()
    try:
        result = service.stats(campaign)
    except ServiceError as error:
        _fail(str(error))
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    print_stats(result)


def print_stats(result: CampaignStats) -> None:
    leads = ", ".join(
        f"{styled_status(status)} {count}" for status, count in result.leads.items() if count
    )
    console.print(
        f"[bold]{result.campaign_name}[/bold] ({result.campaign_id}): {leads or 'no leads'}; "
        f"{result.unsubscribed} unsubscribed",
        highlight=False,
    )
    columns = ("sent", "failed", "bounced", "skipped", "waiting", "failure rate")
    steps = Table(title="Steps")
    steps.add_column("step")
    steps.add_column("type")
    for column in columns:
        steps.add_column(column, justify="right")
    for number, counts in sorted(result.steps.items()):
        steps.add_row(str(number), result.step_types[number], *_counts(counts))
    console.print(steps)
    channels = Table(title="Channels")
    channels.add_column("channel")
    for column in columns:
        channels.add_column(column, justify="right")
    for name, counts in sorted(result.channels.items()):
        channels.add_row(name, *_counts(counts))
    console.print(channels)


def _counts(counts) -> list[str]:
    rate = counts.failure_rate
    return [
        str(counts.sent),
        str(counts.failed),
        str(counts.bounced),
        str(counts.skipped),
        str(counts.waiting),
        "-" if rate is None else f"{rate:.0%}",
    ]


# Events


CampaignArgument = Annotated[str, typer.Argument(help="Campaign id or name.")]
LeadArgument = Annotated[str, typer.Argument(help="The lead's email address or LinkedIn URL.")]
StepOption = Annotated[int, typer.Option("--step", help="Step number, counted from 1.")]


@event_app.command("bounce")
def event_bounce(
    campaign: CampaignArgument,
    lead: LeadArgument,
    step: StepOption,
    reason: Annotated[str, typer.Option(help="Reason recorded with the step.")] = "bounce",
    detail: Annotated[str | None, typer.Option(help="The DSN status or SMTP reply.")] = None,
) -> None:
    """Report that an email step bounced; the lead is unsubscribed and moves on."""
    service = _service()
    message = _run(service.report_failure(campaign, lead, step, reason, True, detail))
    console.print(message, highlight=False)


@event_app.command("fail")
def event_fail(
    campaign: CampaignArgument,
    lead: LeadArgument,
    step: StepOption,
    reason: Annotated[str, typer.Option(help="Reason recorded with the step.")] = "failed",
    detail: Annotated[str | None, typer.Option(help="What the provider reported.")] = None,
) -> None:
    """Report that a step failed after it ran, such as a LinkedIn invitation."""
    service = _service()
    message = _run(service.report_failure(campaign, lead, step, reason, False, detail))
    console.print(message, highlight=False)


@event_app.command("reply")
def event_reply(
    campaign: CampaignArgument,
    lead: LeadArgument,
    channel: Annotated[str | None, typer.Option(help="Channel of the reply.")] = None,
    auto: Annotated[bool, typer.Option("--auto", help="An out-of-office auto-reply.")] = False,
) -> None:
    """Report that the lead replied: the sequence stops (an auto-reply is only recorded)."""
    service = _service()
    console.print(_run(service.report_reply(campaign, lead, channel, auto)), highlight=False)


@event_app.command("mail")
def event_mail(
    files: Annotated[
        list[Path], typer.Argument(help="Messages from the sender's mailbox, as .eml files.")
    ],
) -> None:
    """Apply messages from a sender's mailbox: bounces, delay warnings, replies, complaints.

    Each message is classified and matched to its lead by the Message-ID the engine sent, or
    else by the address. A message applied before changes nothing.
    """
    service = _service()
    failed = False
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as error:
            errors.print(f"[red]error:[/red] cannot read {path}: {error.strerror}", highlight=False)
            failed = True
            continue
        if not _looks_like_email(raw):
            errors.print(
                f"[red]error:[/red] {path} is not an email message: it has none of the From, "
                "To, Subject, Date or Message-ID headers. Save the message with its headers "
                "(as .eml) and try again",
                highlight=False,
            )
            failed = True
            continue
        for line in _run(service.apply_mail(raw, source=str(path))):
            console.print(line, highlight=False)
    if failed:
        raise typer.Exit(1)


def _looks_like_email(raw: bytes) -> bool:
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    return any(headers[name] for name in ("From", "To", "Subject", "Date", "Message-ID"))


@event_app.command("invite-accepted")
def event_invite_accepted(
    campaign: CampaignArgument,
    lead: LeadArgument,
    detail: Annotated[str | None, typer.Option(help="What the provider reported.")] = None,
) -> None:
    """Report that the lead accepted the LinkedIn invitation: a waiting message is sent."""
    console.print(_run(_service().report_invitation(campaign, lead, True, detail)), highlight=False)


@event_app.command("invite-declined")
def event_invite_declined(
    campaign: CampaignArgument,
    lead: LeadArgument,
    detail: Annotated[
        str | None, typer.Option(help="What the provider reported: declined, withdrawn...")
    ] = None,
) -> None:
    """Report that the invitation was declined or withdrawn: LinkedIn messages fail."""
    console.print(
        _run(_service().report_invitation(campaign, lead, False, detail)), highlight=False
    )


# Operator controls


NoteOption = Annotated[str | None, typer.Option("--note", help="The reason, kept in the Activity.")]


@lead_app.command("pause")
def lead_pause(campaign: CampaignArgument, lead: LeadArgument, note: NoteOption = None) -> None:
    """Pause a lead: nothing is sent and its remaining wait is frozen until it is resumed."""
    console.print(_run(_service().control(campaign, lead, "pause", note)), highlight=False)


@lead_app.command("resume")
def lead_resume(campaign: CampaignArgument, lead: LeadArgument, note: NoteOption = None) -> None:
    """Resume a paused lead with the wait it had left."""
    console.print(_run(_service().control(campaign, lead, "resume", note)), highlight=False)


@lead_app.command("remove")
def lead_remove(campaign: CampaignArgument, lead: LeadArgument, note: NoteOption = None) -> None:
    """Take a lead out of the campaign: its remaining steps are skipped, status removed."""
    console.print(_run(_service().control(campaign, lead, "remove", note)), highlight=False)


@lead_app.command("reassign")
def lead_reassign(
    campaign: CampaignArgument,
    lead: Annotated[
        str | None, typer.Argument(help="The lead's email address or LinkedIn URL.")
    ] = None,
    every_lead: Annotated[
        bool, typer.Option("--all", help="Move every lead of the campaign that has not ended.")
    ] = False,
    to: Annotated[str | None, typer.Option("--to", help="The new sender's address.")] = None,
    smtp_url: Annotated[
        str | None, typer.Option(help="The new sender's SMTP server, if it differs.")
    ] = None,
    linkedin_account: Annotated[
        str | None, typer.Option(help="The LinkedIn account to use instead.")
    ] = None,
) -> None:
    """Move a lead, or with --all every lead of the campaign, to another sender account.

    A lead paused because its account is disconnected or at its daily limit resumes at once.
    """
    service = _service()
    if every_lead == (lead is not None):
        _fail("name one lead, or give --all to move every lead of the campaign")
    if every_lead:
        for line in _run(service.reassign_all(campaign, to, smtp_url, linkedin_account)):
            console.print(line, highlight=False)
        return
    message = _run(service.reassign(campaign, lead, to, smtp_url, linkedin_account))
    console.print(message, highlight=False)


AddressArgument = Annotated[str, typer.Argument(help="The email address.")]


@app.command()
def unsubscribe(address: AddressArgument) -> None:
    """Add an address to the suppression list: no campaign emails it any more."""
    for line in _run(_service().unsubscribe(address)):
        console.print(line, highlight=False)


@app.command()
def resubscribe(
    address: AddressArgument,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Also start again, from the first step never executed, the "
            "enrollments a bounce of this address stopped.",
        ),
    ] = False,
) -> None:
    """Remove an address from the suppression list."""
    for line in _run(_service().resubscribe(address, resume)):
        console.print(line, highlight=False)


@app.command()
def sends(
    uncertain: Annotated[
        bool,
        typer.Option(
            "--uncertain",
            help="Only the sends whose outcome is unknown (recorded as sent, never sent again).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Show the email sends in the send ledger, which keeps each email step to one send.

    The ledger lists sends that reached the SMTP server or may have. A message the server
    rejected is not in it.
    """
    rows = _service().sends("uncertain" if uncertain else None)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("No uncertain sends." if uncertain else "No email sends yet.")
        return
    table = Table(title="Uncertain email sends" if uncertain else "Email sends")
    for column in ("at (UTC)", "campaign", "lead", "step", "state", "detail"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["updated_at"][:19].replace("T", " "),
            row["campaign"] or "",
            row["lead"] or row["workflow_id"],
            str(row["step"]),
            row["state"],
            row["detail"] or "",
        )
    console.print(table)


# Sender accounts


@account_app.command("list")
def account_list(as_json: JsonOption = False) -> None:
    """Show every sender account in use: connected or not, and its sends of the last 24 hours."""
    rows = _run(_service().accounts())
    if as_json:
        print(json.dumps([json.loads(row.model_dump_json()) for row in rows], indent=2))
        return
    if not rows:
        console.print("No sender account has been used yet.")
        return
    table = Table(title="Sender accounts")
    # Slots count sends booked in the last 24 hours, whether the send succeeded or not.
    for column in ("account", "status", "since", "leads waiting", "slots in 24 h", "ahead"):
        table.add_column(column)
    for row in rows:
        status = (
            "[green]connected[/green]"
            if row.connected
            else f"[red]disconnected[/red]: {row.reason}"
        )
        table.add_row(
            row.id,
            status,
            row.since.strftime("%Y-%m-%d %H:%M:%S") if row.since else "",
            str(row.waiting_leads),
            ", ".join(f"{kind} {count}" for kind, count in sorted(row.sends_last_24h.items())),
            str(row.booked_ahead),
        )
    console.print(table)


@apikey_app.command("create")
def apikey_create(
    name: Annotated[str, typer.Argument(help="Who or what uses the key, such as 'crm-sync'.")],
) -> None:
    """Create an API key and print it once: only its digest is stored."""
    from sequencer.api_keys import create_api_key

    service = _service()
    try:
        created = create_api_key(service.store, name)
    except ValueError as error:
        _fail(str(error))
    errors.print(
        f"API key {created.id} ({created.name}) created. It is shown only now: keep it in a "
        "secret store.",
        highlight=False,
    )
    print(created.key)


@apikey_app.command("list")
def apikey_list(as_json: JsonOption = False) -> None:
    """List API keys: id, name, first characters, creation, last use, revocation."""
    rows = _service().store.list_api_keys()
    if as_json:
        print(json.dumps([row.__dict__ for row in rows], indent=2, default=str))
        return
    table = Table(title="API keys")
    for column in ("id", "name", "key", "created", "last used", "revoked"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row.id),
            row.name,
            f"{row.prefix}...",
            row.created_at.strftime("%Y-%m-%d %H:%M"),
            row.last_used_at.strftime("%Y-%m-%d %H:%M") if row.last_used_at else "",
            row.revoked_at.strftime("%Y-%m-%d %H:%M") if row.revoked_at else "",
        )
    console.print(table)


@apikey_app.command("revoke")
def apikey_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id (apikey list).")],
) -> None:
    """Revoke an API key: requests that carry it are refused from now on."""
    if not _service().store.revoke_api_key(key_id):
        _fail(f"API key {key_id} not found, or already revoked: see `sequencer apikey list`")
    console.print(f"API key {key_id} revoked")


@payload_key_app.command("generate")
def payload_key_generate(
    key_id: Annotated[
        str | None,
        typer.Option(
            "--id",
            help="Key id, stored with every payload it encrypts (default: kYYYYMMDD-xxxx).",
        ),
    ] = None,
) -> None:
    """Print a new payload key as ID:BASE64 (32 random bytes) for SEQUENCER_PAYLOAD_KEYS."""
    try:
        entry = generate_key_entry(key_id)
    except ValueError as error:
        _fail(str(error))
    errors.print(
        "New payload key for SEQUENCER_PAYLOAD_KEYS. To rotate, add it after the current key "
        "everywhere, then move it first (docs/security.md). Keep a copy in a secret store, "
        "because the payloads it encrypts cannot be read without it.",
        highlight=False,
    )
    print(entry)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the database's schema to the latest revision. The worker, the API and every
    command do it too when they open the database, so this is for a deploy step that runs
    before them."""
    from sequencer.schema import SchemaError, head_revision, upgrade

    with _database() as engine:
        try:
            before = upgrade(engine)
        except SchemaError as error:
            _fail(str(error))
    head = head_revision()
    if before == head:
        console.print(f"The database is at the latest schema revision, {head}: nothing to do")
    else:
        console.print(f"Upgraded the database from schema revision {before or 'none'} to {head}")


@db_app.command("status")
def db_status() -> None:
    """Print the database's schema revision and the latest one; exit with 1 when they differ."""
    from sequencer.schema import current_revision, head_revision

    with _database() as engine:
        current = current_revision(engine)
    head = head_revision()
    console.print(f"schema revision: {current or 'none'} (latest: {head})")
    if current != head:
        _fail("the database is not at the latest revision: run `sequencer db upgrade`")


@contextmanager
def _database() -> Iterator[Engine]:
    """Yield an engine on DATABASE_URL; exit with one line when the URL is invalid or the
    database cannot be opened."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = _settings().database_url
    try:
        shown = make_url(url).render_as_string(hide_password=True)
        engine = create_engine(url)
    except ArgumentError as error:
        # Only the scheme is shown, because the rest of the URL may carry a password.
        scheme = url.partition("://")[0]
        _fail(
            f"invalid DATABASE_URL (scheme {scheme!r}): {error}. Use sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/NAME"
        )
    try:
        yield engine
    except OperationalError as error:
        reason = " ".join(str(error.orig).split())
        _fail(f"cannot open the database {shown}: {reason}. Check DATABASE_URL")
    finally:
        engine.dispose()


MAILBOX_STATE_STYLE = {
    "reading": "[green]{}[/green]",
    "retrying": "[yellow]{}[/yellow]",
    "failed": "[red]{}[/red]",
}


@mailbox_app.command("list")
def mailbox_list(as_json: JsonOption = False) -> None:
    """Show every mailbox being read: how far, how many messages, and the last poll."""
    rows = _run(_service().mailboxes())
    if as_json:
        print(json.dumps([json.loads(row.model_dump_json()) for row in rows], indent=2))
        return
    if not rows:
        console.print(
            "No mailbox is read: `sequencer launch` starts reading the sender's mailbox when "
            "the sender has an imap_url or SEQUENCER_IMAP_URL is set."
        )
        return
    table = Table(title="Mailboxes")
    columns = ("address", "state", "server", "every", "polls", "messages", "not applied")
    for column in (*columns, "last poll"):
        table.add_column(column)
    for row in rows:
        totals = row.totals
        last = totals.last_poll_at.strftime("%Y-%m-%d %H:%M:%S") if totals.last_poll_at else ""
        state = MAILBOX_STATE_STYLE.get(row.state, "{}").format(row.state)
        if row.problem:
            state += f": {row.problem}"
        table.add_row(
            row.address,
            state,
            row.imap_url,
            format_duration(row.poll_interval),
            str(totals.polls),
            str(totals.messages),
            str(totals.failed),
            f"{last} {totals.last_summary or ''}".strip(),
        )
    console.print(table)


MailboxArgument = Annotated[str, typer.Argument(help="The sender's email address.")]


@mailbox_app.command("poll")
def mailbox_poll(address: MailboxArgument) -> None:
    """Read a sender's mailbox now instead of at the next poll."""
    console.print(_run(_service().mailbox_signal(address, "poll_now")), highlight=False)


@mailbox_app.command("stop")
def mailbox_stop(address: MailboxArgument) -> None:
    """Stop reading a sender's mailbox; the next launch for this sender starts it again."""
    console.print(_run(_service().mailbox_signal(address, "stop")), highlight=False)


AccountArgument = Annotated[
    str, typer.Argument(help="The account: an email address, or email:ADDRESS, linkedin:NAME.")
]


@account_app.command("reconnect")
def account_reconnect(
    account: AccountArgument,
    note: NoteOption = None,
) -> None:
    """Mark an account connected again: every lead it paused resumes by itself."""
    console.print(_run(_service().account_action(account, "reconnect", note)), highlight=False)


@account_app.command("disconnect")
def account_disconnect(account: AccountArgument, note: NoteOption = None) -> None:
    """Mark an account disconnected: its leads pause on their next send until it reconnects."""
    console.print(_run(_service().account_action(account, "disconnect", note)), highlight=False)


# Tasks


@task_app.command("list")
def task_list(
    campaign: Annotated[str | None, typer.Option(help="Only this campaign's tasks.")] = None,
    all_tasks: Annotated[bool, typer.Option("--all", help="Include closed tasks.")] = False,
    as_json: JsonOption = False,
) -> None:
    """List open calls and manual tasks."""
    service = _service()
    try:
        rows = service.tasks(None if all_tasks else "open", campaign)
    except ServiceError as error:
        _fail(str(error))
    if as_json:
        print(json.dumps([row.__dict__ for row in rows], indent=2, default=str))
        return
    if not rows:
        console.print("No open tasks." if not all_tasks else "No tasks.")
        return
    table = Table(title="Tasks")
    for column in ("id", "campaign", "lead", "step", "type", "status", "instructions"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row.id),
            row.campaign_id,
            row.lead_key,
            str(row.step),
            row.step_type,
            styled_status(row.status),
            row.instructions,
        )
    console.print(table)


TaskArgument = Annotated[int, typer.Argument(help="Task id, from `sequencer task list`.")]


@task_app.command("done")
def task_done(
    task: TaskArgument, note: Annotated[str | None, typer.Option(help="A note to keep.")] = None
) -> None:
    """Mark a task done; the lead's next wait counts from now."""
    console.print(_run(_service().close_task(task, "done", note)), highlight=False)


@task_app.command("fail")
def task_fail(
    task: TaskArgument,
    reason: Annotated[str, typer.Option(help="Why, such as wrong_number.")] = "task_failed",
) -> None:
    """Mark a task failed (a wrong or dead number): the channel's other steps are skipped."""
    console.print(_run(_service().close_task(task, "failed", reason)), highlight=False)


@task_app.command("skip")
def task_skip(
    task: TaskArgument, note: Annotated[str | None, typer.Option(help="A note to keep.")] = None
) -> None:
    """Skip a task; the lead's next step runs at once."""
    console.print(_run(_service().close_task(task, "skipped", note)), highlight=False)


# What-if runs and the demo


@app.command()
def simulate(
    campaign: Annotated[Path, typer.Argument(help="Campaign YAML file.")],
    leads: Annotated[Path, typer.Option("--leads", help="Lead CSV file.")],
    outcomes: Annotated[Path, typer.Option("--outcomes", help="Outcomes YAML file.")],
    as_json: JsonOption = False,
) -> None:
    """Run the campaign on a time-skipping server with scripted outcomes, and show the result."""
    from sequencer.simulate import OutcomesError, load_outcomes, run_simulation

    try:
        loaded = load_campaign(campaign)
        report = read_leads(leads, loaded)
        lead_list = [imported.lead for imported in report.leads]
        scripts = load_outcomes(outcomes, loaded, lead_list)
    except (CampaignError, LeadFileError, OutcomesError) as error:
        _fail(str(error))
    with console.status("Simulating...") if not as_json else _nothing():
        result = asyncio.run(run_simulation(loaded, lead_list, scripts))
    for warning in result.pop("warnings"):
        errors.print(f"[yellow]warning:[/yellow] ignored {warning}", highlight=False)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"[bold]{result['campaign']}[/bold]: what-if run of {len(lead_list)} leads")
    for lead in result["leads"]:
        table = Table(
            title=f"{lead['lead']}: {lead['status']}"
            + (" (unsubscribed)" if lead["unsubscribed"] else ""),
            title_justify="left",
        )
        for column in ("step", "type", "status", "at", "reason"):
            table.add_column(column)
        for step in lead["steps"]:
            at = "" if step["at_seconds"] is None else _human_offset(step["at_seconds"])
            table.add_row(
                str(step["step"]),
                step["type"],
                styled_status(step["status"]),
                at,
                step["reason"] or "",
            )
        console.print(table)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _human_offset(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{days}d" if days else "",
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
    ]
    text = "".join(parts) + (f"{secs}s" if secs or not any(parts) else "")
    return f"+{text}"


@app.command()
def demo(
    timeout: Annotated[
        int, typer.Option(help="Stop waiting for the leads after this many seconds.")
    ] = 110,
) -> None:
    """Run the example campaigns on the local stack and print their stats and activity."""
    from sequencer.demo import run_demo

    _configure_logging(logging.WARNING)
    try:
        asyncio.run(run_demo(_settings(), console, timeout))
    except (ServiceError, CampaignError, LeadFileError) as error:
        _fail(str(error))


def _configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=os.environ.get("SEQUENCER_LOG_LEVEL", level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # transitions logs every state change at INFO without any id. The activity log records
    # the same changes with the lead and step.
    logging.getLogger("transitions").setLevel(logging.WARNING)


def main() -> None:
    code = 0
    try:
        app()
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            code = 1
    except KeyboardInterrupt:
        code = 130
    exit_without_teardown(code)


if __name__ == "__main__":
    main()
