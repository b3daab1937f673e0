"""The HTTP API through the real app, on the time-skipping server and a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import replace

import httpx
import pytest
import yaml
from openapi_spec_validator import validate
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError

from activities.records import StoreActivities
from sequencer.api_keys import create_api_key
from sequencer.config import load_settings
from sequencer.http_app import create_http_app
from sequencer.service import Sequencer, ServiceError
from sequencer.simulate import SimulatedChannels
from sequencer.temporal import lead_worker

CAMPAIGN = {
    "name": "API campaign",
    "sender": {"email": "rep@acme.test"},
    "steps": [
        {"type": "email", "subject": "Hi {{first_name}}", "body": "Hello", "wait_after": "2d"},
        {"type": "email", "subject": "Again", "body": "Hello again", "wait_after": "1d"},
        {"type": "call", "instructions": "Call {{first_name}}"},
    ],
}
LEADS_CSV = (
    "email,first_name,company,phone\n"
    "ann@example.com,Ann,Northwind,+33612345678\n"
    "ben@example.com,Ben,Contoso,+33612345679\n"
    "not-an-address,Bad,Nowhere,+33612345670\n"
)


@pytest.fixture
async def api(time_skipping_env, tmp_path, monkeypatch):
    """An API client with a valid key, on a service with its own database and task queue."""
    monkeypatch.setattr("sequencer.service.TASK_QUEUE", f"api-{uuid.uuid4()}")
    import sequencer.service as service_module

    settings = replace(load_settings({"SEQUENCER_HOME": str(tmp_path / "home")}))
    service = Sequencer(settings, client=time_skipping_env.client)
    records = StoreActivities(service.store)
    channels = SimulatedChannels({})
    key = create_api_key(service.store, "tests").key
    app = create_http_app(service, settings)
    async with lead_worker(
        time_skipping_env.client,
        service_module.TASK_QUEUE,
        [channels.send_email, channels.linkedin_step, records.create_task, records.record_activity],
        end_accounts=True,
    ):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://testserver",
            headers={"Authorization": f"Bearer {key}"},
        ) as client:
            client.service = service
            # Workflow ids derive from the campaign id, and the test server is shared.
            client.campaign_id = f"api-{uuid.uuid4().hex[:12]}"
            yield client
        await end_leads(time_skipping_env, service)
    service.close()


async def end_leads(time_skipping_env, service: Sequencer) -> None:
    """End every lead while the worker runs, or the shared server's clock stops.

    The test server does not skip time while an activity is outstanding, even one of a
    terminated workflow, so leads are removed as an operator would, and end by themselves.
    Temporal is asked, not the database: a lead recorded as ended may still run its last
    workflow task.
    """
    for campaign in service.store.list_campaigns():
        for row in service.store.list_enrollments(campaign.id):
            handle = time_skipping_env.client.get_workflow_handle(row.workflow_id)
            with contextlib.suppress(ServiceError):
                await service.control(campaign.id, row.workflow_id, "remove", "the test is over")
            for _ in range(200):
                if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
                    break
                await asyncio.sleep(0.05)
            else:
                with contextlib.suppress(RPCError):
                    await handle.terminate("the test is over")
                pytest.fail(f"{row.workflow_id} was still running after its removal")


async def launch(api) -> httpx.Response:
    return await api.post(
        "/api/v1/campaigns/launch",
        files={
            "campaign": ("campaign.yaml", campaign_yaml(api), "application/yaml"),
            "leads": ("leads.csv", LEADS_CSV, "text/csv"),
        },
    )


def campaign_yaml(api, **changes) -> str:
    return yaml.safe_dump({**CAMPAIGN, "id": api.campaign_id, **changes})


async def wait_for(time_skipping_env, condition, what: str) -> None:
    for _ in range(100):
        if await condition():
            return
        await time_skipping_env.sleep(0.1)
    pytest.fail(f"timed out waiting until {what}")


# Keys


async def test_request_without_key_rejected(api):
    response = await api.get("/api/v1/campaigns", headers={"Authorization": ""})

    assert response.status_code == 401
    assert "sequencer apikey create" in response.json()["detail"]
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_unknown_key_rejected(api):
    response = await api.get("/api/v1/campaigns", headers={"Authorization": "Bearer sq_nope"})

    assert response.status_code == 401


async def test_revoked_key_rejected(api):
    created = create_api_key(api.service.store, "short-lived")
    api.service.store.revoke_api_key(created.id)

    response = await api.get(
        "/api/v1/campaigns", headers={"Authorization": "", "X-API-Key": created.key}
    )

    assert response.status_code == 401


async def test_key_in_header_accepted(api):
    created = create_api_key(api.service.store, "header")

    response = await api.get(
        "/api/v1/campaigns", headers={"Authorization": "", "X-API-Key": created.key}
    )

    assert response.status_code == 200


async def test_key_stored_as_digest(api):
    created = create_api_key(api.service.store, "digest")

    with api.service.store.engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT prefix, digest FROM api_keys").all()

    assert all(created.key not in (prefix, digest) for prefix, digest in rows)
    assert any(created.key.startswith(prefix) for prefix, _ in rows)


async def test_health_needs_no_key(api):
    response = await api.get("/healthz", headers={"Authorization": ""})

    assert response.json() == {"status": "ok"}


# OpenAPI


async def test_openapi_document_valid(api):
    document = (await api.get("/openapi.json")).json()

    validate(document)
    assert "/api/v1/campaigns/launch" in document["paths"]
    assert "/api/v1/tasks/{task_id}/{outcome}" in document["paths"]


# Campaigns and leads


async def test_launch_reports_import(api):
    response = await launch(api)

    body = response.json()
    assert response.status_code == 200, body
    assert body["campaign_id"] == api.campaign_id
    assert sorted(body["enrolled"]) == ["ann@example.com", "ben@example.com"]
    assert [row["row"] for row in body["import"]["rejected"]] == [3]
    assert body["import"]["rejected"][0]["line"] == 4
    assert "not-an-address" in body["import"]["rejected"][0]["reason"]


async def test_invalid_campaign_lists_problems(api):
    response = await api.post(
        "/api/v1/campaigns/validate",
        content=campaign_yaml(api, steps=[{"type": "fax"}]),
        headers={"Content-Type": "application/yaml"},
    )

    assert response.status_code == 422
    assert any("fax" in problem for problem in response.json()["problems"])


async def test_validate_returns_campaign(api):
    response = await api.post(
        "/api/v1/campaigns/validate",
        content=campaign_yaml(api),
        headers={"Content-Type": "application/yaml"},
    )

    assert response.status_code == 200
    assert [step["type"] for step in response.json()["steps"]] == ["email", "email", "call"]


async def test_lead_file_without_address_column_rejected(api):
    response = await api.post(
        "/api/v1/campaigns/launch",
        files={
            "campaign": ("campaign.yaml", campaign_yaml(api), "application/yaml"),
            "leads": ("leads.csv", "first_name\nAnn\n", "text/csv"),
        },
    )

    assert response.status_code == 422
    assert "leads.csv" in response.json()["detail"]


async def test_unknown_campaign_not_found(api):
    response = await api.get("/api/v1/campaigns/nope/stats")

    assert response.status_code == 404
    assert "nope" in response.json()["detail"]


async def test_leads_filtered_by_status_and_text(api):
    await launch(api)

    leads_url = f"/api/v1/campaigns/{api.campaign_id}/leads"
    everyone = (await api.get(leads_url)).json()
    running = (await api.get(f"{leads_url}?status=running")).json()
    found = (await api.get(f"{leads_url}?q=contoso")).json()
    invalid = await api.get(f"{leads_url}?status=asleep")

    assert sorted(row["lead"] for row in everyone) == ["ann@example.com", "ben@example.com"]
    assert len(running) == 2
    assert [row["lead"] for row in found] == ["ben@example.com"]
    assert invalid.status_code == 422
    assert invalid.json()["detail"].startswith("invalid request: query.status:")


async def test_save_then_add_leads(api):
    saved = await api.post(
        "/api/v1/campaigns",
        content=campaign_yaml(api),
        headers={"Content-Type": "application/yaml"},
    )
    added = await api.post(
        f"/api/v1/campaigns/{api.campaign_id}/leads",
        files={"leads": ("more.csv", "email\ncid@example.com\n", "text/csv")},
    )

    assert saved.status_code == 201
    assert added.json()["enrolled"] == ["cid@example.com"]


# A bounce reported through the API, then the call task


async def test_bounce_event_runs_call_at_once(api, time_skipping_env):
    await launch(api)
    activity_url = f"/api/v1/campaigns/{api.campaign_id}/leads/ann@example.com/activity"

    async def step_one_sent() -> bool:
        steps = (await api.get(activity_url)).json()["steps"]
        return steps[0]["status"] == "sent"

    await wait_for(time_skipping_env, step_one_sent, "step 1 is sent")
    bounce = await api.post(
        "/api/v1/events/bounce",
        json={"campaign": api.campaign_id, "lead": "ann@example.com", "step": 1, "detail": "5.1.1"},
    )
    repeated = await api.post(
        "/api/v1/events/bounce",
        json={"campaign": api.campaign_id, "lead": "ann@example.com", "step": 1},
    )

    async def call_open() -> bool:
        return bool((await api.get(f"/api/v1/tasks?campaign={api.campaign_id}")).json())

    await wait_for(time_skipping_env, call_open, "the call task opens")
    [task] = (await api.get(f"/api/v1/tasks?campaign={api.campaign_id}")).json()
    done = await api.post(f"/api/v1/tasks/{task['id']}/done", json={"note": "spoke to Ann"})
    again = await api.post(f"/api/v1/tasks/{task['id']}/failed")
    steps = (await api.get(activity_url)).json()["steps"]

    assert bounce.status_code == 200
    assert "bounced" in bounce.json()["message"]
    assert repeated.json()["message"].endswith("nothing changed")
    assert task["lead"] == "ann@example.com"
    assert task["type"] == "call"
    assert done.json() == {"message": f"task {task['id']} done"}
    assert again.status_code == 409
    assert [step["status"] for step in steps][:2] == ["bounced", "skipped"]


async def test_unknown_task_not_found(api):
    response = await api.post("/api/v1/tasks/999999/done")

    assert response.status_code == 404


async def test_invalid_task_outcome_rejected(api):
    response = await api.post("/api/v1/tasks/1/finished")

    assert response.status_code == 422


# Unsubscribes


async def test_unsubscribe_and_resubscribe(api):
    added = await api.post("/api/v1/unsubscribes", json={"address": "Zed@Example.com"})
    twice = await api.post("/api/v1/unsubscribes", json={"address": "zed@example.com"})
    listed = (await api.get("/api/v1/unsubscribes")).json()
    removed = await api.delete("/api/v1/unsubscribes/zed@example.com")
    after = (await api.get("/api/v1/unsubscribes")).json()

    assert added.status_code == 201
    assert twice.status_code == 409
    assert [row["address"] for row in listed] == ["zed@example.com"]
    assert removed.status_code == 200
    assert after == []


async def test_invalid_address_rejected(api):
    response = await api.post("/api/v1/unsubscribes", json={"address": "not an address"})

    assert response.status_code == 409
    assert "not an address" in response.json()["detail"]


async def test_mail_event_without_body_rejected(api):
    response = await api.post("/api/v1/events/mail", content=b"")

    assert response.status_code == 422


async def test_sends_filtered_by_state(api):
    store = api.service.store
    store.claim_send("<1@acme.test>", "lead-x-1", 1, "a")
    store.move_send("<1@acme.test>", "a", "claimed", "sending")
    store.move_send("<1@acme.test>", "a", "sending", "uncertain", "reply lost")
    store.claim_send("<2@acme.test>", "lead-x-1", 2, "b")

    uncertain = await api.get("/api/v1/sends", params={"state": "uncertain"})
    every = await api.get("/api/v1/sends")
    invalid = await api.get("/api/v1/sends", params={"state": "lost"})

    assert uncertain.status_code == 200
    assert [(row["message_id"], row["detail"]) for row in uncertain.json()] == [
        ("<1@acme.test>", "reply lost")
    ]
    assert uncertain.json()[0]["campaign"] is None
    assert [row["state"] for row in every.json()] == ["uncertain", "claimed"]
    assert invalid.status_code == 422
    assert invalid.json()["detail"].startswith("invalid request: query.state:")
