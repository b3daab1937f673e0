"""Normalise email addresses the same way everywhere: import, suppression list, events."""

from __future__ import annotations

import functools
import re
import unicodedata

from email_validator import EmailNotValidError, validate_email

# Zero-width and other invisible format characters that spreadsheets and CRMs leave inside
# copied addresses. They are never part of a real address.
INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")


class InvalidEmailError(ValueError):
    """An address that is not a syntactically valid email address."""


def clean_text(value: str | None) -> str:
    """Strip Unicode whitespace (including no-break spaces) and NFC-normalise a cell."""
    if value is None:
        return ""
    return unicodedata.normalize("NFC", value).strip()


# Workers decode the same addresses again for each payload of a lead: cache the results.
@functools.lru_cache(maxsize=4096)
def normalize_email(value: str) -> str:
    """Return the canonical form of an address: trimmed, lower-cased, Unicode domain.

    The domain is stored as Unicode (`müller-bau.de`) whether it was written as a U-label or
    an A-label (`xn--mller-bau-q9a.de`), so both spellings deduplicate to one lead. Use
    `ascii_email` for the SMTP envelope. Raises InvalidEmailError naming the value.
    """
    text = INVISIBLE.sub("", clean_text(value))
    try:
        result = validate_email(
            text, check_deliverability=False, test_environment=True, globally_deliverable=False
        )
    except EmailNotValidError as error:
        raise InvalidEmailError(f"invalid email address {value.strip()!r}: {error}") from None
    return result.normalized.lower()


def ascii_email(value: str) -> str:
    """Return the address with an IDNA (A-label) domain, for an SMTP envelope without SMTPUTF8."""
    result = validate_email(
        value, check_deliverability=False, test_environment=True, globally_deliverable=False
    )
    return result.ascii_email or result.normalized
