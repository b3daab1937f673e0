"""Authentication of the HTTP API and the dashboard by API key.

API clients send the key in `Authorization: Bearer <key>` or `X-API-Key: <key>`. The dashboard
stores it in an HttpOnly cookie once its login form accepts it. Webhook routes do not use
these keys: each provider's request is verified by its own signature.
"""

from __future__ import annotations

from fastapi import HTTPException, Request

from sequencer.api_keys import check_api_key
from sequencer.storage import ApiKeyRow, Store

API_KEY_COOKIE = "sequencer_key"
API_KEY_HEADER = "X-API-Key"
# The store is kept on the app so that dependencies reach it without a global.
STORE_STATE = "api_key_store"


def presented_key(request: Request) -> str | None:
    """Return the key a request carries: header first, then the dashboard's cookie."""
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    header = request.headers.get(API_KEY_HEADER)
    if header:
        return header.strip()
    return request.cookies.get(API_KEY_COOKIE)


def authenticated_key(request: Request) -> ApiKeyRow | None:
    """Return the valid API key of a request, or None."""
    store: Store = getattr(request.app.state, STORE_STATE)
    return check_api_key(store, presented_key(request))


def require_api_key(request: Request) -> ApiKeyRow:
    """FastAPI dependency: the request's valid API key, else 401."""
    key = authenticated_key(request)
    if key is None:
        raise HTTPException(
            status_code=401,
            detail=(
                "missing, unknown or revoked API key: send it as 'Authorization: Bearer KEY'; "
                "create one with `sequencer apikey create NAME`"
            ),
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key
