"""Payload encryption: the codec, its keys and settings, the codec server, and a real history.

The history test runs `python worker.py` against a Temporal dev server, then reads the raw
history with a client that has no codec and looks for the lead's address and name in it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from sequencer.api_keys import create_api_key
from sequencer.codec import (
    ENCODING,
    KEY_ID_METADATA,
    LOCAL_KEY_FILE,
    EncryptionCodec,
    PayloadCodecError,
    codec_for,
    create_local_key_file,
    generate_key_entry,
    parse_keys,
)
from sequencer.config import load_settings
from sequencer.http_app import create_http_app
from sequencer.http_auth import API_KEY_COOKIE
from sequencer.linkedin_sandbox import LinkedInSandbox
from sequencer.service import Sequencer
from sequencer.smtp_sink import SmtpSink
from sequencer.stack import LocalStack, StackPorts, free_port
from sequencer.storage import Store
from sequencer.temporal import find_binary
from tests.test_compose import COMPOSE_FILE, ENV_EXAMPLE, environment_of, interpolate
from tests.test_stack_e2e import StackProcess, run_cli, wait_until
from workflows.lead_sequence import (
    ACCOUNT_KEY,
    CAMPAIGN_KEY,
    STAGE_KEY,
    STATUS_KEY,
    LeadSequenceWorkflow,
)

REPO = Path(__file__).resolve().parents[1]
KEY_VARIABLES = (
    "SEQUENCER_PAYLOAD_KEYS",
    "SEQUENCER_PAYLOAD_KEYS_FILE",
    "SEQUENCER_PAYLOAD_ENCRYPTION",
    "SEQUENCER_CODEC_CORS_ORIGINS",
)
UI_ORIGIN = "http://127.0.0.1:8233"
# Lead data that random ciphertext is unlikely to contain by chance.
LEAD_EMAIL = "zephyrine.quackenbush@example.com"
LEAD_FIRST_NAME = "Zephyrine"
LEAD_LAST_NAME = "Quackenbush"
LEAD_PROFILE = "zephyrine-quackenbush-profile"
# The SMTP sink rejects this address, and the LinkedIn sandbox fails the first request for a
# profile whose slug contains "flaky", so this lead's history has a failure.
BOUNCING_EMAIL = "bounce-ottoline.fairweather@example.com"
BOUNCING_NAME = "Ottoline"
BOUNCING_PROFILE = "ottoline-fairweather-flaky"
LINKEDIN_API_KEY = "linkedin-key-7c1f9e"
IMAP_PASSWORD = "imap-password-5d2b8a"
LEAD_DATA = (
    LEAD_EMAIL,
    LEAD_FIRST_NAME,
    LEAD_LAST_NAME,
    LEAD_PROFILE,
    BOUNCING_EMAIL,
    BOUNCING_NAME,
    BOUNCING_PROFILE,
)


def json_payload(value: object) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(value).encode())


def codec_of(*entries: str, encrypt: bool = True) -> EncryptionCodec:
    keys = parse_keys(",".join(entries), "SEQUENCER_PAYLOAD_KEYS")
    return EncryptionCodec(keys, encrypt=encrypt, source="SEQUENCER_PAYLOAD_KEYS")


def clean_environment(**variables: str) -> dict[str, str]:
    """Return this process's environment without payload settings, plus `variables`."""
    environment = {key: value for key, value in os.environ.items() if key not in KEY_VARIABLES}
    environment.pop("DATABASE_URL", None)
    return {**environment, **variables}


# The codec


async def test_round_trip():
    codec = codec_of(generate_key_entry("k1"))
    original = json_payload({"email": LEAD_EMAIL})

    [encrypted] = await codec.encode([original])
    [again] = await codec.encode([original])
    [decrypted] = await codec.decode([encrypted])

    assert encrypted.metadata["encoding"] == ENCODING
    assert encrypted.metadata[KEY_ID_METADATA] == b"k1"
    assert LEAD_EMAIL.encode() not in encrypted.SerializeToString()
    assert encrypted.data != again.data, "each payload needs a fresh nonce"
    assert decrypted == original


async def test_plain_payload_unchanged():
    codec = codec_of(generate_key_entry("k1"))
    plain = json_payload("written before encryption")

    assert await codec.decode([plain]) == [plain]


