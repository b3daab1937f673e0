"""The HTTP API, version 1: every operation of the CLI, over the same service layer.

Every route needs an API key (see `sequencer.http_auth`). Errors have the status their cause
calls for, and a `detail` sentence with the reason and the next step:

    401  missing, unknown or revoked API key
    404  unknown campaign, lead, task or mailbox
    409  the request is valid but changes nothing or contradicts the lead's state
    413  an upload larger than MAX_UPLOAD_BYTES
    422  an invalid campaign file, lead file or request field
    500  a Temporal payload that the service's payload keys cannot decrypt

The OpenAPI document is at /openapi.json and the interactive docs at /docs.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sequencer.campaign import CampaignError, parse_campaign_text
from sequencer.codec import PayloadCodecError
from sequencer.http_auth import require_api_key
from sequencer.leads import ImportReport, LeadFileError
from sequencer.service import (
    ActivityReport,
    LaunchReport,
    Sequencer,
    ServiceError,
    ServiceNotFoundError,
)
from sequencer.storage import EnrollmentRow, TaskRow

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
# Campaign files and lead files larger than this are rejected.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
CAMPAIGN_CONTENT_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/plain")

LeadStatus = Literal["running", "paused", "completed", "stopped", "replied", "removed"]
TaskStatus = Literal["open", "done", "failed", "skipped", "cancelled", "all"]
SendState = Literal["claimed", "sending", "sent", "uncertain"]


# Request bodies


class Note(BaseModel):
    note: str | None = Field(default=None, max_length=1000, description="Shown in the Activity.")


class BounceEvent(BaseModel):
    campaign: str
    lead: str = Field(description="The lead's email address, LinkedIn URL or key.")
    step: int = Field(ge=1)
    bounced: bool = Field(default=True, description="False reports a failure, not a bounce.")
    reason: str = Field(default="bounce", max_length=100)
    detail: str | None = Field(default=None, max_length=1000)


class ReplyEvent(BaseModel):
    campaign: str
    lead: str
    channel: Literal["email", "linkedin", "phone"] | None = None
    auto_reply: bool = False


class InvitationEventBody(BaseModel):
    campaign: str
    lead: str
    accepted: bool
    detail: str | None = Field(default=None, max_length=1000)


# In paths, {lead} is the lead's email address, or its workflow id (`lead-...`, in every lead
# list) for a lead known only by its LinkedIn URL, which contains slashes.


class Reassign(BaseModel):
    to: str | None = Field(default=None, description="The new email sender's address.")
    smtp_url: str | None = None
    linkedin_account: str | None = None


class Unsubscribe(BaseModel):
    address: str
    reason: str = Field(default="operator", max_length=32)


class Message(BaseModel):
    message: str


class Lines(BaseModel):
    lines: list[str]


# Responses


def _enrollment(row: EnrollmentRow) -> dict[str, Any]:
    return {
        "lead": row.lead_key,
        "status": row.status,
        "unsubscribed": row.unsubscribed,
        "enrolled_at": row.enrolled_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "email": row.lead.email,
        "first_name": row.lead.first_name,
        "last_name": row.lead.last_name,
        "company": row.lead.company,
        "workflow_id": row.workflow_id,
    }


def _task(row: TaskRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "campaign_id": row.campaign_id,
        "lead": row.lead_key,
        "step": row.step,
        "type": row.step_type,
        "instructions": row.instructions,
        "status": row.status,
        "created_at": row.created_at.isoformat(),
        "closed_at": row.closed_at.isoformat() if row.closed_at else None,
        "note": row.note,
    }


def _import_report(report: ImportReport) -> dict[str, Any]:
    return {"leads": len(report.leads), **report.as_dict()}


def _launch(report: LaunchReport) -> dict[str, Any]:
    return {
        "campaign": report.campaign.name,
        "campaign_id": report.campaign.id,
        "enrolled": report.enrolled,
        "already_enrolled": report.already_enrolled,
        "import": _import_report(report.import_report),
        "mailbox_workflow": report.mailbox.workflow_id if report.mailbox else None,
        "mailbox_problem": report.mailbox.problem if report.mailbox else None,
    }


def _activity(report: ActivityReport) -> dict[str, Any]:
    return report.as_dict()


async def _read_upload(upload: UploadFile, what: str) -> bytes:
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(
            413, f"the {what} is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB; split it"
        )
    return data


def _campaign_text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise HTTPException(422, f"{name}: the file is not UTF-8 text ({error.reason})") from None


def api_router(service: Sequencer) -> APIRouter:
    """Build the /api/v1 routes on `service`."""
    router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(require_api_key)])

    # Campaigns

    @router.get("/campaigns", summary="List campaigns with their lead counts")
    def list_campaigns() -> list[dict[str, Any]]:
        campaigns = []
        for campaign in service.store.list_campaigns():
            stats = service.stats(campaign.id)
            campaigns.append(
                {
                    "id": campaign.id,
                    "name": campaign.name,
                    "steps": [step.type for step in campaign.steps],
                    "leads": stats.leads,
                    "unsubscribed": stats.unsubscribed,
                }
            )
        return campaigns

    @router.post(
        "/campaigns/validate",
        summary="Validate a campaign file (YAML or JSON body) without saving it",
        openapi_extra=_text_body("The campaign file, as YAML or JSON."),
    )
    async def validate_campaign(request: Request) -> dict[str, Any]:
        campaign = parse_campaign_text(await _body_text(request), "request body")
        return json.loads(campaign.model_dump_json())

    @router.post(
        "/campaigns",
        status_code=201,
        summary="Create or update a campaign from a YAML or JSON body, without leads",
        openapi_extra=_text_body("The campaign file, as YAML or JSON."),
    )
    async def save_campaign(request: Request) -> dict[str, Any]:
        campaign = parse_campaign_text(await _body_text(request), "request body")
        service.save_campaign(campaign)
        return json.loads(campaign.model_dump_json())

    @router.get("/campaigns/{campaign_id}", summary="A campaign's definition")
    def get_campaign(campaign_id: str) -> dict[str, Any]:
        return json.loads(service.campaign(campaign_id).model_dump_json())

    @router.post(
        "/campaigns/launch",
        summary="Import a lead CSV file and enroll each valid lead in a campaign file",
    )
    async def launch(
        campaign: Annotated[UploadFile, File(description="The campaign file (YAML or JSON).")],
        leads: Annotated[UploadFile, File(description="The lead CSV file.")],
    ) -> dict[str, Any]:
        campaign_name = campaign.filename or "campaign.yaml"
        text = _campaign_text(await _read_upload(campaign, "campaign file"), campaign_name)
        data = await _read_upload(leads, "lead file")
        report = await service.launch_content(
            text, data, campaign_name=campaign_name, leads_name=leads.filename or "leads.csv"
        )
        return _launch(report)

    @router.post(
        "/campaigns/{campaign_id}/leads",
        summary="Import a lead CSV file into a saved campaign and enroll each valid lead",
    )
    async def add_leads(
        campaign_id: str,
        leads: Annotated[UploadFile, File(description="The lead CSV file.")],
    ) -> dict[str, Any]:
        data = await _read_upload(leads, "lead file")
        report = await service.launch_saved(
            campaign_id, data, leads_name=leads.filename or "leads.csv"
        )
        return _launch(report)

    @router.get("/campaigns/{campaign_id}/stats", summary="A campaign's Stats")
    def stats(campaign_id: str) -> dict[str, Any]:
        return service.stats(campaign_id).as_dict()

    @router.get("/campaigns/{campaign_id}/leads", summary="A campaign's leads, with filters")
    def list_leads(
        campaign_id: str,
        status: Annotated[
            LeadStatus | None, Query(description="Only leads in this status.")
        ] = None,
        q: Annotated[
            str | None, Query(max_length=200, description="Text in the address, name or company.")
        ] = None,
    ) -> list[dict[str, Any]]:
        rows = service.enrollments(campaign_id)
        if status:
            rows = [row for row in rows if row.status == status]
        if q:
            rows = [row for row in rows if row.matches(q)]
        return [_enrollment(row) for row in rows]

    @router.get("/campaigns/{campaign_id}/leads/{lead}/activity", summary="One lead's Activity")
    def activity(campaign_id: str, lead: str) -> dict[str, Any]:
        return _activity(service.activity(campaign_id, lead))

    @router.post(
        "/campaigns/{campaign_id}/leads/{lead}/reassign",
        summary="Move one lead to another sender account",
    )
    async def reassign(campaign_id: str, lead: str, body: Reassign) -> Message:
        message = await service.reassign(
            campaign_id, lead, body.to, body.smtp_url, body.linkedin_account
        )
        return Message(message=message)

    @router.post(
        "/campaigns/{campaign_id}/leads/{lead}/{action}",
        summary="Pause, resume or remove one lead",
    )
    async def control(
        campaign_id: str,
        lead: str,
        action: Literal["pause", "resume", "remove"],
        body: Note | None = None,
    ) -> Message:
        note = body.note if body else None
        return Message(message=await service.control(campaign_id, lead, action, note))

    # Tasks

    @router.get("/tasks", summary="Call and manual tasks")
    def list_tasks(
        status: TaskStatus = "open",
        campaign: str | None = None,
    ) -> list[dict[str, Any]]:
        rows = service.tasks(None if status == "all" else status, campaign)
        return [_task(row) for row in rows]

    @router.post("/tasks/{task_id}/{outcome}", summary="Complete, fail or skip a task")
    async def close_task(
        task_id: int, outcome: Literal["done", "failed", "skipped"], body: Note | None = None
    ) -> Message:
        note = body.note if body else None
        return Message(message=await service.close_task(task_id, outcome, note))

    # Events

    @router.post("/events/bounce", summary="Report a bounce or a failure of a step that ran")
    async def bounce(body: BounceEvent) -> Message:
        message = await service.report_failure(
            body.campaign, body.lead, body.step, body.reason, body.bounced, body.detail
        )
        return Message(message=message)

    @router.post("/events/reply", summary="Report a reply (rule: the sequence stops)")
    async def reply(body: ReplyEvent) -> Message:
        message = await service.report_reply(
            body.campaign, body.lead, body.channel, body.auto_reply
        )
        return Message(message=message)

    @router.post("/events/invitation", summary="Report an accepted or declined invitation")
    async def invitation(body: InvitationEventBody) -> Message:
        message = await service.report_invitation(
            body.campaign, body.lead, body.accepted, body.detail
        )
        return Message(message=message)

    @router.post(
        "/events/mail",
        summary="Apply one message from a sender's mailbox (bounce, reply, auto-reply...)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"message/rfc822": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def mail(request: Request) -> Lines:
        raw = await request.body()
        if not raw.strip():
            raise HTTPException(422, "the body is empty: send the message as message/rfc822")
        if len(raw) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, "the message is too large")
        return Lines(lines=await service.apply_mail(raw, source="API message"))

    # Unsubscribes

    @router.get("/unsubscribes", summary="The suppression list")
    def list_unsubscribes() -> list[dict[str, Any]]:
        return [
            {**row, "created_at": row["created_at"].isoformat()}
            for row in service.store.list_suppressions()
        ]

    @router.post("/unsubscribes", status_code=201, summary="Unsubscribe an address")
    async def unsubscribe(body: Unsubscribe) -> Lines:
        return Lines(lines=await service.unsubscribe(body.address, body.reason))

    @router.delete("/unsubscribes/{address}", summary="Re-subscribe an address")
    async def resubscribe(
        address: str,
        resume: Annotated[
            bool, Query(description="Start again what the address's bounce stopped.")
        ] = False,
    ) -> Lines:
        return Lines(lines=await service.resubscribe(address, resume))

    # Email sends

    @router.get("/sends", summary="Email sends by step, from the send ledger")
    def list_sends(
        state: Annotated[
            SendState | None,
            Query(description="Only sends in this state; `uncertain` lists unknown outcomes."),
        ] = None,
    ) -> list[dict[str, Any]]:
        return service.sends(state)

    # Accounts and mailboxes

    @router.get("/accounts", summary="Sender accounts: connected or not, and their sends")
    async def accounts() -> list[dict[str, Any]]:
        return [json.loads(row.model_dump_json()) for row in await service.accounts()]

    @router.post(
        "/accounts/{account_id}/{action}", summary="Reconnect or disconnect a sender account"
    )
    async def account_action(
        account_id: str, action: Literal["reconnect", "disconnect"], body: Note | None = None
    ) -> Message:
        note = body.note if body else None
        return Message(message=await service.account_action(account_id, action, note))

    @router.get("/mailboxes", summary="Mailboxes read for bounces and replies")
    async def mailboxes() -> list[dict[str, Any]]:
        return [json.loads(row.model_dump_json()) for row in await service.mailboxes()]

    return router


def _text_body(description: str) -> dict[str, Any]:
    schema = {"type": "string", "description": description}
    return {
        "requestBody": {
            "required": True,
            "content": {
                content_type: {"schema": schema}
                for content_type in (*CAMPAIGN_CONTENT_TYPES, "application/json")
            },
        }
    }


async def _body_text(request: Request) -> str:
    data = await request.body()
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, "the campaign file is too large")
    return _campaign_text(data, "request body")


def add_error_handlers(app: Any) -> None:
    """Turn the service's exceptions into JSON errors with the status their cause calls for."""

    @app.exception_handler(ServiceNotFoundError)
    async def not_found(request: Request, error: ServiceNotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=404)

    @app.exception_handler(ServiceError)
    async def conflict(request: Request, error: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=409)

    @app.exception_handler(CampaignError)
    async def invalid_campaign(request: Request, error: CampaignError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(error), "problems": list(error.problems)}, status_code=422
        )

    @app.exception_handler(LeadFileError)
    async def invalid_leads(request: Request, error: LeadFileError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors()
        ]
        return JSONResponse(
            {
                "detail": "invalid request: " + "; ".join(problems),
                "problems": jsonable_encoder(error.errors()),
            },
            status_code=422,
        )

    @app.exception_handler(PayloadCodecError)
    async def payload_codec_failed(request: Request, error: PayloadCodecError) -> JSONResponse:
        # The service lacks the key of a payload that a worker wrote, a deployment error.
        logger.error("API %s request failed: %s", request.method, error)
        return JSONResponse({"detail": str(error)}, status_code=500)
