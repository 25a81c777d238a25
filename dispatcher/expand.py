"""Expansion: a parsed manifest becomes a list of fully specified, deterministic jobs, or one ManifestError.

Pure: no database, no files written. The same manifest gives the same job ids, seeds and output keys on
every machine, because each comes from a hash of the row, never from time or randomness.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError

from dispatcher.reader import RawManifest, Record
from dispatcher.template import TemplateError, placeholders, render
from schemas.checkpoints import TRANSFORMER_WIDTH, header, lora_width
from schemas.errors import KilnError, ManifestError, ModelError, Problem
from schemas.keys import output_key_problem
from schemas.manifest import DEFAULT_SIDE, FIELDS, MAX_PIXELS, MAX_PROMPT_CHARS, MAX_ROWS, RowFields, describe
from schemas.models import DEFAULT_MODEL, ModelSpec, resolve_model, transformer_width
from schemas.params import (
    DEFAULT_QUALITY,
    EXTENSIONS,
    MAX_LORAS,
    MAX_REFERENCES,
    Decoder,
    ImageFormat,
    Lora,
    Reference,
    RenderParams,
    named_format,
)

REFERENCE_TYPES = (".png", ".jpg", ".jpeg", ".webp")
MAX_REFERENCE_BYTES = 20 * 2**20
MAX_MODEL_CHARS = 300  # the jobs table's model column
MAX_LORA_BYTES = 2 * 2**30  # a rank-128 LoRA of the 9B transformer is well under 1 GiB
MAX_REFERENCE_PIXELS = 64 * 10**6  # a 50 MP packshot opens; a file that declares gigapixels is refused


@dataclass(frozen=True)
class Options:
    """What the user said besides the manifest itself."""

    batch: str  # the batch name, used in default output keys
    base_dir: Path  # folder that relative references and model folders are resolved against
    prompt: str | None = None  # --prompt: overrides every row's prompt
    model: str | None = None  # --model: overrides every row's model
    output: str | None = None  # --output: overrides every row's output template
    format: ImageFormat | None = None  # --format: overrides every row's format
    quality: int | None = None  # --quality: overrides every row's quality
    decoder: Decoder | None = None  # --decoder: overrides every row's decoder
    non_commercial: bool = False
    skip_incomplete: bool = False
    max_jobs: int = 100_000
    max_rows: int = MAX_ROWS
    # s3://bucket/key -> that object as a local file (the fleet's bucket credentials); None: no bucket configured
    fetch: Callable[[str], Path] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)  # slots: a million of them in a big dry run
class PlannedJob:
    """One job as the manifest asks for it, before it is recorded."""

    job_id: str
    params: RenderParams
    output_key: str
    manifest_row: int
    manifest_line: int
    row_id: str
    variant: int
    row_data: dict[str, Any]


@dataclass
class Expansion:
    """The jobs of a manifest (unless only counted), what they add up to, and how many incomplete rows were
    skipped."""

    jobs: list[PlannedJob]
    skipped_rows: int = 0
    count: int = 0  # jobs, kept or not
    per_model: Counter[str] = field(default_factory=Counter)
    pixels: int = 0  # width x height, summed over the jobs
    first: list[PlannedJob] = field(default_factory=list)  # the first three jobs, for a plan's examples
    models: dict[str, ModelSpec] = field(default_factory=dict)  # by ModelSpec.name, as jobs name them
    typed: dict[str, ModelSpec] = field(default_factory=dict, repr=False)  # by what the manifest says


class _Problems:
    """Collects problems; the same message on many rows is reported once with a count."""

    def __init__(self) -> None:
        self._first: dict[str, Problem] = {}
        self._count: dict[str, int] = {}

    def add(self, where: str, message: str) -> None:
        self._count[message] = self._count.get(message, 0) + 1
        self._first.setdefault(message, Problem(where, message))

    def __bool__(self) -> bool:
        return bool(self._first)

    def error(self) -> ManifestError:
        out = []
        for message, problem in self._first.items():
            more = self._count[message] - 1
            out.append(Problem(problem.where, message + (f" (and {more} more rows)" if more else "")))
        return ManifestError(out)


def derive_seed(row_id: str, index: int) -> int:
    """A seed from a row id and an image index: stable everywhere, different for every row and index."""
    digest = hashlib.sha256(f"kiln-seed\0{row_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def expand(manifest: RawManifest, options: Options, keep_jobs: bool = True) -> Expansion:
    """Validate every row and expand it into jobs; raise one ManifestError listing every problem found. With
    `keep_jobs` False the jobs are only counted (a dry run of a million rows holds none of them)."""
    problems = _Problems()
    expansion = Expansion(jobs=[])
    seen_ids: dict[str, int] = {}  # row id -> its record's line (or number), to say where it was seen first
    seen_keys: dict[str, int] = {}
    combos = _combinations(manifest.matrix)
    records = iter(manifest.records)
    try:
        for record in records:
            if record.number > options.max_rows:
                rows = record.number + sum(1 for _ in records)
                problems.add(manifest.name, f"has {rows:,} rows; the limit is {options.max_rows:,} (--max-rows, "
                                            "KILN_MAX_ROWS): split it into several manifests, or raise the limit")
                break
            if not _expand_row(record, manifest, options, expansion, problems, combos, seen_ids, seen_keys,
                               keep_jobs):
                break
    except ManifestError as exc:  # the file itself is broken where reading reached: say so with the rows before
        for problem in exc.problems:
            problems.add(problem.where, problem.message)
    if problems:
        raise problems.error()
    return expansion


def _where(manifest: RawManifest, mark: int) -> str:
    """Where a record was, from the mark `_expand_row` keeps: its line (a streamed file's records have one), or for
    a JSON document (held whole, as a list) minus its number. The record's own `where`, rebuilt only for a message,
    so a million seen ids and keys hold no strings of their own."""
    if mark > 0:
        return f"{manifest.name} line {mark}"
    assert isinstance(manifest.records, list)
    return manifest.records[-mark - 1].where


def _expand_row(record: Record, manifest: RawManifest, options: Options, expansion: Expansion,
                problems: _Problems, combos: list[dict[str, str]], seen_ids: dict[str, int],
                seen_keys: dict[str, int], keep_jobs: bool) -> bool:
    """Validate and expand one record into `expansion`; False once the job cap is passed (stop reading)."""
    row = _validate(record, manifest, problems)
    if row is None:
        return True
    mark = record.line or -record.number
    row_id = row.id or str(record.number)
    if row_id in seen_ids:
        problems.add(record.where, f'column "id": {row_id!r} is also the id of {_where(manifest, seen_ids[row_id])}; '
                                   "ids must be unique")
        return True
    seen_ids[row_id] = mark
    try:
        jobs = list(_row_jobs(record, row, row_id, combos, manifest, options, expansion))
    except _RowProblem as exc:
        if exc.incomplete and options.skip_incomplete:
            expansion.skipped_rows += 1
        else:
            problems.add(record.where, str(exc))
        return True
    for job in jobs:
        if job.output_key in seen_keys:
            problems.add(record.where, f"output key {job.output_key!r} is also written by "
                                       f"{_where(manifest, seen_keys[job.output_key])}: make the output template "
                                       "unique per image (add {id} or {variant})")
        seen_keys.setdefault(job.output_key, mark)
        expansion.count += 1
        expansion.per_model[job.params.model] += 1
        expansion.pixels += job.params.width * job.params.height
        if len(expansion.first) < 3:
            expansion.first.append(job)
    if keep_jobs:
        expansion.jobs.extend(jobs)
    if expansion.count > options.max_jobs:
        problems.add(manifest.name, f"expands to more than {options.max_jobs} jobs (the --max-jobs cap): "
                                    "split the manifest or raise --max-jobs")
        return False
    return True


class _RowProblem(Exception):
    def __init__(self, message: str, incomplete: bool = False) -> None:
        super().__init__(message)
        self.incomplete = incomplete


def unstorable(text: str) -> str | None:
    """Why a database Kiln supports cannot store `text`, or None: PostgreSQL refuses NUL characters, and no
    UTF-8 database takes a lone surrogate (a broken \\ud800 escape in JSON)."""
    if "\x00" in text:
        return "contains a NUL character (\\x00), which PostgreSQL cannot store: remove it"
    if text.isascii():  # most text: no surrogate to look for
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (a broken \\uXXXX escape), which is not text: fix the escape"
    return None


def _validate(record: Record, manifest: RawManifest, problems: _Problems) -> RowFields | None:
    values = {**manifest.defaults, **record.values}
    bad = [f"a column name {unstorable(k)}" if unstorable(k) else f'column "{k}": {unstorable(v)}'
           for k, v in values.items() if unstorable(k) or (isinstance(v, str) and unstorable(v))]
    for problem in bad:
        problems.add(record.where, problem)
    if bad:
        return None
    # An empty cell means "not given" for a field; for a variable it stays an empty value.
    values = {k: v for k, v in values.items() if not (k in FIELDS and (v is None or v == ""))}
    try:
        return RowFields.model_validate(values)
    except ValidationError as exc:
        for err in exc.errors():
            column = str(err["loc"][0]) if err["loc"] else "?"
            if column in FIELDS:
                problems.add(record.where, f'column "{column}": must be {describe(column)}, '
                                           f"got {err.get('input')!r}")
            else:
                problems.add(record.where, f'column "{column}": variables must be text or numbers, '
                                           f"got {err.get('input')!r}")
        return None


def _combinations(matrix: dict[str, list[Any]]) -> list[dict[str, str]]:
    names = list(matrix)
    return [dict(zip(names, (_text(v) for v in values), strict=True))
            for values in itertools.product(*(matrix[n] for n in names))]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _row_jobs(record: Record, row: RowFields, row_id: str, combos: list[dict[str, str]],
              manifest: RawManifest, options: Options, expansion: Expansion) -> Iterator[PlannedJob]:
    spec = _model(options.model or row.model or DEFAULT_MODEL, options, expansion)
    width, height = row.width or DEFAULT_SIDE, row.height or DEFAULT_SIDE
    if width * height > MAX_PIXELS:
        raise _RowProblem(f'columns "width" and "height": {width}x{height} is above the {MAX_PIXELS:,} pixel cap '
                          f"(about 1.1 MP, e.g. 1024x1072): larger sizes switch klein to an untested schedule")
    steps = row.steps or spec.default_steps
    guidance = row.guidance if row.guidance is not None else spec.default_guidance
    count = row.count or 1
    prompt_template = options.prompt or row.prompt or manifest.prompt
    if not prompt_template:
        raise _RowProblem('no prompt: add a "prompt" column or pass --prompt "TEMPLATE with {Column}"')
    output_template = options.output or row.output or (
        "{batch}/{id}" if len(combos) * count == 1 else "{batch}/{id}-{variant}")
    image_format = options.format or row.format
    row_data = {**manifest.defaults, **record.values}
    # Every column is a variable, the fields included: `--prompt "{prompt}, studio light"` extends a row's prompt.
    variables = {k: _text(v) for k, v in row_data.items()}
    for c, combo in enumerate(combos):
        for n in range(count):
            variant = c * count + n
            seed = (row.seed + n) % 2**32 if row.seed is not None else derive_seed(row_id, n)
            values = {**variables, **combo, "id": row_id, "n": str(n), "variant": str(variant),
                      "seed": str(seed), "model": spec.name, "width": str(width), "height": str(height),
                      "batch": options.batch}
            prompt = _prompt(prompt_template, values)
            key = _fill("output", output_template, values)
            key, fmt = _keyed(key, image_format)
            problem = output_key_problem(key)
            if problem:
                raise _RowProblem(f'column "output": the output key {key!r} {problem}')
            quality = options.quality or row.quality
            if fmt == "png" and quality is not None:
                where = "--quality" if options.quality else 'column "quality"'
                raise _RowProblem(f'{where}: applies to webp and jpeg; PNG is lossless (leave it out, or set "format" '
                                  "or --format to webp or jpeg)")
            files = _files(_fill("reference", row.reference, values), options, REFERENCE_FILES) if row.reference else []
            first = files[0] if files else None
            loras = _loras(row, values, options, spec)
            params = RenderParams(model=spec.name, prompt=prompt, width=width, height=height, steps=steps,
                                  guidance=guidance, seed=seed, reference=first.path if first else None,
                                  reference_sha256=first.sha256 if first else None, more_references=tuple(files[1:]),
                                  format=fmt, quality=None if fmt == "png" else quality or DEFAULT_QUALITY,
                                  loras=loras, decoder=options.decoder or row.decoder or "full")
            yield PlannedJob(params.job_id(key), params, key, record.number, record.line, row_id, variant,
                             {**row_data, **combo})


def _prompt(template: str, values: dict[str, str]) -> str:
    """A variant's prompt: the template filled in, then checked (a template or matrix value may bring in what the
    row's own prompt was checked for)."""
    prompt = _fill("prompt", template, values)
    if unstorable(prompt):
        raise _RowProblem(f"the prompt {unstorable(prompt)}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _RowProblem(f"the prompt is {len(prompt)} characters after filling in the template; "
                          f"the limit is {MAX_PROMPT_CHARS}")
    return prompt


def _loras(row: RowFields, values: dict[str, str], options: Options, spec: ModelSpec) -> tuple[Lora, ...]:
    """A variant's LoRAs, each with its scale (one for all, or one each), checked against the row's model."""
    lora_files = _files(_fill("lora", row.lora, values), options, LORA_FILES) if row.lora else []
    scales = row.lora_scale or (1.0,)
    if len(scales) not in (1, len(lora_files)):
        raise _RowProblem(f'column "lora_scale": {len(scales)} values for {len(lora_files)} LoRAs: give one '
                          "for all of them, or one per LoRA in the same order")
    per_lora = scales if len(scales) == len(lora_files) else scales * len(lora_files)
    loras = tuple(Lora(path=f.path, sha256=f.sha256, scale=s) for f, s in zip(lora_files, per_lora, strict=True))
    for lora in loras:
        _lora_fits(lora, spec)
    return loras


def _keyed(key: str, image_format: ImageFormat | None) -> tuple[str, ImageFormat]:
    """An output key and its format. A format given decides the key's extension (an image extension of another
    format is replaced); with none given, the key's extension decides, and a key without one is PNG."""
    named = named_format(key)
    if named is not None:
        if image_format is None or image_format == named:
            return key, named
        key = key.rpartition(".")[0]
    chosen: ImageFormat = image_format or "png"
    return key + EXTENSIONS[chosen], chosen


def _model(name: str, options: Options, expansion: Expansion) -> ModelSpec:
    if name not in expansion.typed:
        # a folder named on the command line is relative to where the user stands; in a manifest, to the manifest
        base = Path.cwd() if options.model else options.base_dir
        try:
            expansion.typed[name] = resolve_model(name, base)
        except ModelError as exc:
            raise _RowProblem(f'column "model": {exc}') from None
    spec = expansion.models.setdefault(expansion.typed[name].name, expansion.typed[name])
    if len(spec.name) > MAX_MODEL_CHARS:
        raise _RowProblem(f'column "model": the folder {spec.name!r} has a path over {MAX_MODEL_CHARS} characters: '
                          "move it somewhere shorter")
    if not spec.commercial and not options.non_commercial:
        raise _RowProblem(f'column "model": {spec.name} is under the {spec.licence} licence, which forbids '
                          "commercial use such as product catalogs. Use klein-4b or klein-base-4b (Apache-2.0), "
                          "or pass --non-commercial to declare this batch non-commercial")
    return spec


def _fill(column: str, template: str, values: dict[str, str]) -> str:
    try:
        names = placeholders(template)
        empty = [n for n in names if n in values and not values[n].strip()]
        if empty:
            raise _RowProblem(f"placeholder {{{empty[0]}}} in \"{column}\" is empty in this row: fill it in, "
                              "or pass --skip-incomplete to skip such rows", incomplete=True)
        return render(template, values)
    except TemplateError as exc:
        raise _RowProblem(f'column "{column}": the template {exc}') from None


@dataclass(frozen=True)
class _FileKind:
    """A kind of file a row names (reference images, LoRAs): its column, how many one row may name, and what a
    file of the kind must be."""

    column: str
    limit: int
    too_many: str  # after "N", when a row names more than `limit`
    suffixes: tuple[str, ...]
    not_suffix: str  # after the path, when its suffix is not one of `suffixes`
    max_bytes: int
    too_big: str  # after the path, when it is over `max_bytes`
    problem: Callable[[Path, tuple[int, int]], str | None]  # what is wrong with its content (cached by version)


def _files(text: str, options: Options, kind: _FileKind) -> list[Reference]:
    """The files a row names in `kind.column` (`|` between several), each checked: its absolute path and its
    content's SHA-256."""
    paths = [p.strip() for p in text.split("|") if p.strip()]
    if len(paths) > kind.limit:
        raise _RowProblem(f'column "{kind.column}": {len(paths)} {kind.too_many}')
    return [_file(path_text, options, kind) for path_text in paths]


def _file(path_text: str, options: Options, kind: _FileKind) -> Reference:
    where = f'column "{kind.column}": {path_text!r}'
    if Path(path_text).suffix.lower() not in kind.suffixes:
        raise _RowProblem(f"{where} {kind.not_suffix}")
    if path_text.startswith("s3://"):
        if options.fetch is None:
            raise _RowProblem(f"{where} is in a bucket, and no bucket is configured here: set KILN_STORAGE_URL "
                              "(and KILN_S3_ENDPOINT_URL, the AWS_* keys) to the fleet's bucket, or name a file")
        try:
            path = options.fetch(path_text)
        except KilnError as exc:
            raise _RowProblem(f"{where}: {exc}") from None
    else:
        path = Path(path_text).expanduser()
        path = path if path.is_absolute() else options.base_dir / path
    if not path.is_file():
        raise _RowProblem(f"{where} does not exist (paths are relative to the manifest)")
    if path.stat().st_size > kind.max_bytes:
        raise _RowProblem(f"{where} {kind.too_big}")
    path, version = path.resolve(), _version(path)
    problem = kind.problem(path, version)
    if problem:
        raise _RowProblem(f"{where} {problem}")
    return Reference(path=str(path), sha256=_digest(path, version))


@functools.lru_cache(maxsize=256)
def _lora_problem(path: Path, _version: tuple[int, int]) -> str | None:
    """What is wrong with a LoRA file, read from its safetensors header only (whether it fits the row's model is
    `_lora_fits`)."""
    try:
        keys = header(path)  # read once: `_lora_fits` reads the same header from its cache
    except ModelError as exc:
        return str(exc).removeprefix(f"{path} ")
    if not any("lora" in key or "lokr" in key for key in keys):
        return ("holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up tensors): is it a whole model "
                "checkpoint? Name a LoRA trained for klein")
    return None


def _lora_fits(lora: Lora, spec: ModelSpec) -> None:
    """Refuse a LoRA trained for a transformer of another width than the row's model's (a 9B LoRA on 4B): read from
    its header where its attention projections say so, else found out when a worker loads it."""
    wanted, trained = transformer_width(spec), lora_width(header(Path(lora.path)))
    if wanted and trained and wanted != trained:
        names = {width: "klein " + size.upper() if size != "tiny" else "the tiny model"
                 for size, width in TRANSFORMER_WIDTH.items()}
        raise _RowProblem(f'column "lora": {Path(lora.path).name} was trained for a transformer {trained} wide '
                          f"({names.get(trained, 'not klein')}), but {spec.name} is {wanted} wide: a LoRA fits only "
                          "the model size it was trained on")


def _version(path: Path) -> tuple[int, int]:
    """What tells one version of a file from the next without reading it: modification time and size."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4096)
def _digest(path: Path, _version: tuple[int, int]) -> str:
    """A reference file's SHA-256, read once per version of the file however many rows share it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _image_problem(path: Path, _version: tuple[int, int]) -> str | None:
    """What is wrong with a reference image, read from its header only (a row may share it with thousands)."""
    width: int | None = None
    height: int | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:  # declares more than Pillow opens at all
        pass
    except (OSError, ValueError) as exc:
        return f"is not a readable image ({exc})"
    if width is None or height is None or width * height > MAX_REFERENCE_PIXELS:
        size = f"{width}x{height} pixels" if width and height else "more pixels than Pillow will open"
        return (f"declares {size}, over the {MAX_REFERENCE_PIXELS // 10**6} MP Kiln opens: klein uses at most 1 MP "
                "of a reference, so save a smaller copy")
    return None


REFERENCE_FILES = _FileKind(
    "reference", MAX_REFERENCES, f"images; klein takes at most {MAX_REFERENCES} in Kiln (each adds up to 4,096 "
    "tokens to every step): keep the views that show the product best", REFERENCE_TYPES,
    f"is not a {', '.join(REFERENCE_TYPES)} image", MAX_REFERENCE_BYTES,
    f"is over {MAX_REFERENCE_BYTES // 2**20} MiB", _image_problem)
LORA_FILES = _FileKind(
    "lora", MAX_LORAS, f"LoRAs; Kiln applies at most {MAX_LORAS} to one job", (".safetensors",),
    "is not a .safetensors file (Kiln never loads pickled .bin, .pt or .ckpt files: convert it, or take the "
    ".safetensors download)", MAX_LORA_BYTES, f"is over {MAX_LORA_BYTES // 2**30} GiB: that is a whole model, "
    "not a LoRA", _lora_problem)
