"""The benchmarks beyond throughput: reaction to a late bounce, sleeping leads, lead import.

Each function starts its own dev server and returns raw measurements; bench/run.py runs them
and writes the report.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, text
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

from activities.records import StoreActivities
from bench import baseline as baseline_module
from bench.baseline import BaselineLead, BaselinePlan
from sequencer.campaign import Campaign, parse_campaign
from sequencer.codec import EncryptionCodec, generate_key_entry, parse_keys
from sequencer.config import load_settings
from sequencer.models import TASK_QUEUE, LateFailure, workflow_id_for
from sequencer.service import START_CONCURRENCY, Sequencer
from sequencer.simulate import SimulatedChannels
from sequencer.storage import Store
from sequencer.temporal import cache_bytecode, lead_worker, workflow_runner

REPO = Path(__file__).resolve().parents[1]
BOUNCE_RATE = 20  # late bounces sent per second in the reaction benchmark


def percentile(values: list[float], share: float) -> float:
    """Return the value below which `share` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


# Reaction: a lead asleep for 7 days after its first email gets a bounce for it. A failed step
# skips the rest of its channel, so the second email is skipped, and the next step on another
# channel, the LinkedIn visit, runs at once.


def reaction_campaign(campaign_id: str) -> Campaign:
    return parse_campaign(
        {
            "name": campaign_id,
            "id": campaign_id,
            "sender": {"email": "rep@acme.test", "daily_limit": 1_000_000},
            "steps": [
                {"type": "email", "subject": "Hi", "body": "One", "wait_after": "7d"},
                {"type": "email", "subject": "Again", "body": "Two"},
                {"type": "linkedin_visit"},
            ],
        }
    )


@dataclass
class Reaction:
    leads: int
    # Seconds from sending each bounce to the start of the next channel's activity.
    delays: list[float] = field(default_factory=list)

    def summary(self) -> tuple[float, float]:
        return percentile(self.delays, 0.5), percentile(self.delays, 0.99)


async def _until_count(client: Client, query: str, count: int, limit: float = 1800) -> None:
    deadline = time.monotonic() + limit
    while (await client.count_workflows(query)).count < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} workflows match {query} after {limit:.0f} s")
        await asyncio.sleep(0.5)


async def _send_at_rate(ids: list[str], send) -> dict[str, float]:
    """Call `send(id)` for each id, BOUNCE_RATE a second; return when each was sent."""
    sent: dict[str, float] = {}
    tasks = []
    began = time.monotonic()
    for number, workflow_id in enumerate(ids):
        pause = began + number / BOUNCE_RATE - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        sent[workflow_id] = time.time()
        tasks.append(asyncio.create_task(send(workflow_id)))
    await asyncio.gather(*tasks)
    return sent


async def _first_activity_after(client: Client, workflow_id: str, kinds: set[int]) -> float:
    """Return when the first activity scheduled after the workflow received an event of one of
    `kinds` (the bounce's update, the baseline's signal), other than a database write, started.
    """
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    received = False
    scheduled: int | None = None
    for event in history.events:
        if event.event_type in kinds:
            received = True
        elif (
            received
            and scheduled is None
            and event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and event.activity_task_scheduled_event_attributes.activity_type.name
            != "record_activity"
        ):
            scheduled = event.event_id
        elif (
            scheduled is not None
            and event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
            and event.activity_task_started_event_attributes.scheduled_event_id == scheduled
        ):
            return event.event_time.ToDatetime(tzinfo=UTC).timestamp()
    raise RuntimeError(f"{workflow_id} started no activity after its late event")


LATE_EVENTS = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED,
}


async def _delays(client: Client, sent: dict[str, float]) -> list[float]:
    gate = asyncio.Semaphore(16)

    async def one(workflow_id: str) -> float:
        async with gate:
            started = await _first_activity_after(client, workflow_id, LATE_EVENTS)
        return started - sent[workflow_id]

    return list(await asyncio.gather(*(one(workflow_id) for workflow_id in sent)))


