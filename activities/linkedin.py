"""The LinkedIn channel: profile visits, invitations and messages through a provider's HTTP API.

The provider (Unipile, HeyReach or the local `sequencer.linkedin_sandbox`) drives the sender's
LinkedIn session. Its API is `POST /v1/profile-visits`, `/v1/invitations` and `/v1/messages`
with a Bearer API key, as the sandbox module describes.

Outcomes follow `sequencer.errors`: problems with the lead are returned as a failed
`StepOutcome`, while provider trouble is raised as an `ApplicationError` whose type is
TRANSIENT_ERROR_TYPE (retried) or ACCOUNT_INTERRUPTED_ERROR_TYPE (not retried).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from sequencer.campaign import LinkedInInviteStep, LinkedInMessageStep, LinkedInVisitStep
from sequencer.channels import Reason, StepStatus
from sequencer.errors import ACCOUNT_INTERRUPTED_ERROR_TYPE, TRANSIENT_ERROR_TYPE
from sequencer.linkedin_urls import parse_linkedin_url
from sequencer.models import StepInput, StepOutcome
from sequencer.templates import MissingVariableError, render

logger = logging.getLogger(__name__)

PROVIDER_REJECTED = Reason.PROVIDER_REJECTED
# Error type for a step that is not a LinkedIn step, which is a bug in the caller.
UNSUPPORTED_STEP_ERROR_TYPE = "UnsupportedStepType"

_ENDPOINTS: dict[type, str] = {
    LinkedInVisitStep: "/v1/profile-visits",
    LinkedInInviteStep: "/v1/invitations",
    LinkedInMessageStep: "/v1/messages",
}
# Template field of each step type and the request field that carries its rendered text.
_TEXT_FIELDS: dict[type, tuple[str, str]] = {
    LinkedInInviteStep: ("note", "note"),
    LinkedInMessageStep: ("message", "text"),
}


class LinkedInActivities:
    """The `linkedin_step` activity, bound to one provider account.

    A client passed in is used as configured, and the caller closes it. Without one, the
    activity creates a client with `timeout` seconds for each request and `aclose()` closes it.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        client: httpx.AsyncClient | None = None,
        timeout: float = 20.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"invalid LinkedIn provider URL {base_url!r}: expected http://HOST:PORT "
                "or https://HOST. Check SEQUENCER_LINKEDIN_URL"
            )
        if not api_key:
            raise ValueError(
                "the LinkedIn provider API key is empty. Set SEQUENCER_LINKEDIN_API_KEY"
            )
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            await self._client.aclose()

    @activity.defn(name="linkedin_step")
    async def linkedin_step(self, input: StepInput) -> StepOutcome:
        """Carry out one LinkedIn step for one lead through the provider.

        Returns a failed outcome, without a request, when the lead has no usable LinkedIn URL
        or lacks a template variable. Raises ApplicationError for provider errors that are not
        the lead's fault.
        """
        step = input.step
        endpoint = _ENDPOINTS.get(type(step))
        if endpoint is None:
            raise ApplicationError(
                f"linkedin_step cannot run step {input.step_number} of type {step.type}: "
                "only linkedin_visit, linkedin_invite and linkedin_message steps are supported",
                type=UNSUPPORTED_STEP_ERROR_TYPE,
                non_retryable=True,
            )

        raw_url = (input.lead.linkedin_url or "").strip()
        if not raw_url:
            return self._fail(input, Reason.NO_LINKEDIN_URL, "the lead has no LinkedIn URL")
        parsed = parse_linkedin_url(raw_url)
        if not parsed.usable:
            return self._fail(input, Reason.INVALID_LINKEDIN_URL, parsed.reason)

        body: dict[str, Any] = {
            # `cleaned` is the canonical URL, or a legacy URL for the provider to resolve.
            "profile_url": parsed.cleaned or raw_url,
            "idempotency_key": f"{input.workflow_id}:{input.step_number}",
        }
        text_field = _TEXT_FIELDS.get(type(step))
        if text_field is not None:
            template_name, request_name = text_field
            template = step.templates().get(template_name)
            if template is not None:
                try:
                    body[request_name] = render(template, input.lead.template_variables())
                except MissingVariableError as error:
                    return self._fail(input, Reason.MISSING_VARIABLE, f"{template_name}: {error}")

        response = await self._post(input, endpoint, body)
        return self._outcome(input, response)

    async def _post(self, input: StepInput, endpoint: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._client.post(
                self._base_url + endpoint,
                json=body,
                headers={"Authorization": f"Bearer {self._api_key}"},
            )
        except httpx.TimeoutException as error:
            logger.warning(
                "campaign %s workflow %s step %s: LinkedIn provider timed out",
                input.campaign_id,
                input.workflow_id,
                input.step_number,
            )
            raise ApplicationError(
                f"the LinkedIn provider timed out on step {input.step_number} "
                f"({type(error).__name__}), so the step will be retried",
                type=TRANSIENT_ERROR_TYPE,
            ) from error
        except httpx.TransportError as error:
            logger.warning(
                "campaign %s workflow %s step %s: cannot reach the LinkedIn provider: %s",
                input.campaign_id,
                input.workflow_id,
                input.step_number,
                type(error).__name__,
            )
            raise ApplicationError(
                f"cannot reach the LinkedIn provider at {self._base_url} on step "
                f"{input.step_number} ({type(error).__name__}: {error}), so the step will be "
                "retried",
                type=TRANSIENT_ERROR_TYPE,
            ) from error

    def _outcome(self, input: StepInput, response: httpx.Response) -> StepOutcome:
        status = response.status_code
        payload = json_object(response)
        error_code = str(payload.get("error") or "")
        logger.info(
            "campaign %s workflow %s step %s: LinkedIn provider returned HTTP %s",
            input.campaign_id,
            input.workflow_id,
            input.step_number,
            status,
        )

        if 200 <= status < 300:
            action_id = payload.get("id")
            if action_id is None:
                logger.warning(
                    "campaign %s workflow %s step %s: HTTP %s response has no action id",
                    input.campaign_id,
                    input.workflow_id,
                    input.step_number,
                    status,
                )
            return StepOutcome(
                status=StepStatus.SENT, detail=str(action_id) if action_id is not None else None
            )

        if status == 410 or error_code == "profile_deactivated":
            return self._fail(
                input, Reason.PROFILE_DEACTIVATED, _describe_error(status, payload, response)
            )

        if status == 401 and error_code == "session_expired":
            raise ApplicationError(
                "the LinkedIn provider returned HTTP 401 session_expired: the sender account's "
                "LinkedIn session expired. Log the account in again at the provider, and its "
                "leads resume by themselves once the account works again",
                type=ACCOUNT_INTERRUPTED_ERROR_TYPE,
                non_retryable=True,
            )

        if status in (401, 403):
            raise ApplicationError(
                f"the LinkedIn provider rejected the API key or session with HTTP {status}. "
                "Set SEQUENCER_LINKEDIN_API_KEY to a valid key and reconnect the LinkedIn "
                "account at the provider, then resume the campaign",
                type=ACCOUNT_INTERRUPTED_ERROR_TYPE,
                non_retryable=True,
            )

        if status == 429 or status >= 500:
            delay = _retry_after(response)
            raise ApplicationError(
                f"the LinkedIn provider returned HTTP {status} on step {input.step_number}, "
                "so the step will be retried",
                type=TRANSIENT_ERROR_TYPE,
                next_retry_delay=delay,
            )

        if 400 <= status < 500:
            return self._fail(input, PROVIDER_REJECTED, _describe_error(status, payload, response))

        # A 1xx or 3xx means the base URL points at something other than the provider's API,
        # so every lead would fail the same way. Stopping the sender is better than failing
        # every lead.
        raise ApplicationError(
            f"unexpected HTTP {status} from the LinkedIn provider at {self._base_url}: "
            "check SEQUENCER_LINKEDIN_URL",
            type=ACCOUNT_INTERRUPTED_ERROR_TYPE,
            non_retryable=True,
        )

    def _fail(self, input: StepInput, reason: str, detail: str | None) -> StepOutcome:
        # A failed step is a normal business outcome (the workflow applies the failed-step
        # rule), not a fault of the worker, so it is logged at INFO.
        logger.info(
            "campaign %s workflow %s step %s: LinkedIn step failed: %s",
            input.campaign_id,
            input.workflow_id,
            input.step_number,
            reason,
        )
        return StepOutcome(status=StepStatus.FAILED, reason=str(reason), detail=detail)


def json_object(response: httpx.Response) -> dict[str, Any]:
    """Return the response's JSON object, or an empty dict when the body is not one."""
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _describe_error(status: int, payload: dict[str, Any], response: httpx.Response) -> str:
    """Return the provider's error as one line, such as `HTTP 422 invalid_request: note: ...`."""
    error = payload.get("error")
    detail = payload.get("detail")
    if error is None and detail is None:
        text = response.text.strip()[:300]
        return f"HTTP {status}: {text}" if text else f"HTTP {status}"
    parts = [str(part) for part in (error, detail) if part]
    return f"HTTP {status} " + ": ".join(parts)


def _retry_after(response: httpx.Response) -> timedelta | None:
    """Return the Retry-After header as a delay. The header contains seconds or an HTTP date."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(when - datetime.now(UTC), timedelta(0))
