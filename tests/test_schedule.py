"""Sending schedules: parsing, rejection messages, and openings across DST changes.

The property tests compare `next_opening` with a brute-force search: the first minute at or
after the due instant that `allows` accepts. That search is exact here because every window
edge and every DST change in these zones falls on a whole minute.
"""

from __future__ import annotations

import ast
import bisect
import json
from datetime import UTC, datetime, time, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from pydantic import ValidationError

from sequencer.schedule import SendingSchedule

MINUTE = timedelta(minutes=1)
# Not a whole number of minutes, so that due instants also fall between minutes.
DUE_STEP = timedelta(minutes=7, seconds=13)

# (timezone, instant of the 2026 change in UTC). Asia/Kolkata has no DST, so its instant is
# only the middle of the week under test.
CHANGES = [
    pytest.param("Europe/Paris", datetime(2026, 3, 29, 1, 0, tzinfo=UTC), id="paris-march"),
    pytest.param("Europe/Paris", datetime(2026, 10, 25, 1, 0, tzinfo=UTC), id="paris-october"),
    pytest.param("America/New_York", datetime(2026, 3, 8, 7, 0, tzinfo=UTC), id="new-york-march"),
    pytest.param(
        "America/New_York", datetime(2026, 11, 1, 6, 0, tzinfo=UTC), id="new-york-november"
    ),
    pytest.param(
        "Australia/Lord_Howe", datetime(2026, 4, 4, 15, 0, tzinfo=UTC), id="lord-howe-april"
    ),
    pytest.param(
        "Australia/Lord_Howe", datetime(2026, 10, 3, 15, 30, tzinfo=UTC), id="lord-howe-october"
    ),
    pytest.param("Asia/Kolkata", datetime(2026, 3, 29, 0, 0, tzinfo=UTC), id="kolkata-no-dst"),
]

# (start, end, days)
WINDOWS = [
    pytest.param("09:00", "17:00", "mon-fri", id="office-hours"),
    pytest.param("01:30", "03:30", "mon-sun", id="around-change"),
    pytest.param("00:00", "01:00", "mon-sun", id="after-midnight"),
    pytest.param("02:15", "02:45", "mon-sun", id="inside-change-hour"),
]


def build_schedule(timezone: str = "Europe/Paris", **fields: Any) -> SendingSchedule:
    values: dict[str, Any] = {"timezone": timezone, "start": "09:00", "end": "17:00"}
    return SendingSchedule.model_validate({**values, **fields})


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def instants_between(first: datetime, last: datetime, step: timedelta) -> list[datetime]:
    """Return the instants from `first` (included) to `last` (excluded), `step` apart."""
    instants = []
    instant = first
    while instant < last:
        instants.append(instant)
        instant += step
    return instants


# Parsing and serialization


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        pytest.param(["mon", "tue"], (0, 1), id="list"),
        pytest.param(["Monday", "FRIDAY", "sat"], (0, 4, 5), id="full-names-any-case"),
        pytest.param("mon-fri", (0, 1, 2, 3, 4), id="range"),
        pytest.param("mon-fri, sun", (0, 1, 2, 3, 4, 6), id="range-and-day"),
        pytest.param("Mon - Wed,fri", (0, 1, 2, 4), id="spaces-around-dash"),
        pytest.param(["mon-wed", "fri"], (0, 1, 2, 4), id="list-with-range"),
        pytest.param("fri-mon", (0, 4, 5, 6), id="range-past-sunday"),
        pytest.param("tues, thurs", (1, 3), id="longer-abbreviations"),
        pytest.param(["sun", "sun", "mon"], (0, 6), id="repeats"),
        pytest.param("sun-sat", (0, 1, 2, 3, 4, 5, 6), id="whole-week"),
    ],
)
def test_days_forms(days: Any, expected: tuple[int, ...]) -> None:
    assert build_schedule(days=days).days == expected


def test_days_default_monday_to_friday() -> None:
    assert build_schedule().days == (0, 1, 2, 3, 4)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("09:00", time(9, 0), id="padded"),
        pytest.param("9:30", time(9, 30), id="unpadded"),
        pytest.param(" 9:30 ", time(9, 30), id="spaces"),
        pytest.param("17:00:30", time(17, 0, 30), id="seconds"),
        pytest.param("9", time(9, 0), id="hour-string"),
        pytest.param(9, time(9, 0), id="hour-int"),
        pytest.param(0, time(0, 0), id="midnight-int"),
        pytest.param(time(8, 15), time(8, 15), id="time-object"),
        pytest.param(570, time(9, 30), id="yaml-base-60"),
    ],
)
def test_time_forms(value: Any, expected: time) -> None:
    assert build_schedule(start=value, end="23:59").start == expected


