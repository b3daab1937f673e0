"""The web dashboard in a real browser, on a real `sequencer up`, used as a sales rep would.

A single local stack and one headless Chromium (Debian's, driven by Playwright) serve the
module. The rep logs in by pasting an API key made with the CLI, launches the demo campaign
in examples/ by uploading its files, and watches its pages change by themselves as the engine
runs: htmx fetches the live tables every 2 seconds. The rep then completes a call task,
re-subscribes a bounced address and reads the Stats funnel.

With SEQUENCER_SCREENSHOTS=1, the last test also saves screenshots of the main pages to
docs/screenshots/ for the README.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

from sequencer.durations import parse_duration
from sequencer.imap_server import find_dovecot
from sequencer.stack import StackPorts
from tests.test_stack_e2e import StackProcess, run_cli

try:
    from playwright.sync_api import Browser, Locator, Page, Playwright, expect, sync_playwright
except ImportError:
    sync_playwright = None

pytestmark = pytest.mark.stack

CHROMIUM = Path("/usr/bin/chromium")
if sync_playwright is None or not CHROMIUM.exists():
    missing_tool = (
        "the playwright package is missing: install the dev dependencies, pip install -e '.[dev]'"
        if sync_playwright is None
        else f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)"
    )
    if os.environ.get("SEQUENCER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{missing_tool}, but SEQUENCER_REQUIRE_BROWSER=1", pytrace=False)
    pytest.skip(
        f"browser tests need Playwright and Chromium: {missing_tool}", allow_module_level=True
    )

# Headless, with Chromium's background connections (component updates, sync, QUIC) turned off,
# because a machine without outside network access refuses them. Playwright gives each launch a
# fresh, empty --user-data-dir of its own and rejects one passed here.
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
VIEWPORT = {"width": 1280, "height": 800}

# How long to wait for what the engine does (steps, bounces, tasks): the demo campaign's leads
# reach their call step about 30 seconds after the launch. Page loads, clicks and every other
# check of what a page shows get the shorter timeout.
ENGINE_TIMEOUT_MS = 60_000
PAGE_TIMEOUT_MS = 15_000
expect.set_options(timeout=PAGE_TIMEOUT_MS)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CAMPAIGN = REPO / "examples" / "mixed-outreach.yaml"
EXAMPLE_LEADS = REPO / "examples" / "mixed-outreach-leads.csv"
SCREENSHOTS = REPO / "docs" / "screenshots"
CAMPAIGN_ID = "mixed-outreach-demo"
KEY_NAME = "browser tests"

# The stack's SMTP server rejects this address at RCPT.
RCPT_BOUNCE = "bounce-chloe@fabrikam.example"
# The stack's SMTP server accepts this address, then puts a DSN into the sender's IMAP mailbox.
LATE_BOUNCE = "late-bounce-dan@tailspin.example"
LEADS = (
    "ann@northwind.example",
    "ben@contoso.example",
    RCPT_BOUNCE,
    LATE_BOUNCE,
    "eve@adatum.example",
)
# The demo campaign's steps: 3 and 4 are the emails, 5 the call.
FIRST_EMAIL_STEP = 3
FOLLOW_UP_STEP = 4
CALL_STEP = 5
TASK_NOTE = "Left a voicemail, calling back on Monday"


def campaign_yaml(smtp_port: int) -> str:
    """Return the demo campaign with its sender's SMTP URL aimed at the stack's SMTP port."""
    text = EXAMPLE_CAMPAIGN.read_text()
    replaced = re.sub(r"smtp://127\.0\.0\.1:\d+", f"smtp://127.0.0.1:{smtp_port}", text)
    assert replaced != text, f"no smtp_url on 127.0.0.1 found in {EXAMPLE_CAMPAIGN}"
    return replaced


def first_email_wait() -> timedelta:
    """Return the demo campaign's wait after its first email, which a bounce cuts short."""
    steps = yaml.safe_load(EXAMPLE_CAMPAIGN.read_text())["steps"]
    return parse_duration(steps[FIRST_EMAIL_STEP - 1]["wait_after"])


# The module's stack, browser and logged-in page


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    home = tmp_path_factory.mktemp("stack-browser")
    process = StackProcess(home, StackPorts.free())
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def api_key(stack: StackProcess) -> str:
    created = run_cli(stack.home, "apikey", "create", KEY_NAME)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


