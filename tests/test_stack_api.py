"""The HTTP API end to end, on a real `sequencer up`: a key made with the CLI, a launch by
upload, a bounce reported through the API, and the call task completed through the API."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from sequencer.stack import StackPorts
from tests.test_stack_e2e import StackProcess, run_cli, steps_of, wait_until

pytestmark = pytest.mark.stack

CAMPAIGN_ID = "api-e2e"
LEAD = "ann@northwind.example"
OTHER = "ben@contoso.example"
FIRST_WAIT = timedelta(minutes=10)


def campaign_yaml(smtp_port: int) -> str:
    return f"""
name: API e2e
id: {CAMPAIGN_ID}
sender: {{email: rita@acme.test, smtp_url: "smtp://127.0.0.1:{smtp_port}"}}
steps:
  - type: email
    subject: "Hello {{{{first_name}}}}"
    body: "A short note."
    wait_after: 10m
  - type: email
    subject: "Again"
    body: "Following up."
  - type: call
    instructions: "Call {{{{first_name}}}}"
"""


LEADS_CSV = f"first_name,email,phone\nAnn,{LEAD},+33612345678\nBen,{OTHER},+33612345679\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("stack-api")
    stack = StackProcess(home, StackPorts.free())
    try:
        stack.wait_ready()
        created = run_cli(home, "apikey", "create", "e2e tests")
        key = created.stdout.strip()
        base = f"http://127.0.0.1:{stack.ports.webhooks}"
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        result: dict[str, Any] = {"created": created}
        result["unauthorised"] = httpx.get(f"{base}/api/v1/campaigns", timeout=30)
        result["openapi"] = api.get("/openapi.json")
        result["launch"] = api.post(
            "/api/v1/campaigns/launch",
            files={
                "campaign": ("campaign.yaml", campaign_yaml(stack.ports.smtp)),
                "leads": ("leads.csv", LEADS_CSV),
            },
        )
        activity_url = f"/api/v1/campaigns/{CAMPAIGN_ID}/leads/{LEAD}/activity"
        state: dict[str, Any] = {}

        def step_one_sent() -> bool:
            stack.check_running()
            state.update(api.get(activity_url).json())
            return steps_of(state)[1]["status"] == "sent"

        wait_until(step_one_sent, lambda: str(state), "step 1 is sent")
        result["bounce"] = api.post(
            "/api/v1/events/bounce",
            json={"campaign": CAMPAIGN_ID, "lead": LEAD, "step": 1, "detail": "550 5.1.1"},
        )
        tasks: list[dict[str, Any]] = []

        def call_open() -> bool:
            tasks[:] = api.get(f"/api/v1/tasks?campaign={CAMPAIGN_ID}").json()
            return bool(tasks)

        wait_until(call_open, lambda: str(tasks), "the call task opens")
        result["task"] = tasks[0]
        result["done"] = api.post(f"/api/v1/tasks/{tasks[0]['id']}/done")

        def lead_completed() -> bool:
            state.update(api.get(activity_url).json())
            return state["status"] == "completed"

        wait_until(lead_completed, lambda: str(state), "the lead completes")
        result["activity"] = dict(state)
        result["leads"] = api.get(f"/api/v1/campaigns/{CAMPAIGN_ID}/leads").json()
        result["stats"] = api.get(f"/api/v1/campaigns/{CAMPAIGN_ID}/stats").json()
        api.close()

        # The dashboard on the same port: a browser without the cookie goes to the login form.
        with httpx.Client(base_url=base, timeout=30) as browser:
            result["anonymous"] = browser.get("/")
            result["login"] = browser.post("/login", data={"key": key}, follow_redirects=True)
            result["lead_page"] = browser.get(f"/campaigns/{CAMPAIGN_ID}/leads")
        return result
    finally:
        stack.stop()


def test_cli_creates_key(run):
    assert run["created"].returncode == 0, run["created"].stderr
    assert run["created"].stdout.startswith("sq_")


def test_request_without_key_refused(run):
    assert run["unauthorised"].status_code == 401


def test_openapi_served(run):
    assert run["openapi"].status_code == 200
    assert "/api/v1/events/bounce" in run["openapi"].json()["paths"]


def test_launch_by_upload(run):
    assert run["launch"].status_code == 200, run["launch"].text
    assert sorted(run["launch"].json()["enrolled"]) == sorted([LEAD, OTHER])


def test_bounce_through_api(run):
    assert run["bounce"].status_code == 200, run["bounce"].text
    assert "bounced" in run["bounce"].json()["message"]


def test_call_runs_at_once(run):
    steps = steps_of(run["activity"])
    delay = datetime.fromisoformat(steps[3]["at"]) - datetime.fromisoformat(steps[1]["at"])
    assert steps[1]["status"] == "bounced"
    assert steps[2]["status"] == "skipped"
    assert delay < FIRST_WAIT, f"the call ran {delay} after the email"


def test_task_completed_through_api(run):
    assert run["task"]["lead"] == LEAD
    assert run["done"].json() == {"message": f"task {run['task']['id']} done"}
    assert steps_of(run["activity"])[3]["status"] == "sent"


def test_stats_count_the_bounce(run):
    [first_step] = [step for step in run["stats"]["steps"] if step["step"] == 1]
    assert first_step["bounced"] == 1
    assert first_step["sent"] == 1


def test_other_lead_still_waiting(run):
    statuses = {row["lead"]: row["status"] for row in run["leads"]}
    assert statuses == {LEAD: "completed", OTHER: "running"}


def test_dashboard_needs_login(run):
    assert run["anonymous"].status_code == 303
    assert run["anonymous"].headers["location"].startswith("/login")


def test_dashboard_lists_campaign_after_login(run):
    assert run["login"].status_code == 200
    assert "API e2e" in run["login"].text


def test_dashboard_shows_leads(run):
    assert run["lead_page"].status_code == 200
    assert LEAD in run["lead_page"].text
    assert OTHER in run["lead_page"].text
