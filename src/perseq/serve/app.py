"""The HTTP service (FastAPI): ``perseq serve RUN``.

    POST   /v1/recommend                      a history in the request -> top k
    POST   /v1/users/{user_id}/events?k=10     append events (idempotent ids); with k, the new top k
    GET    /v1/users/{user_id}/recommendations?k=10
    GET    /v1/users/{user_id}/events?limit=20 the newest events    GET /v1/users: users, newest first
    DELETE /v1/users/{user_id}                 erase the user's events and state
    GET    /                                   a demo page: a user's history and recommendations
    GET    /healthz  /readyz  /metrics (Prometheus text)  /docs  /openapi.json

Raw item ids in and out (as ``perseq predict``); bad input is a 4xx with a message, never a
5xx. With a token (``--token-env``), every /v1 call needs ``Authorization: Bearer <token>``.
"""
from __future__ import annotations

import os
import secrets
import sqlite3
from pathlib import Path as PathLib
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_HISTORY = 10_000  # events in one stateless request
MAX_EVENTS = 1_000  # events in one post
MAX_K = 1_000
MAX_BODY = 2 * 1024 * 1024  # bytes

ItemId = Annotated[str | int, Field(description="raw item id, as in the training data")]
UserId = Annotated[str, Path(min_length=1, max_length=256, description="the user's id")]


def _item(v):
    if isinstance(v, bool):  # JSON true is not an item id
        raise ValueError("an item id is a string or an integer")
    s = str(v)
    if not 0 < len(s) <= 256:
        raise ValueError("an item id has 1 to 256 characters")
    return s


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[ItemId] = Field(max_length=MAX_HISTORY, description="the user's events, oldest first")
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = Field(True, description="leave out items already in the history")
    adapt: bool = Field(False, description="PCRec-simple with the choice stored in the run folder")

    @field_validator("history", mode="before")
    @classmethod
    def _ids(cls, v):
        return [_item(x) for x in v] if isinstance(v, list) else v


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128, description="unique per user: a retried post with it is applied once")
    item_id: ItemId
    ts: int | None = Field(None, ge=0, le=2**62, description="event time (stored; never reorders events)")

    @field_validator("item_id", mode="before")
    @classmethod
    def _id(cls, v):
        return _item(v)


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS)


class Item(BaseModel):
    item_id: str
    score: float | None
    title: str | None = None


class EventOut(BaseModel):
    id: str
    item_id: str
    ts: int | None
    title: str | None = None


class UserEvents(BaseModel):
    user_id: str
    events: list[EventOut] = Field(description="newest first")


class Users(BaseModel):
    users: list[str] = Field(description="users whose state changed last, newest first")


class Recommendations(BaseModel):
    items: list[Item]
    cold_start: bool = Field(description="no usable history: the most popular items")
    unknown: list[str] = []
    adapted: bool = False


class UserRecommendations(Recommendations):
    user_id: str


class EventsResponse(BaseModel):
    user_id: str
    applied: int
    duplicates: int
    unknown: list[str]
    n_events: int
    recommendations: Recommendations | None = None