def test_yaml_unquoted_times() -> None:
    # PyYAML reads unquoted 9:30 and 17:00 as base-60 integers, and 09:00 as a string.
    data = yaml.safe_load("timezone: Europe/Paris\ndays: mon-fri, sun\nstart: 9:30\nend: 17:00\n")
    assert data["start"] == 570

    loaded = SendingSchedule.model_validate(data)

    assert loaded.start == time(9, 30)
    assert loaded.end == time(17, 0)
    assert loaded.days == (0, 1, 2, 3, 4, 6)


def test_dump_is_readable() -> None:
    loaded = build_schedule(days=["sun", "mon", "tue", "wed"], start=9, end="17:30:15")

    assert loaded.model_dump() == {
        "timezone": "Europe/Paris",
        "days": "mon-wed, sun",
        "start": "09:00",
        "end": "17:30:15",
    }


def test_dump_round_trip() -> None:
    original = build_schedule("Asia/Kolkata", days="fri-mon", start="8:00", end="12:00")

    assert SendingSchedule.model_validate(original.model_dump()) == original
    assert SendingSchedule.model_validate_json(original.model_dump_json()) == original
    assert json.loads(original.model_dump_json())["days"] == "mon, fri-sun"


def test_timezone_name_trimmed() -> None:
    assert build_schedule(" Europe/Paris ").timezone == "Europe/Paris"


def test_describe_formats_window() -> None:
    assert build_schedule().describe() == "Mon-Fri 09:00-17:00 Europe/Paris"
    assert (
        build_schedule("Asia/Kolkata", days="mon-fri, sun", start="1:30", end="3:30").describe()
        == "Mon-Fri, Sun 01:30-03:30 Asia/Kolkata"
    )