async def test_rotation_old_key_decrypts():
    old = generate_key_entry("old")
    new = generate_key_entry("new")
    [written_before] = await codec_of(old).encode([json_payload("before")])
    rotated = codec_of(new, old)

    [written_after] = await rotated.encode([json_payload("after")])

    assert written_after.metadata[KEY_ID_METADATA] == b"new"
    assert await rotated.decode([written_before]) == [json_payload("before")]
    assert await rotated.decode([written_after]) == [json_payload("after")]


async def test_unknown_key_named():
    [payload] = await codec_of(generate_key_entry("retired")).encode([json_payload("x")])

    with pytest.raises(PayloadCodecError) as raised:
        await codec_of(generate_key_entry("current")).decode([payload])

    message = str(raised.value)
    assert "'retired'" in message
    assert "SEQUENCER_PAYLOAD_KEYS" in message
    assert "current" in message


async def test_tampered_payload_rejected():
    codec = codec_of(generate_key_entry("k1"))
    [payload] = await codec.encode([json_payload({"email": LEAD_EMAIL})])
    flipped = Payload()
    flipped.CopyFrom(payload)
    flipped.data = payload.data[:-1] + bytes([payload.data[-1] ^ 1])
    truncated = Payload()
    truncated.CopyFrom(payload)
    truncated.data = payload.data[:8]

    for broken in (flipped, truncated):
        with pytest.raises(PayloadCodecError) as raised:
            await codec.decode([broken])
        assert "'k1' failed authentication" in str(raised.value)
        assert "SEQUENCER_PAYLOAD_KEYS" in str(raised.value)


async def test_same_id_other_key_rejected():
    [payload] = await codec_of(generate_key_entry("k1")).encode([json_payload("x")])

    with pytest.raises(PayloadCodecError, match="'k1' failed authentication"):
        await codec_of(generate_key_entry("k1")).decode([payload])


async def test_encode_without_key_raises():
    codec = EncryptionCodec((), source="SEQUENCER_PAYLOAD_KEYS")

    with pytest.raises(PayloadCodecError) as raised:
        await codec.encode([json_payload({"email": LEAD_EMAIL})])

    assert "SEQUENCER_PAYLOAD_KEYS" in str(raised.value)
    assert "SEQUENCER_PAYLOAD_ENCRYPTION=off" in str(raised.value)
    assert await codec.encode([]) == []


async def test_encryption_off_still_decrypts():
    entry = generate_key_entry("k1")
    [encrypted] = await codec_of(entry).encode([json_payload("old")])
    switched_off = codec_of(entry, encrypt=False)

    assert await switched_off.encode([json_payload("new")]) == [json_payload("new")]
    assert await switched_off.decode([encrypted]) == [json_payload("old")]
    assert switched_off.encrypting_key_id is None


# Keys and settings


def test_generated_key_parses():
    entry = generate_key_entry()

    [key] = parse_keys(entry, "test")

    assert entry.startswith(f"{key.key_id}:")
    assert len(key.secret) == 32
    assert key.secret.hex() not in repr(key)


def test_keys_file_comments_and_separators():
    first, second = generate_key_entry("a"), generate_key_entry("b")
    text = f"# current first\n{first}\n\n# retired\n{second}, "

    keys = parse_keys(text, "file")

    assert [key.key_id for key in keys] == ["a", "b"]


SECRET_32 = base64.b64encode(b"s" * 32).decode()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("no-colon-here", "entry 1 is not ID:BASE64"),
        (f":{SECRET_32}", "entry 1 is not ID:BASE64"),
        ("k1:", "entry 1 is not ID:BASE64"),
        ("k1:not*base64", "key 'k1' is not valid base64"),
        (f"k1:{base64.b64encode(b's' * 16).decode()}", "key 'k1' is 16 bytes long"),
        (f"k1:{base64.b64encode(b's' * 33).decode()}", "key 'k1' is 33 bytes long"),
        (f"k1:{SECRET_32},k1:{SECRET_32}", "the key id 'k1' appears twice"),
        (f"-k1:{SECRET_32}", "invalid key id '-k1'"),
    ],
)
def test_invalid_keys_named(tmp_path, value, message):
    with pytest.raises(ValueError) as raised:
        load_settings({"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_PAYLOAD_KEYS": value})

    assert str(raised.value).startswith("SEQUENCER_PAYLOAD_KEYS: ")
    assert message in str(raised.value)
    assert SECRET_32 not in str(raised.value)


