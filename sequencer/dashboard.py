"""The web dashboard: campaigns and their Stats, leads and their Activity, tasks, unsubscribes.

Pages are rendered on the server with Jinja2 (autoescaped). htmx refreshes the main table of
the campaign list, campaign, leads, lead and tasks pages every 2 seconds by fetching the same
URL with `partial=1`, which returns only that table. Every form is a plain POST, so the pages
work without JavaScript apart from that refresh.

Every page except /login, /logout and the static files needs a valid API key, read by
`sequencer.http_auth`. The login form stores the key in an HttpOnly, SameSite=Strict cookie,
and an API client may send it in a header instead. A POST whose Origin header names another
host is rejected, so another site cannot submit the forms, including the login form.

Mount it in a FastAPI app, without a prefix because the pages link to each other by absolute
paths, with the API key store on the app's state:

    app = FastAPI()
    app.state.api_key_store = service.store
    app.include_router(dashboard_router(service))

The router serves its own CSS and htmx at /static/dashboard.css and /static/htmx.min.js, so
nothing else needs mounting. Its paths are /, /login, /logout, /campaigns/..., /tasks,
/unsubscribes and /static/...: the API must not use them.

Links to a lead use its workflow id, which keeps email addresses out of URLs and access logs.
The lead pages accept the lead's email address as well.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from temporalio.service import RPCError

from sequencer.addresses import InvalidEmailError, normalize_email
from sequencer.api_keys import check_api_key
from sequencer.campaign import CampaignError
from sequencer.channels import CHANNEL_OF, EnrollmentStatus, StepType
from sequencer.durations import format_duration
from sequencer.http_auth import API_KEY_COOKIE, authenticated_key
from sequencer.leads import LeadFileError
from sequencer.models import Lead
from sequencer.service import (
    TASK_OUTCOMES,
    ActivityReport,
    Sequencer,
    ServiceError,
    ServiceNotFoundError,
)
from sequencer.storage import ApiKeyRow, CampaignStats, ChannelCounts, EnrollmentRow, NotFoundError

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "dashboard_templates"
STATIC_DIR = PACKAGE_DIR / "dashboard_static"
STATIC_FILES = {
    "dashboard.css": "text/css; charset=utf-8",
    "htmx.min.js": "text/javascript; charset=utf-8",
}

# Sent with every page and export. The CSP allows only this site's own script and styles, so
# an injected <script> or inline handler does not run even if escaping ever missed one.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # Pages contain personal data: keep them out of shared caches and the back-button cache.
    "Cache-Control": "no-store",
}

# How long the login cookie lasts. The key itself is checked on every request, so revoking it
# ends the session at once.
COOKIE_MAX_AGE = int(timedelta(days=30).total_seconds())
# Upload limits, so that one form cannot fill the memory. A campaign file is a few kilobytes,
# and 32 MiB of CSV is about 200,000 leads at 150 bytes a row.
MAX_CAMPAIGN_BYTES = 1024 * 1024
MAX_LEADS_BYTES = 32 * 1024 * 1024
MAX_NOTE_LENGTH = 1000
MAX_SEARCH_LENGTH = 200
LEADS_PAGE_SIZE = 100
LEAD_ACTIONS = ("pause", "resume", "remove")
# Enrollment statuses offered as filters on the leads page, in lifecycle order.
LEAD_STATUSES = tuple(status.value for status in EnrollmentStatus)

# A spreadsheet reads a cell that starts with one of these as a formula (OWASP, "CSV
# Injection"). The exports prefix such a cell with a single quote.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


# Small pure helpers: redirects, links, exports


def safe_next(value: str | None) -> str:
    """Return `value` when it is a path on this site, else "/" (no open redirect)."""
    if not value or len(value) > 2000:
        return "/"
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    if any(ord(character) < 0x20 or ord(character) == 0x7F for character in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def http_url(value: str | None) -> str | None:
    """Return `value` when it is an http(s) URL, so that no `javascript:` link is rendered."""
    if not value:
        return None
    parts = urlsplit(value)
    return value if parts.scheme in ("http", "https") and parts.netloc else None


def phone_link(value: str | None) -> str | None:
    """Return a `tel:` link for a phone number, or None when it has no digit."""
    if not value or not re.search(r"\d", value):
        return None
    return "tel:" + re.sub(r"[^+\d]", "", value)


def neutralise_cell(value: Any) -> Any:
    """Prefix a text cell that a spreadsheet would run as a formula with a single quote."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_response(header: Sequence[str], rows: Iterable[Sequence[Any]], filename: str) -> Response:
    """Return rows as a CSV attachment that is safe to open in a spreadsheet.

    Text cells are quoted and neutralised, but numbers stay bare so that they stay numbers.
    The UTF-8 byte order mark makes Excel read accented names correctly.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC)
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_value(value) for value in row])
    headers = {
        **PAGE_HEADERS,
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    return Response(
        "\ufeff" + buffer.getvalue(), media_type="text/csv; charset=utf-8", headers=headers
    )


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat()
    return neutralise_cell(value)


def file_slug(text: str, limit: int = 60) -> str:
    """Turn text into a file name part of lower-case letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].strip("-") or "lead"


