"""The HTTP server of ``sls serve``: FastAPI routes over a :class:`~sls.serve.pool.TaskPool`.

FastAPI (on Starlette, run by uvicorn) because it is the well-kept, widely known way to
put a Python model behind HTTP: async request handling next to a thread for the model,
multipart parsing, request validation and OpenAPI docs (``/docs``) come with it. LitServe
batches too, but one model per server and its own worker processes, where here every task
must share ONE backbone in one process.

Routes: ``GET /v1/tasks``, ``POST /v1/tasks/{name}/predict``, ``GET /healthz``,
``GET /metrics`` (Prometheus), ``POST /v1/admin/reload``, ``POST /v1/admin/tasks`` and
``DELETE /v1/admin/tasks/{name}``. Every error is ``{"error": "<one line>"}`` with a 4xx
status for bad input and 500 for a model error (logged with its traceback); neither
changes what the other requests get.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from sls.data.files import ImageTooLarge, read_image
from sls.errors import ConfigError, DataError
from sls.serve.batching import Scheduler
from sls.serve.metrics import UNKNOWN_TASK, Metrics
from sls.serve.pool import ServedTask, TaskPool

log = logging.getLogger("sls.serve")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "SLS_SERVE_TOKEN"


@dataclass
class ServeSettings:
    """How the server batches and what it accepts (the options of ``sls serve``).

    Attributes:
        paths: the task folders and folders of task folders served; a reload rescans them.
        max_batch: the most images of one forward pass.
        max_wait_ms: how long a batch's first request waits for others of its task.
        max_body_mb: the largest request body; a larger one is a 413 before it is read.
        max_images: the most images of one request.
        max_pixels: the most pixels of one image, read from its header before decoding
            (a decompression bomb is a 413, not gigabytes of memory).
        token: when set, every call must send ``Authorization: Bearer <token>``.
    """

    paths: list[Path] = field(default_factory=list)
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_body_mb: float = 32.0
    max_images: int = 64
    max_pixels: int = 40_000_000
    token: str | None = None

    def validate(self) -> ServeSettings:
        checks = {"--max-batch": self.max_batch >= 1, "--max-wait-ms": self.max_wait_ms >= 0,
                  "--max-body-mb": self.max_body_mb > 0, "--max-images": self.max_images >= 1,
                  "--max-pixels": self.max_pixels >= 1}  # fmt: skip
        for option, ok in checks.items():
            if not ok:
                raise ConfigError(f"{option} must be positive")
        if self.token is not None and not self.token.strip():
            raise ConfigError("the token is empty; give a non-empty --token or SLS_SERVE_TOKEN")
        return self


def check_bind(host: str, token: str | None) -> None:
    """A server reachable from other machines must check a token on every call."""
    if host not in LOCAL_HOSTS and not token:
        raise ConfigError(f"--host {host} lets other machines call the server; give a token (--token or "
                          f"{TOKEN_ENV}) that every call must send, or bind to 127.0.0.1")  # fmt: skip


class RequestError(Exception):
    """A request the server refuses: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message  # made one line by error_response


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class JsonImages(BaseModel):
    """A JSON predict request: base64 images (a ``data:`` URL's prefix is allowed)."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1, description="base64 image files (PNG, JPEG, ...)")
    top_k: int | None = Field(None, ge=1, description="classification: the classes returned per image")
    threshold: float | None = Field(None, ge=0, le=1, description="detection: the lowest score of a box returned")


class AddTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    folder: str = Field(description="a pruned task folder on the server's file system")
    name: str | None = Field(None, description="the name it is served under (default: the folder's name)")


PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/json": {"schema": JsonImages.model_json_schema()},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}  # fmt: skip


def _one_line_validation(error: ValidationError | RequestValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query"))
    return f"{where}: {first['msg']}" if where else first["msg"]


async def _read_upload(request: Request, settings: ServeSettings) -> tuple[list[tuple[str, bytes]], dict]:
    """The request's image files as (name, bytes), and the options its JSON body gives."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images, max_fields=16)
        except (MultiPartException, HTTPException) as error:
            message = getattr(error, "message", None) or getattr(error, "detail", "")
            if message.startswith("Too many files"):  # Starlette's limit, set to ours
                raise RequestError(413, f"over the limit of {settings.max_images} images (--max-images)") from None
            raise RequestError(400, f"malformed multipart body: {message}") from None
        try:
            files = [(part.filename or key, await part.read()) for key, part in form.multi_items()
                     if isinstance(part, UploadFile)]  # fmt: skip
        finally:
            await form.close()  # the parts' spooled files
        return files, {}
    if kind == "application/json":
        body = await request.body()
        if not body.strip():
            raise RequestError(400, 'the body is empty; send {"images": ["<base64>", ...]}')
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, deep nesting
            raise RequestError(400, f"malformed JSON body: {type(error).__name__}: {error}") from None
        try:
            payload = JsonImages.model_validate(parsed)
        except ValidationError as error:
            raise RequestError(422, f"JSON body: {_one_line_validation(error)}") from None
        files = []
        for i, text in enumerate(payload.images):
            try:
                files.append((f"images[{i}]", base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:")
                                                                else text, validate=True)))  # fmt: skip
            except (binascii.Error, ValueError):
                raise RequestError(400, f"images[{i}] is not base64") from None
        return files, payload.model_dump(exclude_none=True, exclude={"images"})
    if kind.startswith("image/") or kind == "application/octet-stream":
        return [("body", await request.body())], {}
    raise RequestError(415, f"unsupported content type {kind or '(none)'}: send multipart/form-data, "
                            "application/json with base64 images, or one image as the body")  # fmt: skip


