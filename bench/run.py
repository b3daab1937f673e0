"""Run the benchmarks on a local Temporal dev server and write docs/benchmarks.md.

    python -m bench                  # every benchmark, three runs each
    python -m bench --leads 200 --runs 1 --output /tmp/benchmarks.md

Each run starts a fresh dev server (SQLite file, like `sequencer up`) and one in-process worker
with the same settings for the engine and the baseline. The engine runs a 5-step mixed
campaign with zero waits, with payload encryption on as in production. Its channel activities
return at once (the what-if simulator's), while the activity log goes to a real SQLite
database and sending slots are booked on the real sender account workflows. The baseline runs
one no-op activity per step, without encryption.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import temporalio
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHistory
from temporalio.common import WorkflowIDReusePolicy
from temporalio.worker import Worker

from activities.records import StoreActivities
from bench.baseline import BaselineLead, BaselinePlan, noop
from sequencer.campaign import Campaign, parse_campaign
from sequencer.codec import EncryptionCodec, generate_key_entry, parse_keys
from sequencer.models import TASK_QUEUE, EnrollmentInput, Lead, workflow_id_for
from sequencer.service import _start_lead
from sequencer.simulate import SimulatedChannels
from sequencer.stack import free_port
from sequencer.storage import Store
from sequencer.temporal import (
    connect,
    find_binary,
    lead_worker,
    search_attribute_flags,
    workflow_runner,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
BASELINE_QUEUE = "bench-baseline"
# Workflows started at once; more only queue up in the client.
START_CONCURRENCY = 64

# History events that Temporal bills as actions, by the name used in the report.
ACTION_EVENTS = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED: "workflow start",
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: "activity",
    EventType.EVENT_TYPE_TIMER_STARTED: "timer",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED: "signal received",
    EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED: "signal sent",
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: "search attribute update",
    EventType.EVENT_TYPE_MARKER_RECORDED: "marker (patch)",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: "update",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW: "continue as new",
}


def mixed_campaign(campaign_id: str) -> Campaign:
    return parse_campaign(
        {
            "name": campaign_id,
            "id": campaign_id,
            "sender": {"email": "rep@acme.test", "daily_limit": 1_000_000},
            "steps": [
                {"type": "email", "subject": "Hi {{first_name}}", "body": "One"},
                {"type": "linkedin_visit"},
                {"type": "call"},
                {"type": "email", "subject": "Again", "body": "Two"},
                {"type": "linkedin_visit"},
            ],
        }
    )


def leads(count: int) -> list[Lead]:
    return [
        Lead(
            email=f"lead{number}@example.com",
            first_name=f"Lead{number}",
            linkedin_url=f"https://www.linkedin.com/in/lead-{number}",
            phone="+33612345678",
        )
        for number in range(count)
    ]


class DevServer:
    """A `temporal server start-dev` on a SQLite file in a folder of its own."""

    def __init__(self, folder: Path, codec: EncryptionCodec | None = None) -> None:
        self.folder = folder
        self.codec = codec
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Client:
        log = (self.folder / "temporal.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(find_binary("temporal")),
                "server",
                "start-dev",
                "--headless",
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--db-filename",
                str(self.folder / "temporal.db"),
                "--log-level",
                "error",
                "--sqlite-pragma",
                "journal_mode=wal",
                "--sqlite-pragma",
                "synchronous=normal",
                *search_attribute_flags(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        for _ in range(120):
            try:
                client = await connect(self.address, payload_codec=self.codec)
                await client.count_workflows()
                return client
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.5)
        raise RuntimeError(f"the dev server did not start; see {self.folder / 'temporal.log'}")

    async def __aexit__(self, *exc_info: Any) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)


async def start_all(count: int, start: Callable[[int], Awaitable[None]]) -> None:
    gate = asyncio.Semaphore(START_CONCURRENCY)

    async def one(number: int) -> None:
        async with gate:
            await start(number)

    await asyncio.gather(*(one(number) for number in range(count)))


async def wait_until_done(client: Client, workflow_type: str, count: int) -> None:
    query = f'WorkflowType = "{workflow_type}" AND ExecutionStatus = "Completed"'
    while (await client.count_workflows(query)).count < count:
        await asyncio.sleep(0.2)


@dataclass
class Run:
    """One run of one workload: its throughput and the histories of a sample of its leads."""

    leads: int
    seconds: float
    histories: list[WorkflowHistory] = field(default_factory=list)
    # Events of the other workflows the leads used (sender accounts), over the whole run.
    shared_events: Counter[str] = field(default_factory=Counter)

    @property
    def per_second(self) -> float:
        return self.leads / self.seconds


async def sample_histories(client: Client, ids: list[str]) -> list[WorkflowHistory]:
    return [await client.get_workflow_handle(workflow_id).fetch_history() for workflow_id in ids]


async def account_events(client: Client) -> Counter[str]:
    """Count the events of the sender account workflows, by action name and in all."""
    counts: Counter[str] = Counter()
    async for execution in client.list_workflows('WorkflowType = "SenderAccountWorkflow"'):
        history = await client.get_workflow_handle(
            execution.id, run_id=execution.run_id
        ).fetch_history()
        counts.update(classify(history))
    return counts


def classify(history: WorkflowHistory) -> Counter[str]:
    counts: Counter[str] = Counter(events=len(history.events))
    for event in history.events:
        name = ACTION_EVENTS.get(event.event_type)
        if name:
            counts[name] += 1
    return counts


def production_codec() -> EncryptionCodec:
    """Return the payload encryption that production workers use, with a throwaway key."""
    return EncryptionCodec(parse_keys(generate_key_entry("bench"), "bench"), source="bench")


async def run_engine(folder: Path, count: int) -> Run:
    async with DevServer(folder, production_codec()) as client:
        store = Store(f"sqlite:///{folder / 'sequencer.db'}")
        records = StoreActivities(store)
        channels = SimulatedChannels({})
        campaign = mixed_campaign(f"bench-{uuid.uuid4().hex[:8]}")
        people = leads(count)
        ids = [workflow_id_for(campaign.id, lead.key) for lead in people]
        worker = lead_worker(
            client,
            TASK_QUEUE,
            [
                channels.send_email,
                channels.linkedin_step,
                channels.create_task,
                records.record_activity,
            ],
            account_check_interval=None,
        )
        async with worker:

            async def start(number: int) -> None:
                store.add_enrollment(ids[number], campaign.id, people[number])
                await _start_lead(
                    client,
                    EnrollmentInput(campaign=campaign, lead=people[number]),
                    ids[number],
                    WorkflowIDReusePolicy.REJECT_DUPLICATE,
                    1,
                )

            began = time.monotonic()
            await start_all(count, start)
            await wait_until_done(client, "LeadSequenceWorkflow", count)
            seconds = time.monotonic() - began
            sample = ids[:: max(1, count // 20)][:20]
            run = Run(count, seconds, await sample_histories(client, sample))
            run.shared_events = await account_events(client)
        store.close()
    return run


async def run_baseline(folder: Path, count: int, timers: int) -> Run:
    async with DevServer(folder) as client:
        worker = Worker(
            client,
            task_queue=BASELINE_QUEUE,
            workflows=[BaselineLead],
            activities=[noop],
            workflow_runner=workflow_runner(),
        )
        ids = [f"baseline-{number}" for number in range(count)]
        async with worker:

            async def start(number: int) -> None:
                await client.start_workflow(
                    BaselineLead.run,
                    BaselinePlan(steps=STEPS, timers=timers),
                    id=ids[number],
                    task_queue=BASELINE_QUEUE,
                )

            began = time.monotonic()
            await start_all(count, start)
            await wait_until_done(client, "BaselineLead", count)
            seconds = time.monotonic() - began
            sample = ids[:: max(1, count // 20)][:20]
            return Run(count, seconds, await sample_histories(client, sample))


def per_step(runs: list[Run]) -> dict[str, float]:
    """Return the median, over the sampled leads of every run, of each count per step, with
    the account workflows' events spread over every executed step."""
    names = sorted({name for run in runs for h in run.histories for name in classify(h)})
    medians = {}
    for name in names:
        values = [classify(h)[name] / STEPS for run in runs for h in run.histories]
        medians[name] = statistics.median(values)
    shared = Counter()
    steps = 0
    for run in runs:
        shared.update(run.shared_events)
        steps += run.leads * STEPS
    for name, total in shared.items():
        medians[f"{name} (sender accounts)"] = total / steps
    return medians