def test_settings_read_keys(tmp_path):
    entry = generate_key_entry("k1")

    settings = load_settings({"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_PAYLOAD_KEYS": entry})

    assert [key.key_id for key in settings.payload_keys] == ["k1"]
    assert settings.payload_encryption is True
    assert entry.partition(":")[2] not in repr(settings)


def test_settings_repr_hides_secrets(tmp_path):
    secrets = {
        "SEQUENCER_SMTP_USERNAME": "rep",
        "SEQUENCER_SMTP_PASSWORD": "smtp-password-1e4f",
        "SEQUENCER_LINKEDIN_API_KEY": "linkedin-key-8a3c",
        "SEQUENCER_LINKEDIN_WEBHOOK_SECRET": "webhook-secret-2b9d",
        "SEQUENCER_IMAP_PASSWORD": "imap-password-6f0a",
        "SEQUENCER_MAILGUN_SIGNING_KEY": "mailgun-key-4c7e",
        "SEQUENCER_POSTMARK_WEBHOOK_PASSWORD": "postmark-password-9d1b",
    }

    settings = load_settings({"SEQUENCER_HOME": str(tmp_path), **secrets})

    text = repr(settings)
    for name, value in secrets.items():
        if name != "SEQUENCER_SMTP_USERNAME":
            assert value not in text, name


def test_settings_read_keys_file(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"{generate_key_entry('new')}\n{generate_key_entry('old')}\n")

    settings = load_settings(
        {"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_PAYLOAD_KEYS_FILE": str(key_file)}
    )

    assert [key.key_id for key in settings.payload_keys] == ["new", "old"]
    assert str(key_file) in settings.payload_keys_source


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"SEQUENCER_PAYLOAD_KEYS": "x", "SEQUENCER_PAYLOAD_KEYS_FILE": "/x"},
            "are both set",
        ),
        ({"SEQUENCER_PAYLOAD_KEYS_FILE": "/nonexistent/keys"}, "cannot read /nonexistent/keys"),
        ({"SEQUENCER_PAYLOAD_ENCRYPTION": "maybe"}, "SEQUENCER_PAYLOAD_ENCRYPTION: 'maybe'"),
        ({"SEQUENCER_CODEC_CORS_ORIGINS": "http://ui.test/path"}, "is not an origin"),
        ({"SEQUENCER_CODEC_CORS_ORIGINS": "ui.test:8233"}, "is not an origin"),
    ],
)
def test_invalid_payload_settings(tmp_path, variables, message):
    with pytest.raises(ValueError, match=message):
        load_settings({"SEQUENCER_HOME": str(tmp_path), **variables})