@pytest.fixture(scope="module")
def base_url(stack: StackProcess) -> str:
    return f"http://127.0.0.1:{stack.ports.webhooks}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    playwright: Playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def page(browser: Browser, base_url: str) -> Iterator[Page]:
    """One tab for the whole module, so that the login cookie and the launch carry over."""
    context = browser.new_context(base_url=base_url, viewport=VIEWPORT)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def logged_in(page: Page, api_key: str) -> Page:
    """Log in on the login form by pasting the key, as a rep would."""
    page.goto("/")
    page.get_by_label("API key").fill(api_key)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Campaigns")
    return page


@pytest.fixture(scope="module")
def launched(logged_in: Page, stack: StackProcess) -> Page:
    """Launch the demo campaign with the form on the campaign list, leaving the report shown."""
    campaign_file = stack.home / "mixed-outreach.yaml"
    campaign_file.write_text(campaign_yaml(stack.ports.smtp))
    logged_in.goto("/")
    logged_in.get_by_label("Campaign (YAML)").set_input_files(campaign_file)
    logged_in.get_by_label("Leads (CSV)").set_input_files(EXAMPLE_LEADS)
    logged_in.get_by_role("button", name="Launch").click()
    expect(logged_in.locator("#launch-report")).to_be_visible()
    return logged_in


@pytest.fixture
def dashboard(launched: Page, stack: StackProcess) -> Page:
    """The logged-in tab after the launch, once the stack is known to be still running."""
    stack.check_running()
    return launched


# Helpers that read the pages


def open_lead(page: Page, lead: str) -> None:
    """Open a lead's Activity from the campaign's leads page, as a rep would."""
    page.goto(f"/campaigns/{CAMPAIGN_ID}/leads")
    page.locator("#leads").get_by_role("link", name=lead, exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(lead)


def step_cell(page: Page, step: int, column: str) -> Locator:
    """Return the cell of a step's row in the Activity's steps table, by column name."""
    columns = ("step", "type", "channel", "status", "when", "reason", "detail")
    return page.locator(f'#steps tr[data-step="{step}"] td').nth(columns.index(column))


def step_time(page: Page, step: int) -> datetime:
    """Read a step's time from the Activity's steps table, such as `2025-01-31 09:00:05 +16s`."""
    text = step_cell(page, step, "when").inner_text()
    return datetime.strptime(text[:19], "%Y-%m-%d %H:%M:%S")


def mark_page(page: Page) -> None:
    """Mark the loaded document, so that a check can tell that no reload replaced it."""
    page.evaluate("() => { window.sequencerTestMark = true; }")


def page_was_reloaded(page: Page) -> bool:
    return page.evaluate("() => window.sequencerTestMark !== true")


# Logging in and launching


def test_login_rejects_wrong_key(browser: Browser, base_url: str):
    context = browser.new_context(base_url=base_url)
    try:
        page = context.new_page()
        page.goto("/tasks")
        expect(page).to_have_url(re.compile(r"/login\?next=%2Ftasks$"))
        page.get_by_label("API key").fill("sq_not-a-real-key")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("alert")).to_contain_text("Invalid API key")
        expect(page.get_by_role("heading", level=1)).to_have_text("Log in")
    finally:
        context.close()


def test_login_with_pasted_key(logged_in: Page):
    expect(logged_in).to_have_url(re.compile(r"/$"))
    expect(logged_in.locator("header .logout")).to_contain_text(f"key {KEY_NAME}")
    expect(logged_in.get_by_role("button", name="Log out")).to_be_visible()


def test_launch_shows_import_report(dashboard: Page):
    # This test uses the page the launch left, so it must be the first to use `launched`.
    report = dashboard.locator("#launch-report")

    expect(report.get_by_role("heading", level=2)).to_have_text(
        f"Launched Mixed outreach demo {CAMPAIGN_ID}"
    )
    expect(report).to_contain_text(
        "5 enrolled, 0 already enrolled, 0 duplicate rows, 0 rejected rows."
    )
    warning = report.locator("tr", has_text="eve@adatum.example")
    expect(warning).to_contain_text("no LinkedIn URL")
    if find_dovecot() is not None:
        expect(report).to_contain_text("Reading the mailbox of rep@acme.test")
    campaign_row = dashboard.locator("#campaigns tbody tr", has_text=CAMPAIGN_ID)
    expect(campaign_row).to_contain_text("Mixed outreach demo")
    expect(campaign_row.locator("td").nth(2)).to_have_text("5")