async def reaction_engine(server_factory, folder: Path, count: int) -> Reaction:
    from bench.run import enroll, leads, production_codec, start_all

    async with server_factory(folder, production_codec()) as client:
        store = Store(f"sqlite:///{folder / 'sequencer.db'}")
        records = StoreActivities(store)
        channels = SimulatedChannels({})
        campaign = reaction_campaign(f"react-{uuid.uuid4().hex[:8]}")
        people = leads(count)
        ids = [workflow_id_for(campaign.id, lead.key) for lead in people]
        worker = lead_worker(
            client,
            TASK_QUEUE,
            [channels.send_email, channels.linkedin_step, records.record_activity],
            account_check_interval=None,
            store=store,
        )
        async with worker:

            async def start(number: int) -> None:
                await enroll(client, store, campaign, people[number])

            await start_all(count, start)
            # Every lead has sent its first email and sleeps before the second.
            await _until_count(client, 'SequencerStage = "step-2-email"', count)

            async def bounce(workflow_id: str) -> None:
                await client.get_workflow_handle(workflow_id).execute_update(
                    "apply_failure",
                    LateFailure(step=1, reason="bounce", bounced=True, detail="550 5.1.1"),
                    result_type=str,
                )

            sent = await _send_at_rate(ids, bounce)
            await _until_count(
                client,
                'WorkflowType = "LeadSequenceWorkflow" AND ExecutionStatus = "Completed"',
                count,
            )
            delays = await _delays(client, sent)
        store.close()
    return Reaction(count, delays)


async def reaction_baseline(server_factory, folder: Path, count: int) -> Reaction:
    from bench.run import production_codec, start_all

    cache_bytecode(baseline_module.__file__)
    done = 0

    @activity.defn(name="bench_noop")
    async def counting_noop(step: int) -> int:
        nonlocal done
        done += 1
        return step

    async with server_factory(folder, production_codec()) as client:
        queue = "bench-baseline-reaction"
        ids = [f"baseline-react-{number}" for number in range(count)]
        async with Worker(
            client,
            task_queue=queue,
            workflows=[BaselineLead],
            activities=[counting_noop],
            workflow_runner=workflow_runner(),
        ):

            async def start(number: int) -> None:
                await client.start_workflow(
                    BaselineLead.run,
                    BaselinePlan(steps=1, wait=timedelta(days=7), after_wait=1),
                    id=ids[number],
                    task_queue=queue,
                )

            await start_all(count, start)
            # Every workflow has run its first activity; a moment later it sleeps on its timer.
            while done < count:
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)

            async def wake(workflow_id: str) -> None:
                await client.get_workflow_handle(workflow_id).signal(BaselineLead.wake)

            sent = await _send_at_rate(ids, wake)
            await _until_count(
                client, 'WorkflowType = "BaselineLead" AND ExecutionStatus = "Completed"', count
            )
            delays = await _delays(client, sent)
    return Reaction(count, delays)


# Memory: the production worker process (`python worker.py`) while leads sleep on timers.

DAY_NAMES = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def sleeping_campaign(campaign_id: str) -> Campaign:
    """Return a one-email campaign whose sending window opens in three days, so that its
    leads sleep until then."""
    day = DAY_NAMES[(datetime.now(UTC).weekday() + 3) % 7]
    return parse_campaign(
        {
            "name": campaign_id,
            "id": campaign_id,
            "sender": {"email": "rep@acme.test", "daily_limit": 1_000_000},
            "schedule": {"days": day, "start": "09:00", "end": "17:00", "timezone": "UTC"},
            "steps": [{"type": "email", "subject": "Hi", "body": "One"}],
        }
    )


@dataclass
class Memory:
    # (leads asleep, worker resident memory in MB, worker peak resident memory in MB)
    points: list[tuple[int, float, float]] = field(default_factory=list)


