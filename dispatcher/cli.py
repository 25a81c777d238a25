"""The `kiln` command line. Every Kiln error ends as one line on stderr (a traceback only with --debug)."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dispatcher import exporter, interrupts, store, usecases
from dispatcher.bucket import Bucket
from schemas.errors import ConfigError, KilnError, ManifestError
from schemas.job import JobSpec, JobStatus, RenderResult
from schemas.models import REGISTRY, known_names, resolve_model, weights_location
from schemas.settings import COMPILE_MIN_IMAGES, KilnSettings, load_settings
from schemas.storage import scheme
from schemas.tables import Batch

# Not on a terminal (a pipe, a log file): whole lines, never wrapped or cut at 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 240)


WATCH_SECONDS = 2.0  # how often `kiln status --watch` looks again
CAPS = ("max_jobs", "max_rows", "max_manifest_bytes")  # a manifest's size limits: settings and options alike


def utcnow() -> datetime:
    """Naive UTC, the database's convention."""
    return datetime.now(UTC).replace(tzinfo=None)


class KilnGroup(click.Group):
    """Turns KilnError into a one-line message and a non-zero exit; --debug keeps the traceback. Commands of
    other packages (`kiln worker`) come from the `kiln.commands` entry point and load only when run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(ep.name for ep in entry_points(group="kiln.commands"))})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            found = entry_points(group="kiln.commands", name=name)
            command = next(iter(found)).load() if found else None
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            except OperationalError as exc:  # a database that went away or stayed locked mid-command
                raise KilnError(store.explain(exc)) from exc
        except KilnError as exc:
            if ctx.find_root().params.get("debug"):
                raise
            code = 2 if isinstance(exc, ManifestError | ConfigError) else 1
            for line in str(exc).splitlines():
                err.print(f"[bold red]error:[/] {line}", highlight=False, markup=True, soft_wrap=True)
            ctx.exit(code)


@click.group(cls=KilnGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, envvar="KILN_DEBUG", help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Show what the worker is doing.")
@click.version_option("0.1.0", prog_name="kiln")
def cli(debug: bool, verbose: bool) -> None:
    """Kiln renders product catalogs with FLUX.2 [klein]: a manifest in, one tracked PNG per job out.

    \b
    kiln render catalog.csv --model tiny    render here (SQLite + ./renders), no services needed
    kiln submit catalog.csv --dry-run       check a manifest and see what it would render
    kiln status [BATCH] [--watch]           progress, ETA, failures and their reasons
    kiln export BATCH -o results.csv        one row per job: its manifest row, output and how it was made
    kiln models list                        models, licences, defaults, and whether weights are here
    kiln dispatcher / kiln worker           the fleet: coordinator, and one per GPU machine
    kiln batch pause|resume|cancel|priority control a batch the fleet is rendering
    kiln retry BATCH [--set steps=8]        queue a batch's failed and dead jobs again
    kiln serve [--token SECRET]             a dashboard: progress, a gallery per batch, the fleet

    Settings come from KILN_* environment variables (KILN_DATABASE_URL, KILN_STORAGE_URL, KILN_DEVICE,
    KILN_CACHE_DIR, KILN_BATCH_SIZE, KILN_MAX_JOBS, KILN_BROKER_URL, KILN_S3_ENDPOINT_URL) or the
    matching options.
    """
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    if err.is_terminal:
        handler: logging.Handler = RichHandler(console=err, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # a service's log file: one line per record
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("diffusers", "transformers", "huggingface_hub", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.ERROR)
    for chatty in ("celery", "kombu"):  # one INFO line per message received; warnings matter (lost broker)
        logging.getLogger(chatty).setLevel(logging.DEBUG if debug else logging.WARNING)


def manifest_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that decide how a manifest expands, shared by render and submit."""
    options = [
        click.option("--model", help="Model for every row (overrides the manifest): " + ", ".join(REGISTRY)
                     + ", tiny:NAME, a local diffusers folder, a klein .safetensors transformer file, or a ComfyUI "
                       "models folder."),
        click.option("--prompt", help='Prompt template for every row, e.g. "Studio photo of {Title} by {Vendor}".'),
        click.option("--output", "output_template",
                     help="Output key template for every row, e.g. '{Vendor}/{id}.png'."),
        click.option("--format", "image_format",
                     type=click.Choice(["png", "webp", "jpeg", "jpg"], case_sensitive=False),
                     help="Image format for every row (overrides the manifest) [default: png, or the output key's "
                          "extension]."),
        click.option("--quality", type=click.IntRange(1, 100),
                     help="WebP and JPEG quality for every row (overrides the manifest) [default: 90]."),
        click.option("--decoder", type=click.Choice(["full", "small"]),
                     help="VAE decoder for every row (overrides the manifest): small is FLUX.2-small-decoder, "
                          "about 1.4x faster decoding [default: full]."),
        click.option("--name", help="Batch name, used in default output keys [default: the manifest's file name]."),
        click.option("--non-commercial", is_flag=True,
                     help="Declare this batch non-commercial (needed for 9B models)."),
        click.option("--skip-incomplete", is_flag=True,
                     help="Skip rows whose placeholders are empty, and say how many."),
        click.option("--max-jobs", type=int,
                     help="Refuse manifests that expand to more jobs [env KILN_MAX_JOBS; 100000]."),
        click.option("--max-rows", type=int, help="Refuse manifests with more rows [env KILN_MAX_ROWS; 100000]."),
        click.option("--max-bytes", "max_manifest_bytes", type=int,
                     help="Refuse manifest files bigger than this [env KILN_MAX_MANIFEST_BYTES; 64 MiB]."),
        click.option("--database-url", help="SQLAlchemy URL [env KILN_DATABASE_URL; sqlite:///kiln.db]."),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary for scripts."),
        click.argument("manifest", type=click.Path(path_type=Path)),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _request(manifest: Path, params: dict[str, Any]) -> usecases.Request:
    return usecases.Request(manifest, model=params.get("model"), prompt=params.get("prompt"),
                            output=params.get("output_template"), name=params.get("name"),
                            image_format=params.get("image_format"), quality=params.get("quality"),
                            decoder=params.get("decoder"), non_commercial=params["non_commercial"],
                            skip_incomplete=params["skip_incomplete"],
                            priority=params.get("priority") or 0)


@cli.command()
@manifest_options
@click.option("--out", "storage_url",
              help="Folder, file:// or s3://bucket/prefix for the images [env KILN_STORAGE_URL; ./renders].")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "cpu"]), help="[env KILN_DEVICE; auto]")
