"""The campaign file: a YAML document validated by pydantic models.

The format is a public contract: examples, tests and users' files rely on it. Errors name
the step number (counted from 1) and the field, as in `step 3 (email): subject: missing`.
"""

from __future__ import annotations

import re
import reprlib
import sys
import unicodedata
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from sequencer.addresses import InvalidEmailError, normalize_email
from sequencer.channels import CHANNEL_OF, Channel, StepType
from sequencer.durations import format_duration, parse_duration
from sequencer.schedule import SendingSchedule
from sequencer.templates import (
    TemplateSyntaxError,
    parse_placeholders,
    render_without_variables,
)

DEFAULT_SMTP_URL = "smtp://127.0.0.1:2525"
MISSING_SENDER = (
    "sender: missing; a campaign with email steps needs a sender such as "
    '{email: rep@example.com, smtp_url: "smtp://127.0.0.1:2525"}'
)


class CampaignError(ValueError):
    """An invalid campaign file. `problems` lists one sentence per invalid field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid campaign {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def _duration(value: Any) -> timedelta:
    return parse_duration(value)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _StepBase(_Model):
    wait_after: timedelta = timedelta(0)

    @field_validator("wait_after", mode="before")
    @classmethod
    def _parse_wait(cls, value: Any) -> timedelta:
        return _duration(value)

    @field_serializer("wait_after")
    def _dump_wait(self, value: timedelta) -> str:
        return format_duration(value, exact=True)

    @property
    def channel(self) -> Channel:
        return CHANNEL_OF[StepType(self.type)]  # type: ignore[attr-defined]

    def templates(self) -> dict[str, str]:
        """Return the step's template fields by name, for validation and rendering."""
        return {}


