"""The FastAPI application: /v1 (routes.py), /health, /metrics, request-size limit, errors in OpenAI's shape.

Further pages (a dashboard, rollout controls) are ``APIRouter``s passed to ``create_app``.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaroute.serve import routes
from adaroute.serve.errors import APIError, error_response
from adaroute.serve.service import Service


def create_app(service: Service, extra_routers: tuple[APIRouter, ...] = ()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import asyncio  # noqa: PLC0415

        service.start(asyncio.get_running_loop())
        yield
        await service.stop()

    app = FastAPI(title="adaroute", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, limit=service.config.max_body_bytes, service=service)
    app.include_router(routes.router)
    for r in extra_routers:
        app.include_router(r)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    _error_handlers(app, service)
    return app


async def health(request: Request) -> dict:
    svc: Service = request.app.state.service
    counts = svc.scheduler.counts()
    return {"status": "ok", "model": svc.model.name, "arms": list(svc.model.arms), "default_arm": svc.default_arm,
            "running": sum(r for r, _ in counts.values()), "waiting": sum(w for _, w in counts.values())}


async def metrics(request: Request) -> Response:
    svc: Service = request.app.state.service
    svc.metrics.set_queue(svc.scheduler.counts())
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _error_handlers(app: FastAPI, service: Service) -> None:
    rejected = service.metrics.rejected

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        if e.reason:
            rejected.labels(e.reason).inc()
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        rejected.labels("bad_request").inc()
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in err["loc"]) or None
        return error_response(400, f"invalid request: {where}: {err['msg']}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type=kind)


class BodyLimit:
    """Pure ASGI middleware: a body over ``limit`` bytes is answered 413 (by its Content-Length, or
    while it streams in when there is none), before any handler reads it."""

    def __init__(self, app, limit: int, service: Service):
        self.app, self.limit, self.service = app, limit, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        self.service.metrics.rejected.labels("bad_request").inc()
        response = error_response(413, f"request body over {self.limit} bytes", code="request_too_large")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass
