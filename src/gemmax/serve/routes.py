"""The model-listing routes that the generation server and the embedding server answer alike.

Both list their served names under OpenAI's ``/v1/models`` with the same auth and the same 404; each service
shapes its own cards (a generative model's modalities, an encoder's dimensions), so the routes take any
service that offers the three calls of :class:`ModelCatalog`.
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import FastAPI
from fastapi import Request as HTTPRequest


class ModelCatalog(Protocol):
    """What the model routes ask of a service."""

    def check_auth(self, request: HTTPRequest) -> None:
        """Raise a 401 unless the request carries the server's API key."""

    def model_list(self) -> dict[str, Any]:
        """``{"object": "list", "data": [card, ...]}`` over every served name."""

    def model_card(self, name: str) -> dict[str, Any]:
        """One served name's card; a 404 ``APIError`` for a name that is not served."""


def add_model_routes(app: FastAPI, svc: ModelCatalog) -> None:
    """``GET /v1/models`` and ``GET /v1/models/{name}`` (the route functions' names are the OpenAPI schema's
    operation ids)."""

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest) -> dict[str, Any]:
        svc.check_auth(request)
        return svc.model_list()

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: HTTPRequest) -> dict[str, Any]:
        svc.check_auth(request)
        return svc.model_card(name)
