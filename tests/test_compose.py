"""Static checks of the production stack in docker-compose.yml, its Dockerfile and deploy/.

No Docker engine runs in CI, so these tests read the files instead of starting containers.
The setup scripts run under /bin/sh with stub `temporal`, `temporal-sql-tool` and `psql`
commands, which checks their control flow but not the real tools' output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from sequencer.config import load_settings
from sequencer.models import SEARCH_ATTRIBUTES, WORKER_ROLES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"

REQUIRED_SERVICES = {
    "postgresql",
    "temporal-admin-tools",
    "temporal",
    "temporal-namespace-setup",
    "temporal-ui",
    "worker",
    "email-worker",
    "linkedin-worker",
}
# The worker services and the task queues each polls (SEQUENCER_WORKER_ROLES).
WORKERS = {"worker": "workflows", "email-worker": "email", "linkedin-worker": "linkedin"}
ALLOWED_CONDITIONS = {"service_healthy", "service_completed_successfully"}
WORKER_VARIABLES = {
    "TEMPORAL_ADDRESS",
    "TEMPORAL_NAMESPACE",
    "DATABASE_URL",
    "SEQUENCER_SMTP_USERNAME",
    "SEQUENCER_SMTP_PASSWORD",
    "SEQUENCER_LINKEDIN_URL",
    "SEQUENCER_LINKEDIN_API_KEY",
}
SECRET_NAME = re.compile(r"PASSWORD|PWD|SECRET|TOKEN|API_KEY")
# A whole value that is one variable reference: ${NAME}, ${NAME:?message} or ${NAME:-}.
# A non-empty default is rejected because it would be a hard-coded secret.
SECRET_REFERENCE = re.compile(r"\$\{[A-Z][A-Z0-9_]*(?::\?[^}]*|:-)?\}")
DATABASE_URL = re.compile(
    r"postgresql\+psycopg://sequencer:(?P<password>\$\{[^}]*\})@postgresql:5432/sequencer"
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def environment_of(service: dict) -> dict[str, str]:
    """Return a service's environment as a dict, from either the mapping or the list form."""
    environment = service.get("environment") or {}
    if isinstance(environment, dict):
        return {key: "" if value is None else str(value) for key, value in environment.items()}
    pairs = (entry.split("=", 1) for entry in environment)
    return {pair[0]: pair[1] if len(pair) == 2 else "" for pair in pairs}


def image_tag(image: str) -> tuple[str, str | None]:
    """Split an image reference into name and tag. The tag is None when it is missing."""
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return image, None
    return name, tag


