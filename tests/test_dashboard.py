"""The web dashboard, served in-process to httpx, on the time-skipping server with a worker."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import FastAPI

from activities.records import StoreActivities
from sequencer.api_keys import create_api_key
from sequencer.cli import STATUS_STYLE
from sequencer.config import load_settings
from sequencer.dashboard import (
    STATIC_DIR,
    dashboard_router,
    neutralise_cell,
    safe_next,
)
from sequencer.http_auth import API_KEY_COOKIE
from sequencer.service import Sequencer, ServiceError
from sequencer.simulate import SimulatedChannels
from sequencer.temporal import lead_worker

FINAL = {"completed", "stopped", "replied", "removed"}
EMAIL = {"type": "email", "subject": "Hi {{first_name}}", "body": "Hello"}
# Two emails a few days apart, then a call: a bounce of the first email skips the second and
# opens the call at once, while a lead without a bounce waits two days on step 2.
STEPS = [
    {**EMAIL, "wait_after": "2d"},
    {**EMAIL, "wait_after": "1d"},
    {"type": "call", "instructions": "Call {{first_name}} about the demo"},
]
LEADS = (
    "email,first_name,last_name,company,phone,linkedin_url\n"
    "ann@example.com,Ann,Lee,Northwind,+33612345678,https://www.linkedin.com/in/ann-lee\n"
    "bob@example.com,Bob,Ray,Contoso,+14155550100,https://www.linkedin.com/in/bob-ray\n"
)
BASE_URL = "http://testserver"


@pytest.fixture
async def sequencer(time_skipping_env, tmp_path, monkeypatch):
    """A Sequencer on the shared test server, with its own database and task queue."""
    monkeypatch.setattr("sequencer.service.TASK_QUEUE", f"dashboard-{uuid.uuid4()}")
    import sequencer.service as service_module

    settings = replace(load_settings({"SEQUENCER_HOME": str(tmp_path / "home")}))
    service = Sequencer(settings, client=time_skipping_env.client)
    records = StoreActivities(service.store)
    channels = SimulatedChannels({})
    async with lead_worker(
        time_skipping_env.client,
        service_module.TASK_QUEUE,
        [
            channels.send_email,
            channels.linkedin_step,
            records.create_task,
            records.record_activity,
        ],
        end_accounts=True,
    ):
        yield service
        # Let every workflow end while this worker still runs. A workflow left running holds
        # the shared test server's clock and makes every later test that skips time hang.
        for _ in range(100):
            rows = [
                row
                for campaign in service.store.list_campaigns()
                for row in service.store.list_enrollments(campaign.id)
            ]
            if all(row.status in FINAL for row in rows):
                break
            await time_skipping_env.sleep(0.1)
        else:
            for row in rows:
                if row.status not in FINAL:
                    await time_skipping_env.client.get_workflow_handle(row.workflow_id).terminate(
                        "the test is over"
                    )
            pytest.fail(f"workflows still running after the test: {rows}")
    service.close()


@pytest.fixture
def app(sequencer) -> FastAPI:
    """The dashboard, mounted as the module docstring of sequencer.dashboard describes."""
    application = FastAPI()
    application.state.api_key_store = sequencer.store
    application.include_router(dashboard_router(sequencer))
    return application


@pytest.fixture
def api_key(sequencer) -> str:
    return create_api_key(sequencer.store, "tests").key


@pytest.fixture
async def anonymous(app):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


@pytest.fixture
async def client(app, api_key):
    """A client logged in: it sends the login cookie with every request."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url=BASE_URL, cookies={API_KEY_COOKIE: api_key}
    ) as client:
        yield client


async def wait_for(time_skipping_env, condition, what: str) -> None:
    for _ in range(100):
        if condition():
            return
        await time_skipping_env.sleep(0.1)
    pytest.fail(f"timed out waiting until {what}")