def _check_template(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_placeholders(value)
        except TemplateSyntaxError as error:
            raise ValueError(str(error)) from None
    return value


class EmailStep(_StepBase):
    type: Literal["email"] = "email"
    subject: str = Field(min_length=1)
    body: str = Field(min_length=1)

    _templates = field_validator("subject", "body")(_check_template)

    def templates(self) -> dict[str, str]:
        return {"subject": self.subject, "body": self.body}


class LinkedInVisitStep(_StepBase):
    type: Literal["linkedin_visit"] = "linkedin_visit"


# LinkedIn rejects an invitation note longer than this many characters.
MAX_INVITE_NOTE_LENGTH = 300


class LinkedInInviteStep(_StepBase):
    type: Literal["linkedin_invite"] = "linkedin_invite"
    note: str | None = None

    _templates = field_validator("note")(_check_template)

    @field_validator("note")
    @classmethod
    def _check_note_length(cls, value: str | None) -> str | None:
        if value is None:
            return value
        # The note's own text, with each placeholder counted as empty: every lead's note is at
        # least this long.
        fixed = render_without_variables(value)
        if len(fixed) > MAX_INVITE_NOTE_LENGTH:
            raise ValueError(
                f"the note has {len(fixed)} characters before any variable is filled; LinkedIn "
                f"accepts at most {MAX_INVITE_NOTE_LENGTH}, so shorten it"
            )
        return value

    def templates(self) -> dict[str, str]:
        return {"note": self.note} if self.note else {}


class LinkedInMessageStep(_StepBase):
    type: Literal["linkedin_message"] = "linkedin_message"
    message: str = Field(min_length=1)

    _templates = field_validator("message")(_check_template)

    def templates(self) -> dict[str, str]:
        return {"message": self.message}


class CallStep(_StepBase):
    type: Literal["call"] = "call"
    instructions: str = "Call {{first_name|the lead}}"

    _templates = field_validator("instructions")(_check_template)

    def templates(self) -> dict[str, str]:
        return {"instructions": self.instructions}


class ManualTaskStep(_StepBase):
    type: Literal["manual_task"] = "manual_task"
    instructions: str = Field(min_length=1)

    _templates = field_validator("instructions")(_check_template)

    def templates(self) -> dict[str, str]:
        return {"instructions": self.instructions}


Step = Annotated[
    EmailStep
    | LinkedInVisitStep
    | LinkedInInviteStep
    | LinkedInMessageStep
    | CallStep
    | ManualTaskStep,
    Field(discriminator="type"),
]


DEFAULT_DAILY_EMAILS = 50
DEFAULT_DAILY_INVITES = 25
DEFAULT_INVITE_TIMEOUT = timedelta(days=14)


def _positive_duration(value: Any) -> timedelta:
    delta = _duration(value)
    if delta < timedelta(0):
        raise ValueError(f"{value!r} is negative: use a duration such as 30s or 2m")
    return delta


class _SendingAccount(_Model):
    """An account that sends: `min_spacing` is the shortest time between two of its sends."""

    min_spacing: timedelta = timedelta(0)

    @field_validator("min_spacing", mode="before")
    @classmethod
    def _parse_spacing(cls, value: Any) -> timedelta:
        return _positive_duration(value)

    @field_serializer("min_spacing")
    def _dump_spacing(self, value: timedelta) -> str:
        return format_duration(value, exact=True)


class Sender(_SendingAccount):
    """The account that sends email steps. Credentials come from the environment.

    `daily_limit` caps the emails this account sends in any 24 hours, across every campaign.
    """

    email: str
    name: str | None = None
    smtp_url: str = DEFAULT_SMTP_URL
    # The mailbox that bounces and replies arrive in. Without it, the worker's
    # SEQUENCER_IMAP_URL is used, and with neither the mailbox is not read.
    imap_url: str | None = None
    daily_limit: int = Field(default=DEFAULT_DAILY_EMAILS, ge=1)

    @property
    def account_id(self) -> str:
        return f"email:{self.email}"

    @field_validator("email")
    @classmethod
    def _check_email(cls, value: str) -> str:
        try:
            return normalize_email(value)
        except InvalidEmailError as error:
            raise ValueError(str(error)) from None

    @field_validator("smtp_url")
    @classmethod
    def _check_smtp_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError(
                f"invalid SMTP URL {value!r}: expected smtp://HOST:PORT or smtps://HOST:PORT"
            )
        if parts.username or parts.password:
            raise ValueError(
                "SMTP credentials must not be written in the campaign file: remove them from "
                "smtp_url and set SEQUENCER_SMTP_USERNAME and SEQUENCER_SMTP_PASSWORD instead"
            )
        if not parts.hostname:
            raise ValueError(f"invalid SMTP URL {value!r}: the host is missing")
        return value

    @field_validator("imap_url")
    @classmethod
    def _check_imap_url(cls, value: str | None) -> str | None:
        return None if value is None else check_imap_url(value)


def check_imap_url(value: str) -> str:
    """Check an IMAP server URL (imap://HOST[:PORT] or imaps://HOST[:PORT]) and return it.

    Raises ValueError naming the problem. The mailbox read is always INBOX, so a path is
    rejected, and credentials are rejected because they belong in the environment.
    """
    expected = "expected imap://HOST:PORT or imaps://HOST:PORT"
    parts = urlsplit(value)
    if parts.scheme not in ("imap", "imaps"):
        raise ValueError(f"invalid IMAP URL {value!r}: {expected}")
    if parts.username or parts.password:
        raise ValueError(
            "IMAP credentials must not be written in a URL: remove them from the IMAP URL and "
            "set SEQUENCER_IMAP_USERNAME and SEQUENCER_IMAP_PASSWORD instead"
        )
    if not parts.hostname:
        raise ValueError(f"invalid IMAP URL {value!r}: the host is missing")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"invalid IMAP URL {value!r}: the port must be 1 to 65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"invalid IMAP URL {value!r}: remove the path; the engine always reads INBOX"
        )
    return value


class LinkedInAccount(_SendingAccount):
    """The LinkedIn account the provider drives for this campaign, and its limits."""

    account: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
    daily_invites: int = Field(default=DEFAULT_DAILY_INVITES, ge=1)

    @property
    def account_id(self) -> str:
        return f"linkedin:{self.account}"


