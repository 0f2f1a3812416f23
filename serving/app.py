"""The Ray Serve application: ranking and retrieval over HTTP, with a FastAPI ingress.

Start it (from the checkout, with a model published to the registry folder):

    serve run serving.app:app registry=.state/registry            # defaults, one replica
    serve run serving/config.yaml                                  # replicas, autoscaling, store

Endpoints (OpenAPI at `/docs`): `POST /rank`, `POST /retrieve`, `GET /healthz`, `GET /version`;
README.md shows a `curl` for each. The app's arguments are `serving.config.ServingConfig`
(validated on the driver, before anything is deployed); the deployment's `user_config` pins a
version (`{"version": 7}`) or follows the registry (`{"version": "latest"}`, the default).

Each replica is one `Recommender`: FastAPI parses and validates the body, `@serve.batch` groups
concurrent requests, and the batch runs in the replica's compute thread
(`serving.scorer.Scorer.run_batch`), so the event loop keeps accepting requests meanwhile. A
background thread swaps model versions between requests (`serving.versions`). Nothing a request
sends can stop a replica: every failure is that request's 4xx or 5xx.
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse, Response
from ray import serve
from ray.serve import Application

from serving.config import ServingConfig, load_follow_config, load_serving_config
from serving.schemas import (
    ErrorResponse,
    HealthResponse,
    RankRequest,
    RankResponse,
    RetrieveRequest,
    RetrieveResponse,
    VersionResponse,
)
from serving.scorer import Job, JobError
from serving.service import RecommenderService, RequestError


class BodyTooLarge(HTTPException):
    def __init__(self, size: str, limit: int) -> None:
        super().__init__(413, f"the body has {size} bytes, the limit is {limit} (limits.max_body_bytes): send less")


class BodyLimit:
    """ASGI middleware: a body past `max_bytes` gets a 413 unread (by its Content-Length), or
    as soon as the bytes read pass the limit (a chunked body)."""

    def __init__(self, app, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = BodyTooLarge(declared.decode(), self.max_bytes)
            return await ORJSONResponse({"detail": error.detail}, status_code=413)(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(
                    f"at least {received}", self.max_bytes
                )  # FastAPI answers an HTTPException while reading
            return message

        return await self.app(scope, limited, send)


ERRORS = {code: {"model": ErrorResponse} for code in (413, 422, 503)}


async def _invalid(request: Request, error: RequestValidationError) -> ORJSONResponse:
    # FastAPI's default echoes each bad input back (a whole candidate list); keep where and why.
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()[:20]]
    return ORJSONResponse({"detail": detail}, status_code=422)


def _answer(result: bytes | JobError) -> Response:
    if isinstance(result, JobError):
        raise HTTPException(result.status, result.detail)
    return Response(content=result, media_type="application/json")


def build_api(replica: Recommender) -> FastAPI:
    """The FastAPI app of one replica: its routes call the replica, its limits are the replica's."""
    api = FastAPI(
        title="hstu-rt serving",
        description="Ranking and retrieval with the HSTU generative recommender; see serving/app.py.",
        default_response_class=ORJSONResponse,
    )
    api.add_middleware(BodyLimit, max_bytes=replica.config.limits.max_body_bytes)
    api.add_exception_handler(RequestValidationError, _invalid)

    @api.post("/rank", response_model=RankResponse, responses=ERRORS)
    async def rank(body: RankRequest) -> Response:
        """Order `candidates` by predicted engagement for `user_id`, with per-action probabilities."""
        return _answer(await replica.run(replica.service.rank_job, body))

    @api.post("/retrieve", response_model=RetrieveResponse, responses=ERRORS)
    async def retrieve(body: RetrieveRequest) -> Response:
        """The top `k` items of the live vocabulary for `user_id`."""
        return _answer(await replica.run(replica.service.retrieve_job, body))

    @api.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def healthz() -> ORJSONResponse:
        served = replica.service.watcher.current
        if served is None:
            return ORJSONResponse({"status": "no model version loaded", "version": None}, status_code=503)
        return ORJSONResponse({"status": "ok", "version": served.version})

    @api.get("/version", response_model=VersionResponse)
    async def version() -> ORJSONResponse:
        """The answering version, its manifest time and the offsets it trained to."""
        return ORJSONResponse(replica.service.watcher.status())

    return api


@serve.deployment(
    name="Recommender",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=32,
    health_check_period_s=10,
    health_check_timeout_s=30,
)
@serve.ingress()
class Recommender:
    """One replica; see the module docstring."""

    def __init__(self, config: ServingConfig) -> None:
        self.config = config
        sys.setswitchinterval(config.switch_interval_ms / 1000)  # this replica's process
        self.service = RecommenderService(config=config)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._batch.set_max_batch_size(config.batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(config.batching.wait_timeout_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    def reconfigure(self, user_config: Any) -> None:
        """`{"version": N}` pins version N (a rollback); `{"version": "latest"}` follows the registry."""
        self.service.watcher.set_follow(load_follow_config(user_config))

    def check_health(self) -> None:
        if not self.service.watcher.alive:
            raise RuntimeError("the registry watcher thread is not running: this replica cannot follow new versions")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()

    async def run(self, make_job, body) -> bytes | JobError:
        """Turn a validated body into a job on the version answering now, and await its batch."""
        try:
            job = make_job(body, arrived=time.perf_counter())
        except RequestError as error:
            raise HTTPException(error.status, error.detail) from None
        return await self._batch(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _batch(self, jobs: list[Job]) -> list[bytes | JobError]:
        return await asyncio.get_running_loop().run_in_executor(self._compute, self.service.scorer.run_batch, jobs)


def app(args: dict[str, Any] | None = None) -> Application:
    """The application builder `serve run serving.app:app [key=value ...]` and serving/config.yaml
    call: the config is checked here, on the driver, before any replica starts."""
    return Recommender.bind(load_serving_config(args))
