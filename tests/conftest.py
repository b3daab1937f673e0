"""Shared fixtures: Temporal servers from the installed packages, and a clean exit."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from sequencer.models import SEARCH_ATTRIBUTES
from sequencer.temporal import find_binary, register_search_attributes

REPO = Path(__file__).resolve().parents[1]
# The PostgreSQL server and the `database_url` fixture of the store's tests.
pytest_plugins = ["tests.postgres"]

# Keep every test's data, and that of the commands the tests run, out of the user's own data
# directory. Tests that start a stack set their own SEQUENCER_HOME on top of this.
if "SEQUENCER_HOME" not in os.environ:
    _TEST_HOME = tempfile.mkdtemp(prefix="sequencer-tests-")
    os.environ["SEQUENCER_HOME"] = _TEST_HOME
else:
    _TEST_HOME = None
CORPUS = REPO.parent / "shared" / "corpus"


@pytest_asyncio.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """Start one time-skipping test server for the session, with our search attributes."""
    environment = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(find_binary("temporal-test-server")),
        data_converter=pydantic_data_converter,
    )
    await register_search_attributes(environment.client)
    yield environment
    await environment.shutdown()


@pytest_asyncio.fixture
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    """Start a Temporal dev server (in memory) with our search attributes, for one test."""
    environment = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(find_binary("temporal")),
        data_converter=pydantic_data_converter,
        search_attributes=[SearchAttributeKey.for_keyword(name) for name in SEARCH_ATTRIBUTES],
    )
    yield environment
    await environment.shutdown()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # The Temporal SDK's native runtime can abort interpreter teardown with "Fatal Python
    # error: PyGILState_Release" (Temporal's Python SDK, issue 300 on GitHub), failing a run
    # whose tests all passed. Once pytest has printed its summary, leave without teardown and
    # keep pytest's exit status.
    if _TEST_HOME:
        shutil.rmtree(_TEST_HOME, ignore_errors=True)
    status = config.stash.get(_EXIT_STATUS, None)
    if status is not None and os.environ.get("SEQUENCER_TEST_TEARDOWN") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
