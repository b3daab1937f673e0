"""A throwaway PostgreSQL server for the store's tests, from the machine's PostgreSQL binaries.

The server runs in a temporary folder, listens on 127.0.0.1 on a free port, trusts local
connections and is stopped at the end of the test session. PostgreSQL refuses to run as root,
so under root it runs as the `postgres` user that Debian's package creates.

Without the binaries the tests that need it are skipped, unless SEQUENCER_REQUIRE_POSTGRES=1
(set by .ci/run, which installs them) turns that into a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from sequencer.stack import free_port

REQUIRED = os.environ.get("SEQUENCER_REQUIRE_POSTGRES") == "1"
INSTALL_HINT = "install Debian's postgresql package (apt-get install postgresql)"


def find_bin_directory() -> Path | None:
    """Return the newest folder of PostgreSQL server binaries, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version)
    if found:
        return Path(found[-1]).parent
    postgres = shutil.which("postgres")
    return Path(postgres).parent if postgres else None


def _version(path: str) -> float:
    try:
        return float(Path(path).parts[-3])
    except ValueError:
        return 0.0


class PostgresServer:
    def __init__(self, bin_directory: Path) -> None:
        self.bin = bin_directory
        self.folder = Path(tempfile.mkdtemp(prefix="sequencer-postgres-"))
        self.port = free_port()
        self.user: str | None = None
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if os.geteuid() == 0:
            self.user = "postgres"
            account = pwd.getpwnam(self.user)
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        data = self.folder / "data"
        self._run([self.bin / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        log = (self.folder / "postgres.log").open("w")
        self.process = subprocess.Popen(
            [
                self.bin / "postgres",
                *("-D", str(data), "-p", str(self.port), "-k", str(self.folder)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self.user,
        )
        log.close()
        for _ in range(100):
            if self._ready():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"PostgreSQL did not start; see {self.folder / 'postgres.log'}:\n"
            + (self.folder / "postgres.log").read_text()[-2000:]
        )

    def _run(self, command: list) -> None:
        subprocess.run(
            [str(part) for part in command],
            check=True,
            capture_output=True,
            user=self.user,
            cwd=self.folder,
        )

    def _ready(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True,
        )
        return result.returncode == 0

    def create_database(self) -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        import psycopg

        name = f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    bin_directory = find_bin_directory()
    if bin_directory is None:
        message = f"no PostgreSQL server binaries: {INSTALL_HINT}"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        message = "psycopg is not installed: pip install -e '.[dev,postgres]'"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bin_directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """The URL of an empty database: a SQLite file, then a database on the test PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sequencer.db'}"
    return request.getfixturevalue("postgres_server").create_database()