async def launch(sequencer, tmp_path: Path, steps: list[dict], leads: str, name: str = "") -> str:
    """Launch a campaign with a name unique on the shared server, and return its id."""
    name = f"{name or 'Dash'} {uuid.uuid4().hex[:8]}"
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        yaml.safe_dump({"name": name, "sender": {"email": "rep@acme.test"}, "steps": steps})
    )
    leads_file = tmp_path / "leads.csv"
    leads_file.write_text(leads)
    report = await sequencer.launch(campaign, leads_file)
    return report.campaign.id


async def end_all(sequencer, campaign_id: str) -> None:
    """Remove every lead still running, so that its workflow ends before the test does."""
    for row in sequencer.enrollments(campaign_id):
        if row.status not in FINAL:
            try:
                await sequencer.control(campaign_id, row.lead_key, "remove")
            except ServiceError:
                pass  # it ended meanwhile


def step_statuses(sequencer, campaign_id: str, lead: str) -> list[str]:
    return [step.status.value for step in sequencer.activity(campaign_id, lead).steps]


@pytest.fixture
async def bounced(sequencer, tmp_path, time_skipping_env):
    """A campaign whose first email was sent to Ann and Bob, then bounced for Bob.

    Bob's second email is skipped and his call task is open. Ann waits two days for step 2.
    """
    campaign_id = await launch(sequencer, tmp_path, STEPS, LEADS)
    await wait_for(
        time_skipping_env,
        lambda: all(
            step_statuses(sequencer, campaign_id, lead)[0] == "sent"
            for lead in ("ann@example.com", "bob@example.com")
        ),
        "step 1 is sent to both leads",
    )
    await sequencer.report_failure(campaign_id, "bob@example.com", 1, "bounce", True, "550 5.1.1")
    # The task row and the step's status are written by two activities: wait for both.
    await wait_for(
        time_skipping_env,
        lambda: (
            sequencer.tasks("open", campaign_id)
            and step_statuses(sequencer, campaign_id, "bob@example.com")[2] == "waiting"
        ),
        "Bob's call task opens",
    )
    yield campaign_id
    await end_all(sequencer, campaign_id)


def workflow_of(sequencer, campaign_id: str, lead: str) -> str:
    return sequencer.activity(campaign_id, lead).enrollment.workflow_id


def table_cells(html: str, table_id: str) -> list[list[str]]:
    """Return the text of each cell of a table, row by row, with tags removed."""
    table = re.search(rf'<table[^>]*id="{table_id}".*?</table>', html, re.S)
    assert table, f"no table {table_id!r} in the page"
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table.group(0), re.S)
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S) for row in rows]
    return [[" ".join(re.sub(r"<[^>]+>", " ", cell).split()) for cell in row] for row in cells]