def test_empty_keys_file_rejected(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# nothing yet\n")

    with pytest.raises(ValueError, match="contains no key"):
        load_settings(
            {"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_PAYLOAD_KEYS_FILE": str(key_file)}
        )


def test_local_key_file_created_once(tmp_path):
    path = create_local_key_file(tmp_path)
    first = path.read_text()

    assert create_local_key_file(tmp_path) == path
    assert path.read_text() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    settings = load_settings({"SEQUENCER_HOME": str(tmp_path)})
    assert len(settings.payload_keys) == 1
    assert str(path) in settings.payload_keys_source


def test_environment_keys_win_over_local_file(tmp_path):
    create_local_key_file(tmp_path)

    settings = load_settings(
        {"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_PAYLOAD_KEYS": generate_key_entry("env")}
    )

    assert [key.key_id for key in settings.payload_keys] == ["env"]


def test_stack_makes_key_and_allows_ui(tmp_path):
    settings = load_settings({"SEQUENCER_HOME": str(tmp_path)})
    stack = LocalStack(settings, StackPorts.free())

    stack._use_local_payload_keys()

    assert (tmp_path / LOCAL_KEY_FILE).is_file()
    assert len(stack.settings.payload_keys) == 1
    assert stack.settings.codec_cors_origins == (stack.ui_url,)
    # The commands that use this home read the same key.
    reread = load_settings({"SEQUENCER_HOME": str(tmp_path)})
    assert reread.payload_keys == stack.settings.payload_keys


def test_stack_without_encryption_makes_no_key(tmp_path):
    settings = load_settings(
        {"SEQUENCER_HOME": str(tmp_path), "SEQUENCER_PAYLOAD_ENCRYPTION": "off"}
    )
    stack = LocalStack(settings, StackPorts.free())

    stack._use_local_payload_keys()

    assert not (tmp_path / LOCAL_KEY_FILE).exists()
    assert codec_for(stack.settings) is None


def test_cli_generates_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sequencer.cli", "payload-key", "generate", "--id", "spring"],
        env=clean_environment(SEQUENCER_HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    [key] = parse_keys(result.stdout, "stdout")
    assert key.key_id == "spring"
    assert "SEQUENCER_PAYLOAD_KEYS" in result.stderr


# Refusal to start without a key


@pytest.mark.parametrize(
    "command",
    [["worker.py"], ["-m", "sequencer.cli", "serve", "--port", "1"]],
    ids=["worker", "serve"],
)
def test_refuses_to_start_without_key(tmp_path, command):
    # Nothing listens at this address: the refusal comes before any connection.
    environment = clean_environment(
        SEQUENCER_HOME=str(tmp_path), TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}"
    )

    result = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "SEQUENCER_PAYLOAD_KEYS" in lines[0]
    assert "sequencer payload-key generate" in lines[0]
    assert "SEQUENCER_PAYLOAD_ENCRYPTION=off" in lines[0]


def test_worker_rejects_malformed_key(tmp_path):
    environment = clean_environment(
        SEQUENCER_HOME=str(tmp_path),
        TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}",
        SEQUENCER_PAYLOAD_KEYS=f"k1:{base64.b64encode(b'short').decode()}",
    )

    result = subprocess.run(
        [sys.executable, "worker.py"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Invalid setting: SEQUENCER_PAYLOAD_KEYS: key 'k1' is 5 bytes long" in lines[0]


# The production compose file


def test_compose_passes_keys_from_env():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    documented = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line
    )

    for name in ("worker", "api"):
        environment = environment_of(services[name])
        assert environment["SEQUENCER_PAYLOAD_KEYS"] == "${SEQUENCER_PAYLOAD_KEYS:-}", name
        assert interpolate(environment["SEQUENCER_PAYLOAD_ENCRYPTION"], {}) == "on", name
    assert documented["SEQUENCER_PAYLOAD_KEYS"] == ""


def test_compose_ui_calls_codec_server():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    ui = environment_of(services["temporal-ui"])
    api = environment_of(services["api"])

    endpoint = interpolate(ui["TEMPORAL_CODEC_ENDPOINT"], {})
    assert endpoint == "http://127.0.0.1:8766/codec"
    assert ui["TEMPORAL_CODEC_INCLUDE_CREDENTIALS"] == "true"
    assert "127.0.0.1:8766:8766" in services["api"]["ports"]
    # The origin allowed by default is the UI's published address.
    assert interpolate(api["SEQUENCER_CODEC_CORS_ORIGINS"], {}) == "http://127.0.0.1:8233"
    assert "127.0.0.1:8233:8080" in services["temporal-ui"]["ports"]


# The codec server over HTTP


class HttpApp:
    """The HTTP app served by uvicorn on a free port of 127.0.0.1."""

    def __init__(self, service: Sequencer, port: int) -> None:
        app = create_http_app(service, service.settings)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HttpApp:
        self.task = asyncio.create_task(self.server.serve())
        for _ in range(200):
            if self.server.started:
                return self
            assert not self.task.done(), "the HTTP app did not start"
            await asyncio.sleep(0.05)
        raise AssertionError("the HTTP app did not start within 10 s")

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout=10)


@pytest.fixture
async def codec_server(tmp_path):
    """The HTTP app with a payload key, an API key and the UI's origin allowed."""
    entry = generate_key_entry("k1")
    settings = load_settings(
        {
            "SEQUENCER_HOME": str(tmp_path),
            "SEQUENCER_PAYLOAD_KEYS": entry,
            "SEQUENCER_CODEC_CORS_ORIGINS": UI_ORIGIN,
        }
    )
    service = Sequencer(settings)
    async with HttpApp(service, free_port()) as server:
        server.api_key = create_api_key(service.store, "codec tests").key
        server.codec = codec_of(entry)
        server.service = service
        yield server
    service.close()


def payloads_json(*payloads: Payload) -> dict:
    return {
        "payloads": [
            {
                "metadata": {
                    key: base64.b64encode(value).decode() for key, value in p.metadata.items()
                },
                "data": base64.b64encode(p.data).decode(),
            }
            for p in payloads
        ]
    }