def slugify(name: str) -> str:
    """Turn a campaign name into the id used in workflow ids and commands."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")


class Campaign(_Model):
    name: str = Field(min_length=1)
    id: str = ""
    sender: Sender | None = None
    linkedin: LinkedInAccount = LinkedInAccount()
    # When steps may run (rule 3); a lead's own timezone replaces the schedule's.
    schedule: SendingSchedule | None = None
    # How long a LinkedIn invitation may stay pending before its message steps fail (rule 9).
    invite_timeout: timedelta = DEFAULT_INVITE_TIMEOUT
    # New leads started per rolling 24 hours; None starts every lead at once.
    max_new_leads_per_day: int | None = Field(default=None, ge=1)
    steps: list[Step] = Field(min_length=1)

    @field_validator("invite_timeout", mode="before")
    @classmethod
    def _parse_invite_timeout(cls, value: Any) -> timedelta:
        delta = _duration(value)
        if delta <= timedelta(0):
            raise ValueError(f"{value!r} is not a positive duration: use one such as 14d")
        return delta

    @field_serializer("invite_timeout")
    def _dump_invite_timeout(self, value: timedelta) -> str:
        return format_duration(value, exact=True)

    @model_validator(mode="before")
    @classmethod
    def _default_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("id") and isinstance(data.get("name"), str):
            slug = slugify(data["name"])
            if not slug:
                raise ValueError(
                    f"cannot derive a campaign id from the name {data['name']!r}: add an `id:` "
                    "field with lower-case letters, digits and dashes"
                )
            data = {**data, "id": slug}
        return data

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if value and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", value):
            raise ValueError(
                f"invalid campaign id {value!r}: use lower-case letters, digits and dashes"
            )
        return value

    @model_validator(mode="after")
    def _check_sender(self) -> Campaign:
        if self.sender is None and Channel.EMAIL in self.channels:
            raise ValueError(MISSING_SENDER)
        return self

    @property
    def channels(self) -> set[Channel]:
        return {step.channel for step in self.steps}

    def variables_by_step(self) -> dict[int, dict[str, list[str]]]:
        """Return, per step number, the required variables (no fallback) of each field."""
        result: dict[int, dict[str, list[str]]] = {}
        for number, step in enumerate(self.steps, start=1):
            for field, template in step.templates().items():
                names = [p.name for p in parse_placeholders(template) if p.fallback is None]
                if names:
                    result.setdefault(number, {})[field] = names
        return result


# The repr that quotes a value in a problem. A YAML alias can repeat a list millions of times
# in a small file, so a full repr could grow far larger than the file.
_VALUE_REPR = reprlib.Repr()
_VALUE_REPR.maxlevel = 2
_VALUE_REPR.maxstring = 80
_VALUE_REPR.maxother = 80
_VALUE_REPR.maxlist = _VALUE_REPR.maxtuple = _VALUE_REPR.maxdict = _VALUE_REPR.maxset = 4

# Examples for the settings that are mappings, shown when a file gives something else.
_MAPPING_EXAMPLES = {
    "schedule": ', such as {timezone: Europe/Paris, days: mon-fri, start: "09:00", end: "17:00"}',
    "linkedin": ", such as {account: default, daily_invites: 25}",
    "sender": ", such as {email: rep@example.com}",
}


def _describe(error: dict[str, Any], data: Any) -> str:
    location = list(error["loc"])
    prefix = ""
    if location[:1] == ["steps"] and len(location) >= 2 and isinstance(location[1], int):
        number = location[1] + 1
        step_type = None
        steps = data.get("steps") if isinstance(data, dict) else None
        if isinstance(steps, list) and location[1] < len(steps):
            raw_step = steps[location[1]]
            step_type = raw_step.get("type") if isinstance(raw_step, dict) else None
        prefix = f"step {number}" + (f" ({step_type})" if isinstance(step_type, str) else "")
        location = location[2:]
        if location and location[0] in {t.value for t in StepType}:
            location = location[1:]
        if error["type"] == "union_tag_invalid":
            allowed = ", ".join(t.value for t in StepType)
            unknown = _VALUE_REPR.repr(step_type)
            return f"{prefix}: type: unknown step type {unknown}; use one of {allowed}"
        if error["type"] == "union_tag_not_found":
            return f"{prefix}: type: missing; every step needs a type such as email or call"
    field = ".".join(str(part) for part in location)
    message = error["msg"]
    if error["type"] == "missing":
        message = "missing"
    elif error["type"] == "extra_forbidden":
        message = "unknown field; check its spelling against the campaign format in the README"
    elif error["type"] == "too_short" and field == "steps":
        message = "a campaign needs at least one step"
    elif error["type"] == "list_type":
        message = "expected a list of steps, each starting with `- type: ...`"
    elif error["type"] in ("greater_than_equal", "greater_than"):
        limit = error.get("ctx", {}).get("ge", error.get("ctx", {}).get("gt"))
        value = _VALUE_REPR.repr(error["input"])
        message = f"invalid value {value}: use a whole number of at least {limit}"
    elif error["type"] == "string_pattern_mismatch":
        message = (
            f"invalid name {_VALUE_REPR.repr(error['input'])}: use letters, digits, dots, "
            "dashes, underscores and @, starting with a letter or digit"
        )
    elif error["type"] in ("model_type", "dict_type", "model_attributes_type"):
        example = _MAPPING_EXAMPLES.get(field, "")
        message = f"expected a mapping of fields, not {_VALUE_REPR.repr(error['input'])}{example}"
    elif error["type"] in ("int_parsing", "int_type", "int_from_float"):
        message = f"invalid value {_VALUE_REPR.repr(error['input'])}: use a whole number"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    where = ": ".join(part for part in (prefix, field) if part)
    return f"{where}: {message}" if where else message


def parse_campaign(data: Any, source: str = "<campaign>") -> Campaign:
    """Validate a campaign from already-parsed YAML or JSON, raising CampaignError."""
    if not isinstance(data, dict):
        raise CampaignError(source, ["the file must be a mapping with name, sender and steps"])
    try:
        return Campaign.model_validate(data)
    except ValidationError as error:
        problems = [_describe(item, data) for item in error.errors()]
        # The sender check runs only once every step is valid, so report it here as well.
        steps = data.get("steps")
        has_email = isinstance(steps, list) and any(
            isinstance(step, dict) and step.get("type") == "email" for step in steps
        )
        if (
            has_email
            and not data.get("sender")
            and not any(p.startswith("sender") for p in problems)
        ):
            problems.insert(0, MISSING_SENDER)
        raise CampaignError(source, problems) from None


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """Describe a YAML syntax error in one line, with its line and column when known."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(error, "problem", None) or str(error)
    return f"{where}invalid YAML: {problem}"