# Rejections


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {"timezone": "Europe/Pariss"},
            "unknown timezone 'Europe/Pariss': use an IANA name such as Europe/Paris",
            id="misspelled-timezone",
        ),
        pytest.param(
            {"timezone": "america/new_york"},
            "unknown timezone 'america/new_york': use an IANA name such as America/New_York",
            id="timezone-case",
        ),
        pytest.param({"timezone": "Mars/Olympus"}, "unknown timezone 'Mars/Olympus'", id="no-zone"),
        pytest.param({"timezone": ""}, "unknown timezone ''", id="empty-timezone"),
        pytest.param({"timezone": "localtime"}, "unknown timezone 'localtime'", id="host-zone"),
        pytest.param({"timezone": "../etc/passwd"}, "unknown timezone '../etc/passwd'", id="path"),
        pytest.param(
            {"start": "22:00", "end": "06:00"},
            "invalid window 22:00-06:00: start must be earlier than end",
            id="overnight",
        ),
        pytest.param(
            {"start": "09:00", "end": "9"}, "invalid window 09:00-09:00", id="empty-window"
        ),
        pytest.param({"days": []}, "no sending days: give at least one day", id="no-days"),
        pytest.param({"days": " , "}, "no sending days", id="blank-days"),
        pytest.param({"days": ["mon", "funday"]}, "unknown day 'funday'", id="unknown-day"),
        pytest.param({"days": "mon-fry"}, "unknown day 'fry'", id="unknown-day-in-range"),
        pytest.param({"days": "mo"}, "unknown day 'mo'", id="two-letters"),
        pytest.param({"days": "mon-"}, "invalid day range 'mon-'", id="open-range"),
        pytest.param({"days": "mon-wed-fri"}, "invalid day range 'mon-wed-fri'", id="two-dashes"),
        pytest.param({"days": [1, 2]}, "invalid day 1: use a day name", id="day-number"),
        pytest.param({"days": 5}, "invalid days 5", id="days-not-a-list"),
        pytest.param({"start": "25:00"}, "invalid time '25:00'", id="hour-25"),
        pytest.param({"start": "9:75"}, "invalid time '9:75'", id="minute-75"),
        pytest.param({"start": "9h"}, "invalid time '9h'", id="unit-suffix"),
        pytest.param({"start": "9am"}, "invalid time '9am'", id="am"),
        pytest.param({"start": 24}, "invalid time 24", id="int-24"),
        pytest.param({"start": 1440}, "invalid time 1440", id="yaml-24-00"),
        pytest.param({"start": 9.5}, "invalid time 9.5", id="float"),
        pytest.param({"start": True}, "invalid time True", id="bool"),
        pytest.param(
            {"start": time(9, tzinfo=UTC)}, "invalid time '09:00:00+00:00'", id="aware-time"
        ),
        pytest.param(
            {"start": time(9, 0, 0, 500)}, "invalid time '09:00:00.000500'", id="microseconds"
        ),
    ],
)
def test_rejection_names_value(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as info:
        build_schedule(**fields)

    assert expected in str(info.value)


def test_unknown_field_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        build_schedule(weekdays="mon-fri")

    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_start_required() -> None:
    with pytest.raises(ValidationError) as info:
        SendingSchedule.model_validate({"timezone": "Europe/Paris", "end": "17:00"})

    assert info.value.errors()[0]["loc"] == ("start",)
    assert info.value.errors()[0]["type"] == "missing"


def test_naive_datetime_rejected() -> None:
    naive = datetime(2026, 3, 10, 9, 0)

    with pytest.raises(ValueError, match="naive datetime 2026-03-10T09:00:00"):
        build_schedule().allows(naive)
    with pytest.raises(ValueError, match="naive datetime 2026-03-10T09:00:00"):
        build_schedule().next_opening(naive)


def test_module_stays_pure() -> None:
    # Workflow code calls this module, so it must stay pure: no Temporal and no clock.
    source = Path(__file__).parents[1] / "sequencer" / "schedule.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}

    assert not any(name.split(".")[0] == "temporalio" for name in modules)
    assert not {"now", "utcnow", "today", "monotonic"} & attributes


# Openings on ordinary days


def test_allowed_instant_returned_in_utc() -> None:
    due = datetime(2026, 3, 10, 10, 0, tzinfo=ZoneInfo("Europe/Paris"))

    opening = build_schedule().next_opening(due)

    assert opening == due
    assert opening.tzinfo is UTC


def test_window_edges() -> None:
    office = build_schedule()

    # 09:00 CET is 08:00 UTC on Tuesday 10 March 2026. The end is exclusive.
    assert office.allows(utc(2026, 3, 10, 8, 0))
    assert not office.allows(utc(2026, 3, 10, 7, 59, 59))
    assert office.allows(utc(2026, 3, 10, 15, 59, 59))
    assert not office.allows(utc(2026, 3, 10, 16, 0))


def test_evening_due_moves_to_morning() -> None:
    opening = build_schedule().next_opening(utc(2026, 3, 10, 18, 30))

    assert opening == utc(2026, 3, 11, 8, 0)


def test_friday_evening_moves_to_monday() -> None:
    opening = build_schedule().next_opening(utc(2026, 3, 13, 16, 0))

    assert opening == utc(2026, 3, 16, 8, 0)


def test_fraction_of_second_before_opening() -> None:
    opening = build_schedule().next_opening(utc(2026, 3, 10, 7, 59, 59) + timedelta(microseconds=1))

    assert opening == utc(2026, 3, 10, 8, 0)


def test_kolkata_half_hour_offset() -> None:
    kolkata = build_schedule("Asia/Kolkata")

    # Friday 27 March 2026, 17:30 IST (UTC+05:30), is after the window, so the send moves
    # to Monday 30 March, 09:00 IST.
    assert kolkata.next_opening(utc(2026, 3, 27, 12, 0)) == utc(2026, 3, 30, 3, 30)
    assert kolkata.next_opening(utc(2026, 3, 30, 3, 0)) == utc(2026, 3, 30, 3, 30)


def test_single_day_window() -> None:
    sundays = build_schedule(days="sun", start="10:00", end="10:05")

    assert sundays.next_opening(utc(2026, 3, 15, 9, 5)) == utc(2026, 3, 22, 9, 0)


def test_skipped_date_moves_to_next_week() -> None:
    # Samoa moved across the date line after Thursday 29 December 2011, so Friday 30
    # December never happened in Pacific/Apia.
    fridays = build_schedule("Pacific/Apia", days="fri")

    opening = fridays.next_opening(utc(2011, 12, 29, 20, 0))

    # Friday 6 January 2012, 09:00 at UTC+14:00.
    assert opening == utc(2012, 1, 5, 19, 0)


# Openings across DST changes


def test_start_in_gap_opens_at_change() -> None:
    # On 29 March 2026 Paris clocks jump from 02:00 CET to 03:00 CEST (01:00 UTC), so 02:30
    # never happens and the first instant with a local time of 02:30 or later is 03:00 CEST.
    paris = build_schedule(days="mon-sun", start="02:30", end="04:00")

    opening = paris.next_opening(utc(2026, 3, 29, 0, 0))

    assert opening == utc(2026, 3, 29, 1, 0)
    assert opening.astimezone(ZoneInfo("Europe/Paris")).time() == time(3, 0)


def test_window_inside_gap_skips_day() -> None:
    paris = build_schedule(days="mon-sun", start="02:15", end="02:45")

    opening = paris.next_opening(utc(2026, 3, 29, 0, 0))

    # 02:15 CEST on Monday 30 March.
    assert opening == utc(2026, 3, 30, 0, 15)


def test_repeated_hour_allowed_twice() -> None:
    # On 1 November 2026 New York clocks go back from 02:00 EDT to 01:00 EST (06:00 UTC),
    # so 01:00 to 02:00 happens twice. The window reads only the wall clock.
    new_york = build_schedule("America/New_York", days="mon-sun", start="01:30", end="03:30")

    assert new_york.allows(utc(2026, 11, 1, 5, 40))  # 01:40 EDT
    assert not new_york.allows(utc(2026, 11, 1, 6, 10))  # 01:10 EST
    assert new_york.allows(utc(2026, 11, 1, 6, 40))  # 01:40 EST


def test_window_reopens_in_repeated_hour() -> None:
    new_york = build_schedule("America/New_York", days="mon-sun", start="00:00", end="01:30")

    # 01:45 EDT is after the window, but the clocks go back to 01:00 EST fifteen minutes
    # later, and 01:00 EST is inside the window again.
    opening = new_york.next_opening(utc(2026, 11, 1, 5, 45))

    assert opening == utc(2026, 11, 1, 6, 0)


def test_fall_back_morning_window() -> None:
    # 25 October 2026: Paris goes back to CET (UTC+01:00) at 01:00 UTC, before a 09:00 start.
    paris = build_schedule(days="mon-sun")

    assert paris.next_opening(utc(2026, 10, 25, 6, 0)) == utc(2026, 10, 25, 8, 0)
    assert paris.next_opening(utc(2026, 10, 24, 16, 0)) == utc(2026, 10, 25, 8, 0)


def test_lord_howe_half_hour_fall_back() -> None:
    # On 5 April 2026 Lord Howe clocks go back from 02:00 (UTC+11:00) to 01:30
    # (UTC+10:30), at 15:00 UTC on 4 April.
    lord_howe = build_schedule("Australia/Lord_Howe", days="mon-sun", start="01:45", end="03:00")

    assert lord_howe.allows(utc(2026, 4, 4, 14, 50))  # 01:50 UTC+11:00
    assert lord_howe.next_opening(utc(2026, 4, 4, 15, 0)) == utc(2026, 4, 4, 15, 15)


def test_lord_howe_half_hour_spring_forward() -> None:
    # On 4 October 2026 Lord Howe clocks jump from 02:00 (UTC+10:30) to 02:30 (UTC+11:00),
    # at 15:30 UTC on 3 October, so a 02:10 start opens at the change.
    lord_howe = build_schedule("Australia/Lord_Howe", days="mon-sun", start="02:10", end="03:00")

    assert lord_howe.next_opening(utc(2026, 10, 3, 15, 0)) == utc(2026, 10, 3, 15, 30)


@pytest.mark.parametrize(("timezone", "change"), CHANGES)
def test_change_instants_are_real(timezone: str, change: datetime) -> None:
    zone = ZoneInfo(timezone)
    before = (change - timedelta(seconds=1)).astimezone(zone).utcoffset()
    after = change.astimezone(zone).utcoffset()

    if timezone == "Asia/Kolkata":
        assert before == after == timedelta(hours=5, minutes=30)
    else:
        assert before != after


@pytest.mark.parametrize(("start", "end", "days"), WINDOWS)
@pytest.mark.parametrize(("timezone", "change"), CHANGES)
def test_opening_matches_brute_force(
    timezone: str, change: datetime, start: str, end: str, days: str
) -> None:
    window = build_schedule(timezone, days=days, start=start, end=end)
    first_due = change - timedelta(days=2)
    last_due = change + timedelta(days=2)
    # Four more days cover the longest wait, from a Friday evening to a Monday morning.
    allowed_minutes = [
        minute
        for minute in instants_between(first_due, last_due + timedelta(days=4), MINUTE)
        if window.allows(minute)
    ]

    for due in instants_between(first_due, last_due, DUE_STEP):
        opening = window.next_opening(due)
        first_allowed = allowed_minutes[bisect.bisect_left(allowed_minutes, due)]
        expected = due if window.allows(due) else first_allowed

        assert opening >= due, f"due {due}"
        assert window.allows(opening), f"due {due}, opening {opening}"
        assert opening == expected, f"due {due}: an allowed minute comes before {opening}"
        assert window.next_opening(opening) == opening, f"due {due}"


@pytest.mark.parametrize("wait", [timedelta(minutes=30), timedelta(hours=5), timedelta(hours=25)])
@pytest.mark.parametrize(("start", "end", "days"), WINDOWS[:2])
@pytest.mark.parametrize(("timezone", "change"), CHANGES)
def test_sends_allowed_and_never_repeated(
    timezone: str, change: datetime, start: str, end: str, days: str, wait: timedelta
) -> None:
    # As in the lead machine, each step falls due `wait` of calendar time after the previous
    # send, and the send moves to the next opening.
    window = build_schedule(timezone, days=days, start=start, end=end)
    send = window.next_opening(change - timedelta(days=3))
    sends = [send]
    while send < change + timedelta(days=4):
        due = send + wait
        send = window.next_opening(due)
        assert send >= due
        sends.append(send)

    assert all(window.allows(send) for send in sends)
    assert all(earlier < later for earlier, later in pairwise(sends))
    assert len(set(sends)) == len(sends)


def test_sends_in_repeated_hour_distinct() -> None:
    # Steps due every 30 minutes through the New York fall-back: 01:00 and 01:30 each happen
    # twice, and each occurrence takes one step.
    new_york = build_schedule("America/New_York", days="mon-sun", start="01:00", end="02:00")
    send = new_york.next_opening(utc(2026, 11, 1, 0, 0))
    sends = [send]
    for _ in range(4):
        sends.append(new_york.next_opening(sends[-1] + timedelta(minutes=30)))

    assert sends == [
        utc(2026, 11, 1, 5, 0),  # 01:00 EDT
        utc(2026, 11, 1, 5, 30),  # 01:30 EDT
        utc(2026, 11, 1, 6, 0),  # 01:00 EST
        utc(2026, 11, 1, 6, 30),  # 01:30 EST
        utc(2026, 11, 2, 6, 0),  # 01:00 EST the next day
    ]


# The lead's timezone


def test_lead_timezone_overrides_campaign() -> None:
    paris = build_schedule(days="mon-fri, sun", start="09:00", end="17:00")
    due = utc(2026, 3, 16, 12, 0)  # 13:00 in Paris, 08:00 EDT in New York

    lead = paris.in_timezone("America/New_York")

    assert paris.allows(due)
    assert not lead.allows(due)
    assert lead.next_opening(due) == utc(2026, 3, 16, 13, 0)
    assert lead.timezone == "America/New_York"
    assert (lead.days, lead.start, lead.end) == (paris.days, paris.start, paris.end)


@pytest.mark.parametrize("timezone", [None, "", "  ", "Europe/Paris"])
def test_lead_timezone_absent_keeps_schedule(timezone: str | None) -> None:
    paris = build_schedule()

    assert paris.in_timezone(timezone) is paris


def test_lead_timezone_trimmed() -> None:
    assert build_schedule().in_timezone(" Asia/Kolkata ").timezone == "Asia/Kolkata"


def test_lead_timezone_unknown_rejected() -> None:
    with pytest.raises(ValueError, match="unknown timezone 'Mars/Olympus'"):
        build_schedule().in_timezone("Mars/Olympus")
