"""Sending schedules: the weekly window in which a campaign's steps may run.

A schedule is a timezone, a set of weekdays and a daily window from `start` (inclusive) to
`end` (exclusive), both local wall-clock times. `allows` reads only the wall clock, and
`next_opening` moves a due instant to the earliest instant that `allows` accepts. Waits
between steps count in calendar time, so only the send moves, never the next step's wait.

Daylight saving time, where the window meets a change:
- A wall-clock time skipped by a spring-forward change never happens, so a window that
  starts inside the gap opens at the change itself. For example, a 02:30 start in
  Europe/Paris on 29 March 2026 opens at 03:00 CEST. A window that lies wholly inside the
  gap has no opening that day.
- A wall-clock time repeated by a fall-back change is allowed both times, so a window that
  overlaps the repeated hour is longer that day. When `start` or `end` lies inside the
  repeated hour, the window closes and opens again. For example, 00:00-01:30 in
  America/New_York on 1 November 2026 is open from 00:00 to 01:30 EDT, closed until the
  clocks go back, then open from 01:00 to 01:30 EST. Each due instant still maps to one
  send, so no step runs twice.

This module is pure: it never reads the clock and never imports `temporalio`, so workflow
code can call it.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from datetime import timezone as timezone_type
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict, field_serializer, field_validator, model_validator

DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONDAY_TO_FRIDAY = (0, 1, 2, 3, 4)

# Files in the zoneinfo folder that load like zones but depend on the host's configuration.
_HOST_SPECIFIC_ZONES = frozenset({"localtime", "posixrules"})
_TIME_PATTERN = re.compile(r"(\d{1,2})(?::(\d{2}))?(?::(\d{2}))?")
_ONE_DAY = timedelta(days=1)
_ONE_SECOND = timedelta(seconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A weekly window opens within 7 days of any instant, or within 14 when a DST gap or a date
# skipped by a zone (Pacific/Apia skipped 30 December 2011) removes one week's window.
_SEARCH_DAYS = 15


class SendingSchedule(BaseModel):
    """A weekly sending window in one IANA timezone: the `schedule:` mapping of a campaign."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timezone: str
    # Allowed weekdays as `date.weekday()` numbers (Monday is 0), sorted and without repeats.
    # The campaign file names them instead: `[mon, tue]`, `mon-fri` or `mon-fri, sun`.
    days: tuple[int, ...] = MONDAY_TO_FRIDAY
    start: time
    end: time

    @field_validator("timezone", mode="before")
    @classmethod
    def _check_timezone(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            load_zone(value)
        return value

    @field_validator("days", mode="before")
    @classmethod
    def _parse_days(cls, value: Any) -> tuple[int, ...]:
        return parse_days(value)

    @field_validator("start", "end", mode="before")
    @classmethod
    def _parse_time(cls, value: Any) -> time:
        return parse_time(value)

    @model_validator(mode="after")
    def _check_window(self) -> SendingSchedule:
        if self.start >= self.end:
            raise ValueError(
                f"invalid window {format_time(self.start)}-{format_time(self.end)}: start must "
                "be earlier than end, because a window cannot run past midnight"
            )
        return self

    @field_serializer("days")
    def _dump_days(self, value: tuple[int, ...]) -> str:
        return format_days(value)

    @field_serializer("start", "end")
    def _dump_time(self, value: time) -> str:
        return format_time(value)

    @property
    def zone(self) -> ZoneInfo:
        return load_zone(self.timezone)

    def describe(self) -> str:
        """Describe the window for reports, such as `Mon-Fri 09:00-17:00 Europe/Paris`."""
        days = format_days(self.days).title()
        return f"{days} {format_time(self.start)}-{format_time(self.end)} {self.timezone}"

    def in_timezone(self, timezone: str | None) -> SendingSchedule:
        """Return the same window in another timezone, such as the lead's own.

        None or a blank name returns this schedule. An unknown name raises ValueError.
        """
        name = (timezone or "").strip()
        if not name or name == self.timezone:
            return self
        load_zone(name)
        return self.model_copy(update={"timezone": name})

    def allows(self, instant: datetime) -> bool:
        """Check whether the wall-clock time of `instant`, in this timezone, is in the window.

        Raises ValueError for a naive datetime.
        """
        _require_aware(instant)
        local = instant.astimezone(self.zone)
        return local.weekday() in self.days and self.start <= local.time() < self.end

    def next_opening(self, instant: datetime) -> datetime:
        """Return the earliest instant at or after `instant` that `allows` accepts, in UTC.

        An allowed `instant` comes back as the same instant, converted to UTC. Raises
        ValueError for a naive datetime.
        """
        _require_aware(instant)
        zone = self.zone
        cursor = instant.astimezone(UTC)
        horizon = cursor + _SEARCH_DAYS * _ONE_DAY

        # Walk forward one piece at a time. A piece lasts at most a day and has one UTC
        # offset, so its wall-clock times are the UTC times plus that offset.
        while cursor < horizon:
            offset = _utc_offset(zone, cursor)
            piece_end = _end_of_offset(zone, cursor, offset, cursor + _ONE_DAY)
            opening = self._first_opening(cursor, piece_end, offset)
            if opening is not None:
                return opening
            cursor = piece_end

        raise RuntimeError(
            f"no opening of {self.describe()} within {_SEARCH_DAYS} days after "
            f"{instant.isoformat()}: this is a bug in sequencer.schedule"
        )

    def _first_opening(
        self, piece_start: datetime, piece_end: datetime, offset: timedelta
    ) -> datetime | None:
        """Return the earliest allowed instant in [piece_start, piece_end), or None.

        The UTC offset must be `offset` throughout the piece.
        """
        first_local = piece_start.replace(tzinfo=None) + offset
        end_local = piece_end.replace(tzinfo=None) + offset
        day = first_local.date()
        while day <= end_local.date():
            if day.weekday() in self.days:
                opens = max(datetime.combine(day, self.start), first_local)
                closes = min(datetime.combine(day, self.end), end_local)
                if opens < closes:
                    return (opens - offset).replace(tzinfo=UTC)
            day += _ONE_DAY
        return None


def _require_aware(instant: datetime) -> None:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(
            f"naive datetime {instant.isoformat()}: pass a timezone-aware datetime, "
            "such as one with tzinfo=datetime.UTC"
        )


def _utc_offset(zone: ZoneInfo, instant: datetime) -> timedelta:
    offset = instant.astimezone(zone).utcoffset()
    assert offset is not None  # a ZoneInfo always has an offset for an aware datetime
    return offset


def _end_of_offset(zone: ZoneInfo, start: datetime, offset: timedelta, limit: datetime) -> datetime:
    """Return the first instant after `start` whose UTC offset is not `offset`, or `limit`.

    `offset` must be the offset at `start`. The search assumes at most one change between
    `start` and `limit`, which holds for one day: no zone in tzdata 2025b changes its offset
    twice within 95 hours. Changes happen on whole seconds, so the bisection counts seconds.
    """
    if _utc_offset(zone, limit) == offset:
        return limit

    # Invariant: the offset at second `before` is `offset`, and at second `after` it is not.
    before = (start - _EPOCH) // _ONE_SECOND
    after = -((_EPOCH - limit) // _ONE_SECOND)
    while after - before > 1:
        middle = (before + after) // 2
        if _utc_offset(zone, _EPOCH + middle * _ONE_SECOND) == offset:
            before = middle
        else:
            after = middle
    return _EPOCH + after * _ONE_SECOND


@cache
def load_zone(name: str) -> ZoneInfo:
    """Load an IANA timezone, raising ValueError with a suggestion when the name is unknown."""
    if name not in _HOST_SPECIFIC_ZONES:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass

    known = available_timezones() - _HOST_SPECIFIC_ZONES
    if not known:
        raise ValueError(
            f"cannot load timezone {name!r}: no IANA timezone database found, so install "
            "the tzdata package or the operating system's tzdata"
        )
    by_lower_case = {known_name.lower(): known_name for known_name in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower_case), n=1)
    suggestion = by_lower_case[close[0]] if close else "Europe/Paris"
    raise ValueError(f"unknown timezone {name!r}: use an IANA name such as {suggestion}")


def local_instant(day: date, at: time, timezone: str | None) -> datetime:
    """Return the UTC instant of the wall-clock time `at` on `day` in an IANA timezone.

    An unknown or missing timezone counts as UTC. A time skipped by a DST change counts as
    the same wall-clock time in the offset before the change (PEP 495, fold=0).
    """
    zone: ZoneInfo | timezone_type = UTC
    if timezone:
        try:
            zone = load_zone(timezone)
        except ValueError:
            zone = UTC
    return datetime.combine(day, at, zone).astimezone(UTC)


def parse_time(value: Any) -> time:
    """Parse a local wall-clock time: `09:00`, `9:30`, `17:00:30`, an hour such as 9, or a time.

    PyYAML (YAML 1.1) reads an unquoted `9:30` as the base-60 integer 570 and an unquoted
    `17:00` as 1020, so integers from 60 to 1439 are read as minutes after midnight.
    """
    if isinstance(value, time):
        if value.tzinfo is not None or value.microsecond:
            raise ValueError(
                f"invalid time {value.isoformat()!r}: use a wall-clock time in whole seconds "
                "with no timezone, such as 09:00"
            )
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= 23:
            return time(value)
        if 60 <= value < 24 * 60:
            hours, minutes = divmod(value, 60)
            return time(hours, minutes)
        raise ValueError(
            f"invalid time {_quote(value)}: use an hour from 0 to 23 or a quoted time such as "
            "'09:30'"
        )
    if isinstance(value, str):
        match = _TIME_PATTERN.fullmatch(value.strip())
        if match:
            hour, minute, second = (int(part) if part else 0 for part in match.groups())
            if hour < 24 and minute < 60 and second < 60:
                return time(hour, minute, second)
    raise ValueError(
        f"invalid time {_quote(value)}: use HH:MM on a 24-hour clock, from 00:00 to 23:59, "
        "such as 09:00 or 17:30"
    )


# A YAML alias can repeat a list millions of times in a small file: quote values shortened.
_VALUE_REPR = reprlib.Repr()
_VALUE_REPR.maxlevel = 2
_VALUE_REPR.maxstring = _VALUE_REPR.maxother = 80
_VALUE_REPR.maxlist = _VALUE_REPR.maxtuple = _VALUE_REPR.maxdict = _VALUE_REPR.maxset = 4


def _quote(value: Any) -> str:
    return _VALUE_REPR.repr(value)


def format_time(value: time) -> str:
    """Format a time as `HH:MM`, or `HH:MM:SS` when it has seconds."""
    return value.isoformat(timespec="seconds" if value.second else "minutes")


def parse_days(value: Any) -> tuple[int, ...]:
    """Parse weekdays into sorted `date.weekday()` numbers.

    Accepts a list of names (`[mon, tue]`) or a string of names and ranges (`mon-fri, sun`),
    in any case, with three-letter or full English names. A range may wrap past Sunday, as
    in `fri-mon`. Numbers are rejected, because conventions differ on which day is 0.
    """
    if isinstance(value, str):
        items: Iterable[Any] = [value]
    elif isinstance(value, list | tuple | set | frozenset):
        items = value
    else:
        raise ValueError(
            f"invalid days {_quote(value)}: use a list such as [mon, tue] or a range such as "
            "mon-fri"
        )

    days: set[int] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(
                f"invalid day {_quote(item)}: use a day name such as mon or monday, because day "
                "numbers differ between conventions"
            )
        # Join `mon - fri` into `mon-fri`, then split on commas and spaces.
        joined = re.sub(r"\s*-\s*", "-", item.strip())
        for part in re.split(r"[,\s]+", joined):
            if part:
                days.update(_parse_day_range(part))

    if not days:
        raise ValueError("no sending days: give at least one day, such as mon-fri")
    return tuple(sorted(days))


def _parse_day_range(text: str) -> list[int]:
    if "-" not in text:
        return [_parse_day(text)]
    first_name, _, last_name = text.partition("-")
    if not first_name or not last_name or "-" in last_name:
        raise ValueError(f"invalid day range {text!r}: use a form such as mon-fri")
    first = _parse_day(first_name)
    length = (_parse_day(last_name) - first) % 7 + 1
    return [(first + index) % 7 for index in range(length)]


def _parse_day(name: str) -> int:
    key = name.lower()
    for number, full_name in enumerate(DAY_NAMES):
        # Three letters or more of the full name: mon, tues, thurs, saturday.
        if len(key) >= 3 and full_name.startswith(key):
            return number
    raise ValueError(
        f"unknown day {name!r}: use mon, tue, wed, thu, fri, sat, sun or the full English name"
    )


def format_days(days: Iterable[int]) -> str:
    """Format weekday numbers as names and ranges, such as `mon-fri, sun`, for parse_days."""
    runs: list[list[int]] = []
    for day in sorted(set(days)):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])

    parts = []
    for run in runs:
        names = [DAY_NAMES[day][:3] for day in run]
        if len(run) >= 3:
            parts.append(f"{names[0]}-{names[-1]}")
        else:
            parts.extend(names)
    return ", ".join(parts)