def parse_port(entry: str | int | dict) -> tuple[str | None, str, str]:
    """Return (host IP, published port, container port) of a compose port entry."""
    if isinstance(entry, dict):
        return entry.get("host_ip"), str(entry.get("published")), str(entry["target"])
    parts = str(entry).split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return None, parts[0], parts[1]
    return None, parts[0], parts[0]


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """Return (host path, container path) for each bind mount, skipping named volumes."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def host_path_of(service: dict, container_path: str) -> Path | None:
    """Map a path inside the container back to the repository through the bind mounts."""
    for source, target in bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            relative = container_path[len(target) :].lstrip("/")
            return (ROOT / source / relative).resolve()
    return None


def test_compose_defines_required_services(services: dict) -> None:
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"docker-compose.yml lacks services: {sorted(missing)}"


def test_images_are_pinned(services: dict) -> None:
    for name, service in services.items():
        if "image" not in service:
            continue
        _, tag = image_tag(service["image"])
        assert tag, f"{name}: image {service['image']} has no tag"
        assert tag != "latest", f"{name}: image {service['image']} uses the latest tag"


def test_image_versions_match_pins(services: dict) -> None:
    server_name, server_tag = image_tag(services["temporal"]["image"])
    assert server_name == "temporalio/server"
    assert re.fullmatch(r"1\.32\.\d+", server_tag or ""), server_tag

    ui_name, ui_tag = image_tag(services["temporal-ui"]["image"])
    assert ui_name == "temporalio/ui"
    assert re.fullmatch(r"2\.54\.\d+", ui_tag or ""), ui_tag

    postgres_name, postgres_tag = image_tag(services["postgresql"]["image"])
    assert postgres_name == "postgres"
    assert re.fullmatch(r"16(\.\d+)?(-.+)?", postgres_tag or ""), postgres_tag

    # The schema files in admin-tools must be the ones that the server release expects.
    for job in ("temporal-admin-tools", "temporal-namespace-setup"):
        tools_name, tools_tag = image_tag(services[job]["image"])
        assert tools_name == "temporalio/admin-tools", job
        assert tools_tag == server_tag, f"{job}: admin-tools {tools_tag} != server {server_tag}"


def test_depends_on_targets_and_conditions(services: dict) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must be a mapping"
        for dependency, options in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            condition = (options or {}).get("condition")
            assert condition in ALLOWED_CONDITIONS, f"{name} -> {dependency}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
            if condition == "service_completed_successfully":
                # The setup scripts retry by themselves, so each job runs once per `up`.
                restart = str(services[dependency].get("restart", "no"))
                assert restart == "no", f"{dependency} is a one-shot job but restarts: {restart}"


def test_startup_order(services: dict) -> None:
    def condition(service: str, dependency: str) -> str | None:
        return (services[service].get("depends_on", {}).get(dependency) or {}).get("condition")

    assert condition("temporal-admin-tools", "postgresql") == "service_healthy"
    assert condition("temporal", "temporal-admin-tools") == "service_completed_successfully"
    assert condition("temporal-namespace-setup", "temporal") == "service_healthy"
    assert condition("temporal-ui", "temporal") == "service_healthy"
    for worker in WORKERS:
        assert condition(worker, "temporal") == "service_healthy"
        assert condition(worker, "postgresql") == "service_healthy"
        assert condition(worker, "temporal-namespace-setup") == "service_completed_successfully"
        assert condition(worker, "migrate") == "service_completed_successfully"
    assert condition("migrate", "postgresql") == "service_healthy"
    assert condition("api", "migrate") == "service_completed_successfully"


def test_migrate_job_upgrades_the_workers_database(services: dict) -> None:
    """The schema job migrates the very database that the worker and the API open."""
    migrate = services["migrate"]

    assert migrate["command"] == ["sequencer", "db", "upgrade"]
    assert migrate["build"] == services["worker"]["build"]
    url = migrate["environment"]["DATABASE_URL"]
    for worker in WORKERS:
        assert url == services[worker]["environment"]["DATABASE_URL"], worker
    assert url == services["api"]["environment"]["DATABASE_URL"]


def test_services_restart_and_report_health(services: dict) -> None:
    """Every long-running service restarts on failure and has a health check; jobs run once."""
    for name, service in services.items():
        restart = str(service.get("restart", "no"))
        if restart == "no":
            assert "healthcheck" not in service, f"{name} is a one-shot job with a health check"
            continue
        assert restart == "unless-stopped", f"{name}: restart {restart}"
        assert "healthcheck" in service, f"{name} has no health check"
    ui = services["temporal-ui"]
    _, _, container_port = parse_port(ui["ports"][0])
    assert f"127.0.0.1:{container_port}/" in " ".join(ui["healthcheck"]["test"])


def test_postgresql_volume_and_healthcheck(compose: dict, services: dict) -> None:
    postgresql = services["postgresql"]
    named = [
        volume.split(":")[0]
        for volume in postgresql.get("volumes", [])
        if isinstance(volume, str) and volume.endswith(":/var/lib/postgresql/data")
    ]
    assert len(named) == 1, "PGDATA must be on exactly one volume"
    assert named[0] in (compose.get("volumes") or {}), f"{named[0]} is not a named volume"
    assert "pg_isready" in " ".join(postgresql["healthcheck"]["test"])


def test_published_ports_bind_to_loopback(services: dict) -> None:
    published = {}
    for name, service in services.items():
        for entry in service.get("ports", []):
            host_ip, host_port, container_port = parse_port(entry)
            assert host_ip == "127.0.0.1", f"{name}: port {entry} is not bound to 127.0.0.1"
            published[name, host_port] = container_port
    assert published == {
        ("temporal", "7233"): "7233",
        ("temporal-ui", "8233"): "8080",
        ("api", "8766"): "8766",
    }


def test_secrets_are_not_hard_coded(services: dict) -> None:
    for name, service in services.items():
        for key, value in environment_of(service).items():
            if SECRET_NAME.search(key):
                assert SECRET_REFERENCE.fullmatch(value), f"{name}: {key} is not a ${{...}}"

    url = environment_of(services["worker"])["DATABASE_URL"]
    match = DATABASE_URL.fullmatch(url)
    assert match, f"unexpected DATABASE_URL {url}"
    assert SECRET_REFERENCE.fullmatch(match["password"]), match["password"]


def test_database_passwords_are_required(services: dict) -> None:
    for service, key in [
        ("postgresql", "POSTGRES_PASSWORD"),
        ("postgresql", "SEQUENCER_DB_PASSWORD"),
        ("temporal", "POSTGRES_PWD"),
        ("temporal-admin-tools", "SQL_PASSWORD"),
    ]:
        value = environment_of(services[service])[key]
        assert ":?" in value, f"{service}: {key}={value} must fail when the variable is unset"


def test_temporal_clients_use_the_server(services: dict) -> None:
    for name in ("temporal-ui", "temporal-namespace-setup", *WORKERS):
        assert environment_of(services[name])["TEMPORAL_ADDRESS"] == "temporal:7233", name

    temporal = environment_of(services["temporal"])
    assert temporal["DB"] == "postgres12"
    assert temporal["POSTGRES_SEEDS"] == "postgresql"


@pytest.mark.parametrize("name", sorted(WORKERS))
def test_worker_service(services: dict, name: str) -> None:
    worker = services[name]
    environment = environment_of(worker)

    missing = WORKER_VARIABLES - set(environment)
    assert not missing, f"worker environment lacks {sorted(missing)}"
    assert environment["TEMPORAL_NAMESPACE"] == "default"
    namespace = environment_of(services["temporal-namespace-setup"])["TEMPORAL_NAMESPACE"]
    assert environment["TEMPORAL_NAMESPACE"] == namespace
    assert worker["command"] in (["python", "worker.py"], "python worker.py")
    assert worker["restart"] == "unless-stopped"
    # `docker compose up --scale worker=N` fails on a fixed container name or host port.
    assert "container_name" not in worker
    assert "ports" not in worker
    # The health check runs worker.py's own check, whose limit the interval must fit in.
    healthcheck = worker["healthcheck"]
    assert healthcheck["test"] == ["CMD", "python", "worker.py", "--health"]
    assert _seconds(healthcheck["interval"]) < 60


def test_worker_roles_cover_every_queue(services: dict, tmp_path: Path) -> None:
    """Each worker service polls the queues of its role, and every queue has a worker.

    The services' settings, with the defaults of the compose file, must load as worker.py
    loads them: a limit the application rejects would stop the container at start.
    """
    polled: list[str] = []
    for name, role in WORKERS.items():
        environment = {
            key: interpolate(value, {"SEQUENCER_DB_PASSWORD": "example"})
            for key, value in environment_of(services[name]).items()
        }
        settings = load_settings({**environment, "SEQUENCER_HOME": str(tmp_path)})
        assert settings.worker_roles == (role,), name
        polled += settings.worker_roles
        if role != "workflows":
            limits = settings.channel_limits[role]
            assert limits.max_concurrent is not None, f"{name} runs an unbounded number of steps"
    assert sorted(polled) == sorted(WORKER_ROLES)


def _seconds(value: str) -> int:
    number, unit = int(value[:-1]), value[-1]
    return number * {"s": 1, "m": 60}[unit]


def test_build_context_and_mounts_exist(services: dict) -> None:
    build = services["worker"]["build"]
    context = ROOT / build["context"]
    assert context.is_dir(), context
    assert (context / build.get("dockerfile", "Dockerfile")).is_file()

    for name, service in services.items():
        for source, _ in bind_mounts(service):
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        for env_file in service.get("env_file", []):
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            assert (ROOT / path).is_file(), f"{name} reads missing {path}"


@pytest.mark.parametrize("job", ["temporal-admin-tools", "temporal-namespace-setup"])
def test_job_script_is_mounted(services: dict, job: str) -> None:
    service = services[job]
    script = service["command"][-1]
    host_path = host_path_of(service, script)
    assert host_path is not None, f"{job}: {script} is not under a bind mount"
    assert host_path.is_file(), host_path


def test_postgres_init_script_is_mounted(services: dict) -> None:
    init_dir = host_path_of(services["postgresql"], "/docker-entrypoint-initdb.d")
    assert init_dir is not None and init_dir.is_dir()
    scripts = sorted(init_dir.glob("*.sh"))
    assert scripts, f"no init scripts in {init_dir}"
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_search_attributes_match_models(services: dict) -> None:
    environment = environment_of(services["temporal-namespace-setup"])
    registered = environment["SEQUENCER_SEARCH_ATTRIBUTES"].split()
    assert sorted(registered) == sorted(SEARCH_ATTRIBUTES)
    assert len(registered) == len(set(registered))


def string_values(node: object) -> list[str]:
    """Return every string in a parsed YAML document, keys excluded."""
    if isinstance(node, dict):
        return [text for value in node.values() for text in string_values(value)]
    if isinstance(node, list):
        return [text for value in node for text in string_values(value)]
    return [node] if isinstance(node, str) else []


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Expand ${NAME}, ${NAME:-default} and ${NAME:?message} as docker compose does."""

    def expand(match: re.Match) -> str:
        name, operator, argument = match["name"], match["operator"], match["argument"]
        if variables.get(name):
            return variables[name]
        if operator == ":?":
            raise ValueError(f"{name} is required: {argument}")
        return argument or ""

    pattern = r"\$\{(?P<name>[A-Z][A-Z0-9_]*)(?:(?P<operator>:-|:\?)(?P<argument>[^}]*))?\}"
    return re.sub(pattern, expand, value)