def _decode(task: ServedTask, files: list[tuple[str, bytes]], max_pixels: int) -> tuple[torch.Tensor, list]:
    """The files as one batch for ``task``'s model, and each image's (width, height)."""
    tensors, sizes = [], []
    for name, data in files:
        if not data:
            raise RequestError(400, f"{name}: empty file")
        try:
            image = read_image(io.BytesIO(data), name=name, max_pixels=max_pixels)
        except ImageTooLarge as error:
            raise RequestError(413, str(error)) from None
        except DataError as error:
            raise RequestError(400, str(error)) from None
        tensors.append(task.transform(image))
        sizes.append(image.size)
    return torch.stack(tensors), sizes


def _answers(task: ServedTask, outputs: list, sizes: list, files: list, top_k: int, threshold: float) -> list[dict]:
    answers = []
    for (name, _), output, size in zip(files, outputs, sizes):
        answer = task.answer(output, size, top_k=top_k, threshold=threshold)
        if "mask" in answer:  # the class of every pixel as a PNG, the file `sls predict` writes
            png = io.BytesIO()
            Image.fromarray(answer.pop("mask")).save(png, format="PNG")
            answer["mask_png"] = base64.b64encode(png.getvalue()).decode()
        answers.append({"image": name, "width": size[0], "height": size[1], **answer})
    return answers


def _batching(pool: TaskPool, task: ServedTask) -> tuple:
    """The scheduler's key, forward function and tag of a request for ``task``: its group's
    (requests of every member share a pass) or its own. Keys hold the task or group object
    they were made with, so a reload never puts two versions of a task in one pass."""
    placed = pool.placement.get(task.name)
    if placed is not None and placed[0].tasks[placed[1]] is task:
        group, member = placed
        return ("group", group), group.forward, member
    return ("task", task), lambda images, tags: pool.forward(task, images), None


def _images_per_task(key: tuple, tags: list) -> dict[str, int]:
    if key[0] == "group":
        return {key[1].tasks[member].name: count for member, count in Counter(tags).items()}
    return {key[1].name: len(tags)}


class Guard:
    """ASGI middleware: the token on every call, and the body limit before and while the
    body is read (a missing or lying Content-Length is counted, not trusted)."""

    def __init__(self, app, *, token: str | None, max_bytes: int) -> None:
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                response = error_response(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                                          {"WWW-Authenticate": "Bearer"})  # fmt: skip
                return await response(scope, receive, send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, f"the body is {int(length)} bytes, over the limit of {self.max_bytes} "
                                           "(--max-body-mb)")  # fmt: skip
            return await response(scope, receive, send)
        read = 0

        async def counted():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.max_bytes:
                raise RequestError(413, f"the body is over the limit of {self.max_bytes} bytes (--max-body-mb)")
            return message

        await self.app(scope, counted, send)