def timers_per_lead(run: Run) -> int:
    return int(statistics.median(classify(h)["timer"] for h in run.histories))


def report(
    machine: dict[str, str],
    command: str,
    throughput: dict[int, tuple[list[Run], list[Run]]],
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench`; do not edit by hand. Every figure of the engine is a",
        "ratio to the baseline, measured in the same run on the same server and worker",
        "settings: a workflow with one no-op activity per step (`bench/baseline.py`).",
        "The engine encrypts its payloads as production workers do; the baseline does not.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in machine.items()],
        f"- command: `{command}`",
        "",
        "## Throughput: leads per second through a 5-step mixed campaign",
        "",
        "Zero waits; channels answer at once. Median of the runs; the raw figures follow.",
        "",
        "| leads | engine (leads/s) | baseline (leads/s) | ratio | target |",
        "|---:|---:|---:|---:|---|",
    ]
    for count, (engine, baseline) in sorted(throughput.items()):
        ours = statistics.median(r.per_second for r in engine)
        theirs = statistics.median(r.per_second for r in baseline)
        verdict = "met" if ours / theirs >= 0.8 else "missed"
        lines.append(
            f"| {count:,} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} | "
            f"at least 0.8: {verdict} |"
        )
    lines += ["", "Raw runs (seconds for all leads):", ""]
    for count, (engine, baseline) in sorted(throughput.items()):
        lines.append(
            f"- {count:,} leads: engine "
            + ", ".join(f"{r.seconds:.1f}" for r in engine)
            + "; baseline "
            + ", ".join(f"{r.seconds:.1f}" for r in baseline)
        )
    largest = max(throughput)
    engine_cost = per_step(throughput[largest][0])
    baseline_cost = per_step(throughput[largest][1])
    ours, theirs = _billable(engine_cost), _billable(baseline_cost)
    lines += [
        "",
        "## Cost per executed step",
        "",
        f"History events and billable actions per executed step ({largest:,} leads, median of "
        "20 sampled leads per run; the sender account workflows' events spread over every step).",
        "",
        "| count per step | engine | baseline |",
        "|---|---:|---:|",
    ]
    for name in sorted(set(engine_cost) | set(baseline_cost)):
        lines.append(
            f"| {name} | {engine_cost.get(name, 0):.2f} | {baseline_cost.get(name, 0):.2f} |"
        )
    verdict = "met" if ours / theirs <= 1.25 else "missed"
    lines += [
        f"| **billable actions** | **{ours:.2f}** | **{theirs:.2f}** |",
        "",
        f"Billable actions per step: {ours / theirs:.2f} times the baseline's (target at most "
        f"1.25: {verdict}).",
        "",
    ]
    return "\n".join(lines)


def _billable(costs: dict[str, float]) -> float:
    return sum(value for name, value in costs.items() if not name.startswith("events"))


def machine_description() -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "Python": platform.python_version(),
        "temporalio": temporalio.__version__,
        "Temporal CLI": subprocess.run(
            [str(find_binary("temporal")), "--version"], capture_output=True, text=True
        ).stdout.strip(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


async def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--leads",
        type=int,
        nargs="+",
        default=[1000, 10000],
        help="lead counts of the throughput benchmark (default: 1000 10000)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each workload (default 3)")
    parser.add_argument(
        "--output", type=Path, default=REPO / "docs" / "benchmarks.md", help="report file"
    )
    options = parser.parse_args(arguments)
    throughput: dict[int, tuple[list[Run], list[Run]]] = {}
    with tempfile.TemporaryDirectory(prefix="sequencer-bench-") as scratch:
        for count in options.leads:
            engine_runs, baseline_runs = [], []
            for number in range(options.runs):
                folder = Path(scratch) / f"engine-{count}-{number}"
                folder.mkdir()
                engine = await run_engine(folder, count)
                engine_runs.append(engine)
                folder = Path(scratch) / f"baseline-{count}-{number}"
                folder.mkdir()
                baseline = await run_baseline(folder, count, timers_per_lead(engine))
                baseline_runs.append(baseline)
                print(
                    f"{count} leads, run {number + 1}: engine {engine.seconds:.1f}s, "
                    f"baseline {baseline.seconds:.1f}s",
                    file=sys.stderr,
                )
            throughput[count] = (engine_runs, baseline_runs)
    command = "python -m bench " + " ".join(arguments if arguments is not None else sys.argv[1:])
    options.output.write_text(report(machine_description(), command.strip(), throughput))
    print(f"wrote {options.output}", file=sys.stderr)