def test_env_example_lists_every_variable(compose: dict) -> None:
    referenced = {
        name
        for text in string_values(compose)
        for name in re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", text)
    }
    assert referenced, "the compose file reads no variables"
    documented = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if re.match(r"[A-Z][A-Z0-9_]*=", line)
    }
    assert referenced - documented == set(), "deploy/.env.example lacks these variables"


def test_env_example_contains_no_secrets() -> None:
    for line in ENV_EXAMPLE.read_text().splitlines():
        key, separator, value = line.partition("=")
        if separator and SECRET_NAME.search(key):
            assert value == "", f"deploy/.env.example sets {key}"


def test_dockerfile_builds_non_root_worker() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]

    assert instructions[0] == "FROM python:3.11-slim"
    assert any("pip install --no-cache-dir '.[postgres]'" in line for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users, "the Dockerfile never switches away from root"
    assert users[-1] not in ("root", "0"), users[-1]
    assert instructions[-1] == 'CMD ["python", "worker.py"]'


def test_image_install_includes_migrations(tmp_path: Path) -> None:
    """The image installs the project as a wheel (no checkout on sys.path for the `sequencer`
    command), so the wheel must carry Alembic's migrations and their template."""
    # Built from a copy: setuptools leaves a build/ folder in the tree it builds.
    source = tmp_path / "source"
    for name in ("sequencer", "workflows", "activities"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "worker.py"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(wheels)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    migrations = sorted(
        p.name for p in (ROOT / "sequencer" / "migrations" / "versions").glob("*.py")
    )
    assert migrations
    for name in migrations:
        assert f"sequencer/migrations/versions/{name}" in names
    assert "sequencer/migrations/env.py" in names
    assert "sequencer/migrations/script.py.mako" in names


def test_dockerignore_excludes_secrets() -> None:
    patterns = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".env", ".git", ".venv"):
        assert pattern in patterns, pattern


def test_pyproject_defines_postgres_extra() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"].get("optional-dependencies", {})
    assert "postgres" in extras, (
        "the Dockerfile installs '.[postgres]': add "
        'postgres = ["psycopg[binary]>=3.1"] to [project.optional-dependencies]'
    )
    assert any(requirement.startswith("psycopg") for requirement in extras["postgres"])


def test_docker_compose_config_is_valid() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    if version.returncode != 0:
        pytest.skip("the docker compose plugin is not installed")

    environment = {
        **os.environ,
        "POSTGRES_PASSWORD": "dummy-postgres-password",
        "SEQUENCER_DB_PASSWORD": "dummy-sequencer-password",
    }
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# The stubs below log their arguments to $STUB_LOG and keep state as files in $STUB_STATE.
TEMPORAL_STUB = """#!/bin/sh
echo "temporal $*" >> "$STUB_LOG"
case "$1 $2 $3" in
    "operator cluster health") exit 0 ;;
    "operator namespace describe") test -f "$STUB_STATE/namespace" ;;
    "operator namespace create") touch "$STUB_STATE/namespace" ;;
    "operator search-attribute list")
        echo "Name Type"
        cat "$STUB_STATE/attributes" 2>/dev/null || true
        ;;
    "operator search-attribute create")
        previous=""
        for argument in "$@"; do
            if [ "$previous" = "--name" ]; then
                echo "$argument Keyword" >> "$STUB_STATE/attributes"
            fi
            previous=$argument
        done
        ;;
    *) exit 2 ;;
esac
"""
LOGGING_STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "$STUB_LOG"
cat > "$STUB_STATE/stdin"
"""


def install_stubs(tmp_path: Path) -> dict[str, str]:
    """Install stub commands in tmp_path and return the environment that puts them first."""
    bin_dir = tmp_path / "bin"
    state = tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in [
        ("temporal", TEMPORAL_STUB),
        ("temporal-sql-tool", LOGGING_STUB),
        ("psql", LOGGING_STUB),
    ]:
        stub = bin_dir / name
        stub.write_text(text)
        stub.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STUB_LOG": str(tmp_path / "log"),
        "STUB_STATE": str(state),
    }


def run_script(relative_path: str, environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/sh", str(ROOT / relative_path)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )


def logged_calls(environment: dict[str, str]) -> list[str]:
    log = Path(environment["STUB_LOG"])
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture()
def namespace_environment(tmp_path: Path, services: dict) -> dict[str, str]:
    """Return the setup job's environment as compose would pass it with no .env file."""
    job_environment = environment_of(services["temporal-namespace-setup"])
    resolved = {key: interpolate(value, {}) for key, value in job_environment.items()}
    return {**install_stubs(tmp_path), **resolved}


def test_namespace_setup_creates_missing_items(namespace_environment: dict[str, str]) -> None:
    state = Path(namespace_environment["STUB_STATE"])
    (state / "attributes").write_text("SequencerCampaign Keyword\n")

    result = run_script("deploy/temporal/setup-namespace.sh", namespace_environment)

    assert result.returncode == 0, result.stderr
    calls = logged_calls(namespace_environment)
    creates = [call for call in calls if "search-attribute create" in call]
    assert len(creates) == len(SEARCH_ATTRIBUTES) - 1
    for name in SEARCH_ATTRIBUTES[1:]:
        assert any(f"--name {name} --type Keyword" in call for call in creates), name
    assert any("namespace create" in call and "--namespace default" in call for call in calls)
    assert any("--retention 720h" in call for call in calls)


def test_namespace_setup_is_idempotent(namespace_environment: dict[str, str]) -> None:
    first = run_script("deploy/temporal/setup-namespace.sh", namespace_environment)
    assert first.returncode == 0, first.stderr
    Path(namespace_environment["STUB_LOG"]).unlink()

    second = run_script("deploy/temporal/setup-namespace.sh", namespace_environment)

    assert second.returncode == 0, second.stderr
    calls = logged_calls(namespace_environment)
    assert not [call for call in calls if " create " in call], calls


def test_schema_setup_migrates_both_databases(tmp_path: Path, services: dict) -> None:
    environment = {**install_stubs(tmp_path), "SQL_PASSWORD": "dummy"}
    assert environment_of(services["temporal-admin-tools"])["SQL_PASSWORD"]

    result = run_script("deploy/temporal/setup-schema.sh", environment)

    assert result.returncode == 0, result.stderr
    calls = logged_calls(environment)
    for database, schema in [("temporal", "temporal"), ("temporal_visibility", "visibility")]:
        prefix = (
            f"temporal-sql-tool --plugin postgres12 --endpoint postgresql --port 5432 "
            f"--user temporal --database {database}"
        )
        assert f"{prefix} create" in calls
        assert f"{prefix} setup-schema -v 0.0" in calls
        assert (
            f"{prefix} update-schema -d /etc/temporal/schema/postgresql/v12/{schema}/versioned"
            in calls
        )
    assert all("dummy" not in call for call in calls), "the password leaked into arguments"


def test_schema_setup_requires_password(tmp_path: Path) -> None:
    environment = install_stubs(tmp_path)

    result = run_script("deploy/temporal/setup-schema.sh", environment)

    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr
    assert logged_calls(environment) == []


def test_postgres_init_creates_sequencer_database(tmp_path: Path) -> None:
    password = "it's a secret"
    environment = {
        **install_stubs(tmp_path),
        "POSTGRES_USER": "temporal",
        "SEQUENCER_DB_PASSWORD": password,
    }

    result = run_script("deploy/postgres/initdb/10-create-sequencer-database.sh", environment)

    assert result.returncode == 0, result.stderr
    [call] = logged_calls(environment)
    assert call.endswith(f"-v password={password}")
    sql = (Path(environment["STUB_STATE"]) / "stdin").read_text()
    assert "CREATE ROLE sequencer LOGIN PASSWORD :'password';" in sql
    assert "CREATE DATABASE sequencer OWNER sequencer;" in sql
    assert password not in sql


def test_postgres_init_requires_password(tmp_path: Path) -> None:
    environment = {**install_stubs(tmp_path), "POSTGRES_USER": "temporal"}

    result = run_script("deploy/postgres/initdb/10-create-sequencer-database.sh", environment)

    assert result.returncode != 0
    assert "SEQUENCER_DB_PASSWORD" in result.stderr
    assert logged_calls(environment) == []


def test_api_service(services: dict) -> None:
    api = services["api"]
    environment = environment_of(api)

    assert api["command"] == ["sequencer", "serve", "--host", "0.0.0.0", "--port", "8766"]
    assert api["ports"] == ["127.0.0.1:8766:8766"]
    assert "8766/healthz" in " ".join(api["healthcheck"]["test"])
    assert environment["TEMPORAL_ADDRESS"] == "temporal:7233"
    assert environment["DATABASE_URL"] == environment_of(services["worker"])["DATABASE_URL"]
    assert ":?" in environment["SEQUENCER_LINKEDIN_WEBHOOK_SECRET"]