@click.option("--batch-size", type=int, help="Images per pipeline call [env KILN_BATCH_SIZE; 1].")
@click.option("--vram", type=float, help="GB of GPU memory to use, CUDA context included; the process is capped "
              "there [env KILN_VRAM; the whole card].")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="[env KILN_CACHE_DIR; ~/.cache/kiln]")
@click.option("--compile", type=click.Choice(["auto", "on", "off"]),
              help="Regional torch.compile of the transformer [env KILN_COMPILE; auto: tried on a CUDA card for "
                   f"{COMPILE_MIN_IMAGES}+ images, kept where faster].")
@click.option("--attention", help="Attention kernel: a diffusers backend name [env KILN_ATTENTION; auto: the "
                                  "fastest exact one, timed on this card].")
def render(manifest: Path, as_json: bool, **params: Any) -> None:
    """Render MANIFEST here, in this process: expand, record, render, and summarize.

    Rendering a manifest again renders only what is not done yet.
    """
    settings = load_settings(**{k: params.get(k) for k in
                                ("database_url", "storage_url", "device", "batch_size", "vram", "cache_dir",
                                 "compile", "attention", *CAPS)})
    interrupts.stop_on_signals()  # Ctrl-C or SIGTERM: the jobs in hand go back to the queue
    progress = Progress(TextColumn("[bold]rendering"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                        TimeRemainingColumn(), console=err, disable=as_json, transient=False)
    task = progress.add_task("render", total=None, start=False)
    done = 0

    def on_start(queued: int) -> None:
        if queued:
            progress.update(task, total=queued)
            progress.start_task(task)
            progress.start()  # a bar only once something is to render (a stopped, never started one prints a line)

    def on_step(step: int, steps: int) -> None:
        progress.update(task, completed=done + min(step / steps, 0.99))

    def on_result(_job: JobSpec, _result: RenderResult) -> None:
        nonlocal done
        done += 1
        progress.update(task, completed=done)

    try:
        report = usecases.render_here(_request(manifest, params), settings, utcnow, on_start=on_start,
                                      on_step=on_step, on_result=on_result)
    except usecases.Interrupted as stopped:  # say how far it got, and how to go on
        _stop(progress)
        err.print(f"interrupted: the job in hand went back to the queue; batch {stopped.batch_id} has "
                  f"{stopped.counts['succeeded']} done and {stopped.counts['queued']} queued. Run the same command "
                  "again to render the rest", highlight=False)
        sys.exit(130)
    finally:
        _stop(progress)
    if as_json:
        out.print_json(data=report.as_json())
    else:
        _print_summary(report)
    if report.failed or report.unserved_models:
        sys.exit(1)


def _stop(progress: Progress) -> None:
    if progress.live.is_started:
        progress.stop()


def _print_summary(report: usecases.Rendered) -> None:
    spi = report.seconds_per_image
    out.print(f"batch [bold]{report.batch_id}[/]: {report.rendered} rendered, {report.failed} failed, "
              f"{report.already_done} already done, of {report.jobs} jobs"
              + (f"; {report.skipped_rows} incomplete rows skipped" if report.skipped_rows else ""))
    out.print(f"wall time {report.wall_seconds:.1f} s" + (f" ({report.load_seconds:.1f} s loading the model)"
                                                             if report.load_seconds >= 0.05 else "")
              + (f", {spi:.2f} s per image" if spi else "") + f" on {report.device}; images in {report.storage}")
    for row_id, error in report.failures[:10]:
        out.print(f"  [red]failed[/] row {row_id}: {error}", highlight=False)
    for model, why in report.unserved_models.items():
        out.print(f"  [red]not rendered here[/] {model}: {why}", highlight=False)
    if report.left_queued and report.unserved_models:
        out.print(f"{report.left_queued} jobs stay queued: run again once this machine can load their model, "
                  f"or render them on a fleet (`kiln submit`)")
    elif report.left_queued:
        out.print(f"batch paused: {report.left_queued} jobs stay queued; `kiln batch resume "
                  f"{report.batch_id}`, then run the same command again")
    if report.failed:
        out.print(f"see every failure with `kiln status {report.batch_id}`")


@cli.command()
@manifest_options
@click.option("--dry-run", is_flag=True, help="Only validate and summarize; write nothing.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher batches are rendered first.")
def submit(manifest: Path, as_json: bool, dry_run: bool, **params: Any) -> None:
    """Validate MANIFEST and record it as a batch of queued jobs (with --dry-run, write nothing)."""
    settings = load_settings(database_url=params.get("database_url"), **{k: params.get(k) for k in CAPS})
    done = usecases.submit(_request(manifest, params), settings, utcnow, dry_run)
    summary, plan = done.as_json(), done.plan
    if as_json:
        out.print_json(data=summary)
        return
    out.print(f"[bold]{manifest.name}[/]: {plan.jobs} jobs, {plan.megapixels} megapixels"
              + (f", {plan.skipped_rows} incomplete rows skipped" if plan.skipped_rows else ""))
    for model, n in plan.per_model.items():
        out.print(f"  {model}: {n} jobs")
    for ex in plan.examples:
        out.print(f"  row {ex['id']} -> {ex['output']} (seed {ex['seed']}): {ex['prompt']}", highlight=False)
    if dry_run:
        out.print("dry run: nothing was written")
    else:
        out.print(f"recorded batch [bold]{summary['batch_id']}[/]: {summary['queued']} queued, "
                  f"{summary['already_done']} already done", highlight=False)
        if settings.broker_url:
            out.print(f"the fleet's workers take it from here: follow it with `kiln status {summary['batch_id']}`",
                      highlight=False)
        else:
            out.print("no fleet is configured (KILN_BROKER_URL): render it here with "
                      f"`{_render_command(manifest, params)}`", highlight=False)


def _render_command(manifest: Path, params: dict[str, Any]) -> str:
    """The `kiln render` line that expands `manifest` as `kiln submit` just did."""
    words = ["kiln", "render", str(manifest)]
    for option, key in (("--model", "model"), ("--prompt", "prompt"), ("--output", "output_template"),
                        ("--format", "image_format"), ("--quality", "quality"), ("--decoder", "decoder"),
                        ("--name", "name"),
                        ("--max-jobs", "max_jobs"), ("--max-rows", "max_rows"),
                        ("--max-bytes", "max_manifest_bytes"), ("--database-url", "database_url")):
        if params.get(key) is not None:
            words += [option, str(params[key])]
    words += [flag for flag, key in (("--non-commercial", "non_commercial"), ("--skip-incomplete", "skip_incomplete"))
              if params.get(key)]
    return shlex.join(words)


def _database(database_url: str | None) -> Any:
    return store.open_database(load_settings(database_url=database_url).database_url)


@cli.command()
@click.argument("batch", required=False)
@click.option("--watch", is_flag=True, help="Follow BATCH live (progress, images per hour, ETA) until nothing of it "
              "is queued or running; Ctrl-C stops watching, not the batch.")
@click.option("--database-url", help="[env KILN_DATABASE_URL]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (with --watch: a line per update).")
def status(batch: str | None, watch: bool, database_url: str | None, as_json: bool) -> None:
    """Job counts of BATCH (an id or unique prefix) with its failures and progress, or of the recent batches."""
    settings = load_settings(database_url=database_url)
    sessions = store.open_database(settings.database_url)
    if watch:
        if batch is None:
            raise ConfigError("--watch follows one batch: name it (`kiln status` lists the recent ones)")
        _watch(sessions, batch, settings, as_json)
        return
    with sessions.begin() as session:
        if batch is None:
            recent = usecases.recent_batches(session)
        else:
            found = usecases.batch_status(session, batch, utcnow(), _worker_timeout(settings))
            progress = usecases.batch_progress(session, found, utcnow(), _worker_timeout(settings))
    if batch is None:
        if as_json:
            out.print_json(data=[row.as_json() for row in recent])
            return
        if not recent:
            out.print("no batches yet: start one with `kiln render MANIFEST`")
        for row in recent:
            out.print(f"{row.batch.id}  {row.batch.created_at:%Y-%m-%d %H:%M}  {row.batch.name}: "
                      f"{_counts_text(row.counts)}" + _state_text(row.batch), highlight=False)
        return
    if as_json:
        out.print_json(data=found.detail_json(progress))
        return
    b = found.batch
    out.print(f"batch [bold]{b.id}[/] {b.name!r} from {b.manifest}, {b.created_at:%Y-%m-%d %H:%M} UTC"
              + _state_text(b), highlight=False)
    out.print(f"  {_counts_text(found.counts)}", highlight=False)
    out.print(f"  {_progress_text(progress)}", highlight=False)
    for g in found.failures:
        rows = f"row {g.row_id}" if g.count == 1 else f"{g.count} rows (first: {g.row_id})"
        out.print(f"  [red]{g.status}[/] {rows}: {g.error}", highlight=False)
    for u in found.unfit:
        rows = f"row {u.row_id}" if u.count == 1 else f"{u.count} rows (first: {u.row_id})"
        out.print(f"  [yellow]waiting, fits no online worker[/] {rows}: {u.reason}", highlight=False)


def _watch(sessions: sessionmaker[Session], batch: str, settings: KilnSettings, as_json: bool) -> None:
    """Redraw a batch's progress every WATCH_SECONDS until nothing of it is queued or running."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress_bar import ProgressBar

    live = None if as_json or not out.is_terminal else Live(console=out, auto_refresh=False)
    last = ""
    try:
        if live:
            live.start()
        while True:
            with sessions.begin() as session:
                found = usecases.batch_status(session, batch, utcnow(), _worker_timeout(settings))
                progress = usecases.batch_progress(session, found, utcnow(), _worker_timeout(settings))
            line = (f"{found.batch.id}: {_progress_text(progress)}; {_counts_text(found.counts)}"
                    + _state_text(found.batch))
            if as_json:
                out.print_json(data=found.as_json() | {"progress": progress.as_json()}, indent=None)
            elif live:
                live.update(Group(ProgressBar(total=progress.total or 1, completed=progress.finished), line),
                            refresh=True)
            elif line != last:
                out.print(line, highlight=False)
            last = line
            if not progress.active:
                return
            time.sleep(WATCH_SECONDS)
    except KeyboardInterrupt:
        err.print("stopped watching; the batch goes on")
    finally:
        if live:
            live.stop()


def _progress_text(p: usecases.BatchProgress) -> str:
    text = f"{p.finished}/{p.total} finished"
    if p.images_per_hour:
        text += f", {p.images_per_hour:.0f} images per hour"
    if p.eta is not None:
        minutes = round(p.eta.total_seconds() / 60)
        done_at = utcnow() + p.eta
        text += f", about {minutes // 60} h {minutes % 60:02d} min left (done near {done_at:%H:%M} UTC)"
    elif p.active:
        text += ", no pace measured yet"
    return text


def _worker_timeout(settings: KilnSettings) -> timedelta:
    return timedelta(seconds=settings.worker_timeout_seconds)


def _counts_text(counts: dict[str, int]) -> str:
    shown = ", ".join(f"{state} {n}" for state, n in counts.items() if n)
    return f"{sum(counts.values())} jobs" + (f": {shown}" if shown else "")


def _state_text(batch: Batch) -> str:
    return ("; paused" if batch.paused else "") + (f"; priority {batch.priority}" if batch.priority else "")


@cli.command()
@click.argument("batch")
@click.option("-o", "--output", "target", type=click.Path(path_type=Path),
              help="results.csv or results.jsonl (by extension) [default: CSV on stdout].")
@click.option("--database-url", help="[env KILN_DATABASE_URL]")
@click.option("--presign", "presign_seconds", type=click.IntRange(1, 7 * 24 * 3600),
              help="Add kiln_download_url: a signed link to each S3 image, valid this many seconds.")
@click.option("--contact-sheet", "sheet", type=click.Path(path_type=Path),
              help="Also write a contact sheet: sheet.html (thumbnails with row, prompt and seed; one file that "
                   "opens offline) or sheet.png (a grid).")
def export(batch: str, target: Path | None, database_url: str | None, presign_seconds: int | None,
           sheet: Path | None) -> None:
    """Write one row per job of BATCH: its manifest row, then status, output, seed, model, worker, attempts, error."""
    settings = load_settings(database_url=database_url)
    with store.open_database(settings.database_url).begin() as session:
        found, rows = usecases.export_rows(session, batch)
    if presign_seconds:
        if scheme(settings.storage_url) != "s3":
            raise ConfigError("--presign needs S3 storage: set KILN_STORAGE_URL=s3://bucket/prefix")
        bucket = Bucket.from_settings(settings)
        for row in rows:
            done = row["kiln_status"] == "succeeded"
            row["kiln_download_url"] = bucket.download_url(row["kiln_output_key"], presign_seconds) if done else None
    if sheet is not None:
        _contact_sheet(rows, sheet, settings, f"{found.name} ({found.id})")
        if target is None:
            return
    exporter.write(rows, target, sys.stdout)
    if target:
        err.print(f"wrote {len(rows)} rows to {target}")


def _contact_sheet(rows: list[dict[str, Any]], path: Path, settings: KilnSettings, title: str) -> None:
    from dispatcher import contact
    from dispatcher.images import StoredImages

    if path.suffix.lower() not in (".html", ".png"):
        raise ConfigError(f"--contact-sheet {path.name}: name it .html or .png")
    images = StoredImages(settings)
    sheet = contact.tiles(rows, lambda row: images.read(row["kiln_output_uri"] or "", row["kiln_output_key"]))
    with exporter.replacing(path, "wb" if path.suffix.lower() == ".png" else "w") as fh:
        fh.write(contact.grid(sheet) if path.suffix.lower() == ".png" else contact.page(sheet, title))
    shown = sum(t.thumbnail is not None for t in sheet)
    err.print(f"wrote a contact sheet of {len(sheet)} jobs ({shown} images) to {path}")


@cli.command("dispatcher")
@click.option("--database-url", help="[env KILN_DATABASE_URL]")
@click.option("--broker-url", help="[env KILN_BROKER_URL] The fleet's Redis.")
@click.option("--batch-size", type=int, help="Jobs of one shape per render message [env KILN_BATCH_SIZE; 1].")
def dispatcher_command(database_url: str | None, broker_url: str | None, batch_size: int | None) -> None:
    """Coordinate the fleet: feed render queues from the database and record what workers report."""
    from dispatcher import service

    settings = load_settings(database_url=database_url, broker_url=broker_url, batch_size=batch_size)
    logging.getLogger("kiln").setLevel(logging.INFO)  # a service tells its log what it does
    service.serve(settings, store.open_database(settings.database_url, connections=service.CONNECTIONS), utcnow)


def _database_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--database-url", help="[env KILN_DATABASE_URL]")(fn)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 lets other PCs in (give a --token only over a network you trust).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--token", help="Secret that unlocks pause, resume, cancel and retry [env KILN_SERVE_TOKEN; "
                                "none: read-only].")
@_database_option
def serve(host: str, port: int, token: str | None, database_url: str | None) -> None:
    """A dashboard in the browser: batches with live progress and ETA, a gallery per batch, the fleet."""
    import uvicorn

    from dispatcher import web
    from dispatcher.images import StoredImages

    settings = load_settings(database_url=database_url, serve_token=token)
    token = settings.serve_token or None
    app = web.create_app(store.open_database(settings.database_url), StoredImages(settings), utcnow,
                         _worker_timeout(settings), token)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    err.print(f"dashboard on http://{shown}:{port}/ ("
              + ("batch control for whoever signs in with the token at /login" if token else
                 "read-only: start with --token SECRET to pause, cancel and retry from it") + "); Ctrl-C stops it",
              highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@cli.group()
def batch() -> None:
    """Pause, resume, cancel or reprioritize a batch; the dispatcher acts on it within a second."""


def _pause_command(name: str, paused: bool, help_text: str) -> None:
    @batch.command(name, help=help_text)
    @click.argument("batch_id")
    @_database_option
    def command(batch_id: str, database_url: str | None) -> None:
        with _database(database_url).begin() as session:
            done = usecases.pause(session, batch_id, paused)
        said = f"{name}d"
        if done.cancelled:
            said += (f"; its {done.cancelled} cancelled jobs stay cancelled: submit the manifest again "
                     f"({done.batch.manifest}) to render them")
        out.print(f"batch {done.batch.id}: {said}", highlight=False)


_pause_command("pause", True, "Publish no more jobs of BATCH (running ones finish).")
_pause_command("resume", False, "Publish BATCH's jobs again.")


@batch.command("priority")
@click.argument("batch_id")
@click.argument("priority", type=int)
@_database_option
def batch_priority(batch_id: str, priority: int, database_url: str | None) -> None:
    """Set BATCH's PRIORITY: higher batches are rendered first."""
    with _database(database_url).begin() as session:
        done = usecases.set_priority(session, batch_id, priority)
    out.print(f"batch {done.batch.id}: priority {priority}", highlight=False)


@batch.command("cancel")
@click.argument("batch_id")
@_database_option
def batch_cancel(batch_id: str, database_url: str | None) -> None:
    """Cancel BATCH's queued jobs (running ones finish); submitting the manifest again brings them back."""
    with _database(database_url).begin() as session:
        done = usecases.cancel(session, batch_id, utcnow())
    out.print(f"batch {done.batch.id}: {done.cancelled} jobs cancelled", highlight=False)


@cli.command()
@click.argument("batch_id")
@click.option("--failed", "which", flag_value="failed", help="Only the failed jobs.")
@click.option("--dead", "which", flag_value="dead", help="Only the dead jobs.")
@click.option("--set", "changes", multiple=True, metavar="FIELD=VALUE",
              help="Retry with a changed " + ", ".join(usecases.RETRY_SETTABLE) + ", e.g. --set steps=8 (repeatable): "
                   "each becomes a new job in the batch, naming the one it replaces.")
@_database_option
def retry(batch_id: str, which: str | None, changes: tuple[str, ...], database_url: str | None) -> None:
    """Queue BATCH's failed and dead jobs again, in the same batch, each with a fresh attempt budget."""
    bad = [c for c in changes if "=" not in c or not c.partition("=")[0].strip()]
    if bad:
        raise ConfigError(f"--set {bad[0]}: give FIELD=VALUE, e.g. --set steps=8")
    wanted = {k.strip(): v.strip() for k, _, v in (c.partition("=") for c in changes)}
    statuses = [JobStatus(which)] if which else [JobStatus.FAILED, JobStatus.DEAD]
    with _database(database_url).begin() as session:
        done = usecases.retry(session, batch_id, statuses, wanted, utcnow())
    what = " and ".join(s.value for s in statuses)
    if not done.requeued and not done.replaced:
        out.print(f"batch {done.batch_id}: no {what} jobs to retry")
        return
    out.print(f"batch {done.batch_id}: {done.requeued + done.replaced} {what} jobs queued again"
              + (f", {done.replaced} of them as new jobs with {', '.join(changes)}" if done.replaced else "")
              + f"; follow with `kiln status {done.batch_id}`", highlight=False)


@cli.command()
@_database_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def workers(database_url: str | None, as_json: bool) -> None:
    """Workers heard from in the last day: online or not, card, models, what each is doing, images done."""
    settings = load_settings(database_url=database_url)
    with store.open_database(settings.database_url).begin() as session:
        found = usecases.workers(session, utcnow(), _worker_timeout(settings))
    if as_json:
        out.print_json(data=[w.as_json() for w in found])
        return
    if not found:
        out.print("no worker heard from in the last day: start one with `kiln worker` (README, \"Run a fleet\")")
    for w in found:
        doing = (f"job{'s' if len(w.rendering) > 1 else ''} {', '.join(w.rendering)} step {w.step}" if w.rendering
                 else "idle") if w.online else "[red]offline[/]"
        loaded = f", {w.loaded_model} loaded {w.plan}" if w.loaded_model and w.online else ""
        out.print(f"{w.name}: {w.device} {w.vram_gb} GB{loaded}, {doing}, {w.done} done, {w.failed} failed, "
                  f"last seen {w.last_seen:%Y-%m-%d %H:%M:%S} UTC", highlight=False)
        if w.models:
            loads = ", ".join(f"{m} x{n}" + (f" ({w.load_seconds[m]:.1f} s)" if m in w.load_seconds else "")
                              for m, n in w.model_loads.items())
            out.print(f"  serves {', '.join(w.models)}" + (f"; loads: {loads}" if loads else ""), highlight=False)
        for model, why in w.unserved.items():
            out.print(f"  [yellow]does not serve[/] {model}: {why}", highlight=False)
        if w.problem:
            out.print(f"  [red]takes no work:[/] {w.problem}", highlight=False)


@cli.group()
def models() -> None:
    """The model registry."""


@models.command("push")
@click.argument("model")
@click.option("--from", "folder", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="The diffusers folder holding the model's files [default: this machine's Hugging Face cache].")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="[env KILN_CACHE_DIR; ~/.cache/kiln]")
def models_push(model: str, folder: Path | None, cache_dir: Path | None) -> None:
    """Put MODEL's files in the fleet's bucket once (KILN_STORAGE_URL), with their SHA-256s: workers that lack
    them pull them from there through signed links and check every file, instead of each downloading from the hub.
    Files already there are skipped, so an interrupted push resumes."""
    settings = load_settings(cache_dir=cache_dir)
    total = {"bytes": 0, "sent": 0}

    def said(path: str, size: int, uploaded: bool) -> None:
        total["bytes"] += size
        total["sent"] += size if uploaded else 0
        out.print(f"  {'uploaded' if uploaded else 'already there'}: {path} ({size / 1e6:,.1f} MB)", highlight=False)

    sheet = usecases.push_model(model, folder, settings, said)
    out.print(f"pushed {model}: {len(sheet.files)} files, {total['bytes'] / 1e9:.2f} GB "
              f"({total['sent'] / 1e9:.2f} GB uploaded now)"
              + ("; workers are told at once" if settings.broker_url else
                 "; the dispatcher tells workers within ten minutes"), highlight=False)


@models.command("list")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="[env KILN_CACHE_DIR; ~/.cache/kiln]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def models_list(cache_dir: Path | None, as_json: bool) -> None:
    """Each model with its licence, call defaults, and where its weights are on this machine."""
    settings = load_settings(cache_dir=cache_dir)
    rows: list[dict[str, Any]] = []
    for name in known_names():
        spec = resolve_model(name)
        where = weights_location(spec, settings.cache_dir)
        rows.append({"name": name, "source": spec.source, "licence": spec.licence, "commercial_use": spec.commercial,
                     "steps": spec.default_steps, "guidance": spec.default_guidance,
                     "weights": str(where) if where else None, "description": spec.description})
    if as_json:
        out.print_json(data=rows)
        return
    table = Table("model", "licence", "steps", "guidance", "weights here", "about")
    for r in rows:
        table.add_row(r["name"], r["licence"], str(r["steps"]), f"{r['guidance']:g}",
                      r["weights"] or ("built on first use" if r["source"] == "kiln:tiny" else "not downloaded"),
                      r["description"])
    out.print(table)


def main() -> None:
    """Console entry point."""
    cli(prog_name="kiln")
