"""Parse the durations used by `wait_after` and other campaign settings."""

from __future__ import annotations

import functools
import re
import reprlib
from datetime import timedelta

from pydantic import TypeAdapter, ValidationError

_COMPACT = re.compile(r"(\d+(?:\.\d+)?)\s*([wdhms])", re.IGNORECASE)
_COMPACT_WHOLE = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*[wdhms]\s*)+", re.IGNORECASE)
_UNIT_SECONDS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_ISO = TypeAdapter(timedelta)
# The repr that quotes a value of another type in messages. A YAML alias can repeat a list
# millions of times in a small file, so a full repr could grow far larger than the file.
_VALUE_REPR = reprlib.Repr()
_VALUE_REPR.maxlevel = 2
_VALUE_REPR.maxlist = _VALUE_REPR.maxtuple = _VALUE_REPR.maxdict = _VALUE_REPR.maxset = 4


def parse_duration(value: str | int | float | timedelta) -> timedelta:
    """Parse `2d`, `36h`, `90m`, `45s`, combinations such as `1d12h`, or ISO 8601 (`P2D`).

    A bare number is a count of seconds. Raises ValueError with the accepted forms.
    """
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(
            f"invalid duration {_VALUE_REPR.repr(value)}: use a form such as 2d, 36h, 90m, 45s "
            "or P2D"
        )
    elif isinstance(value, int | float):
        result = _from_seconds(value, value)
    else:
        result = _parse_text(value)
    if result < timedelta(0):
        raise ValueError(f"invalid duration {value!r}: a duration cannot be negative")
    return result


# Workers decode the same few durations again for each payload of a lead: cache the parses.
@functools.lru_cache(maxsize=1024)
def _parse_text(value: str) -> timedelta:
    text = value.strip()
    if _COMPACT_WHOLE.fullmatch(text):
        seconds = sum(
            float(amount) * _UNIT_SECONDS[unit.lower()] for amount, unit in _COMPACT.findall(text)
        )
        return _from_seconds(seconds, value)
    if text[:1].upper() == "P":
        try:
            return _ISO.validate_python(text.upper())
        except ValidationError:
            raise ValueError(
                f"invalid ISO 8601 duration {value!r}: expected a form such as P2D or PT36H"
            ) from None
    raise ValueError(f"invalid duration {value!r}: use a form such as 2d, 36h, 90m, 45s or P2D")


def _from_seconds(seconds: int | float, value: object) -> timedelta:
    """Convert a count of seconds, raising ValueError for NaN, a negative count and a count
    that timedelta cannot hold."""
    if seconds != seconds:
        raise ValueError(f"invalid duration {value!r}: use a count of seconds or a form such as 2d")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: a duration cannot be negative")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(
            f"invalid duration {value!r}: the maximum is {timedelta.max.days} days"
        ) from None


def format_duration(delta: timedelta, exact: bool = False) -> str:
    """Format a duration in the compact form (`2d`, `1d12h`, `45s`), `0s` for zero.

    Fractions of a second are dropped, unless `exact` (`1.5s`): campaign files are saved and
    sent to workflows exactly, so that parsing the text gives the same duration back.
    """
    seconds, micros = divmod(delta // timedelta(microseconds=1), 1_000_000)
    if not exact:
        micros = 0
    if seconds == 0 and micros == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        amount, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if unit == "s" and micros:
            parts.append(f"{amount}.{micros:06d}".rstrip("0") + "s")
        elif amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)
