"""The codec server: Temporal's remote codec protocol over HTTP, for the Temporal UI and CLI.

`POST /codec/decode` and `POST /codec/encode` take `{"payloads": [...]}`, each payload as
Temporal's protobuf JSON (`{"metadata": {KEY: BASE64}, "data": BASE64}`), and return the same
shape with every payload run through the payload codec of the settings (sequencer.codec).
Only operators may call them: a valid API key in `Authorization: Bearer KEY` or `X-API-Key`,
or the dashboard's login cookie. Anything else gets 401. The Temporal UI calls them from its
own origin, so the routes respond to CORS requests, preflight included, from the origins in
SEQUENCER_CODEC_CORS_ORIGINS, with credentials (the cookie) allowed. CORS applies to these
routes only, so those origins get no access to the rest of the API.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from sequencer.codec import PayloadCodecError, codec_for
from sequencer.config import Settings
from sequencer.http_auth import API_KEY_HEADER, STORE_STATE, require_api_key
from sequencer.storage import ApiKeyRow, Store

logger = logging.getLogger(__name__)

CODEC_PATH = "/codec"
NAMESPACE_HEADER = "X-Namespace"
# A self-hosted Temporal server accepts gRPC messages up to 4 MB and payloads up to 2 MB by
# default ("Self-hosted Temporal Cluster defaults", temporal.io/kb). Base64 in JSON makes a
# payload a third larger, so the payloads of one history event fit in this.
MAX_BODY_BYTES = 8 * 1024 * 1024


def create_codec_app(settings: Settings, store: Store) -> FastAPI:
    """Build the codec server, to be mounted at CODEC_PATH."""
    codec = codec_for(settings)
    app = FastAPI(title="Sequencer codec server", docs_url=None, redoc_url=None, openapi_url=None)
    setattr(app.state, STORE_STATE, store)
    if settings.codec_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.codec_cors_origins),
            allow_credentials=True,
            allow_methods=["POST"],
            allow_headers=["Content-Type", NAMESPACE_HEADER, "Authorization", API_KEY_HEADER],
            max_age=600,
        )

    async def convert(request: Request, key: ApiKeyRow, direction: str) -> dict[str, Any]:
        _check_namespace(request, settings.temporal_namespace)
        payloads = await _read_payloads(request)
        if codec is None:
            converted = payloads
        else:
            try:
                if direction == "decode":
                    converted = await codec.decode(payloads)
                else:
                    converted = await codec.encode(payloads)
            except PayloadCodecError as error:
                logger.warning(
                    "Codec server: %s failed for API key %s: %s", direction, key.id, error
                )
                raise HTTPException(422, str(error)) from None
        logger.debug(
            "Codec server: %s of %d payloads for API key %s", direction, len(payloads), key.id
        )
        return {"payloads": [_payload_json(payload) for payload in converted]}

    @app.post("/decode")
    async def decode(
        request: Request, key: Annotated[ApiKeyRow, Depends(require_api_key)]
    ) -> dict[str, Any]:
        return await convert(request, key, "decode")

    @app.post("/encode")
    async def encode(
        request: Request, key: Annotated[ApiKeyRow, Depends(require_api_key)]
    ) -> dict[str, Any]:
        return await convert(request, key, "encode")

    return app


def _check_namespace(request: Request, namespace: str) -> None:
    # The Temporal UI and CLI name the namespace of the payloads. This server has the keys of
    # one namespace only, and accepts a request without the header.
    requested = request.headers.get(NAMESPACE_HEADER)
    if requested and requested != namespace:
        raise HTTPException(
            403,
            f"this codec server serves the namespace {namespace!r} (TEMPORAL_NAMESPACE), "
            f"not {requested!r}",
        )


async def _read_payloads(request: Request) -> list[Payload]:
    content_type = request.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send the payloads as application/json")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise HTTPException(413, f"the body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
    try:
        document = json.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("payloads"), list):
            raise ValueError("the body is not an object with a payloads list")
        parsed = json_format.ParseDict(document, Payloads(), ignore_unknown_fields=True)
    except (ValueError, json_format.ParseError) as error:
        raise HTTPException(
            400,
            f'invalid payloads: {error}. Send {{"payloads": [{{"metadata": {{KEY: BASE64}}, '
            '"data": BASE64}]}',
        ) from None
    return list(parsed.payloads)


def _payload_json(payload: Payload) -> dict[str, Any]:
    document = json_format.MessageToDict(payload)
    document.setdefault("metadata", {})
    document.setdefault("data", "")
    return document