def load_campaign(path: str | Path) -> Campaign:
    """Read and validate a campaign YAML file, raising CampaignError on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CampaignError(str(path), ["file not found; check the path"]) from None
    except UnicodeDecodeError as error:
        raise CampaignError(str(path), [f"the file is not UTF-8 text ({error.reason})"]) from None
    return parse_campaign_text(text, str(path))


class _CampaignLoader(yaml.SafeLoader):
    """PyYAML's safe loader, raising a YAMLError with the line and column for a scalar that
    it cannot construct, where SafeLoader raises a bare ValueError."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as error:
            limit = sys.get_int_max_str_digits()
            if node.tag == "tag:yaml.org,2002:int" and len(str(node.value)) > limit:
                reason = f"an integer of more than {limit} digits"
            else:
                reason = str(error)  # such as "year 0 is out of range" for 0000-01-01
            raise yaml.constructor.ConstructorError(
                problem=(
                    f"invalid value {_VALUE_REPR.repr(node.value)}: {reason}; put quotes "
                    "around it if it is text"
                ),
                problem_mark=node.start_mark,
            ) from None


def parse_campaign_text(text: str, source: str = "<campaign>") -> Campaign:
    """Validate a campaign from YAML text (JSON is YAML too), raising CampaignError."""
    try:
        data = yaml.load(text, Loader=_CampaignLoader)
    except yaml.YAMLError as error:
        raise CampaignError(source, [describe_yaml_error(error)]) from None
    except RecursionError:
        raise CampaignError(
            source,
            ["the YAML nests lists or mappings too deeply: a campaign needs only a few levels"],
        ) from None
    return parse_campaign(data, source)
