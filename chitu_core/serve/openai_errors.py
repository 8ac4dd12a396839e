"""OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``, for every failure."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to answer with ``status`` and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _required_fields(request: Request) -> list[str]:
    """The required top-level fields of the route's body model (for an empty body's error)."""
    route = request.scope.get("route")
    body = getattr(route, "body_field", None)
    model = getattr(getattr(body, "field_info", None), "annotation", None)
    fields = getattr(model, "model_fields", {})
    return [name for name, field in fields.items() if field.is_required()]


def _validation_message(exc: RequestValidationError, request: Request) -> tuple[str, str | None]:
    """The message and ``param`` (the dotted field path) of the first validation error."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    content_type = request.headers.get("content-type", "")
    if param is None and content_type and "json" not in content_type.lower():
        # FastAPI parses only JSON bodies; any other type reaches the model as raw bytes.
        return (
            f"the request body must be JSON sent with 'Content-Type: application/json' "
            f"(got {content_type!r})"
        ), None
    if param is None and first.get("type") == "missing":
        required = _required_fields(request)
        return (
            "the request body is empty: send a JSON object with "
            + ", ".join(repr(name) for name in required)
        ), (required[0] if required else None)
    # pydantic prefixes the text of a validator's ValueError with "Value error, ".
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app) -> None:
    """Map every exception to OpenAI's error JSON (never an HTML page or a bare 500)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc, request)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
