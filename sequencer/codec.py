"""Encryption of Temporal payloads with AES-256-GCM, so the Temporal database stores ciphertext.

Every payload a product client or worker writes (workflow and activity inputs and results,
signals, updates, queries, memos, summaries, and failure messages) is serialized and encrypted
with the first configured key. The encrypted payload's data is the 12-byte nonce followed by
the ciphertext and its 16-byte tag, and its metadata is `encoding: binary/encrypted` and
`encryption-key-id: <id>`. Decoding picks the key by that id, so keys rotate by adding a new
key first in the list while the old ones keep decrypting older histories. A payload without
the encrypted encoding is returned unchanged: histories written before encryption still load.

Keys are configured as `ID:BASE64` entries (32 random bytes each), separated by commas or
whitespace, in SEQUENCER_PAYLOAD_KEYS or in the file named by SEQUENCER_PAYLOAD_KEYS_FILE. The
local stack keeps its own key in `$SEQUENCER_HOME/payload-keys`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

if TYPE_CHECKING:
    from sequencer.config import Settings

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
KEY_BYTES = 32
NONCE_BYTES = 12
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The local stack's key file, under $SEQUENCER_HOME.
LOCAL_KEY_FILE = "payload-keys"
KEYS_VARIABLE = "SEQUENCER_PAYLOAD_KEYS"
KEYS_FILE_VARIABLE = "SEQUENCER_PAYLOAD_KEYS_FILE"
SWITCH_VARIABLE = "SEQUENCER_PAYLOAD_ENCRYPTION"
GENERATE_COMMAND = "sequencer payload-key generate"


class PayloadCodecError(RuntimeError):
    """Failure to encrypt or decrypt a payload with the configured keys."""


class MissingPayloadKeyError(RuntimeError):
    """Configuration with payload encryption on and no key."""


@dataclass(frozen=True)
class PayloadKey:
    key_id: str
    secret: bytes = field(repr=False)


def generate_key_entry(key_id: str | None = None) -> str:
    """Return a new `ID:BASE64` key entry with 32 random bytes from `secrets`.

    The default id is `k` followed by today's UTC date and 4 random hex digits, so that ids
    sort by age and two keys made the same day differ. Raises ValueError for an invalid id.
    """
    if key_id is None:
        key_id = f"k{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(2)}"
    _check_key_id(key_id, None)
    secret = base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")
    return f"{key_id}:{secret}"


def parse_keys(text: str, source: str) -> tuple[PayloadKey, ...]:
    """Parse `ID:BASE64` entries separated by commas or whitespace. `#` starts a comment line.

    `source` names the setting or file in error messages. Raises ValueError for an entry
    without a colon, an invalid id, a duplicate id, invalid base64 or a key that is not 32
    bytes long. The messages never quote key material.
    """
    lines = [line for line in text.splitlines() if not line.strip().startswith("#")]
    entries = [entry for entry in re.split(r"[,\s]+", "\n".join(lines)) if entry]
    keys: list[PayloadKey] = []
    for number, entry in enumerate(entries, start=1):
        key_id, colon, encoded = entry.partition(":")
        if not colon or not key_id or not encoded:
            raise ValueError(
                f"{source}: entry {number} is not ID:BASE64; make a key with `{GENERATE_COMMAND}`"
            )
        _check_key_id(key_id, f"{source}: entry {number}")
        if any(key.key_id == key_id for key in keys):
            raise ValueError(
                f"{source}: the key id {key_id!r} appears twice; give each key its own id"
            )
        try:
            secret = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                f"{source}: key {key_id!r} is not valid base64; make a key with "
                f"`{GENERATE_COMMAND}`"
            ) from None
        if len(secret) != KEY_BYTES:
            raise ValueError(
                f"{source}: key {key_id!r} is {len(secret)} bytes long, but AES-256 needs "
                f"{KEY_BYTES}; make a key with `{GENERATE_COMMAND}`"
            )
        keys.append(PayloadKey(key_id, secret))
    return tuple(keys)


def _check_key_id(key_id: str, where: str | None) -> None:
    if not KEY_ID_PATTERN.fullmatch(key_id):
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}invalid key id {key_id!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def read_key_file(path: Path, source: str) -> tuple[PayloadKey, ...]:
    """Read and parse a key file. Raises ValueError naming `source` when it cannot be read
    or contains no key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"{source}: cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{source}: {path} is not UTF-8 text") from None
    keys = parse_keys(text, source)
    if not keys:
        raise ValueError(f"{source}: {path} contains no key; make one with `{GENERATE_COMMAND}`")
    return keys


