"""Run the benchmarks on a local Temporal dev server and write docs/benchmarks.md.

    python -m bench                  # every benchmark, three runs each
    python -m bench --leads 200 --runs 1 --output /tmp/benchmarks.md

Each run starts a fresh dev server (SQLite file, like `sequencer up`) and one in-process worker
with the same settings for the engine and the baseline. The engine runs a 5-step mixed
campaign with zero waits. Its channel activities return at once (the what-if simulator's),
while the activity log and the sending slots go to a real SQLite database. The baseline runs
one no-op activity per step. Both encrypt their payloads, as production workers do.
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
from bench import baseline as baseline_module
from bench.baseline import BaselineLead, BaselinePlan, noop
from bench.workloads import (
    BOUNCE_RATE,
    Import,
    Memory,
    Reaction,
    import_rate,
    reaction_baseline,
    reaction_engine,
    sleeping_memory,
)
from sequencer.campaign import Campaign, parse_campaign
from sequencer.codec import EncryptionCodec, generate_key_entry, parse_keys
from sequencer.models import TASK_QUEUE, EnrollmentInput, Lead, workflow_id_for
from sequencer.service import ENROLLMENT_BATCH, _start_lead
from sequencer.service import START_CONCURRENCY as LAUNCH_CONCURRENCY
from sequencer.simulate import SimulatedChannels
from sequencer.stack import free_port
from sequencer.storage import Store
from sequencer.temporal import (
    cache_bytecode,
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
# How often a long wait prints how far it got.
PROGRESS_INTERVAL = 30.0

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

    def cpu_seconds(self) -> float:
        """Return the CPU time the server process has used so far, user and system."""
        assert self.process is not None
        return process_cpu_seconds(self.process.pid)


def process_cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def enroll(client: Client, store: Store, campaign: Campaign, lead: Lead) -> None:
    """Enroll one lead: write its enrollment row, then start its workflow."""
    workflow_id = workflow_id_for(campaign.id, lead.key)
    store.add_enrollment(workflow_id, campaign.id, lead)
    await _start(client, campaign, lead, workflow_id)


async def enroll_all(client: Client, store: Store, campaign: Campaign, people: list[Lead]) -> None:
    """Enroll the leads as a launch does: rows written ENROLLMENT_BATCH at a time in a thread,
    each batch before its leads start and the next one while they start."""
    pairs = [(workflow_id_for(campaign.id, lead.key), lead) for lead in people]
    batches = [
        pairs[first : first + ENROLLMENT_BATCH] for first in range(0, len(pairs), ENROLLMENT_BATCH)
    ]
    gate = asyncio.Semaphore(START_CONCURRENCY)

    async def one(workflow_id: str, lead: Lead) -> None:
        async with gate:
            await _start(client, campaign, lead, workflow_id)

    def write(number: int) -> asyncio.Future[set[str]]:
        return asyncio.ensure_future(
            asyncio.to_thread(store.add_enrollments, campaign.id, batches[number])
        )

    writing = write(0)
    for number, batch in enumerate(batches):
        await writing
        if number + 1 < len(batches):
            writing = write(number + 1)
        await asyncio.gather(*(one(workflow_id, lead) for workflow_id, lead in batch))


async def _start(client: Client, campaign: Campaign, lead: Lead, workflow_id: str) -> None:
    await _start_lead(
        client,
        # One worker polls every task queue, as by default: channel queues off.
        EnrollmentInput(campaign=campaign, lead=lead, channel_queues=False),
        workflow_id,
        WorkflowIDReusePolicy.REJECT_DUPLICATE,
        1,
    )


class CpuClock:
    """CPU seconds used by this process (the worker) and the dev server since it was made."""

    def __init__(self, server: DevServer) -> None:
        self.server = server
        self.started = (process_cpu_seconds(os.getpid()), server.cpu_seconds())

    def elapsed(self) -> tuple[float, float]:
        worker, server = process_cpu_seconds(os.getpid()), self.server.cpu_seconds()
        return worker - self.started[0], server - self.started[1]


async def start_all(count: int, start: Callable[[int], Awaitable[None]]) -> None:
    gate = asyncio.Semaphore(START_CONCURRENCY)

    async def one(number: int) -> None:
        async with gate:
            await start(number)

    await asyncio.gather(*(one(number) for number in range(count)))


async def wait_until_done(client: Client, workflow_type: str, count: int) -> None:
    """Wait until `count` workflows of the type have completed, printing progress meanwhile."""
    query = f'WorkflowType = "{workflow_type}" AND ExecutionStatus = "Completed"'
    began = reported = time.monotonic()
    while (done := (await client.count_workflows(query)).count) < count:
        if time.monotonic() - reported >= PROGRESS_INTERVAL:
            reported = time.monotonic()
            print(
                f"  {workflow_type}: {done:,} of {count:,} done after {reported - began:.0f} s",
                file=sys.stderr,
            )
        await asyncio.sleep(0.2)


@dataclass
class Run:
    """One run of one workload: its throughput and the histories of a sample of its leads."""

    leads: int
    seconds: float
    histories: list[WorkflowHistory] = field(default_factory=list)
    # Events of the other workflows the leads used (sender accounts), over the whole run.
    shared_events: Counter[str] = field(default_factory=Counter)
    # CPU seconds spent over the run by the worker's process and by the dev server.
    worker_cpu: float = 0.0
    server_cpu: float = 0.0

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


def cache_option(cache_size: int | None) -> dict[str, int]:
    """Return the worker option for a workflow cache of `cache_size` (None: the SDK's 1,000)."""
    return {} if cache_size is None else {"max_cached_workflows": cache_size}


async def run_engine(folder: Path, count: int, cache_size: int | None = None) -> Run:
    server = DevServer(folder, production_codec())
    async with server as client:
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
            store=store,
            **cache_option(cache_size),
        )
        async with worker:
            began, cpu = time.monotonic(), CpuClock(server)
            await enroll_all(client, store, campaign, people)
            await wait_until_done(client, "LeadSequenceWorkflow", count)
            seconds = time.monotonic() - began
            worker_cpu, server_cpu = cpu.elapsed()
            sample = ids[:: max(1, count // 20)][:20]
            run = Run(count, seconds, await sample_histories(client, sample))
            run.worker_cpu, run.server_cpu = worker_cpu, server_cpu
            run.shared_events = await account_events(client)
        store.close()
    return run


async def run_baseline(folder: Path, count: int, timers: int, cache_size: int | None = None) -> Run:
    # The same bytecode cache as the engine's workflow modules get (see cache_bytecode).
    cache_bytecode(baseline_module.__file__)
    server = DevServer(folder, production_codec())
    async with server as client:
        worker = Worker(
            client,
            task_queue=BASELINE_QUEUE,
            workflows=[BaselineLead],
            activities=[noop],
            workflow_runner=workflow_runner(),
            **cache_option(cache_size),
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

            began, cpu = time.monotonic(), CpuClock(server)
            await start_all(count, start)
            await wait_until_done(client, "BaselineLead", count)
            seconds = time.monotonic() - began
            worker_cpu, server_cpu = cpu.elapsed()
            sample = ids[:: max(1, count // 20)][:20]
            run = Run(count, seconds, await sample_histories(client, sample))
            run.worker_cpu, run.server_cpu = worker_cpu, server_cpu
            return run


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
    extra: list[str] | None = None,
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench`; do not edit by hand. Every figure of the engine is a",
        "ratio to the baseline, measured in the same run on the same server and worker",
        "settings: a workflow with one no-op activity per step (`bench/baseline.py`).",
        "Both encrypt their payloads with the codec that production workers use.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in machine.items()],
        f"- command: `{command}`",
        "",
    ]
    if throughput:
        lines += throughput_section(throughput)
    return "\n".join([*lines, *(extra or [])])


def throughput_section(throughput: dict[int, tuple[list[Run], list[Run]]]) -> list[str]:
    """Return the throughput and cost sections of the report, from the largest lead count."""
    lines = [
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
    lines += [
        "",
        "Raw runs (seconds for all leads; CPU seconds of the worker and the server). Each run of",
        "the engine is followed by one of the baseline. The ratio of each such pair shows how",
        "far single runs stray from the median.",
        "",
    ]
    for count, (engine, baseline) in sorted(throughput.items()):
        pairs = ", ".join(
            f"{theirs.seconds / ours.seconds:.2f}"
            for ours, theirs in zip(engine, baseline, strict=True)
        )
        lines.append(
            f"- {count:,} leads: engine "
            + ", ".join(_raw(r) for r in engine)
            + "; baseline "
            + ", ".join(_raw(r) for r in baseline)
            + f"; ratio by pair {pairs}"
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
        "20 sampled leads per run; the events of any sender account workflow, spread over every "
        "step).",
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
    return lines


def _raw(run: Run) -> str:
    return f"{run.seconds:.1f} s (CPU {run.worker_cpu:.1f} + {run.server_cpu:.1f})"


def reaction_section(engine: Reaction, baseline: Reaction) -> list[str]:
    ours, theirs = engine.summary(), baseline.summary()
    verdict = "met" if ours[1] < 1.0 else "missed"
    return [
        "## Reaction: from a late bounce to the next channel's step",
        "",
        f"{engine.leads:,} leads asleep for 7 days after their first email each get a bounce "
        f"for it, {BOUNCE_RATE} a second, through the `apply_failure` update the engine's "
        "bounce handling sends. The second email is skipped and the LinkedIn visit starts at "
        "once; the figure is the time from sending the update to the visit's activity start. "
        "The engine writes the bounce to its log first, so the update's caller reads it next. "
        "The baseline sleeps on a timer that a signal cuts short, then runs one activity.",
        "",
        "| | p50 (s) | p99 (s) | max (s) |",
        "|---|---:|---:|---:|",
        f"| engine | {ours[0]:.3f} | {ours[1]:.3f} | {max(engine.delays):.3f} |",
        f"| baseline | {theirs[0]:.3f} | {theirs[1]:.3f} | {max(baseline.delays):.3f} |",
        "",
        f"p99 {ours[1]:.3f} s (target under 1 s: {verdict}); p50 ratio to the baseline "
        f"{ours[0] / theirs[0]:.1f}.",
        "",
    ]


def memory_section(memory: Memory) -> list[str]:
    lines = [
        "## Memory: the worker process with leads asleep on timers",
        "",
        "The production worker (`python worker.py`, a process of its own, with its default "
        "workflow cache of 250) while every lead sleeps until its campaign's sending window "
        "opens, three days later. Resident memory after all of them wrote their log and went "
        "to sleep, and the peak so far.",
        "",
        "| leads asleep | resident (MB) | peak (MB) |",
        "|---:|---:|---:|",
        *[f"| {count:,} | {rss:.0f} | {peak:.0f} |" for count, rss, peak in memory.points],
        "",
    ]
    if len(memory.points) >= 2:
        first, last = memory.points[0], memory.points[-1]
        flat = last[1] <= first[1] * 1.1
        verdict = "met" if last[1] < 300 and flat else "missed"
        lines += [
            f"From {first[0]:,} to {last[0]:,} leads: {first[1]:.0f} to {last[1]:.0f} MB "
            f"(target under 300 MB and flat: {verdict}).",
            "",
        ]
    return lines


def import_section(result: Import) -> list[str]:
    ours = statistics.median(result.rows / run.seconds for run in result.ours)
    bare = statistics.median(result.rows / run.seconds for run in result.bare)
    verdict = "met" if ours / bare >= 0.8 else "missed"
    lines = [
        "## Import: rows per second from CSV to started workflows",
        "",
        f"`Sequencer.launch` reads a CSV of {result.rows:,} rows, validates each row, writes "
        "the enrollments to SQLite and starts every lead's workflow. The bare loop starts as "
        f"many workflows, {LAUNCH_CONCURRENCY} at a time as the launch does. Each run is on a "
        "fresh server and no worker runs. CPU is counted in seconds: the client's is the "
        "benchmark's process, which reads the file and calls the server.",
        "",
        "| run | launch s | rows/s | client CPU | server CPU "
        "| bare loop s | rows/s | client CPU | server CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for number, (mine, theirs) in enumerate(zip(result.ours, result.bare, strict=True), 1):
        lines.append(
            f"| {number} | {mine.seconds:.1f} | {result.rows / mine.seconds:.0f} "
            f"| {mine.client_cpu:.1f} | {mine.server_cpu:.1f} "
            f"| {theirs.seconds:.1f} | {result.rows / theirs.seconds:.0f} "
            f"| {theirs.client_cpu:.1f} | {theirs.server_cpu:.1f} |"
        )
    lines += [
        "",
        f"Median rows per second: launch {ours:.0f}, bare loop {bare:.0f}. Ratio "
        f"{ours / bare:.2f} (target at least 0.8: {verdict}).",
        "",
    ]
    return lines


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
        nargs="*",
        default=[1000, 10000],
        help="lead counts of the throughput benchmark (default: 1000 10000; none skips it)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each workload (default 3)")
    parser.add_argument(
        "--cache-size",
        type=int,
        default=None,
        help="workflows the throughput workers (engine and baseline alike) keep in memory "
        "(default: the SDK's 1000)",
    )
    parser.add_argument(
        "--output", type=Path, default=REPO / "docs" / "benchmarks.md", help="report file"
    )
    parser.add_argument(
        "--reaction",
        type=int,
        default=1000,
        help="leads of the reaction benchmark (default 1000; 0 skips it)",
    )
    parser.add_argument(
        "--sleeping",
        type=int,
        nargs="*",
        default=[10000, 50000],
        help="sleeping leads at which the worker's memory is read (default: 10000 50000)",
    )
    parser.add_argument(
        "--import-rows",
        type=int,
        default=10000,
        help="rows of the import benchmark (default 10000; 0 skips it)",
    )
    options = parser.parse_args(arguments)
    throughput: dict[int, tuple[list[Run], list[Run]]] = {}
    with tempfile.TemporaryDirectory(prefix="sequencer-bench-") as scratch:
        for count in options.leads:
            engine_runs, baseline_runs = [], []
            for number in range(options.runs):
                folder = Path(scratch) / f"engine-{count}-{number}"
                folder.mkdir()
                engine = await run_engine(folder, count, options.cache_size)
                engine_runs.append(engine)
                folder = Path(scratch) / f"baseline-{count}-{number}"
                folder.mkdir()
                baseline = await run_baseline(
                    folder, count, timers_per_lead(engine), options.cache_size
                )
                baseline_runs.append(baseline)
                print(
                    f"{count} leads, run {number + 1}: engine {engine.seconds:.1f}s "
                    f"(CPU: worker {engine.worker_cpu:.1f}s, server {engine.server_cpu:.1f}s), "
                    f"baseline {baseline.seconds:.1f}s (CPU: worker {baseline.worker_cpu:.1f}s, "
                    f"server {baseline.server_cpu:.1f}s)",
                    file=sys.stderr,
                )
            throughput[count] = (engine_runs, baseline_runs)
        command = "python -m bench " + " ".join(
            arguments if arguments is not None else sys.argv[1:]
        )
        machine = machine_description()
        extra: list[str] = []

        def write() -> None:
            # Written after each benchmark, so that a run stopped early keeps what it measured.
            options.output.write_text(report(machine, command.strip(), throughput, extra))

        write()
        if options.reaction:
            folder = Path(scratch) / "reaction"
            (folder / "engine").mkdir(parents=True)
            (folder / "baseline").mkdir()
            engine_reaction = await reaction_engine(DevServer, folder / "engine", options.reaction)
            baseline_reaction = await reaction_baseline(
                DevServer, folder / "baseline", options.reaction
            )
            print(
                f"reaction p50/p99: engine {engine_reaction.summary()}, "
                f"baseline {baseline_reaction.summary()}",
                file=sys.stderr,
            )
            extra += reaction_section(engine_reaction, baseline_reaction)
            write()
        if options.sleeping:
            folder = Path(scratch) / "sleeping"
            folder.mkdir()
            extra += memory_section(await sleeping_memory(DevServer, folder, options.sleeping))
            write()
        if options.import_rows:
            folder = Path(scratch) / "import"
            folder.mkdir()
            result = await import_rate(DevServer, folder, options.import_rows, options.runs)
            extra += import_section(result)
            write()
    print(f"wrote {options.output}", file=sys.stderr)
