"""The one HTTP application: the API, the dashboard and the providers' webhooks.

`sequencer up` serves it on its HTTP port (default 8766), and `sequencer serve` on its own in
production. Routes:

    /api/v1/...    the HTTP API (API key), see sequencer.api
    /docs          interactive API docs; /openapi.json the OpenAPI document
    /webhooks/...  LinkedIn and email providers' webhooks (each verified by its signature)
    /codec/...     the codec server of the Temporal UI and CLI (API key or dashboard cookie),
                   see sequencer.codec_server
    /healthz       liveness, no key
    /              the dashboard (API key in a cookie after /login)
"""

from __future__ import annotations

import importlib.metadata

from fastapi import FastAPI

from sequencer.api import add_error_handlers, api_router
from sequencer.codec_server import CODEC_PATH, create_codec_app
from sequencer.config import Settings
from sequencer.dashboard import dashboard_router
from sequencer.http_auth import STORE_STATE
from sequencer.service import Sequencer
from sequencer.webhooks import create_webhook_app, mail_webhooks_from_settings


def create_http_app(service: Sequencer, settings: Settings) -> FastAPI:
    """Build the application on `service`.

    Raises ValueError naming the setting when an email provider's webhook setting is invalid.
    """
    webhooks = create_webhook_app(
        linkedin_secret=settings.linkedin_webhook_secret,
        on_invitation=service.invitation_event,
        on_mail_event=service.apply_inbound,
        **mail_webhooks_from_settings(settings),
    )
    app = FastAPI(
        title="Sequencer",
        version=importlib.metadata.version("sequencer"),
        description=(
            "Multichannel outreach sequences on Temporal: campaigns, leads, tasks, events and "
            "unsubscribes. Send an API key as `Authorization: Bearer KEY`; create one with "
            "`sequencer apikey create NAME`."
        ),
    )
    # The webhook app has no exception handlers or middleware: its routes are all it has.
    app.include_router(webhooks.router)
    setattr(app.state, STORE_STATE, service.store)
    app.include_router(api_router(service))
    add_error_handlers(app)
    # A separate app, so that its CORS middleware covers its own routes only.
    app.mount(CODEC_PATH, create_codec_app(settings, service.store))
    # The dashboard serves its own pages and static files, outside /api and /webhooks.
    app.include_router(dashboard_router(service))
    return app