def test_leads_page_lists_every_lead(dashboard: Page):
    dashboard.goto(f"/campaigns/{CAMPAIGN_ID}/leads")

    expect(dashboard.locator("#match-count")).to_have_text("5 of 5 leads")
    links = dashboard.locator("#leads tbody tr td:first-child a")
    expect(links).to_have_count(len(LEADS))
    assert sorted(links.all_inner_texts()) == sorted(LEADS)


# The engine's work, seen on pages that refresh by themselves


def test_rcpt_bounce_appears_without_reload(dashboard: Page):
    open_lead(dashboard, RCPT_BOUNCE)
    # The launch was a few seconds ago: the first email is due about 16 seconds after it.
    expect(step_cell(dashboard, FIRST_EMAIL_STEP, "status")).to_have_text("pending")
    mark_page(dashboard)

    status = step_cell(dashboard, FIRST_EMAIL_STEP, "status")
    expect(status).to_have_text("bounced", timeout=ENGINE_TIMEOUT_MS)
    expect(step_cell(dashboard, FIRST_EMAIL_STEP, "detail")).to_contain_text("550 5.1.1")
    expect(step_cell(dashboard, FOLLOW_UP_STEP, "status")).to_have_text("skipped")
    expect(step_cell(dashboard, FOLLOW_UP_STEP, "reason")).to_have_text(
        f"step {FIRST_EMAIL_STEP} bounced"
    )
    expect(step_cell(dashboard, CALL_STEP, "status")).to_have_text("waiting")
    expect(step_cell(dashboard, CALL_STEP, "detail")).to_have_text(re.compile(r"^task \d+$"))
    expect(dashboard.locator("#lead-status")).to_contain_text("unsubscribed")
    assert not page_was_reloaded(dashboard), "the lead page was reloaded instead of refreshed"


def test_rcpt_bounce_opens_call_at_once(dashboard: Page):
    open_lead(dashboard, RCPT_BOUNCE)
    expect(step_cell(dashboard, CALL_STEP, "detail")).to_have_text(
        re.compile(r"^task \d+$"), timeout=ENGINE_TIMEOUT_MS
    )

    delay = step_time(dashboard, CALL_STEP) - step_time(dashboard, FIRST_EMAIL_STEP)
    # Had the first email's wait been kept, the call would have come that much later.
    assert delay < first_email_wait(), f"the call task opened {delay} after the bounce"
    # The SMTP server rejected the address, so the email was never recorded as sent.
    sent = dashboard.locator("#timeline li.kind-step.status-sent")
    expect(sent.filter(has_text=f"step {FIRST_EMAIL_STEP} email")).to_have_count(0)


def test_late_bounce_from_mailbox(dashboard: Page):
    if find_dovecot() is None:
        pytest.skip("dovecot not found, so the stack has no IMAP mailbox to put the DSN in")
    open_lead(dashboard, LATE_BOUNCE)
    mark_page(dashboard)

    status = step_cell(dashboard, FIRST_EMAIL_STEP, "status")
    expect(status).to_have_text("bounced", timeout=ENGINE_TIMEOUT_MS)
    expect(step_cell(dashboard, FIRST_EMAIL_STEP, "detail")).to_contain_text(LATE_BOUNCE)
    expect(step_cell(dashboard, FOLLOW_UP_STEP, "status")).to_have_text("skipped")
    expect(step_cell(dashboard, CALL_STEP, "status")).to_have_text("waiting")
    # The SMTP server accepted the email first: the bounce came later, from the mailbox.
    sent = dashboard.locator("#timeline li.kind-step.status-sent")
    expect(sent.filter(has_text=f"step {FIRST_EMAIL_STEP} email")).to_have_count(1)
    assert not page_was_reloaded(dashboard), "the lead page was reloaded instead of refreshed"


# What the rep does


