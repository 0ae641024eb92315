"""The FastAPI application of the endpoint: its OpenAPI description, security scheme and the
handlers that turn routing and validation errors into medkd's JSON errors.

The routes themselves are methods of :class:`medkd.serve.ingress.MedkdServer`
(``@serve.ingress(api)``).
"""

# No `from __future__ import annotations`: FastAPI reads the handler signatures at runtime.
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from ray.serve import context as serve_context
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from medkd.serve import responses as answers
from medkd.serve.fast_lane import PredictionLane

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
IMAGE_TYPES = ["image/png", "image/jpeg", "application/x-npy", "application/dicom", "application/octet-stream"]
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **{media: {"schema": {"type": "string", "format": "binary"}} for media in IMAGE_TYPES},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {}},
                        "instances": {"type": "array", "items": {}},
                    },
                }
            },
        },
    }
}
ERRORS = {code: {"model": answers.ErrorAnswer} for code in (400, 401, 404, 413, 415, 503, 504)}

api = FastAPI(
    title="medkd",
    summary="Distilled medical-imaging students served with Ray Serve",
    description="Send one image (PNG, JPEG, NPY, DICOM or JSON) to `/predict`, a stack to `/predict/batch`. "
    "Pick a model with the `serve_multiplexed_model_id` header or `?model=`; `GET /models` lists them.",
)
api.add_middleware(PredictionLane)  # pure ASGI: prediction requests skip FastAPI's routing (see fast_lane)
bearer = HTTPBearer(auto_error=False, description="Needed when the endpoint runs with serve.auth_token_env")
BEARER_SECURITY = {"security": [{bearer.scheme_name: []}]}
"""The OpenAPI ``security`` of a route that checks the token itself (``MedkdServer._handle``):
the prediction routes declare it so, instead of ``Depends(bearer)``, which would be solved on
every request only for the schema (the scheme itself is registered by the other routes)."""


def json_response(payload: dict[str, Any], status: int = 200, request_id: str = "") -> Response:
    # Serve itself answers the request id in X-Request-Id; request_id is in the body.
    return Response(answers.json_body(payload), status_code=status, media_type="application/json")


def request_id(request: Request) -> str:
    """Serve's id of this request (it answers it in ``X-Request-Id`` and tags its logs with it)."""
    try:
        serve_id = serve_context._get_serve_request_context().request_id  # private API: fall back below
    except Exception:  # noqa: BLE001
        serve_id = ""
    given = request.headers.get("x-request-id", "")
    return serve_id or (given if REQUEST_ID.match(given) else uuid.uuid4().hex)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
    root, path = request.scope.get("root_path", ""), request.url.path
    path = path[len(root) :] if root and path.startswith(root) else path
    if error.status_code == 404:
        routes = [
            f"{method.upper()} {route}" for route, item in request.app.openapi()["paths"].items() for method in item
        ]
        message = f"no route {request.method} {path}; routes: {', '.join(routes)}"
    elif error.status_code == 405:
        allowed = {key.lower(): value for key, value in (error.headers or {}).items()}
        message = f"{request.method} {path} is not allowed; use {allowed.get('allow', 'another method')}"
    else:
        message = str(error.detail)
    return Response(
        answers.error_body(message, error.status_code, request_id(request)),
        status_code=error.status_code,
        media_type="application/json",
        headers=error.headers,
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    problems = "; ".join(f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors())
    return Response(
        answers.error_body(problems, 422, request_id(request)), status_code=422, media_type="application/json"
    )
