"""Error kinds raised by channel activities, decided at the activity boundary.

    Exception
    └── ChannelError
        ├── TransientChannelError   network error, SMTP 4xx, HTTP 429 or 5xx: retried with backoff
        └── AccountInterruptedError the sender account cannot send: not the lead's fault

Permanent failures (a hard bounce, a deactivated profile) are not raised: the activity returns
a `StepOutcome` with status failed or bounced, so the workflow applies the failed-step rule.
Activities convert these classes to `temporalio.exceptions.ApplicationError` with `type` set
to the class name, because only the error type crosses the activity boundary.
"""

from __future__ import annotations

TRANSIENT_ERROR_TYPE = "TransientChannelError"
ACCOUNT_INTERRUPTED_ERROR_TYPE = "AccountInterruptedError"


class ChannelError(Exception):
    """A channel could not carry out a step."""


class TransientChannelError(ChannelError):
    """A failure that may pass: retried until the channel's retry budget is spent."""


class AccountInterruptedError(ChannelError):
    """The sender account is disconnected, its credentials expired or its cap is reached."""