def lead_name(lead: Lead) -> str:
    return " ".join(part for part in (lead.first_name, lead.last_name) if part)


def format_utc(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S") if at else ""


def format_offset(at: datetime | None, start: datetime) -> str:
    """Format a time as its offset from the enrollment, as `+1d2h`, like the CLI's Activity."""
    if at is None:
        return ""
    return "+" + format_duration(max(at - start, timedelta(0)))


def lead_path(campaign_id: str, workflow_id: str) -> str:
    return f"/campaigns/{campaign_id}/leads/{workflow_id}"


# Charts, drawn as inline SVG by templates/_charts.html

CHART_LABEL_WIDTH = 150
CHART_BAR_WIDTH = 420
CHART_ROW_HEIGHT = 30
CHART_BAR_HEIGHT = 20
CHART_WIDTH = CHART_LABEL_WIDTH + CHART_BAR_WIDTH + 130
# A segment narrower than this has no room for its count, which its tooltip still shows.
MIN_LABELLED_WIDTH = 22
# The order of the segments in a step's bar: how far the step got, then what is left.
FUNNEL_STATUSES = ("sent", "failed", "bounced", "skipped", "waiting", "pending")


@dataclass(frozen=True)
class Segment:
    status: str
    count: int
    x: float
    width: float
    # The tooltip, such as "step 1 email: 2 sent".
    title: str

    @property
    def labelled(self) -> bool:
        return self.width >= MIN_LABELLED_WIDTH


@dataclass(frozen=True)
class Bar:
    label: str
    y: float
    segments: list[Segment]
    # The text right of the bar, such as "3 leads" or "33% (1 of 3)".
    summary: str
    # The track's full width, for bars drawn against a 100% scale.
    track: float = CHART_BAR_WIDTH


@dataclass(frozen=True)
class Chart:
    title: str
    bars: list[Bar]
    legend: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return len(self.bars) * CHART_ROW_HEIGHT + (CHART_ROW_HEIGHT if self.legend else 0) + 10

    @property
    def legend_y(self) -> int:
        return len(self.bars) * CHART_ROW_HEIGHT + 10


def step_counts(counts: ChannelCounts, total: int) -> dict[str, int]:
    """Return a step's counts by status, with the leads that have not reached it as pending."""
    values = {status: getattr(counts, status) for status in FUNNEL_STATUSES if status != "pending"}
    values["pending"] = max(total - sum(values.values()), 0)
    return values


def funnel_chart(stats: CampaignStats) -> Chart:
    """Draw one stacked bar per step, each as long as the campaign has leads."""
    total = sum(stats.leads.values())
    scale = CHART_BAR_WIDTH / max(total, 1)
    bars = []
    for index, (number, counts) in enumerate(sorted(stats.steps.items())):
        x = float(CHART_LABEL_WIDTH)
        segments = []
        for status, count in step_counts(counts, total).items():
            if count:
                width = round(count * scale, 1)
                title = f"step {number} {stats.step_types[number]}: {count} {status}"
                segments.append(Segment(status, count, round(x, 1), width, title))
                x += width
        bars.append(
            Bar(
                label=f"{number} {stats.step_types[number]}",
                y=index * CHART_ROW_HEIGHT,
                segments=segments,
                summary=f"{total} lead" + ("" if total == 1 else "s"),
            )
        )
    return Chart(title="Steps", bars=bars, legend=list(FUNNEL_STATUSES))


def failure_chart(stats: CampaignStats) -> Chart:
    """Draw each channel's failure rate, (failed + bounced) / executed, on a 0-100% scale."""
    bars = []
    for index, (name, counts) in enumerate(sorted(stats.channels.items())):
        failures = counts.failed + counts.bounced
        executed = counts.sent + failures
        rate = counts.failure_rate
        segments = []
        summary = "no step run yet" if rate is None else f"{rate:.0%} ({failures} of {executed})"
        if rate:
            width = round(rate * CHART_BAR_WIDTH, 1)
            title = f"{name}: {failures} of {executed} failed or bounced"
            segments.append(Segment("failed", failures, float(CHART_LABEL_WIDTH), width, title))
        bars.append(Bar(label=name, y=index * CHART_ROW_HEIGHT, segments=segments, summary=summary))
    return Chart(title="Failure rate by channel", bars=bars)


def stats_rows(stats: CampaignStats) -> list[list[Any]]:
    """Return the rows of the Stats export: one per step, then one per channel."""
    total = sum(stats.leads.values())
    rows: list[list[Any]] = []
    for number, counts in sorted(stats.steps.items()):
        step_type = stats.step_types[number]
        rows.append(
            [
                stats.campaign_id,
                stats.campaign_name,
                "step",
                number,
                step_type,
                CHANNEL_OF[StepType(step_type)].value,
                *step_counts(counts, total).values(),
                _rate(counts.failure_rate),
            ]
        )
    for name, counts in sorted(stats.channels.items()):
        rows.append(
            [
                stats.campaign_id,
                stats.campaign_name,
                "channel",
                None,
                None,
                name,
                counts.sent,
                counts.failed,
                counts.bounced,
                counts.skipped,
                counts.waiting,
                # Pending is counted per step only: a channel's steps have different leads.
                None,
                _rate(counts.failure_rate),
            ]
        )
    return rows


def _rate(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 4)


STATS_HEADER = (
    "campaign_id",
    "campaign",
    "scope",
    "step",
    "type",
    "channel",
    *FUNNEL_STATUSES,
    "failure_rate",
)
ACTIVITY_HEADER = (
    "campaign_id",
    "lead",
    "first_name",
    "last_name",
    "company",
    "at",
    "kind",
    "status",
    "step",
    "step_type",
    "channel",
    "reason",
    "detail",
)


def activity_rows(report: ActivityReport) -> list[list[Any]]:
    """Return the rows of the Activity export, one per log entry, each naming the lead."""
    lead = report.enrollment.lead
    identity = [
        report.campaign.id,
        report.enrollment.lead_key,
        lead.first_name,
        lead.last_name,
        lead.company,
    ]
    return [
        [
            *identity,
            entry.at,
            entry.kind,
            entry.status,
            entry.step,
            entry.step_type,
            entry.channel,
            entry.reason,
            entry.detail,
        ]
        for entry in report.log
    ]


# Views of rows for the templates


@dataclass(frozen=True)
class TaskView:
    id: int
    campaign_id: str
    workflow_id: str
    step: int
    step_type: str
    instructions: str
    created_at: datetime
    lead_key: str
    lead: Lead | None
    phone_href: str | None
    linkedin_href: str | None

    @property
    def lead_path(self) -> str:
        return lead_path(self.campaign_id, self.workflow_id)


@dataclass(frozen=True)
class LeadsPage:
    rows: list[EnrollmentRow]
    counts: Counter[str]
    matched: int
    page: int
    pages: int


ERROR_TITLES = {
    403: "Forbidden",
    404: "Not found",
    409: "Not changed",
    413: "File too large",
    422: "Invalid request",
    503: "Temporal server unavailable",
}


class PageError(Exception):
    """A request that gets an error page: a message and an HTTP status."""

    def __init__(self, status_code: int, message: str, back: str = "/") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.back = back


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["utc"] = format_utc
    environment.globals.update(
        offset=format_offset,
        lead_name=lead_name,
        lead_path=lead_path,
        http_url=http_url,
        phone_link=phone_link,
        chart_label_width=CHART_LABEL_WIDTH,
        chart_width=CHART_WIDTH,
        chart_bar_height=CHART_BAR_HEIGHT,
        final_statuses={status.value for status in EnrollmentStatus if status.is_final},
    )
    return environment


class _Dashboard:
    """The dashboard's pages, one method per route, sharing the service and the templates."""

    def __init__(self, service: Sequencer) -> None:
        self.service = service
        self.templates = _environment()

    # Rendering and access

    def render(
        self,
        request: Request,
        name: str,
        context: dict[str, Any],
        status_code: int = 200,
    ) -> HTMLResponse:
        context.setdefault("key", None)
        context.setdefault("message", None)
        context.setdefault("error", None)
        body = self.templates.get_template(name).render(request=request, **context)
        return HTMLResponse(body, status_code=status_code, headers=PAGE_HEADERS)

    def error_page(self, request: Request, key: ApiKeyRow | None, error: PageError) -> HTMLResponse:
        title = ERROR_TITLES.get(error.status_code, "Error")
        context = {"key": key, "title": title, "error": error.message, "back": error.back}
        return self.render(request, "error.html", context, error.status_code)

    def login_redirect(self, request: Request, next_path: str) -> Response:
        """Send a request without a valid key to the login form, or htmx to a full reload."""
        location = "/login?" + urlencode({"next": safe_next(next_path)})
        if request.headers.get("HX-Request"):
            # htmx would swap the login page into the table; HX-Redirect reloads the page.
            return Response(status_code=401, headers={"HX-Redirect": location})
        return RedirectResponse(location, status_code=303)

    def page_key(self, request: Request) -> ApiKeyRow | Response:
        """Return the request's API key, or the redirect to the login form."""
        key = authenticated_key(request)
        if key is not None:
            return key
        # After the login, the browser goes back to the whole page, not to its partial.
        query = [item for item in request.query_params.multi_items() if item[0] != "partial"]
        path = request.url.path + ("?" + urlencode(query) if query else "")
        return self.login_redirect(request, path)

    def post_key(self, request: Request, page: str) -> ApiKeyRow | Response:
        """Return the API key of a form submission, or the response that rejects it."""
        if _cross_site(request):
            logger.warning("Dashboard rejected a cross-site POST to %s", request.url.path)
            error = PageError(403, "cross-site form submissions are rejected: use the dashboard")
            return self.error_page(request, None, error)
        key = authenticated_key(request)
        if key is None:
            return self.login_redirect(request, page)
        return key

    # Login

    def login_form(
        self, request: Request, next_path: Annotated[str, Query(alias="next")] = "/"
    ) -> HTMLResponse:
        context = {"title": "Log in", "next": safe_next(next_path)}
        return self.render(request, "login.html", context)

    async def login(self, request: Request) -> Response:
        if _cross_site(request):
            return self.error_page(request, None, PageError(403, "cross-site login is rejected"))
        form = await request.form()
        key_text = str(form.get("key") or "").strip()
        next_path = safe_next(str(form.get("next") or "/"))
        key = await run_in_threadpool(check_api_key, self.service.store, key_text)
        if key is None:
            client = request.client.host if request.client else "unknown"
            logger.warning("Dashboard login rejected an invalid API key from %s", client)
            context = {
                "title": "Log in",
                "next": next_path,
                "error": (
                    "Invalid API key: it is unknown, revoked or mistyped. Paste the whole key "
                    "shown by `sequencer apikey create NAME`, which starts with sq_."
                ),
            }
            return self.render(request, "login.html", context, 401)
        logger.info("Dashboard login with API key %s (%s)", key.id, key.name)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            API_KEY_COOKIE,
            key_text,
            max_age=COOKIE_MAX_AGE,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        if _cross_site(request):
            return self.error_page(request, None, PageError(403, "cross-site logout is rejected"))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(API_KEY_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    def static_file(self, name: str) -> Response:
        media_type = STATIC_FILES.get(name)
        if media_type is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return FileResponse(
            STATIC_DIR / name,
            media_type=media_type,
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    # Campaigns

    def campaigns_context(self) -> dict[str, Any]:
        campaigns = self.service.store.list_campaigns()
        return {
            "title": "Campaigns",
            "campaigns": [(campaign, self.service.stats(campaign.id)) for campaign in campaigns],
            "statuses": LEAD_STATUSES,
        }

    def campaigns_page(self, request: Request, partial: str = "") -> Response:
        key = self.page_key(request)
        if isinstance(key, Response):
            return key
        context = {"key": key, **self.campaigns_context(), "report": None}
        name = "_campaigns_table.html" if partial else "campaigns.html"
        return self.render(request, name, context)

    async def launch(self, request: Request) -> Response:
        key = await run_in_threadpool(self.post_key, request, "/")
        if isinstance(key, Response):
            return key
        report = None
        status_code = 200
        error = None
        try:
            campaign, leads = await _read_launch_form(request)
            report = await self.service.launch_content(
                campaign.text,
                leads.data,
                campaign_name=campaign.name,
                leads_name=leads.name,
            )
        except PageError as problem:
            error, status_code = problem.message, problem.status_code
        except (CampaignError, LeadFileError, ServiceError) as problem:
            error, status_code = str(problem), 422
        except RPCError as problem:
            error, status_code = _temporal_failure(problem), 503
        if error is not None:
            logger.info("Dashboard: launch rejected with status %d", status_code)
        if report is not None:
            logger.info(
                "Dashboard launch of campaign %s by API key %s: %d enrolled",
                report.campaign.id,
                key.id,
                len(report.enrolled),
            )
        context = await run_in_threadpool(self.campaigns_context)
        context.update(key=key, report=report, error=error)
        return self.render(request, "campaigns.html", context, status_code)

    def stats_context(self, campaign_id: str) -> dict[str, Any]:
        stats = self._stats(campaign_id)
        total = sum(stats.leads.values())
        return {
            "title": stats.campaign_name,
            "stats": stats,
            "total": total,
            "step_rows": [
                (number, stats.step_types[number], step_counts(counts, total), counts.failure_rate)
                for number, counts in sorted(stats.steps.items())
            ],
            "funnel": funnel_chart(stats),
            "failures": failure_chart(stats),
        }

    def campaign_page(self, request: Request, campaign_id: str, partial: str = "") -> Response:
        key = self.page_key(request)
        if isinstance(key, Response):
            return key
        try:
            context = self.stats_context(campaign_id)
        except PageError as error:
            return self.error_page(request, key, error)
        name = "_stats.html" if partial else "campaign.html"
        return self.render(request, name, {"key": key, **context})

    def stats_csv(self, request: Request, campaign_id: str) -> Response:
        key = self.page_key(request)
        if isinstance(key, Response):
            return key
        try:
            stats = self._stats(campaign_id)
        except PageError as error:
            return self.error_page(request, key, error)
        return csv_response(STATS_HEADER, stats_rows(stats), f"{stats.campaign_id}-stats.csv")

    def has_campaign(self, campaign_id: str) -> bool:
        try:
            self.service.store.get_campaign(campaign_id)
        except NotFoundError:
            return False
        return True

    def _stats(self, campaign_id: str) -> CampaignStats:
        try:
            return self.service.stats(campaign_id)
        except ServiceError as error:
            raise PageError(_status_of(error), str(error)) from None

    # Leads

    def leads_context(
        self, campaign_id: str, status: str, query: str, page_text: str
    ) -> dict[str, Any]:
        try:
            campaign = self.service.store.get_campaign(campaign_id)
            rows = self.service.enrollments(campaign.id)
        except NotFoundError as error:
            raise PageError(404, str(error)) from None
        except ServiceError as error:
            raise PageError(_status_of(error), str(error)) from None
        if status and status not in LEAD_STATUSES:
            raise PageError(
                422,
                f"invalid status {status!r}: use one of {', '.join(LEAD_STATUSES)}",
                back=f"/campaigns/{campaign.id}/leads",
            )
        query = query.strip()[:MAX_SEARCH_LENGTH]
        counts = Counter(row.status for row in rows)
        matched = [
            row
            for row in rows
            if (not status or row.status == status) and (not query or row.matches(query))
        ]
        pages = max((len(matched) + LEADS_PAGE_SIZE - 1) // LEADS_PAGE_SIZE, 1)
        page = min(max(_int(page_text, 1), 1), pages)
        start = (page - 1) * LEADS_PAGE_SIZE
        leads = LeadsPage(
            rows=matched[start : start + LEADS_PAGE_SIZE],
            counts=counts,
            matched=len(matched),
            page=page,
            pages=pages,
        )
        filters = {"status": status, "q": query}
        return {
            "title": f"Leads of {campaign.name}",
            "campaign": campaign,
            "leads": leads,
            "status": status,
            "q": query,
            "total": len(rows),
            "statuses": LEAD_STATUSES,
            "filter_query": urlencode({k: v for k, v in filters.items() if v}),
        }

    def leads_page(
        self,
        request: Request,
        campaign_id: str,
        status: str = "",
        q: str = "",
        page: str = "1",
        partial: str = "",
    ) -> Response:
        key = self.page_key(request)
        if isinstance(key, Response):
            return key
        try:
            context = self.leads_context(campaign_id, status, q, page)
        except PageError as error:
            return self.error_page(request, key, error)
        name = "_leads_table.html" if partial else "leads.html"
        return self.render(request, name, {"key": key, **context})

    def lead_context(self, campaign_id: str, lead_key: str) -> dict[str, Any]:
        try:
            report = self.service.activity(campaign_id, lead_key)
        except ServiceError as error:
            back = f"/campaigns/{campaign_id}/leads" if self.has_campaign(campaign_id) else "/"
            raise PageError(_status_of(error), str(error), back=back) from None
        enrollment = report.enrollment
        return {
            "title": enrollment.lead_key,
            "report": report,
            "campaign": report.campaign,
            "enrollment": enrollment,
            "lead": enrollment.lead,
            "path": lead_path(report.campaign.id, enrollment.workflow_id),
            "workflow_href": http_url(report.workflow_url),
            "note_limit": MAX_NOTE_LENGTH,
        }

    def lead_page(
        self, request: Request, campaign_id: str, lead_key: str, partial: str = ""
    ) -> Response:
        key = self.page_key(request)
        if isinstance(key, Response):
            return key
        try:
            context = self.lead_context(campaign_id, lead_key)
        except PageError as error:
            return self.error_page(request, key, error)
        name = "_lead_live.html" if partial else "lead.html"
        return self.render(request, name, {"key": key, **context})

    def activity_csv(self, request: Request, campaign_id: str, lead_key: str) -> Response:
        key = self.page_key(request)
        if isinstance(key, Response):
            return key
        try:
            report = self.service.activity(campaign_id, lead_key)
        except ServiceError as error:
            return self.error_page(request, key, PageError(_status_of(error), str(error)))
        filename = f"{report.campaign.id}-{file_slug(report.enrollment.lead_key)}-activity.csv"
        return csv_response(ACTIVITY_HEADER, activity_rows(report), filename)

    async def lead_action(
        self, request: Request, campaign_id: str, lead_key: str, action: str
    ) -> Response:
        page = f"/campaigns/{campaign_id}/leads/{lead_key}"
        key = await run_in_threadpool(self.post_key, request, page)
        if isinstance(key, Response):
            return key
        if action not in LEAD_ACTIONS:
            error = PageError(404, f"unknown action {action!r}: use pause, resume or remove", page)
            return self.error_page(request, key, error)

        async def control() -> str:
            note = _note(await request.form())
            message = await self.service.control(campaign_id, lead_key, action, note)
            logger.info(
                "Dashboard: %s of a lead of campaign %s by API key %s", action, campaign_id, key.id
            )
            return message

        outcome = await _perform(control, f"{action} of a lead of campaign {campaign_id}")
        try:
            context = await run_in_threadpool(self.lead_context, campaign_id, lead_key)
        except PageError as problem:
            return self.error_page(request, key, problem)
        context.update(key=key, message=outcome.result, error=outcome.error)
        return self.render(request, "lead.html", context, outcome.status_code)

    # Tasks

    def tasks_context(self, campaign_id: str) -> dict[str, Any]:
        try:
            rows = self.service.tasks("open", campaign_id or None)
        except ServiceError as error:
            raise PageError(_status_of(error), str(error), back="/tasks") from None
        return {
            "title": "Tasks",
            "tasks": [self._task_view(row) for row in rows],
            "campaign_id": campaign_id,
            "campaigns": self.service.store.list_campaigns(),
            "note_limit": MAX_NOTE_LENGTH,
        }

    def _task_view(self, row: Any) -> TaskView:
        try:
            lead: Lead | None = self.service.store.get_enrollment_by_workflow(row.workflow_id).lead
        except NotFoundError:
            lead = None
        return TaskView(
            id=row.id,
            campaign_id=row.campaign_id,
            workflow_id=row.workflow_id,
            step=row.step,
            step_type=row.step_type,
            instructions=row.instructions,
            created_at=row.created_at,
            lead_key=row.lead_key,
            lead=lead,
            phone_href=phone_link(lead.phone) if lead else None,
            linkedin_href=http_url(lead.linkedin_url) if lead else None,
        )

    def tasks_page(self, request: Request, campaign: str = "", partial: str = "") -> Response:
        key = self.page_key(request)
        if isinstance(key, Response):
            return key
        try:
            context = self.tasks_context(campaign)
        except PageError as error:
            return self.error_page(request, key, error)
        name = "_tasks_table.html" if partial else "tasks.html"
        return self.render(request, name, {"key": key, **context})

    async def close_task(self, request: Request, task_id: str, outcome: str) -> Response:
        key = await run_in_threadpool(self.post_key, request, "/tasks")
        if isinstance(key, Response):
            return key
        number = _int(task_id, None)
        if number is None:
            message = f"invalid task id {task_id!r}: use a task from the tasks page"
            return self.error_page(request, key, PageError(404, message, "/tasks"))
        if outcome not in TASK_OUTCOMES:
            message = f"unknown task outcome {outcome!r}: use done, failed or skipped"
            return self.error_page(request, key, PageError(404, message, "/tasks"))
        form = await request.form()
        campaign_id = str(form.get("campaign") or "")

        async def close() -> str:
            message = await self.service.close_task(number, outcome, _note(form))
            logger.info("Dashboard: task %s closed as %s by API key %s", number, outcome, key.id)
            return message

        result = await _perform(close, f"{outcome} of task {number}")
        try:
            context = await run_in_threadpool(self.tasks_context, campaign_id)
        except PageError:
            context = await run_in_threadpool(self.tasks_context, "")
        context.update(key=key, message=result.result, error=result.error)
        return self.render(request, "tasks.html", context, result.status_code)

    # Unsubscribes

    def unsubscribes_context(self, query: str) -> dict[str, Any]:
        query = query.strip()[:MAX_SEARCH_LENGTH]
        rows = self.service.store.list_suppressions()
        if query:
            rows = [row for row in rows if query.casefold() in row["address"].casefold()]
        return {"title": "Unsubscribes", "suppressions": rows, "q": query, "lines": []}

    def unsubscribes_page(self, request: Request, q: str = "") -> Response:
        key = self.page_key(request)
        if isinstance(key, Response):
            return key
        context = {"key": key, **self.unsubscribes_context(q)}
        return self.render(request, "unsubscribes.html", context)

    async def unsubscribe(self, request: Request) -> Response:
        return await self._subscription(request, resubscribe=False)

    async def resubscribe(self, request: Request) -> Response:
        return await self._subscription(request, resubscribe=True)

    async def _subscription(self, request: Request, resubscribe: bool) -> Response:
        key = await run_in_threadpool(self.post_key, request, "/unsubscribes")
        if isinstance(key, Response):
            return key
        form = await request.form()
        address = str(form.get("address") or "").strip()

        async def change() -> list[str]:
            try:
                normalize_email(address)
            except InvalidEmailError as error:
                raise PageError(422, str(error) if address else "missing email address") from None
            if resubscribe:
                lines = await self.service.resubscribe(address, resume=form.get("resume") == "on")
            else:
                lines = await self.service.unsubscribe(address, reason="operator")
            # The address itself is personal data, kept out of the log.
            action = "re-subscribed" if resubscribe else "unsubscribed"
            logger.info("Dashboard: an address %s by API key %s", action, key.id)
            return lines

        label = "re-subscribe" if resubscribe else "unsubscribe"
        outcome = await _perform(change, f"{label} of an address")
        context = await run_in_threadpool(self.unsubscribes_context, "")
        context.update(key=key, lines=outcome.result or [], error=outcome.error)
        return self.render(request, "unsubscribes.html", context, outcome.status_code)


@dataclass(frozen=True)
class _Outcome:
    """The result of a form's operation, or its error message, with the page's HTTP status."""

    result: Any = None
    error: str | None = None
    status_code: int = 200


async def _perform(operation: Callable[[], Awaitable[Any]], label: str) -> _Outcome:
    """Run a form's operation, turning the errors it may raise into a message and a status.

    An invalid field is 422, an unknown campaign, lead or task 404, a request that contradicts
    the current state (a lead already paused, a task already closed) 409, and a failure of the
    Temporal server 503. `label` names the operation in the log, without personal data.
    """
    try:
        return _Outcome(result=await operation())
    except PageError as error:
        outcome = _Outcome(error=error.message, status_code=error.status_code)
    except ServiceNotFoundError as error:
        outcome = _Outcome(error=str(error), status_code=404)
    except ServiceError as error:
        outcome = _Outcome(error=str(error), status_code=409)
    except RPCError as error:
        return _Outcome(error=_temporal_failure(error), status_code=503)
    # The message may contain the lead's address, so only its status is logged.
    logger.info("Dashboard: %s rejected with status %d", label, outcome.status_code)
    return outcome


def _status_of(error: ServiceError) -> int:
    return 404 if isinstance(error, ServiceNotFoundError) else 409


def _note(form: Any) -> str | None:
    """Return the form's optional note, raising PageError when it is too long."""
    note = str(form.get("note") or "").strip()
    if len(note) > MAX_NOTE_LENGTH:
        raise PageError(
            422, f"the note has {len(note)} characters: shorten it to {MAX_NOTE_LENGTH}"
        )
    return note or None


def _cross_site(request: Request) -> bool:
    """Return whether a POST comes from a page of another site, by its Origin header.

    The Fetch standard has browsers send Origin with every POST, so a request without one
    (curl, an API client) is no browser's cross-site form. The port is part of the comparison,
    as it is of the Host header.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()


def _int(text: str, default: Any) -> Any:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def _temporal_failure(error: RPCError) -> str:
    logger.warning("Dashboard request failed on the Temporal server: %s", error)
    return (
        f"the Temporal server failed ({error}); nothing may have changed: check that the "
        "stack runs (`sequencer up`) and try again"
    )


@dataclass(frozen=True)
class _CampaignUpload:
    name: str
    text: str


@dataclass(frozen=True)
class _LeadsUpload:
    name: str
    data: bytes


async def _read_launch_form(request: Request) -> tuple[_CampaignUpload, _LeadsUpload]:
    """Read the campaign and leads files of the launch form, raising PageError when invalid."""
    async with request.form(max_files=2, max_fields=10) as form:
        campaign_file = form.get("campaign")
        leads_file = form.get("leads")
        campaign_name, campaign_bytes = await _read_upload(
            campaign_file, "campaign YAML", MAX_CAMPAIGN_BYTES
        )
        leads_name, leads_bytes = await _read_upload(leads_file, "leads CSV", MAX_LEADS_BYTES)
    try:
        campaign_text = campaign_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PageError(
            422, f"invalid campaign file {campaign_name}: it is not UTF-8 text ({error.reason})"
        ) from None
    return _CampaignUpload(campaign_name, campaign_text), _LeadsUpload(leads_name, leads_bytes)


async def _read_upload(value: Any, what: str, limit: int) -> tuple[str, bytes]:
    if not isinstance(value, UploadFile) or not value.filename:
        raise PageError(422, f"missing {what} file: choose one and launch again")
    data = await value.read(limit + 1)
    if len(data) > limit:
        raise PageError(
            413,
            f"the {what} file {value.filename} is larger than {limit // (1024 * 1024)} MiB: "
            "split it and launch each part",
        )
    # Only the base name of the client's path, short enough for a message.
    name = re.split(r"[\\/]", value.filename)[-1][:100] or what
    return name, data


def dashboard_router(service: Sequencer) -> APIRouter:
    """Return the dashboard's routes; see the module docstring for how to mount them."""
    pages = _Dashboard(service)
    router = APIRouter(include_in_schema=False)
    routes = [
        ("/login", pages.login_form, ["GET"]),
        ("/login", pages.login, ["POST"]),
        ("/logout", pages.logout, ["POST"]),
        ("/static/{name}", pages.static_file, ["GET"]),
        ("/", pages.campaigns_page, ["GET"]),
        ("/campaigns", pages.launch, ["POST"]),
        ("/campaigns/{campaign_id}", pages.campaign_page, ["GET"]),
        ("/campaigns/{campaign_id}/stats.csv", pages.stats_csv, ["GET"]),
        ("/campaigns/{campaign_id}/leads", pages.leads_page, ["GET"]),
        ("/campaigns/{campaign_id}/leads/{lead_key}", pages.lead_page, ["GET"]),
        ("/campaigns/{campaign_id}/leads/{lead_key}/activity.csv", pages.activity_csv, ["GET"]),
        ("/campaigns/{campaign_id}/leads/{lead_key}/{action}", pages.lead_action, ["POST"]),
        ("/tasks", pages.tasks_page, ["GET"]),
        ("/tasks/{task_id}/{outcome}", pages.close_task, ["POST"]),
        ("/unsubscribes", pages.unsubscribes_page, ["GET"]),
        ("/unsubscribes", pages.unsubscribe, ["POST"]),
        ("/unsubscribes/resubscribe", pages.resubscribe, ["POST"]),
    ]
    for path, endpoint, methods in routes:
        router.add_api_route(path, endpoint, methods=methods, response_model=None)
    return router