# Pure helpers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/tasks", "/tasks"),
        ("/campaigns/a/leads?status=running&q=ann", "/campaigns/a/leads?status=running&q=ann"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("tasks", "/"),
        ("/tasks\r\nSet-Cookie: x=1", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_safe_next(value, expected):
    assert safe_next(value) == expected


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("+1", "'+1"),
        ("-2", "'-2"),
        ("@x", "'@x"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("Northwind", "Northwind"),
        ("a=b", "a=b"),
        (3, 3),
        ("", ""),
    ],
)
def test_neutralise_cell(cell, expected):
    assert neutralise_cell(cell) == expected


def test_css_has_cli_status_colours():
    css = (STATIC_DIR / "dashboard.css").read_text()
    for status, style in STATUS_STYLE.items():
        pattern = rf"\.status-{status} \{{ --tone: var\(--{style}\); \}}"
        assert re.search(pattern, css), f"{status} is not {style} in dashboard.css"


def test_htmx_is_vendored():
    script = (STATIC_DIR / "htmx.min.js").read_text()
    assert script.startswith("var htmx=function()")
    # The version that the base template and the README name.
    assert 'version:"2.0.11"' in script


# Login


async def test_page_without_key_redirects(anonymous):
    response = await anonymous.get("/tasks?campaign=x")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Ftasks%3Fcampaign%3Dx"


async def test_partial_without_key_reloads(anonymous):
    response = await anonymous.get("/tasks?partial=1", headers={"HX-Request": "true"})
    assert response.status_code == 401
    assert response.headers["HX-Redirect"] == "/login?next=%2Ftasks"


async def test_post_without_key_redirects(anonymous):
    response = await anonymous.post("/unsubscribes", data={"address": "a@example.com"})
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Funsubscribes"


async def test_login_form_keeps_next(anonymous):
    response = await anonymous.get("/login", params={"next": "/tasks"})
    assert response.status_code == 200
    assert '<input type="hidden" name="next" value="/tasks">' in response.text


async def test_login_wrong_key(anonymous):
    response = await anonymous.post("/login", data={"key": "sq_not-a-key", "next": "/tasks"})
    assert response.status_code == 401
    assert "Invalid API key" in response.text
    assert "set-cookie" not in response.headers


async def test_login_right_key(anonymous, api_key):
    response = await anonymous.post("/login", data={"key": f" {api_key} ", "next": "/tasks"})
    assert response.status_code == 303
    assert response.headers["location"] == "/tasks"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{API_KEY_COOKIE}={api_key};")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/" in cookie
    assert (await anonymous.get("/tasks")).status_code == 200


async def test_login_offsite_next_ignored(anonymous, api_key):
    response = await anonymous.post("/login", data={"key": api_key, "next": "//evil.example"})
    assert response.headers["location"] == "/"


async def test_logout_clears_cookie(anonymous, api_key):
    await anonymous.post("/login", data={"key": api_key})
    response = await anonymous.post("/logout")
    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert (await anonymous.get("/")).status_code == 303


async def test_revoked_key_refused(client, sequencer):
    assert (await client.get("/")).status_code == 200
    key_id = sequencer.store.list_api_keys()[0].id
    sequencer.store.revoke_api_key(key_id)
    response = await client.get("/")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2F"


async def test_bearer_header_accepted(anonymous, api_key):
    response = await anonymous.get("/tasks", headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 200


async def test_cross_site_post_rejected(client, sequencer):
    response = await client.post(
        "/unsubscribes",
        data={"address": "carol@example.com"},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403
    assert sequencer.store.is_suppressed("carol@example.com") is False


async def test_pages_send_csp(client):
    response = await client.get("/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"


async def test_static_files_served(anonymous):
    css = await anonymous.get("/static/dashboard.css")
    script = await anonymous.get("/static/htmx.min.js")
    unknown = await anonymous.get("/static/secrets.txt")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert script.status_code == 200
    assert unknown.status_code == 404


# Pages with a launched campaign


async def test_campaign_list(client, bounced):
    response = await client.get("/")
    rows = table_cells(response.text, "campaigns")
    assert response.status_code == 200
    assert rows[1][1] == bounced
    assert rows[1][2] == "2"
    assert rows[1][3] == "running 2"
    assert rows[1][4] == "1"


async def test_stats_tables(client, bounced):
    response = await client.get(f"/campaigns/{bounced}")
    steps = table_cells(response.text, "steps")
    channels = table_cells(response.text, "channels")
    assert response.status_code == 200
    # step, type, sent, failed, bounced, skipped, waiting, pending, failure rate
    assert steps[1] == ["1", "email", "1", "0", "1", "0", "0", "0", "50%"]
    assert steps[2] == ["2", "email", "0", "0", "0", "1", "0", "1", "-"]
    assert steps[3] == ["3", "call", "0", "0", "0", "0", "1", "1", "-"]
    assert channels[1] == ["email", "1", "0", "1", "1", "0", "50%"]
    assert channels[2] == ["phone", "0", "0", "0", "0", "1", "-"]


async def test_stats_funnel_svg(client, bounced):
    response = await client.get(f"/campaigns/{bounced}")
    funnel = re.search(r'<svg class="chart" id="funnel".*?</svg>', response.text, re.S).group(0)
    titles = re.findall(r"<rect[^>]*><title>(.*?)</title>", funnel)
    assert titles == [
        "step 1 email: 1 sent",
        "step 1 email: 1 bounced",
        "step 2 email: 1 skipped",
        "step 2 email: 1 pending",
        "step 3 call: 1 waiting",
        "step 3 call: 1 pending",
    ]
    # Each of two leads is half of a 420-pixel bar.
    assert 'class="bar status-sent" x="150.0" y="0" width="210.0"' in funnel


async def test_stats_failure_rate_svg(client, bounced):
    response = await client.get(f"/campaigns/{bounced}")
    chart = re.search(r'<svg class="chart" id="failure-rates".*?</svg>', response.text, re.S)
    assert "email: 1 of 2 failed or bounced" in chart.group(0)
    assert ">50% (1 of 2)</text>" in chart.group(0)
    assert ">no step run yet</text>" in chart.group(0)


async def test_stats_partial(client, bounced):
    response = await client.get(f"/campaigns/{bounced}", params={"partial": "1"})
    assert response.status_code == 200
    assert "<html" not in response.text
    assert 'id="funnel"' in response.text


async def test_pages_refresh_live(client, bounced, sequencer):
    workflow = workflow_of(sequencer, bounced, "ann@example.com")
    pages = {
        f"/campaigns/{bounced}": f"/campaigns/{bounced}?partial=1",
        f"/campaigns/{bounced}/leads": f"/campaigns/{bounced}/leads?partial=1&amp;page=1",
        f"/campaigns/{bounced}/leads/{workflow}": (
            f"/campaigns/{bounced}/leads/{workflow}?partial=1"
        ),
        "/tasks": "/tasks?partial=1",
    }
    for page, partial in pages.items():
        html = (await client.get(page)).text
        assert f'hx-get="{partial}" hx-trigger="every 2s"' in html, page


async def test_partials_are_fragments(client, bounced, sequencer):
    workflow = workflow_of(sequencer, bounced, "ann@example.com")
    partials = {
        "/?partial=1": 'id="campaigns"',
        f"/campaigns/{bounced}/leads?partial=1": 'id="leads"',
        f"/campaigns/{bounced}/leads/{workflow}?partial=1": 'id="timeline"',
        "/tasks?partial=1": 'id="tasks"',
    }
    for url, table in partials.items():
        response = await client.get(url)
        assert response.status_code == 200, url
        assert "<html" not in response.text, url
        assert table in response.text, url


async def test_leads_pages(client, bounced, monkeypatch):
    monkeypatch.setattr("sequencer.dashboard.LEADS_PAGE_SIZE", 1)
    first = await client.get(f"/campaigns/{bounced}/leads")
    second = await client.get(f"/campaigns/{bounced}/leads", params={"page": "2"})
    beyond = await client.get(f"/campaigns/{bounced}/leads", params={"page": "x"})
    assert [row[0] for row in table_cells(first.text, "leads")[1:]] == ["ann@example.com"]
    assert f'<a href="/campaigns/{bounced}/leads?page=2">Next</a>' in first.text
    assert [row[0] for row in table_cells(second.text, "leads")[1:]] == ["bob@example.com"]
    assert "page 1 of 2" in beyond.text


async def test_unknown_campaign_404(client):
    response = await client.get("/campaigns/no-such-campaign")
    assert response.status_code == 404
    assert "campaign &#39;no-such-campaign&#39; not found" in response.text
    assert '<a href="/">Back</a>' in response.text


async def test_unknown_lead_404(client, bounced):
    response = await client.get(f"/campaigns/{bounced}/leads/nobody@example.com")
    assert response.status_code == 404
    assert "&#39;nobody@example.com&#39; is not enrolled" in response.text
    assert f'<a href="/campaigns/{bounced}/leads">Back</a>' in response.text


async def test_leads_list(client, bounced, sequencer):
    response = await client.get(f"/campaigns/{bounced}/leads")
    rows = table_cells(response.text, "leads")
    workflow = workflow_of(sequencer, bounced, "bob@example.com")
    assert [row[0] for row in rows[1:]] == ["ann@example.com", "bob@example.com"]
    assert rows[2][1:5] == ["Bob Ray", "Contoso", "running", "unsubscribed"]
    assert f'href="/campaigns/{bounced}/leads/{workflow}"' in response.text


async def test_leads_search(client, bounced):
    for query in ("northwind", "ANN", "lee"):
        response = await client.get(f"/campaigns/{bounced}/leads", params={"q": query})
        leads = [row[0] for row in table_cells(response.text, "leads")[1:]]
        assert leads == ["ann@example.com"], query


async def test_leads_search_no_match(client, bounced):
    response = await client.get(f"/campaigns/{bounced}/leads", params={"q": "zzz"})
    assert response.status_code == 200
    assert "No lead matches" in response.text


async def test_leads_status_filter(client, bounced, sequencer):
    await sequencer.control(bounced, "ann@example.com", "pause", "holiday")
    paused = await client.get(f"/campaigns/{bounced}/leads", params={"status": "paused"})
    running = await client.get(f"/campaigns/{bounced}/leads", params={"status": "running"})
    assert [row[0] for row in table_cells(paused.text, "leads")[1:]] == ["ann@example.com"]
    assert [row[0] for row in table_cells(running.text, "leads")[1:]] == ["bob@example.com"]


async def test_leads_invalid_status(client, bounced):
    response = await client.get(f"/campaigns/{bounced}/leads", params={"status": "lost"})
    assert response.status_code == 422
    assert "invalid status &#39;lost&#39;" in response.text


async def test_lead_page_bounce(client, bounced, sequencer):
    workflow = workflow_of(sequencer, bounced, "bob@example.com")
    response = await client.get(f"/campaigns/{bounced}/leads/{workflow}")
    steps = table_cells(response.text, "steps")
    assert response.status_code == 200
    # step, type, channel, status, when, reason, detail
    assert steps[1][3] == "bounced"
    assert steps[1][5:] == ["bounce", "550 5.1.1"]
    assert steps[2][3] == "skipped"
    assert steps[2][5:] == ["step 1 bounced", "bounce"]
    assert steps[3][3] == "waiting"
    assert '<span class="badge status-unsubscribed">unsubscribed</span>' in response.text


async def test_lead_timeline(client, bounced, sequencer):
    response = await client.get(f"/campaigns/{bounced}/leads/bob@example.com")
    timeline = re.search(r'<ol class="timeline".*?</ol>', response.text, re.S).group(0)
    entries = [
        " ".join(re.sub(r"<[^>]+>", " ", item).split()[3:])
        for item in re.findall(r"<li[^>]*>(.*?)</li>", timeline, re.S)
    ]
    assert "bounced step 1 email reason: bounce 550 5.1.1" in entries
    assert "unsubscribed step 1 email reason: bounce" in entries
    assert "skipped step 2 email reason: step 1 bounced bounce" in entries
    assert '<li class="entry kind-step status-skipped">' in timeline


async def test_lead_workflow_link(client, bounced, sequencer):
    sequencer.settings.stack_file.write_text(json.dumps({"ui_url": "http://127.0.0.1:8233"}))
    workflow = workflow_of(sequencer, bounced, "ann@example.com")
    response = await client.get(f"/campaigns/{bounced}/leads/{workflow}")
    link = f"http://127.0.0.1:8233/namespaces/default/workflows/{workflow}"
    assert f'<a id="workflow-link" href="{link}"' in response.text


async def test_lead_pause_resume_remove(client, bounced, sequencer, time_skipping_env):
    page = f"/campaigns/{bounced}/leads/{workflow_of(sequencer, bounced, 'ann@example.com')}"
    paused = await client.post(f"{page}/pause", data={"note": "on holiday"})
    again = await client.post(f"{page}/pause", data={"note": ""})
    resumed = await client.post(f"{page}/resume")
    removed = await client.post(f"{page}/remove", data={"note": "asked to stop"})
    unknown = await client.post(f"{page}/archive")
    assert paused.status_code == 200
    assert "ann@example.com: paused" in paused.text
    assert again.status_code == 409
    assert "already paused by an operator; nothing changed" in again.text
    assert resumed.status_code == 200
    assert removed.status_code == 200
    assert unknown.status_code == 404
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments(bounced)[0].status == "removed",
        "Ann is removed",
    )
    reasons = [e.reason for e in sequencer.activity(bounced, "ann@example.com").log]
    assert "on holiday" in reasons


async def test_lead_action_unknown_lead(client, bounced):
    response = await client.post(f"/campaigns/{bounced}/leads/nobody@example.com/pause")
    assert response.status_code == 404
    assert "&#39;nobody@example.com&#39; is not enrolled" in response.text


async def test_ended_lead_has_no_controls(client, bounced, sequencer, time_skipping_env):
    await sequencer.control(bounced, "ann@example.com", "remove")
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments(bounced)[0].status == "removed",
        "Ann is removed",
    )
    response = await client.get(f"/campaigns/{bounced}/leads/ann@example.com")
    assert ">removed</span>" in response.text
    assert "/pause" not in response.text


async def test_lead_note_too_long(client, bounced, sequencer):
    page = f"/campaigns/{bounced}/leads/{workflow_of(sequencer, bounced, 'ann@example.com')}"
    response = await client.post(f"{page}/pause", data={"note": "x" * 1001})
    assert response.status_code == 422
    assert sequencer.enrollments(bounced)[0].status == "running"


async def test_tasks_page(client, bounced):
    response = await client.get("/tasks")
    rows = table_cells(response.text, "tasks")
    assert len(rows) == 2
    assert "bob@example.com Bob Ray Contoso" in rows[1][1]
    assert rows[1][2] == "3 call"
    assert rows[1][3] == "Call Bob about the demo"
    assert '<a class="phone" href="tel:+14155550100">+14155550100</a>' in response.text
    assert 'href="https://www.linkedin.com/in/bob-ray"' in response.text


async def test_task_done(client, bounced, sequencer, time_skipping_env):
    task = sequencer.tasks("open", bounced)[0]
    response = await client.post(f"/tasks/{task.id}/done", data={"note": "booked a demo"})
    assert response.status_code == 200
    assert f"task {task.id} done" in response.text
    assert "No open task" in response.text
    assert sequencer.store.get_task(task.id).note == "booked a demo"
    await wait_for(
        time_skipping_env,
        lambda: step_statuses(sequencer, bounced, "bob@example.com")[2] == "sent",
        "the call step is done",
    )


async def test_task_closed_twice(client, bounced, sequencer):
    task = sequencer.tasks("open", bounced)[0]
    await client.post(f"/tasks/{task.id}/skipped")
    response = await client.post(f"/tasks/{task.id}/failed")
    assert response.status_code == 409
    assert f"task {task.id} is already skipped; nothing changed" in response.text


async def test_task_unknown_outcome(client, bounced, sequencer):
    task = sequencer.tasks("open", bounced)[0]
    response = await client.post(f"/tasks/{task.id}/maybe")
    assert response.status_code == 404
    assert sequencer.store.get_task(task.id).status == "open"


async def test_task_unknown_id(client, bounced):
    response = await client.post("/tasks/9999/done")
    assert response.status_code == 404
    assert "task 9999 not found" in response.text


async def test_unsubscribes_list(client, bounced):
    response = await client.get("/unsubscribes")
    rows = table_cells(response.text, "suppressions")
    assert rows[1][:2] == ["bob@example.com", "bounce"]


async def test_resubscribe(client, bounced, sequencer):
    response = await client.post(
        "/unsubscribes/resubscribe", data={"address": "bob@example.com", "resume": "on"}
    )
    assert response.status_code == 200
    assert "bob@example.com re-subscribed (it was unsubscribed because of: bounce)" in response.text
    assert "not resumed, because it is running, not stopped" in response.text
    assert 'id="suppressions"' not in response.text
    assert sequencer.store.is_suppressed("bob@example.com") is False


async def test_unsubscribe_form(client, bounced, sequencer):
    added = await client.post("/unsubscribes", data={"address": "Ann@Example.com"})
    repeated = await client.post("/unsubscribes", data={"address": "ann@example.com"})
    invalid = await client.post("/unsubscribes", data={"address": "not-an-address"})
    assert added.status_code == 200
    assert "ann@example.com unsubscribed" in added.text
    assert f"{bounced}: ann@example.com: recorded in the running enrollment" in added.text
    assert repeated.status_code == 409
    assert "already unsubscribed" in repeated.text
    assert invalid.status_code == 422
    assert "invalid email address" in invalid.text


async def test_resubscribe_unknown_address(client, sequencer):
    response = await client.post("/unsubscribes/resubscribe", data={"address": "x@example.com"})
    assert response.status_code == 409
    assert "x@example.com is not unsubscribed; nothing changed" in response.text


# Exports


async def test_stats_csv(client, bounced):
    response = await client.get(f"/campaigns/{bounced}/stats.csv")
    rows = list(csv.reader(io.StringIO(response.content.decode("utf-8-sig"))))
    assert response.headers["content-disposition"] == f'attachment; filename="{bounced}-stats.csv"'
    assert rows[0][2:] == [
        "scope",
        "step",
        "type",
        "channel",
        "sent",
        "failed",
        "bounced",
        "skipped",
        "waiting",
        "pending",
        "failure_rate",
    ]
    assert rows[1][2:] == ["step", "1", "email", "email", "1", "0", "1", "0", "0", "0", "0.5"]
    assert rows[4][2:] == ["channel", "", "", "email", "1", "0", "1", "1", "0", "", "0.5"]


async def test_csv_neutralises_formulas(client, sequencer, tmp_path, time_skipping_env):
    leads = "email,first_name,last_name,company\n=cmd@example.com,+1,-2,=cmd\n"
    campaign_id = await launch(
        sequencer, tmp_path, [{**EMAIL, "wait_after": "2d"}, EMAIL], leads, name="=Sum"
    )
    lead = "=cmd@example.com"
    await wait_for(
        time_skipping_env,
        lambda: step_statuses(sequencer, campaign_id, lead)[0] == "sent",
        "step 1 is sent",
    )
    await sequencer.control(campaign_id, lead, "pause", "@x")
    await sequencer.control(campaign_id, lead, "resume", "\tresumed")
    await sequencer.control(campaign_id, lead, "remove", "\rgone")
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments(campaign_id)[0].status == "removed",
        "the lead is removed",
    )

    activity = await client.get(f"/campaigns/{campaign_id}/leads/{lead}/activity.csv")
    stats = await client.get(f"/campaigns/{campaign_id}/stats.csv")

    rows = list(csv.reader(io.StringIO(activity.content.decode("utf-8-sig"), newline="")))
    header = rows[0]
    cells = {name: {row[header.index(name)] for row in rows[1:]} for name in header}
    assert activity.headers["content-disposition"] == (
        f'attachment; filename="{campaign_id}-cmd-example-com-activity.csv"'
    )
    assert cells["lead"] == {"'=cmd@example.com"}
    assert cells["first_name"] == {"'+1"}
    assert cells["last_name"] == {"'-2"}
    assert cells["company"] == {"'=cmd"}
    assert "'@x" in cells["reason"]
    assert "'\tresumed" in cells["detail"]
    assert "'\rgone" in cells["detail"]
    stats_rows = list(csv.reader(io.StringIO(stats.content.decode("utf-8-sig"))))
    assert stats_rows[1][1].startswith("'=Sum ")


async def test_activity_csv_unknown_lead(client, bounced):
    response = await client.get(f"/campaigns/{bounced}/leads/nobody@example.com/activity.csv")
    assert response.status_code == 404


# Escaping


async def test_script_lead_escaped(client, sequencer, tmp_path, time_skipping_env):
    leads = (
        "email,first_name,company\n"
        'eve@example.com,<script>alert(1)</script>,"<img src=x onerror=alert(2)>"\n'
    )
    campaign_id = await launch(sequencer, tmp_path, [{**EMAIL, "wait_after": "1d"}, EMAIL], leads)
    workflow = workflow_of(sequencer, campaign_id, "eve@example.com")
    pages = [
        await client.get(f"/campaigns/{campaign_id}/leads"),
        await client.get(f"/campaigns/{campaign_id}/leads", params={"q": "<script>"}),
        await client.get(f"/campaigns/{campaign_id}/leads/{workflow}"),
    ]
    await wait_for(
        time_skipping_env,
        lambda: step_statuses(sequencer, campaign_id, "eve@example.com")[0] == "sent",
        "step 1 is sent",
    )
    await end_all(sequencer, campaign_id)
    for page in pages:
        assert "<script>alert(1)</script>" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
        assert "<img src=x" not in page.text


# Launch from the page


async def test_launch_form_missing_file(client):
    response = await client.post(
        "/campaigns", files={"campaign": ("campaign.yaml", b"name: x\n", "text/yaml")}
    )
    assert response.status_code == 422
    assert "missing leads CSV file" in response.text


async def test_launch_form_not_utf8(client):
    response = await client.post(
        "/campaigns",
        files={
            "campaign": ("campaign.yaml", b"name: \xff\xfe\n", "text/yaml"),
            "leads": ("leads.csv", b"email\na@example.com\n", "text/csv"),
        },
    )
    assert response.status_code == 422
    assert "invalid campaign file campaign.yaml: it is not UTF-8 text" in response.text


needs_launch_content = pytest.mark.skipif(
    not hasattr(Sequencer, "launch_content"),
    reason="Sequencer.launch_content is not in sequencer/service.py yet",
)


@needs_launch_content
async def test_launch_form(client, sequencer, time_skipping_env):
    name = f"Uploaded {uuid.uuid4().hex[:8]}"
    campaign = yaml.safe_dump(
        {"name": name, "sender": {"email": "rep@acme.test"}, "steps": [EMAIL]}
    )
    leads = "email,first_name\nann@example.com,Ann\nnot-an-address,Bob\n"
    response = await client.post(
        "/campaigns",
        files={
            "campaign": ("campaign.yaml", campaign.encode(), "text/yaml"),
            "leads": ("leads.csv", leads.encode(), "text/csv"),
        },
    )
    report = re.search(r'<section class="panel report".*?</section>', response.text, re.S)
    assert response.status_code == 200
    assert "<strong>1</strong> enrolled" in report.group(0)
    assert "<strong>1</strong> rejected rows" in report.group(0)
    assert "invalid email address &#39;not-an-address&#39;" in report.group(0)
    campaign_id = sequencer.store.list_campaigns()[0].id
    await wait_for(
        time_skipping_env,
        lambda: sequencer.enrollments(campaign_id)[0].status == "completed",
        "the lead completes",
    )


@needs_launch_content
async def test_launch_form_invalid_campaign(client):
    response = await client.post(
        "/campaigns",
        files={
            "campaign": ("campaign.yaml", b"name: Broken\nsteps: []\n", "text/yaml"),
            "leads": ("leads.csv", b"email\na@example.com\n", "text/csv"),
        },
    )
    assert response.status_code == 422
    assert "invalid campaign campaign.yaml" in response.text