def create_app(pool: TaskPool, settings: ServeSettings | None = None) -> FastAPI:
    """The server's ASGI app over ``pool`` (its tasks already loaded)."""
    settings = (settings or ServeSettings()).validate()
    metrics = Metrics()
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sls-inference")
        state["scheduler"] = Scheduler(executor, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                                       observe=lambda key, tags, seconds: metrics.forward_pass(
                                           _images_per_task(key, tags), seconds))  # fmt: skip
        state["admin"] = asyncio.Lock()
        metrics.holding(pool)
        yield
        await state["scheduler"].close()
        executor.shutdown(wait=True)

    app = FastAPI(title="sls serve", version="1", lifespan=lifespan,
                  description="Many PETL-adapted, SLS-pruned tasks over one shared backbone.")  # fmt: skip
    app.add_middleware(Guard, token=settings.token, max_bytes=int(settings.max_body_mb * 2**20))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, error.detail, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, _one_line_validation(error))

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, error.message)

    @app.get("/healthz", summary="Liveness: the server answers and how many tasks it holds")
    async def healthz() -> dict:
        return {"status": "ok", "tasks": len(pool.tasks), "backbones": len(pool.backbones)}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.get("/v1/tasks", summary="The tasks served: backbone, k, classes, storage")
    async def list_tasks() -> dict:
        return {"tasks": [task.describe() for task in list(pool.tasks.values())],
                "shared_backbone_bytes": pool.shared_bytes()}  # fmt: skip

    @app.post("/v1/tasks/{name}/predict", summary="Predict with one task", openapi_extra=PREDICT_BODY)
    async def predict(name: str, request: Request, top_k: int = Query(5, ge=1, description="classes per image"),
                      threshold: float = Query(0.3, ge=0, le=1, description="detection: lowest box score")) -> JSONResponse:  # fmt: skip
        began, task, status = time.perf_counter(), pool.tasks.get(name), 200
        try:
            if task is None:
                raise RequestError(404, f"no task named {name!r}; GET /v1/tasks lists the tasks served")
            files, options = await _read_upload(request, settings)
            if not files:
                raise RequestError(400, "the request holds no image")
            if len(files) > settings.max_images:
                raise RequestError(413, f"{len(files)} images, over the limit of {settings.max_images} (--max-images)")
            images, sizes = await run_in_threadpool(_decode, task, files, settings.max_pixels)
            try:
                key, run, tag = _batching(pool, task)
                outputs = await state["scheduler"].submit(key, run, images, tag)
            except Exception as error:  # the model's: logged whole, answered in one line
                log.exception("task %s: the forward pass failed", name)
                raise RequestError(500, f"the model failed on this batch: {type(error).__name__}: {error}") from None
            top_k, threshold = options.get("top_k", top_k), options.get("threshold", threshold)
            answers = await run_in_threadpool(_answers, task, outputs, sizes, files, top_k, threshold)
            return JSONResponse({"task": name, "type": task.task_type.name, "k": int(task.record.depth),
                                 "predictions": answers})  # fmt: skip
        except RequestError as error:
            status = error.status
            return error_response(error.status, error.message)
        except BaseException:
            status = 500
            raise
        finally:
            metrics.answered(name if task is not None else UNKNOWN_TASK, status, time.perf_counter() - began)

    @app.post("/v1/admin/reload", summary="Rescan the served paths: add new task folders, reload changed ones")
    async def reload() -> dict:
        async with state["admin"]:
            report = await run_in_threadpool(pool.sync, settings.paths)
            metrics.holding(pool)  # a removed or replaced task's waiting requests run on the model they came for
        return report

    @app.post("/v1/admin/tasks", summary="Serve one more task folder")
    async def add_task(body: AddTask) -> dict:
        folder = Path(body.folder)
        async with state["admin"]:
            try:
                task = await run_in_threadpool(pool.add, folder, body.name)
            except Exception as error:  # noqa: BLE001 - a folder that does not load is the caller's to fix
                raise RequestError(404 if not folder.exists() else 400, f"{folder}: {error}") from None
            metrics.holding(pool)
        return task.describe()

    @app.delete("/v1/admin/tasks/{name}", summary="Stop serving a task")
    async def remove_task(name: str) -> dict:
        async with state["admin"]:
            if name not in pool.tasks:
                raise RequestError(404, f"no task named {name!r}")
            pool.remove(name)
            metrics.holding(pool)
        return {"removed": name}

    return app


def load_pool(paths: list[str | Path], pool: TaskPool) -> TaskPool:
    """Load every task folder under ``paths`` into ``pool``. A task folder named in ``paths``
    that does not load is an error (at start-up a person is there to fix it); one found in a
    folder of tasks (an unfinished run, say) is skipped with a warning. A reload only reports."""
    from sls.errors import TaskRecordError
    from sls.record import RECORD_FILE

    named = {Path(p).resolve() for p in paths if (Path(p) / RECORD_FILE).is_file()}
    report = pool.sync(paths)
    for failed in report["failed"]:
        message = failed["error"] if failed["folder"] in failed["error"] else f"{failed['folder']}: {failed['error']}"
        if Path(failed["folder"]).resolve() in named:
            raise TaskRecordError(message)
        print(f"sls: warning: skipped {message}", file=sys.stderr, flush=True)
    if not pool.tasks:
        raise TaskRecordError(f"no task to serve under {', '.join(map(str, paths))}")
    return pool


def serve(paths: list[str | Path], *, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          pool: TaskPool | None = None, log_level: str = "info") -> None:  # fmt: skip
    """Load the tasks under ``paths`` and serve them until SIGINT or SIGTERM (uvicorn
    finishes the requests in flight, then the batch running, then exits)."""
    import uvicorn

    settings = settings or ServeSettings()
    settings.paths = [Path(p) for p in paths]
    settings.validate()
    check_bind(host, settings.token)
    pool = load_pool(paths, pool or TaskPool())
    print(f"sls: serving {len(pool.tasks)} task(s) over {len(pool.backbones)} backbone(s) at "
          f"http://{host}:{port} (API docs at /docs)", flush=True)  # fmt: skip
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the
    # handler it found: this one notes it, so a requested stop ends the command normally.
    stops: list[str] = []
    saved = {sig: signal.signal(sig, lambda number, frame: stops.append(signal.Signals(number).name))
             for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    try:
        uvicorn.run(create_app(pool, settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    print(f"sls: stopped on {stops[0] if stops else 'request'}; the requests in flight were answered",
          file=sys.stderr, flush=True)  # fmt: skip