def test_call_task_done_from_tasks_page(dashboard: Page):
    dashboard.get_by_role("navigation").get_by_role("link", name="Tasks").click()
    row = dashboard.locator("#tasks tbody tr", has_text=RCPT_BOUNCE)
    expect(row).to_have_count(1, timeout=ENGINE_TIMEOUT_MS)
    expect(row).to_contain_text("Call Chloe at Fabrikam about the email thread.")
    expect(row.locator("a.phone")).to_have_text("+447911123456")
    task_id = (row.get_attribute("id") or "").removeprefix("task-")

    row.get_by_label(f"note for task {task_id}").fill(TASK_NOTE)
    row.get_by_role("button", name="Done").click()

    expect(dashboard.get_by_role("status")).to_have_text(f"task {task_id} done")
    expect(dashboard.locator(f"#task-{task_id}")).to_have_count(0)
    open_lead(dashboard, RCPT_BOUNCE)
    expect(step_cell(dashboard, CALL_STEP, "status")).to_have_text(
        "sent", timeout=ENGINE_TIMEOUT_MS
    )
    expect(step_cell(dashboard, CALL_STEP, "detail")).to_have_text(TASK_NOTE)
    expect(dashboard.locator("#lead-status")).to_contain_text("completed")


def test_resubscribe_from_unsubscribes(dashboard: Page):
    # The unsubscribes page does not refresh: wait for the bounce on the lead's page first.
    open_lead(dashboard, RCPT_BOUNCE)
    status = step_cell(dashboard, FIRST_EMAIL_STEP, "status")
    expect(status).to_have_text("bounced", timeout=ENGINE_TIMEOUT_MS)
    dashboard.get_by_role("navigation").get_by_role("link", name="Unsubscribes").click()
    row = dashboard.locator("#suppressions tbody tr", has_text=RCPT_BOUNCE)
    expect(row).to_have_count(1)
    expect(row.locator("td").nth(1)).to_have_text("bounce")

    row.get_by_role("button", name="Re-subscribe").click()

    expect(dashboard.locator("#result")).to_contain_text(f"{RCPT_BOUNCE} re-subscribed")
    expect(dashboard.locator("#suppressions tbody tr", has_text=RCPT_BOUNCE)).to_have_count(0)
    open_lead(dashboard, RCPT_BOUNCE)
    expect(dashboard.locator("#lead-status")).not_to_contain_text("unsubscribed")
    resubscribed = dashboard.locator("#timeline li.kind-event.status-resubscribed")
    expect(resubscribed).to_have_count(1)


def test_stats_funnel_counts_bounces(dashboard: Page):
    bounced = 2 if find_dovecot() is not None else 1
    dashboard.goto("/")
    dashboard.locator("#campaigns").get_by_role("link", name="Stats").click()
    expect(dashboard.get_by_role("heading", level=1)).to_contain_text("Mixed outreach demo")

    funnel = dashboard.locator("svg#funnel")
    expect(funnel).to_be_visible()
    expect(funnel.locator("g.row")).to_have_count(5)
    segment = funnel.locator("rect.status-bounced title")
    expect(segment).to_have_text(
        [f"step {FIRST_EMAIL_STEP} email: {bounced} bounced"], timeout=ENGINE_TIMEOUT_MS
    )
    first_email = dashboard.locator("#steps tbody tr").nth(FIRST_EMAIL_STEP - 1)
    expect(first_email.locator('td[data-status="bounced"]')).to_have_text(str(bounced))
    email_rate = dashboard.locator("svg#failure-rates g.row", has_text="email")
    expect(email_rate).to_contain_text(f"({bounced} of ")


# Screenshots for the README


@pytest.mark.skipif(
    os.environ.get("SEQUENCER_SCREENSHOTS") != "1",
    reason="set SEQUENCER_SCREENSHOTS=1 to rewrite the screenshots in docs/screenshots",
)
def test_save_screenshots(dashboard: Page):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    # The normal lead is the last to reach the call step: wait for her task to open.
    dashboard.goto("/tasks")
    last_task = dashboard.locator("#tasks tbody tr", has_text="ann@northwind.example")
    expect(last_task).to_have_count(1, timeout=ENGINE_TIMEOUT_MS)

    pages = [
        ("campaigns", "/", "#campaigns"),
        ("stats", f"/campaigns/{CAMPAIGN_ID}", "svg#funnel"),
        ("leads", f"/campaigns/{CAMPAIGN_ID}/leads", "#leads"),
        ("tasks", "/tasks", "#tasks"),
        ("unsubscribes", "/unsubscribes", "h1"),
    ]
    for name, path, ready in pages:
        dashboard.goto(path)
        expect(dashboard.locator(ready)).to_be_visible()
        dashboard.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)
    open_lead(dashboard, LATE_BOUNCE)
    dashboard.screenshot(path=SCREENSHOTS / "activity.png", full_page=True)