def payloads_of(document: dict) -> list[Payload]:
    return [
        Payload(
            metadata={key: base64.b64decode(value) for key, value in item["metadata"].items()},
            data=base64.b64decode(item["data"]),
        )
        for item in document["payloads"]
    ]


async def post(server, path: str, body: object, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url) as client:
        return await client.post(path, json=body, headers=headers)


async def test_decode_needs_credentials(codec_server):
    [encrypted] = await codec_server.codec.encode([json_payload(LEAD_EMAIL)])
    body = payloads_json(encrypted)

    anonymous = await post(codec_server, "/codec/decode", body, Origin=UI_ORIGIN)
    wrong = await post(codec_server, "/codec/decode", body, Authorization="Bearer sq_wrong")

    assert anonymous.status_code == 401
    assert LEAD_EMAIL not in anonymous.text
    # The UI can read the status, so it reports the failure instead of a network error.
    assert anonymous.headers["access-control-allow-origin"] == UI_ORIGIN
    assert wrong.status_code == 401


async def test_decode_with_api_key(codec_server):
    [encrypted] = await codec_server.codec.encode([json_payload(LEAD_EMAIL)])
    plain = json_payload("written before encryption")

    by_bearer = await post(
        codec_server,
        "/codec/decode",
        payloads_json(encrypted, plain),
        Authorization=f"Bearer {codec_server.api_key}",
        **{"X-Namespace": "default"},
    )
    by_header = await post(
        codec_server,
        "/codec/decode",
        payloads_json(encrypted),
        **{"X-API-Key": codec_server.api_key},
    )

    assert by_bearer.status_code == 200, by_bearer.text
    assert payloads_of(by_bearer.json()) == [json_payload(LEAD_EMAIL), plain]
    assert by_header.status_code == 200, by_header.text
    assert payloads_of(by_header.json()) == [json_payload(LEAD_EMAIL)]


async def test_decode_with_dashboard_cookie(codec_server):
    [encrypted] = await codec_server.codec.encode([json_payload(LEAD_EMAIL)])

    async with httpx.AsyncClient(
        base_url=codec_server.url, cookies={API_KEY_COOKIE: codec_server.api_key}
    ) as client:
        response = await client.post(
            "/codec/decode", json=payloads_json(encrypted), headers={"Origin": UI_ORIGIN}
        )

    assert response.status_code == 200, response.text
    assert payloads_of(response.json()) == [json_payload(LEAD_EMAIL)]
    assert response.headers["access-control-allow-origin"] == UI_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"


async def test_encode_then_decode(codec_server):
    auth = {"Authorization": f"Bearer {codec_server.api_key}"}

    encoded = await post(codec_server, "/codec/encode", payloads_json(json_payload("x")), **auth)
    [payload] = payloads_of(encoded.json())
    decoded = await post(codec_server, "/codec/decode", encoded.json(), **auth)

    assert encoded.status_code == 200, encoded.text
    assert payload.metadata["encoding"] == ENCODING
    assert payloads_of(decoded.json()) == [json_payload("x")]


async def test_revoked_key_rejected(codec_server):
    store = codec_server.service.store
    created = create_api_key(store, "leaving operator")
    store.revoke_api_key(created.id)

    response = await post(
        codec_server,
        "/codec/decode",
        payloads_json(json_payload("x")),
        Authorization=f"Bearer {created.key}",
    )

    assert response.status_code == 401


async def test_preflight_allows_ui_origin(codec_server):
    async with httpx.AsyncClient(base_url=codec_server.url) as client:
        allowed = await client.options(
            "/codec/decode",
            headers={
                "Origin": UI_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace",
            },
        )
        other = await client.options(
            "/codec/decode",
            headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"},
        )

    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == UI_ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "x-namespace" in allowed.headers["access-control-allow-headers"].lower()
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


async def test_cors_limited_to_codec(codec_server):
    async with httpx.AsyncClient(base_url=codec_server.url) as client:
        response = await client.get(
            "/api/v1/campaigns",
            headers={"Origin": UI_ORIGIN, "Authorization": f"Bearer {codec_server.api_key}"},
        )

    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(
    ("content", "headers", "status", "detail"),
    [
        (b"{}", {"Content-Type": "text/plain"}, 415, "application/json"),
        (b"{not json", {"Content-Type": "application/json"}, 400, "invalid payloads"),
        (b'{"payloads": 3}', {"Content-Type": "application/json"}, 400, "invalid payloads"),
        (
            b'{"payloads": [{"metadata": "not an object"}]}',
            {"Content-Type": "application/json"},
            400,
            "invalid payloads",
        ),
        (
            b'{"payloads": []}',
            {"Content-Type": "application/json", "X-Namespace": "other"},
            403,
            "not 'other'",
        ),
    ],
)
async def test_bad_requests_rejected(codec_server, content, headers, status, detail):
    async with httpx.AsyncClient(base_url=codec_server.url) as client:
        response = await client.post(
            "/codec/decode",
            content=content,
            headers={**headers, "Authorization": f"Bearer {codec_server.api_key}"},
        )

    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]