def create_local_key_file(home: Path) -> Path:
    """Create `home/payload-keys` with one new key, readable by its owner only (mode 0600).

    An existing file is left as it is, so every later start keeps the key that encrypted the
    stack's histories.
    """
    path = home / LOCAL_KEY_FILE
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(
            "# Payload encryption keys of the local stack's Temporal data. The first key\n"
            "# encrypts and every key decrypts. Deleting this file makes the stack's\n"
            "# workflow histories unreadable.\n"
            f"{generate_key_entry()}\n"
        )
    return path


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM payload codec: encrypts with the first key, decrypts with any key by id.

    With `encrypt` false, payloads are written as they are and encrypted ones are still
    decrypted. With `encrypt` true and no key, writing a payload raises PayloadCodecError
    instead of storing it in plaintext. `source` names where the keys are configured, for
    the error messages.
    """

    def __init__(self, keys: Sequence[PayloadKey], *, encrypt: bool = True, source: str) -> None:
        self._ciphers = {key.key_id: AESGCM(key.secret) for key in keys}
        self._encrypting_id = keys[0].key_id if keys else None
        self._encrypt = encrypt
        self._source = source

    @property
    def encrypting_key_id(self) -> str | None:
        """The id of the key that new payloads are encrypted with, or None when they are not."""
        return self._encrypting_id if self._encrypt else None

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        if not self._encrypt or not payloads:
            return list(payloads)
        if self._encrypting_id is None:
            raise PayloadCodecError(
                f"cannot encrypt a payload: no payload key is configured. Set {KEYS_VARIABLE} "
                f"(make a key with `{GENERATE_COMMAND}`) or {KEYS_FILE_VARIABLE}, or set "
                f"{SWITCH_VARIABLE}=off to store lead data in Temporal in plaintext"
            )
        cipher = self._ciphers[self._encrypting_id]
        encoded = []
        for payload in payloads:
            # NOTE: with random 12-byte nonces, NIST SP 800-38D allows 2**32 encryptions under
            # one key. Rotate the key before it has encrypted that many payloads.
            nonce = os.urandom(NONCE_BYTES)
            ciphertext = cipher.encrypt(nonce, payload.SerializeToString(), None)
            encoded.append(
                Payload(
                    metadata={
                        "encoding": ENCODING,
                        KEY_ID_METADATA: self._encrypting_id.encode("ascii"),
                    },
                    data=nonce + ciphertext,
                )
            )
        return encoded

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def decrypt(self, payload: Payload) -> Payload:
        """Return the payload that `payload` encrypts, or `payload` when it is not encrypted.

        Raises PayloadCodecError naming the key id when the key is not configured or when the
        payload fails authentication.
        """
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode("utf-8", "replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            if not self._ciphers:
                raise PayloadCodecError(
                    f"a payload is encrypted with the key {key_id!r}, but no payload key is "
                    f"configured: set {KEYS_VARIABLE} or {KEYS_FILE_VARIABLE} to the keys of "
                    "the workers"
                )
            raise PayloadCodecError(
                f"a payload is encrypted with the key {key_id!r}, which is not in "
                f"{self._source} (it has {', '.join(sorted(self._ciphers))}): add the key "
                "with that id after the first key"
            )
        data = payload.data
        try:
            plaintext = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], None)
            return Payload.FromString(plaintext)
        except (InvalidTag, ValueError, DecodeError):
            raise PayloadCodecError(
                f"a payload encrypted with the key {key_id!r} failed authentication: it was "
                f"altered, or the key under that id in {self._source} is not the one that "
                "encrypted it"
            ) from None


def codec_for(settings: Settings) -> EncryptionCodec | None:
    """Return the payload codec of `settings`, or None when encryption is off and no key is
    configured (payloads are then written and read as they are)."""
    if not settings.payload_encryption and not settings.payload_keys:
        return None
    return EncryptionCodec(
        settings.payload_keys,
        encrypt=settings.payload_encryption,
        source=settings.payload_keys_source,
    )


def require_payload_keys(settings: Settings) -> None:
    """Raise MissingPayloadKeyError unless a key is configured or encryption is switched off.

    Workers and the API service call this before they start, so that a deployment without a
    key fails at once instead of on its first launch.
    """
    if settings.payload_encryption and not settings.payload_keys:
        raise MissingPayloadKeyError(
            f"no payload encryption key: set {KEYS_VARIABLE} to a key made with "
            f"`{GENERATE_COMMAND}` (or name a key file in {KEYS_FILE_VARIABLE}), or set "
            f"{SWITCH_VARIABLE}=off to store lead data in Temporal in plaintext"
        )