class _Guard:
    """A plain ASGI middleware (Starlette's BaseHTTPMiddleware costs about a millisecond a
    request): refuses bodies over MAX_BODY with 413, whether announced by Content-Length or
    streamed, and records each request's latency and status for /metrics."""

    def __init__(self, app, latency, n_req):
        self.app, self.latency, self.n_req = app, latency, n_req

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return await JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)(scope, receive, send)
        seen, status, over = [0], [500], [False]

        async def counted():
            msg = await receive()
            seen[0] += len(msg.get("body", b""))
            if seen[0] > MAX_BODY:  # stop reading: to the app the client has gone ...
                over[0] = True
                return {"type": "http.disconnect"}
            return msg

        too_large = JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)

        async def sending(msg):
            if over[0]:  # ... and whatever it answers becomes a 413
                if msg["type"] == "http.response.start":
                    status[0] = 413
                    await too_large(scope, receive, send)
                return
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        t0 = time.perf_counter()
        try:
            await self.app(scope, counted, sending)
        except Exception:
            if not over[0]:
                raise
        if over[0] and status[0] != 413:  # the app stopped without answering
            status[0] = 413
            await too_large(scope, receive, send)
        route = scope.get("route")
        endpoint = getattr(route, "path", "other")
        method = scope.get("method", "")  # GET and POST of one route are different requests ...
        method = method if method in _METHODS else "other"  # ... but a client's made-up methods make no new series
        self.latency.labels(method, endpoint).observe(time.perf_counter() - t0)
        self.n_req.labels(method, endpoint, str(status[0])).inc()


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def create_app(run: str, store: str, token: str | None = None, unknown_items: str = "ignore",
               threads: int | None = None, durability: str = "process", step: str = "auto") -> FastAPI:
    """The service for a run folder, its state in ``store`` (a SQLite file, or ``redis://...``); ``threads``:
    torch threads of this process (None: leave them as they are); ``durability``: what an
    acknowledged event survives, "process" (a crash or kill -9) or "power" (also a power
    loss; one fsync per request), ``store.SQLiteStore``; ``step``: ``engine.Engine``'s."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    # several workers (perseq serve --workers N sets PROMETHEUS_MULTIPROC_DIR): every worker
    # writes its counts to files there and /metrics reads them all, so a scrape sees the
    # whole server, whichever worker answers it
    multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    registry = CollectorRegistry()
    n_req = Counter("perseq_requests", "requests", ["method", "endpoint", "status"], registry=registry)
    latency = Histogram("perseq_request_seconds", "request latency", ["method", "endpoint"], registry=registry,
                        buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import torch

        from .engine import Engine
        from .service import Service
        from .store import open_store

        if threads:
            torch.set_num_threads(threads)
        app.state.service = Service(Engine(run, step=step), open_store(store, durability), unknown_items)
        yield

    app = FastAPI(title="perseq", version="1", lifespan=lifespan,
                  description="Sequential recommendations with per-user incremental state.")

    app.add_middleware(_Guard, latency=latency, n_req=n_req)

    async def auth(authorization: str | None = Header(None, description="Bearer <token>, when the server has one")):
        if token is None:
            return
        if authorization is None or not authorization.startswith("Bearer ") or \
                not secrets.compare_digest(authorization[7:].encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def service(request: Request):
        s = getattr(request.app.state, "service", None)
        if s is None:
            raise HTTPException(503, "the model is still loading")
        return s

    def unknown_to_422(fn, *a, **kw):
        from .service import NoAdaptation, UnknownItems

        try:
            return fn(*a, **kw)
        except UnknownItems as e:
            raise HTTPException(422, {"message": str(e), "unknown": e.ids}) from None
        except NoAdaptation as e:
            raise HTTPException(409, str(e)) from None

    @app.exception_handler(sqlite3.OperationalError)
    async def store_busy(request: Request, exc):  # "database is locked" after the busy timeout
        return JSONResponse({"detail": f"the state store is busy ({exc}); retry"}, status_code=503,
                            headers={"Retry-After": "1"})

    from .service import Busy

    @app.exception_handler(Busy)
    async def user_busy(request: Request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    # Every endpoint and dependency is ``async def`` and runs on the event loop: the work is
    # CPU-bound (torch on one thread, SQLite), so a worker serves one request at a time
    # anyway, and FastAPI's hop to a thread pool for each sync function cost more (about
    # 1.5 ms a request) than it bought. Several workers (--workers) give the parallelism.
    v1 = [Depends(auth)]

    @app.post("/v1/recommend", response_model=Recommendations, dependencies=v1,
              responses={422: {"description": "invalid input, or unknown items with --unknown-items reject"}})
    async def recommend(body: RecommendRequest, svc=Depends(service)):
        return unknown_to_422(svc.recommend, body.history, body.k, body.exclude_seen, body.adapt)

    @app.post("/v1/users/{user_id}/events", response_model=EventsResponse, dependencies=v1,
              responses={422: {"description": "invalid input, or unknown items with --unknown-items reject"}})
    async def post_events(user_id: UserId, body: EventsRequest, svc=Depends(service),
                    k: int | None = Query(None, ge=1, le=MAX_K, description="also return the new top k"),
                    exclude_seen: bool = True):
        return unknown_to_422(svc.post_events, user_id, [e.model_dump() for e in body.events], k, exclude_seen)

    @app.get("/v1/users/{user_id}/recommendations", response_model=UserRecommendations, dependencies=v1)
    async def user_recommendations(user_id: UserId, svc=Depends(service), k: int = Query(10, ge=1, le=MAX_K),
                             exclude_seen: bool = True):
        return svc.recommendations(user_id, k, exclude_seen)

    @app.get("/v1/users/{user_id}/events", response_model=UserEvents, dependencies=v1)
    async def user_events(user_id: UserId, svc=Depends(service), limit: int = Query(20, ge=1, le=MAX_EVENTS)):
        return svc.recent_events(user_id, limit)

    @app.get("/v1/users", response_model=Users, dependencies=v1)
    async def users(svc=Depends(service), limit: int = Query(20, ge=1, le=MAX_EVENTS)):
        return {"users": svc.store.recent_users(limit)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo():
        return HTMLResponse((PathLib(__file__).parent / "demo.html").read_text())

    @app.delete("/v1/users/{user_id}", status_code=204, dependencies=v1, response_class=Response,
                responses={404: {"description": "no such user"}})
    async def delete_user(user_id: UserId, svc=Depends(service)):
        if not svc.delete(user_id):
            raise HTTPException(404, f"no user {user_id!r}")
        return Response(status_code=204)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "the model is still loading"}})
    async def readyz(request: Request):
        s = getattr(request.app.state, "service", None)
        if s is None:
            return JSONResponse({"ready": False}, status_code=503)
        e = s.engine
        return {"ready": True, "model": e.name, "version": e.version, "state": e.kind, "step": e.step_backend, "window": e.W}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        if multiproc:
            from prometheus_client import multiprocess

            every = CollectorRegistry()
            multiprocess.MultiProcessCollector(every)
            return PlainTextResponse(generate_latest(every).decode(), media_type=CONTENT_TYPE_LATEST)
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_env() -> FastAPI:
    """The app for ``uvicorn --factory`` (several workers): settings from PERSEQ_SERVE_*."""
    env = os.environ
    return create_app(env["PERSEQ_SERVE_RUN"], env["PERSEQ_SERVE_STORE"], env.get("PERSEQ_SERVE_TOKEN") or None,
                      env.get("PERSEQ_SERVE_UNKNOWN", "ignore"), int(env.get("PERSEQ_SERVE_THREADS", "1")),
                      env.get("PERSEQ_SERVE_DURABILITY", "process"), env.get("PERSEQ_SERVE_STEP", "auto"))