async def test_unknown_key_is_422(codec_server):
    [foreign] = await codec_of(generate_key_entry("elsewhere")).encode([json_payload("x")])

    response = await post(
        codec_server,
        "/codec/decode",
        payloads_json(foreign),
        Authorization=f"Bearer {codec_server.api_key}",
    )

    assert response.status_code == 422
    assert "'elsewhere'" in response.json()["detail"]


# A lead's history on a real Temporal server


# Payloads that Temporal stores unencoded by design: search attribute values are indexed by the
# server, and headers are not encoded unless a worker requests it.
UNENCODED_FIELDS = {"search_attributes", "header"}
# The SDK's core writes the patch id of `workflow.patched` in these markers, unencoded.
PATCH_MARKER = "core_patch"


def nested_messages(message: Message, full_name: str) -> list[Message]:
    """Return every message of type `full_name` inside `message`, outside UNENCODED_FIELDS."""
    found = []
    for field, value in message.ListFields():
        if field.name in UNENCODED_FIELDS or field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is None:
                continue
            values = list(value.values())
        elif field.is_repeated:
            values = list(value)
        else:
            values = [value]
        for item in values:
            if item.DESCRIPTOR.full_name == full_name:
                found.append(item)
            found.extend(nested_messages(item, full_name))
    return found


def cli_started_input(output: str) -> Payload:
    """Return the start input of `temporal workflow show --output json`."""
    [started] = [
        event["workflowExecutionStartedEventAttributes"]
        for event in json.loads(output)["events"]
        if "workflowExecutionStartedEventAttributes" in event
    ]
    [payload] = payloads_of(started["input"])
    return payload