def resident_megabytes(pid: int) -> tuple[float, float]:
    """Return the current and peak resident memory of a process, in MB, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(value.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _logged_leads(database: Path) -> int:
    """Return how many leads have written their log: each writes it before it first sleeps."""
    engine = create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as connection:
            return connection.execute(
                text("SELECT COUNT(DISTINCT workflow_id) FROM activity")
            ).scalar_one()
    finally:
        engine.dispose()


async def sleeping_memory(server_factory, folder: Path, counts: list[int]) -> Memory:
    from bench.run import enroll, leads, start_all

    key = generate_key_entry("bench")
    codec = EncryptionCodec(parse_keys(key, "bench"), source="bench")
    server = server_factory(folder, codec)
    memory = Memory()
    async with server as client:
        home = folder / "home"
        environment = {
            **os.environ,
            "SEQUENCER_HOME": str(home),
            "TEMPORAL_ADDRESS": server.address,
            "SEQUENCER_PAYLOAD_KEYS": key,
            "SEQUENCER_LOG_LEVEL": "WARNING",
        }
        for name in ("DATABASE_URL", "TEMPORAL_NAMESPACE", "SEQUENCER_PAYLOAD_KEYS_FILE"):
            environment.pop(name, None)
        with (folder / "worker.log").open("w") as log:
            worker = subprocess.Popen(
                [sys.executable, str(REPO / "worker.py")],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            database = home / "sequencer.db"
            while not database.exists():
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited; see {folder / 'worker.log'}")
                await asyncio.sleep(0.2)
            store = Store(f"sqlite:///{database}")
            campaign = sleeping_campaign(f"sleep-{uuid.uuid4().hex[:8]}")
            people = leads(max(counts))
            started = 0
            for target in sorted(counts):

                async def start(number: int, offset: int = started) -> None:
                    await enroll(client, store, campaign, people[number + offset])

                await start_all(target - started, start)
                started = target
                while _logged_leads(database) < target:
                    if worker.poll() is not None:
                        raise RuntimeError(f"the worker exited; see {folder / 'worker.log'}")
                    await asyncio.sleep(1)
                await asyncio.sleep(5)
                memory.points.append((target, *resident_megabytes(worker.pid)))
                print(
                    f"{target} leads asleep: worker RSS {memory.points[-1][1]:.0f} MB",
                    file=sys.stderr,
                )
            store.close()
        finally:
            worker.terminate()
            worker.wait(60)
    return memory


# Import: rows per second from a CSV file to started workflows, against a bare start loop.


@dataclass
class ImportRun:
    seconds: float
    client_cpu: float  # this process: reading, validating and writing rows, and the client
    server_cpu: float


@dataclass
class Import:
    rows: int
    ours: list[ImportRun] = field(default_factory=list)
    bare: list[ImportRun] = field(default_factory=list)


def write_leads_csv(path: Path, count: int) -> None:
    lines = ["first_name,email,linkedin_url"]
    lines += [
        f"Lead{number},lead{number}@example.com,https://www.linkedin.com/in/lead-{number}"
        for number in range(count)
    ]
    path.write_text("\n".join(lines) + "\n")


def own_cpu_seconds() -> float:
    """Return the user and system CPU seconds this process has used so far."""
    times = os.times()
    return times.user + times.system


async def bare_start(client: Client, gate: asyncio.Semaphore, lead: int) -> None:
    """Start a bare workflow for a lead, as many at once as `gate` lets through."""
    async with gate:
        await client.start_workflow(
            BaselineLead.run,
            BaselinePlan(steps=5),
            id=f"bare-{lead}",
            task_queue="bench-bare-import",
        )


async def import_rate(server_factory, folder: Path, count: int, runs: int = 1) -> Import:
    """Time `Sequencer.launch` (read the CSV, validate, enroll and start every lead) and a bare
    loop that starts as many workflows with the same concurrency, each on a fresh server,
    `runs` times in turn. No worker runs: both measure starting workflows, not running them."""
    from bench.run import mixed_campaign, production_codec

    csv_path = folder / "leads.csv"
    write_leads_csv(csv_path, count)
    result = Import(count)
    for number in range(runs):
        campaign_path = folder / f"campaign-{number}.json"
        campaign = mixed_campaign(f"import-{uuid.uuid4().hex[:8]}")
        campaign_path.write_text(campaign.model_dump_json(exclude_none=True))

        ours = folder / f"ours-{number}"
        ours.mkdir()
        server = server_factory(ours, production_codec())
        async with server as client:
            settings = load_settings({"SEQUENCER_HOME": str(ours / "home")})
            service = Sequencer(settings, client=client)
            began, cpu, server_cpu = time.monotonic(), own_cpu_seconds(), server.cpu_seconds()
            report = await service.launch(campaign_path, csv_path)
            result.ours.append(
                ImportRun(
                    time.monotonic() - began,
                    own_cpu_seconds() - cpu,
                    server.cpu_seconds() - server_cpu,
                )
            )
            service.close()
            if len(report.enrolled) != count:
                raise RuntimeError(f"{len(report.enrolled)} of {count} rows enrolled")

        bare = folder / f"bare-{number}"
        bare.mkdir()
        server = server_factory(bare, production_codec())
        async with server as client:
            gate = asyncio.Semaphore(START_CONCURRENCY)
            began, cpu, server_cpu = time.monotonic(), own_cpu_seconds(), server.cpu_seconds()
            await asyncio.gather(*(bare_start(client, gate, lead) for lead in range(count)))
            result.bare.append(
                ImportRun(
                    time.monotonic() - began,
                    own_cpu_seconds() - cpu,
                    server.cpu_seconds() - server_cpu,
                )
            )
        print(
            f"import of {count} rows, run {number + 1}: launch {result.ours[-1].seconds:.1f} s, "
            f"bare loop {result.bare[-1].seconds:.1f} s",
            file=sys.stderr,
        )
    return result
