"""Parse the durations used by `wait_after` and other campaign settings."""

from __future__ import annotations

import re
from datetime import timedelta

from pydantic import TypeAdapter, ValidationError

_COMPACT = re.compile(r"(\d+(?:\.\d+)?)\s*([wdhms])", re.IGNORECASE)
_COMPACT_WHOLE = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*[wdhms]\s*)+", re.IGNORECASE)
_UNIT_SECONDS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_ISO = TypeAdapter(timedelta)


def parse_duration(value: str | int | float | timedelta) -> timedelta:
    """Parse `2d`, `36h`, `90m`, `45s`, combinations such as `1d12h`, or ISO 8601 (`P2D`).

    A bare number is a count of seconds. Raises ValueError with the accepted forms.
    """
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: use a form such as 2d, 36h, 90m, 45s or P2D")
    elif isinstance(value, int | float):
        result = timedelta(seconds=value)
    else:
        text = value.strip()
        if _COMPACT_WHOLE.fullmatch(text):
            seconds = sum(
                float(amount) * _UNIT_SECONDS[unit.lower()]
                for amount, unit in _COMPACT.findall(text)
            )
            result = timedelta(seconds=seconds)
        elif text[:1].upper() == "P":
            try:
                result = _ISO.validate_python(text.upper())
            except ValidationError:
                raise ValueError(
                    f"invalid ISO 8601 duration {value!r}: expected a form such as P2D or PT36H"
                ) from None
        else:
            raise ValueError(
                f"invalid duration {value!r}: use a form such as 2d, 36h, 90m, 45s or P2D"
            )
    if result < timedelta(0):
        raise ValueError(f"invalid duration {value!r}: a duration cannot be negative")
    return result


def format_duration(delta: timedelta) -> str:
    """Format a duration in the compact form (`2d`, `1d12h`, `45s`), `0s` for zero."""
    seconds = int(delta.total_seconds())
    if seconds == 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        amount, seconds = divmod(seconds, _UNIT_SECONDS[unit])
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)
