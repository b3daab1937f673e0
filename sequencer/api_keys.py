"""API keys of the HTTP API and the dashboard.

A key is `sq_` followed by 43 URL-safe characters (32 random bytes from `secrets`). Only its
SHA-256 digest is stored, with its first characters to recognise it in a list, so the key
itself is shown once, when it is created. SHA-256 without a salt is enough here because the
keys are random: no dictionary or reuse attack applies, unlike with passwords.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sequencer.storage import ApiKeyRow, Store

KEY_PREFIX = "sq_"
# Characters of the key kept in clear in the database, the "sq_" included.
SHOWN_CHARACTERS = 10
MAX_NAME_LENGTH = 100


@dataclass(frozen=True)
class NewApiKey:
    id: int
    name: str
    key: str


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(store: Store, name: str) -> NewApiKey:
    """Create a key named `name` and return it; its value cannot be read again later.

    Raises ValueError when the name is empty or longer than MAX_NAME_LENGTH characters.
    """
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"invalid API key name {name!r}: give 1 to {MAX_NAME_LENGTH} characters, such as "
            "the name of the person or integration that uses it"
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = store.add_api_key(name, key[:SHOWN_CHARACTERS], digest_of(key))
    return NewApiKey(id=key_id, name=name, key=key)


def check_api_key(store: Store, key: str | None) -> ApiKeyRow | None:
    """Return the stored key that `key` is, or None when it is missing, unknown or revoked."""
    if not key or not key.startswith(KEY_PREFIX):
        return None
    row = store.api_key_by_digest(digest_of(key.strip()))
    if row is None or row.revoked_at is not None:
        return None
    return row
