"""Step types, channels and statuses: the vocabulary shared by every layer.

Adding a channel means adding its step types to `StepType`, the channel to `Channel`,
the pairs to `CHANNEL_OF`, and one activity module under `activities/`.
"""

from __future__ import annotations

from enum import StrEnum


class Channel(StrEnum):
    EMAIL = "email"
    LINKEDIN = "linkedin"
    PHONE = "phone"
    MANUAL = "manual"


class StepType(StrEnum):
    EMAIL = "email"
    LINKEDIN_VISIT = "linkedin_visit"
    LINKEDIN_INVITE = "linkedin_invite"
    LINKEDIN_MESSAGE = "linkedin_message"
    CALL = "call"
    MANUAL_TASK = "manual_task"


CHANNEL_OF: dict[StepType, Channel] = {
    StepType.EMAIL: Channel.EMAIL,
    StepType.LINKEDIN_VISIT: Channel.LINKEDIN,
    StepType.LINKEDIN_INVITE: Channel.LINKEDIN,
    StepType.LINKEDIN_MESSAGE: Channel.LINKEDIN,
    StepType.CALL: Channel.PHONE,
    StepType.MANUAL_TASK: Channel.MANUAL,
}

# Step types that create a task for a person and wait for its outcome.
TASK_STEP_TYPES = frozenset({StepType.CALL, StepType.MANUAL_TASK})


class StepStatus(StrEnum):
    PENDING = "pending"  # not reached yet
    WAITING = "waiting"  # blocked on something outside the engine, such as an open task
    SENT = "sent"  # done
    FAILED = "failed"
    BOUNCED = "bounced"  # an email failure reported by the mail system
    SKIPPED = "skipped"


class EnrollmentStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"  # ran out of steps after executing its last remaining step
    STOPPED = "stopped"  # a failure left no step of another channel to run
    REPLIED = "replied"  # a stop condition was met
    REMOVED = "removed"  # taken out by an operator

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {
        EnrollmentStatus.COMPLETED,
        EnrollmentStatus.STOPPED,
        EnrollmentStatus.REPLIED,
        EnrollmentStatus.REMOVED,
    }
)


class Reason(StrEnum):
    """Machine-readable reasons recorded with failed and skipped steps."""

    BOUNCE = "bounce"
    RETRIES_EXHAUSTED = "retries_exhausted"
    NO_SENDER = "no_sender"
    INVALID_EMAIL_ADDRESS = "invalid_email_address"
    UNSUPPORTED_ADDRESS = "unsupported_address"
    PROVIDER_REJECTED = "provider_rejected"
    TASK_FAILED = "task_failed"
    NO_EMAIL_ADDRESS = "no_email_address"
    NO_LINKEDIN_URL = "no_linkedin_url"
    NO_PHONE_NUMBER = "no_phone_number"
    INVALID_LINKEDIN_URL = "invalid_linkedin_url"
    PROFILE_DEACTIVATED = "profile_deactivated"
    MISSING_VARIABLE = "missing_variable"
    UNSUBSCRIBED = "unsubscribed"
    REPLIED = "replied"
    TASK_SKIPPED = "task_skipped"
    INVITE_NOT_ACCEPTED = "invite_not_accepted"
