"""`kiln serve`: a small dashboard over the use-case layer. Server-rendered HTML (Jinja2 templates, no front-end build
step, no script): the batches with live progress and ETA, a batch's gallery with filters and each image's
parameters, and the fleet. Read-only unless started with a token; with one, whoever gives it may pause, resume,
cancel and retry batches. JSON of the same views under /api for scripts.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from threading import Lock
from typing import Any
from urllib.parse import quote

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from dispatcher import usecases
from dispatcher.images import StoredImages, jpeg, thumbnail
from schemas.errors import KilnError
from schemas.job import JobStatus
from schemas.params import content_type

COOKIE = "kiln_token"
REFRESH_SECONDS = 5  # how often a page that is still changing reloads itself
PER_PAGE = 48  # thumbnails on a gallery page
THUMBS_KEPT = 1024  # thumbnails kept in memory (about 20 kB each)
ACTIONS = ("pause", "resume", "cancel", "retry")


class Thumbnails:
    """JPEG thumbnails of stored images, the most recently asked for kept in memory."""

    def __init__(self, images: StoredImages, kept: int = THUMBS_KEPT) -> None:
        self.images = images
        self.kept = kept
        self.cache: OrderedDict[str, bytes] = OrderedDict()
        self.lock = Lock()

    def get(self, job_id: str, uri: str, key: str) -> bytes | None:
        with self.lock:
            if job_id in self.cache:
                self.cache.move_to_end(job_id)
                return self.cache[job_id]
        small = thumbnail(self.images.read(uri, key))
        if small is None:
            return None
        data = jpeg(small)
        with self.lock:
            self.cache[job_id] = data
            while len(self.cache) > self.kept:
                self.cache.popitem(last=False)
        return data


class Dashboard:
    """The dashboard's pages, images, batch control and JSON, each route a method; `app` serves them."""

    def __init__(self, sessions: sessionmaker[Session], images: StoredImages, clock: Callable[[], datetime],
                 worker_timeout: timedelta, token: str | None = None) -> None:
        self.sessions, self.images, self.clock, self.worker_timeout = sessions, images, clock, worker_timeout
        self.token = token  # None: read-only; else the secret that unlocks batch control
        self.templates = Jinja2Templates(directory=Path(__file__).parent / "templates")  # escapes .html
        self.templates.env.filters["duration"] = _duration
        self.templates.env.filters["urlquote"] = lambda s: quote(str(s), safe="")
        self.thumbs = Thumbnails(images)

    def app(self) -> Starlette:
        """The ASGI app serving these routes."""
        routes = [
            Route("/", self.index), Route("/batches/{batch_id}", self.batch), Route("/workers", self.workers),
            Route("/thumbs/{job_id}.jpg", self.thumb), Route("/images/{job_id}", self.image),
            Route("/batches/{batch_id}/{action}", self.control, methods=["POST"]),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/api/batches", self.api_batches), Route("/api/batches/{batch_id}", self.api_batch),
            Route("/api/workers", self.api_workers)]
        return Starlette(routes=routes, exception_handlers={HTTPException: self.error})

    def allowed(self, request: Request) -> bool:
        """Whether the request carries the token (cookie or bearer header)."""
        given = request.cookies.get(COOKIE) or request.headers.get("authorization", "").removeprefix("Bearer ")
        return self.token is not None and bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def page(self, request: Request, name: str, **context: Any) -> Response:
        """A template, told whether this visitor may control batches."""
        return self.templates.TemplateResponse(request, name, context | {"control": self.allowed(request),
                                                                         "read_only": self.token is None})

    def read(self, fn: Callable[[Session], Any]) -> Any:
        """`fn` in a transaction; a KilnError (no such batch, say) becomes a 404 that says it."""
        try:
            with self.sessions.begin() as session:
                return fn(session)
        except KilnError as exc:
            raise HTTPException(404, str(exc)) from None

    def _batches(self, session: Session) -> list[tuple[usecases.BatchStatus, usecases.BatchProgress]]:
        now = self.clock()
        return [(b, usecases.batch_progress(session, b, now, self.worker_timeout))
                for b in usecases.recent_batches(session)]

    def _batch(self, session: Session, batch_id: str) -> tuple[usecases.BatchStatus, usecases.BatchProgress]:
        status = usecases.batch_status(session, batch_id, self.clock(), self.worker_timeout)
        return status, usecases.batch_progress(session, status, self.clock(), self.worker_timeout)

    def _workers(self, session: Session) -> list[usecases.WorkerView]:
        return usecases.workers(session, self.clock(), self.worker_timeout)

    def index(self, request: Request) -> Response:
        """The recent batches, with progress and ETA."""
        rows = self.read(self._batches)
        return self.page(request, "batches.html", rows=rows, now=self.clock(),
                         refresh=REFRESH_SECONDS if any(p.active for _, p in rows) else None)

    def batch(self, request: Request) -> Response:
        """One batch: its progress and a page of its gallery, filtered by status."""
        show = request.query_params.get("show", "all")
        if show not in usecases.SHOWS:
            raise HTTPException(400, f"show={show}: one of {', '.join(usecases.SHOWS)}")
        try:
            number = int(request.query_params.get("page", "1"))
        except ValueError:
            raise HTTPException(400, "page: a number from 1") from None

        def load(session: Session) -> tuple[Any, ...]:
            status, progress = self._batch(session, request.path_params["batch_id"])
            return status, progress, usecases.gallery(session, status, show, number, PER_PAGE)

        status, progress, gallery = self.read(load)
        return self.page(request, "batch.html", status=status, progress=progress, gallery=gallery,
                         now=self.clock(), refresh=REFRESH_SECONDS if progress.active else None)

    def workers(self, request: Request) -> Response:
        """The fleet: every worker heard from lately."""
        return self.page(request, "workers.html", workers=self.read(self._workers), refresh=REFRESH_SECONDS)

    def _stored(self, job_id: str) -> Any:
        found = self.read(lambda s: usecases.output(s, job_id))
        if found is None:
            raise HTTPException(404, f"job {job_id} has no image")
        return found

    def thumb(self, request: Request) -> Response:
        """A job's image as a small JPEG."""
        found = self._stored(request.path_params["job_id"])
        data = self.thumbs.get(found.job_id, found.uri, found.key)
        if data is None:
            raise HTTPException(404, f"the image of job {found.job_id} is gone from {found.uri}")
        # A job's image is created once and never replaced: the browser may keep it.
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400, immutable"})

    def image(self, request: Request) -> Response:
        """A job's image itself: a signed link into the bucket, or the file."""
        found = self._stored(request.path_params["job_id"])
        link = self.images.link(found.uri, found.key)
        if link is not None:  # from the bucket straight to the browser
            return RedirectResponse(link, status_code=307)
        path = self.images.path(found.uri)
        if path is None or not path.is_file():
            raise HTTPException(404, f"the image of job {found.job_id} is gone from {found.uri}")
        return FileResponse(path, media_type=content_type(path.name))

    async def control(self, request: Request) -> Response:
        """Pause, resume, cancel or retry a batch: only with the token."""
        if not self.allowed(request):
            raise HTTPException(403, "this dashboard is read-only: batch control needs the token it was started "
                                     "with (kiln serve --token); sign in at /login")
        action, batch_id = request.path_params["action"], request.path_params["batch_id"]
        if action not in ACTIONS:
            raise HTTPException(404, f"no action {action}: one of {', '.join(ACTIONS)}")

        def act(session: Session) -> str:
            if action == "retry":
                return usecases.retry(session, batch_id, [JobStatus.FAILED, JobStatus.DEAD], {},
                                      self.clock()).batch_id
            if action == "cancel":
                return usecases.cancel(session, batch_id, self.clock()).batch.id
            return usecases.pause(session, batch_id, action == "pause").batch.id

        done = await run_in_threadpool(self.read, act)
        return RedirectResponse(f"/batches/{quote(done, safe='')}", status_code=303)

    async def login(self, request: Request) -> Response:
        """The sign-in form; the right token sets the cookie that control reads."""
        if request.method == "GET":
            return self.page(request, "login.html", failed=False)
        form = await request.form()
        given = str(form.get("token", ""))
        if self.token is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            response = self.page(request, "login.html", failed=True)
            response.status_code = 403
            return response
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
        return response

    def api_batches(self, _request: Request) -> Response:
        """The recent batches as JSON."""
        return JSONResponse([s.as_json() | {"progress": p.as_json()} for s, p in self.read(self._batches)])

    def api_batch(self, request: Request) -> Response:
        """One batch in detail as JSON."""
        def load(session: Session) -> dict[str, Any]:
            status, progress = self._batch(session, request.path_params["batch_id"])
            return status.detail_json(progress)

        return JSONResponse(self.read(load))

    def api_workers(self, _request: Request) -> Response:
        """The fleet as JSON."""
        return JSONResponse([w.as_json() for w in self.read(self._workers)])

    async def error(self, request: Request, exc: Exception) -> Response:
        """An HTTP error as a page (or JSON under /api) that says what went wrong, never a traceback."""
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        response = self.page(request, "error.html", message=exc.detail, code=exc.status_code)
        response.status_code = exc.status_code
        return response


def create_app(sessions: sessionmaker[Session], images: StoredImages, clock: Callable[[], datetime],
               worker_timeout: timedelta, token: str | None = None) -> Starlette:
    """The dashboard as an ASGI app. `token`: None for read-only; else the secret that unlocks batch control."""
    return Dashboard(sessions, images, clock, worker_timeout, token).app()


def _duration(value: timedelta | None) -> str:
    if value is None:
        return ""
    minutes = round(value.total_seconds() / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"