@pytest.mark.stack
async def test_history_holds_no_lead_data(tmp_path):
    server = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(find_binary("temporal")),
        search_attributes=[CAMPAIGN_KEY, STATUS_KEY, STAGE_KEY, ACCOUNT_KEY],
    )
    address = server.client.service_client.config.target_host
    sink = SmtpSink(tmp_path / "mailbox", port=0)
    sink.start()
    sandbox = LinkedInSandbox(port=0, api_key=LINKEDIN_API_KEY)
    sandbox.start()
    entry = generate_key_entry("k1")
    codec = codec_of(entry)
    environment = clean_environment(
        SEQUENCER_HOME=str(tmp_path / "home"),
        TEMPORAL_ADDRESS=address,
        SEQUENCER_LINKEDIN_URL=sandbox.base_url,
        SEQUENCER_LINKEDIN_API_KEY=LINKEDIN_API_KEY,
        SEQUENCER_IMAP_PASSWORD=IMAP_PASSWORD,
        SEQUENCER_PAYLOAD_KEYS=entry,
    )
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, str(REPO / "worker.py")],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    service = Sequencer(load_settings(environment))
    try:
        campaign = tmp_path / "campaign.yaml"
        campaign.write_text(
            yaml.safe_dump(
                {
                    "name": "Encrypted",
                    "sender": {"email": "rep@acme.test", "smtp_url": sink.smtp_url},
                    "steps": [
                        {"type": "linkedin_visit", "wait_after": "1s"},
                        {
                            "type": "email",
                            "subject": "Hi {{first_name}} {{last_name}}",
                            "body": "Hello {{first_name}}",
                        },
                    ],
                }
            )
        )
        leads = tmp_path / "leads.csv"
        leads.write_text(
            "email,first_name,last_name,linkedin_url\n"
            f"{LEAD_EMAIL},{LEAD_FIRST_NAME},{LEAD_LAST_NAME},"
            f"https://www.linkedin.com/in/{LEAD_PROFILE}\n"
            f"{BOUNCING_EMAIL},{BOUNCING_NAME},Fairweather,"
            f"https://www.linkedin.com/in/{BOUNCING_PROFILE}\n"
        )
        report = await service.launch(campaign, leads)
        assert sorted(report.enrolled) == sorted([LEAD_EMAIL, BOUNCING_EMAIL])
        for _ in range(120):
            rows = service.enrollments("encrypted")
            if all(row.status in ("completed", "stopped") for row in rows):
                break
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.5)
        statuses = {row.lead_key: row.status for row in service.enrollments("encrypted")}
        assert statuses[LEAD_EMAIL] == "completed"
        # Both accounts booked their slots in the database, which lists them.
        accounts = await service.accounts()
        assert {account.id for account in accounts} == {"email:rep@acme.test", "linkedin:default"}

        plain_client = await Client.connect(address)
        codec_client = await service.client()
        workflow_ids = [item.id async for item in plain_client.list_workflows()]
        lead_ids = {row.lead_key: row.workflow_id for row in service.enrollments("encrypted")}
        assert set(lead_ids.values()) <= set(workflow_ids)
        # The service reads the encrypted results of queries through its codec.
        state = await codec_client.get_workflow_handle(lead_ids[LEAD_EMAIL]).query(
            LeadSequenceWorkflow.activity
        )
        assert state.status == "completed"
        found: dict[str, list[str]] = {}
        payload_count = 0
        failures = []
        for workflow_id in workflow_ids:
            history = await plain_client.get_workflow_handle(workflow_id).fetch_history()
            raw = b"".join(event.SerializeToString() for event in history.events)
            for text in LEAD_DATA:
                if text.encode() in raw:
                    found.setdefault(workflow_id, []).append(text)
            for event in history.events:
                if event.marker_recorded_event_attributes.marker_name == PATCH_MARKER:
                    continue
                for payload in nested_messages(event, "temporal.api.common.v1.Payload"):
                    assert payload.metadata["encoding"] == ENCODING, (workflow_id, event)
                    assert payload.metadata[KEY_ID_METADATA] == b"k1"
                    payload_count += 1
                    # Secrets come from the worker's settings, never from a workflow's input.
                    [plain] = await codec.decode([payload])
                    for secret in (LINKEDIN_API_KEY, IMAP_PASSWORD):
                        assert secret.encode() not in plain.data, (workflow_id, event)
                failures.extend(nested_messages(event, "temporal.api.failure.v1.Failure"))
        assert found == {}, "lead data in plaintext in the Temporal history"
        assert payload_count > 0
        # The flaky profile's first attempt failed: its message is encrypted too.
        assert failures, "no failure in the histories"
        assert {failure.message for failure in failures} == {"Encoded failure"}

        # A client with the codec reads the lead and the failure back from the same history.
        history = await codec_client.get_workflow_handle(lead_ids[LEAD_EMAIL]).fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        [decoded] = await codec_client.data_converter.payload_codec.decode(started.input.payloads)
        assert LEAD_EMAIL.encode() in decoded.data
        assert LEAD_FIRST_NAME.encode() in decoded.data
        messages = [
            str(await codec_client.data_converter.decode_failure(failure)) for failure in failures
        ]
        assert "Encoded failure" not in messages
        assert any("the LinkedIn provider returned HTTP 503" in text for text in messages), messages

        # The Temporal CLI decodes it through the codec server with an API key.
        async with HttpApp(service, free_port()) as app:
            api_key = create_api_key(service.store, "temporal cli").key
            show = [
                str(find_binary("temporal")),
                "workflow",
                "show",
                "--workflow-id",
                lead_ids[LEAD_EMAIL],
                "--address",
                address,
                "--output",
                "json",
                "--codec-endpoint",
                f"{app.url}/codec",
            ]
            with_key = await asyncio.to_thread(
                subprocess.run,
                [*show, "--codec-auth", f"Bearer {api_key}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            without_key = await asyncio.to_thread(
                subprocess.run, show, capture_output=True, text=True, timeout=60
            )
        assert with_key.returncode == 0, with_key.stderr
        started_input = cli_started_input(with_key.stdout)
        assert started_input.metadata["encoding"] == b"json/plain"
        assert LEAD_EMAIL.encode() in started_input.data
        assert without_key.returncode != 0
        assert LEAD_EMAIL not in without_key.stdout
    finally:
        worker.terminate()
        code = worker.wait(60)
        log.close()
        service.close()
        sandbox.stop()
        sink.stop()
        await server.shutdown()
    output = (tmp_path / "worker.log").read_text()
    assert code == 0, output
    assert "Payloads are encrypted with the key k1" in output
    for secret in (entry.partition(":")[2], LINKEDIN_API_KEY, IMAP_PASSWORD):
        assert secret not in output


# The local stack's Temporal UI in a real browser

# Debian's Chromium, headless and without background connections, as in tests/test_browser.py.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def browser_or_skip():
    """Return Playwright's sync entry point, or skip as tests/test_browser.py does."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM.exists():
        if os.environ.get("SEQUENCER_REQUIRE_BROWSER") == "1":
            pytest.fail("Playwright or Debian's chromium is missing", pytrace=False)
        pytest.skip("needs Playwright and Debian's chromium at /usr/bin/chromium")
    return sync_playwright


@pytest.mark.stack
def test_local_ui_decodes_after_opt_in(tmp_path):
    sync_playwright = browser_or_skip()
    home = tmp_path / "home"
    home.mkdir()
    stack = StackProcess(home, StackPorts.free())
    try:
        stack.wait_ready()
        key_file = home / LOCAL_KEY_FILE
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        api_key = run_cli(home, "apikey", "create", "ui").stdout.strip()
        campaign = home / "campaign.yaml"
        campaign.write_text(
            yaml.safe_dump(
                {
                    "name": "Codec UI",
                    "sender": {
                        "email": "rep@acme.test",
                        "smtp_url": f"smtp://127.0.0.1:{stack.ports.smtp}",
                    },
                    "steps": [
                        {"type": "email", "subject": "Hi", "body": "Hello", "wait_after": "1h"},
                        {"type": "call"},
                    ],
                }
            )
        )
        leads = home / "leads.csv"
        leads.write_text(f"email,first_name\n{LEAD_EMAIL},{LEAD_FIRST_NAME}\n")
        # The commands of the same home encrypt with the stack's key, or launch would fail.
        launched = run_cli(home, "launch", str(campaign), "--leads", str(leads))
        assert launched.returncode == 0, launched.stderr
        [row] = Store(load_settings({"SEQUENCER_HOME": str(home)}).database_url).list_enrollments(
            "codec-ui"
        )

        def first_email_sent() -> bool:
            report = run_cli(home, "activity", "codec-ui", LEAD_EMAIL, "--json")
            return report.returncode == 0 and '"sent"' in report.stdout

        wait_until(first_email_sent, stack.describe, "the first email is sent", timeout=60)
        accounts = run_cli(home, "account", "list", "--json")
        assert accounts.returncode == 0, accounts.stderr
        assert "email:rep@acme.test" in accounts.stdout
        ui_page = (
            f"http://127.0.0.1:{stack.ports.ui}/namespaces/default/workflows/{row.workflow_id}"
        )
        codec_url = f"http://127.0.0.1:{stack.ports.webhooks}/codec"

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
            try:
                page = browser.new_context().new_page()
                statuses: list[int] = []
                page.on(
                    "response",
                    lambda response: (
                        statuses.append(response.status)
                        if response.url.startswith(f"{codec_url}/decode")
                        else None
                    ),
                )
                page.goto(f"http://127.0.0.1:{stack.ports.webhooks}/login")
                page.get_by_label("API key").fill(api_key)
                page.get_by_role("button", name="Log in").click()
                page.wait_for_url(f"http://127.0.0.1:{stack.ports.webhooks}/")

                # The endpoint that `sequencer up` gives the UI is called without credentials.
                page.goto(ui_page)
                page.locator("#content").get_by_text("Codec Server could not connect").wait_for()
                assert statuses and set(statuses) == {401}
                assert page.get_by_text("Codec UI").count() == 0

                # The operator switches the UI's codec settings to this browser's, with
                # credentials, in its Codec Server dialog (the icon at the top right).
                page.locator("[data-testid^='data-encoder-status']").first.click()
                page.get_by_text("Use my browser setting and ignore Cluster-level setting.").click()
                page.get_by_label("Codec Server browser endpoint").fill(codec_url)
                page.get_by_test_id("data-encoder-include-credentials").click()
                page.get_by_role("button", name="Apply").click()
                statuses.clear()
                page.goto(ui_page)
                page.get_by_text('"Codec UI"').first.wait_for()
                assert statuses and set(statuses) == {200}
                assert (
                    page.locator("#content").get_by_text("Codec Server could not connect").count()
                    == 0
                )
            finally:
                browser.close()
    finally:
        stack.stop()
