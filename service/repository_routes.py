"""Triton's model repository extension over REST: list the repository, load a version, unload a model.

    POST /v2/repository/index                      {"ready": true}?  -> [{"name", "version", "state", "reason"}]
    POST /v2/repository/models/{name}/load         {"parameters": {"version": "3"}}?   (default: the highest)
    POST /v2/repository/models/{name}/unload       {"parameters": {"version": "3"}}?   (default: every version)

Load and unload change what the server serves, so they want a key of VISIONSERVE_ADMIN_KEYS_FILE (service.auth);
without that file they refuse every call. The index describes the repository and wants the API key like /metadata.
A load answers once the version serves (or was refused); the work goes on if the client goes away.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.auth import AccessControl
from service.errors import ApiError
from service.repository import MEMORY_MEASURE, ModelRepository
from service.request_reading import media_type_of, read_body

# A repository call's body is a few parameters; anything bigger is not one.
MAX_BODY_BYTES = 64 * 1024
INDEX_FIELDS = frozenset({"ready"})
LOAD_FIELDS = frozenset({"parameters"})
LOAD_PARAMETERS = frozenset({"version"})  # Triton's `config` and `file:` overrides are not taken


def routes(repository: ModelRepository, access: AccessControl) -> list[Route]:
    async def index(request: Request) -> JSONResponse:
        document = await read_document(request, repository, INDEX_FIELDS)
        ready = document.get("ready", False)
        if not isinstance(ready, bool):
            raise ApiError("invalid_request", '"ready" must be true or false')
        return JSONResponse(repository.index(ready_only=ready))

    async def load(request: Request) -> JSONResponse:
        access.check_admin(request.headers.get("authorization"))
        version = await requested_version(request, repository)
        classifier = await repository.load(request.path_params["name"], version)
        return JSONResponse(
            {
                "name": classifier.package.name,
                "version": classifier.package.version,
                "state": "READY",
                "memory_bytes": classifier.memory_bytes,
                "memory_measure": MEMORY_MEASURE,
            }
        )

    async def unload(request: Request) -> JSONResponse:
        access.check_admin(request.headers.get("authorization"))
        name = request.path_params["name"]
        unloaded = repository.unload(name, await requested_version(request, repository))
        return JSONResponse({"name": name, "unloaded": unloaded, "default": repository.default_version(name)})

    return [
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
    ]


async def read_document(request: Request, repository: ModelRepository, fields: frozenset[str]) -> dict[str, Any]:
    """The JSON object of a repository call (an empty body is {}); unknown fields are a 400."""
    media_type_of(request)  # refuses a pickle content type
    body = await read_body(request, MAX_BODY_BYTES, repository.uploads, repository.settings.request_deadline())
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError("invalid_json", f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise ApiError("invalid_json", "the body must be a JSON object")
    unknown = set(document) - fields
    if unknown:
        raise ApiError("invalid_request", f"unknown fields {sorted(unknown)}; accepted: {sorted(fields)}")
    return document


async def requested_version(request: Request, repository: ModelRepository) -> str | None:
    """The body's `parameters.version` of a load or unload, or None."""
    parameters = (await read_document(request, repository, LOAD_FIELDS)).get("parameters", {})
    if not isinstance(parameters, dict):
        raise ApiError("invalid_request", '"parameters" must be a JSON object')
    unknown = set(parameters) - LOAD_PARAMETERS
    if unknown:
        raise ApiError("invalid_request", f"unknown parameters {sorted(unknown)}; accepted: {sorted(LOAD_PARAMETERS)}")
    version = parameters.get("version")
    if version is not None and not isinstance(version, str):
        raise ApiError("invalid_request", f'"version" must be a string, got {version!r}')
    return version
