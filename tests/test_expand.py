"""Expansion: deterministic jobs from rows, model defaults, licences, and every row-level rejection."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from dispatcher.expand import Options, derive_seed, expand
from dispatcher.reader import parse_manifest, read_manifest
from schemas.errors import ManifestError


def jobs_of(data: str, name: str = "m.csv", **options: object):
    opts = Options(batch="cat", base_dir=Path.cwd(), **options)  # type: ignore[arg-type]
    return expand(parse_manifest(data.encode(), name), opts)


def rejection(data: str, name: str = "m.csv", **options: object) -> str:
    with pytest.raises(ManifestError) as info:
        jobs_of(data, name, **options)
    return str(info.value)


def test_same_manifest_gives_same_ids_seeds_and_keys() -> None:
    data = "id,prompt,count\nshoe,red shoe,2\nbag,blue bag,1\n"
    first, second = jobs_of(data).jobs, jobs_of(data).jobs
    assert [(j.job_id, j.params.seed, j.output_key) for j in first] == [
        (j.job_id, j.params.seed, j.output_key) for j in second]
    assert [j.output_key for j in first] == ["cat/shoe-0.png", "cat/shoe-1.png", "cat/bag.png"]
    assert first[0].params.seed == derive_seed("shoe", 0) != first[1].params.seed
    assert len({j.job_id for j in first}) == 3


def test_changing_what_decides_an_image_changes_its_job_id() -> None:
    base = jobs_of("id,prompt\na,red shoe\n").jobs[0]
    assert jobs_of("id,prompt\na,red shoe\n", model="tiny").jobs[0].job_id != base.job_id
    assert jobs_of("id,prompt,seed\na,red shoe,5\n").jobs[0].job_id != base.job_id
    assert jobs_of("id,prompt\na,blue shoe\n").jobs[0].job_id != base.job_id


def test_distilled_and_base_models_get_their_own_defaults() -> None:
    distilled, base = jobs_of("prompt,model\nx,klein-4b\ny,klein-base-4b\n").jobs
    d = distilled.params
    assert (d.steps, d.guidance, d.width, d.height) == (4, 1.0, 1024, 1024)
    assert (base.params.steps, base.params.guidance) == (50, 4.0)
    explicit = jobs_of("prompt,steps,guidance\nx,8,2.5\n").jobs[0]
    assert (explicit.params.steps, explicit.params.guidance) == (8, 2.5)


def test_explicit_seed_counts_up_per_image() -> None:
    assert [j.params.seed for j in jobs_of("prompt,seed,count\nx,41,3\n").jobs] == [41, 42, 43]


def test_rows_without_id_are_numbered_and_prompt_templates_use_columns_with_spaces() -> None:
    jobs = jobs_of("Product Title,Vendor\nRunner,Northpeak\n", prompt="Photo of {Product Title} by {Vendor}").jobs
    assert (jobs[0].params.prompt, jobs[0].row_id, jobs[0].output_key) == (
        "Photo of Runner by Northpeak", "1", "cat/1.png")


def test_cli_prompt_overrides_row_prompt_which_stays_a_variable() -> None:
    job = jobs_of("id,prompt\na,red shoe\n", prompt="{prompt}, studio light").jobs[0]
    assert job.params.prompt == "red shoe, studio light"


def test_json_document_multiplies_items_by_the_matrix_with_defaults() -> None:
    doc = ('{"defaults": {"width": 512, "height": 768, "count": 2}, "prompt": "{name} on {bg}",'
           ' "matrix": {"bg": ["white", "oak"]}, "items": [{"id": "mug", "name": "a mug"}]}')
    jobs = jobs_of(doc, "m.json").jobs
    assert [(j.params.prompt, j.variant, j.output_key) for j in jobs] == [
        ("a mug on white", 0, "cat/mug-0.png"), ("a mug on white", 1, "cat/mug-1.png"),
        ("a mug on oak", 2, "cat/mug-2.png"), ("a mug on oak", 3, "cat/mug-3.png")]
    assert {(j.params.width, j.params.height) for j in jobs} == {(512, 768)}
    # the same image index gets the same seed across the matrix, so variants compare like with like
    assert jobs[0].params.seed == jobs[2].params.seed != jobs[1].params.seed
    assert jobs[2].row_data["bg"] == "oak"


def test_output_templates_and_png_suffix() -> None:
    job = jobs_of("id,Vendor,prompt\nx1,North Peak,p\n", output="{Vendor}/{id}-{seed}").jobs[0]
    assert job.output_key == f"North Peak/x1-{job.params.seed}.png"


def test_the_format_decides_the_key_extension_and_the_extension_decides_a_format_not_given() -> None:
    jobs = jobs_of("id,prompt,format,output,quality\n"
                   "a,p,webp,,\n"  # the default key, with the format's extension
                   "b,p,JPG,shop/{id}.png,75\n"  # a format given replaces another format's extension
                   "c,p,,shop/{id}.jpeg,\n"  # none given: the key's extension says
                   "d,p,,shop/{id}.v2,\n").jobs  # no image extension, no format: PNG, as always
    assert [(j.output_key, j.params.format, j.params.quality) for j in jobs] == [
        ("cat/a.webp", "webp", 90), ("shop/b.jpg", "jpeg", 75), ("shop/c.jpeg", "jpeg", 90),
        ("shop/d.v2.png", "png", None)]
    assert jobs_of("id,prompt\na,p\n", format="webp", quality=60).jobs[0].output_key == "cat/a.webp"
    png, webp = jobs_of("id,prompt\na,p\n").jobs[0], jobs_of("id,prompt,format\na,p,webp\n").jobs[0]
    assert png.job_id != webp.job_id and png.params.shape != webp.params.shape


def test_a_format_kiln_does_not_write_or_a_quality_for_png_is_refused() -> None:
    assert 'column "format": must be png, webp or jpeg' in rejection("prompt,format\nx,gif\n")
    assert 'column "quality": applies to webp and jpeg' in rejection("prompt,quality\nx,80\n")
    assert 'column "quality": must be a whole number from 1 to 100' in rejection("prompt,format,quality\nx,webp,0\n")


def test_skip_incomplete_skips_and_counts_rows_with_empty_placeholders() -> None:
    data = "id,Title\na,Shoe\nb,\nc,Bag\n"
    assert "placeholder {Title} in \"prompt\" is empty in this row" in rejection(data, prompt="{Title}")
    expansion = jobs_of(data, prompt="{Title}", skip_incomplete=True)
    assert [j.row_id for j in expansion.jobs] == ["a", "c"]
    assert expansion.skipped_rows == 1


def test_nine_b_models_need_a_declared_non_commercial_batch() -> None:
    message = rejection("prompt,model\nx,klein-9b\n")
    assert "FLUX Non-Commercial" in message and "klein-4b" in message and "--non-commercial" in message
    assert jobs_of("prompt,model\nx,klein-9b\n", non_commercial=True).jobs[0].params.model == "klein-9b"
    assert "--non-commercial" in rejection("prompt,model\nx,tiny:klein-base-9b\n")


def test_max_jobs_caps_the_expansion() -> None:
    assert "more than 3 jobs (the --max-jobs cap)" in rejection("prompt,count\nx,2\ny,2\n", max_jobs=3)


def test_every_problem_is_reported_at_once_and_repeats_are_folded() -> None:
    message = rejection("id,prompt,steps\na,x,0\nb,y,0\nc,z,abc\n")
    assert 'm.csv line 2: column "steps": must be a whole number from 1 to 100, got \'0\' (and 1 more rows)' in message
    assert "m.csv line 4: column \"steps\"" in message


@pytest.mark.parametrize(("data", "options", "expected"), [
    ("id,Title\na,Shoe\n", {}, 'm.csv line 2: no prompt: add a "prompt" column or pass --prompt'),
    ("id,Title\na,Shoe\n", {"prompt": "{Titel}"}, "placeholder {Titel} is not a column"),
    ("prompt\nx {0.__class__}\n", {}, "placeholder {0.__class__} is not a column"),
    ("prompt\nx {a!r}\n", {}, "has a format or conversion"),
    ("prompt\nx {\n", {}, "unbalanced"),
    ("prompt,width\nx,500\n", {}, 'column "width": must be a multiple of 16 from 256 to 2048, got \'500\''),
    ("prompt,width\nx,128\n", {}, 'column "width": must be a multiple of 16'),
    ("prompt,height\nx,4096\n", {}, 'column "height": must be a multiple of 16'),
    ("prompt,width,height\nx,1088,1088\n", {}, "above the 1,100,800 pixel cap"),
    ("prompt,steps\nx,0\n", {}, 'column "steps": must be a whole number from 1 to 100'),
    ("prompt,steps\nx,four\n", {}, 'column "steps": must be a whole number from 1 to 100, got \'four\''),
    ("prompt,guidance\nx,-1\n", {}, 'column "guidance": must be a number from 0 to 30'),
    ("prompt,guidance\nx,nan\n", {}, 'column "guidance": must be a number from 0 to 30'),
    ("prompt,seed\nx,-5\n", {}, 'column "seed": must be a whole number from 0 to 4294967295'),
    ("prompt,seed\nx,4294967296\n", {}, 'column "seed"'),
    ("prompt,count\nx,0\n", {}, 'column "count": must be a whole number from 1 to 64'),
    ("prompt,count\nx,65\n", {}, 'column "count"'),
    ("prompt,model\nx,klein-5b\n", {}, "unknown model 'klein-5b': use one of klein-4b, klein-9b"),
    ("prompt,model\nx,./no/such/folder\n", {}, "does not exist: name a diffusers folder"),
    ("id,prompt\na,x\na,y\n", {}, "m.csv line 3: column \"id\": 'a' is also the id of m.csv line 2"),
    ("id,prompt,output\na,x,same.png\nb,y,same.png\n", {}, "output key 'same.png' is also written by m.csv line 2"),
    ("prompt,output\nx,../escape\n", {}, "has an empty, '.' or '..' folder"),
    ("prompt,output\nx,/etc/passwd\n", {}, "is absolute"),
    ("prompt,output\nx,a\\b\n", {}, "contains a backslash"),
    ("prompt,output\nx,a//b\n", {}, "has an empty, '.' or '..' folder"),
    ("prompt,output\nx,_references/a\n", {}, "is inside _references/, which Kiln keeps for reference images"),
    ("prompt,output,v\nx,{v}/a,..\n", {}, "has an empty, '.' or '..' folder"),
    ("prompt,output,v\nx,{v},\"a\x01b\"\n", {}, "contains a control character"),
    ("prompt,output\nx," + "k" * 1100 + "\n", {}, "is longer than 1024 bytes"),
    ("prompt,output\nx,c:/windows\n", {}, "starts with a drive or scheme name"),
    ("prompt\n" + "x" * 2001 + "\n", {}, 'column "prompt": must be prompt or prompt template of at most 2000'),
    ("p\n" + "x" * 1500 + "\n", {"prompt": "{p} {p}"}, "the prompt is 3001 characters after filling in"),
    ("prompt,reference\nx,missing.png\n", {}, "'missing.png' does not exist (paths are relative to the manifest)"),
    ("prompt,reference\nx,doc.pdf\n", {}, "is not a .png, .jpg, .jpeg, .webp image"),
])
def test_bad_rows_are_rejected_with_row_column_and_what_is_allowed(data: str, options: dict[str, Any],
                                                                   expected: str) -> None:
    assert expected in rejection(data, **options)


def test_json_variables_must_be_scalars() -> None:
    assert 'column "tags": variables must be text or numbers' in rejection('[{"prompt": "x", "tags": ["a"]}]',
                                                                         "m.json")


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height with no pixel data: enough for a header check, nothing to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def test_reference_paths_resolve_against_the_manifest_folder(tmp_path: Path) -> None:
    (tmp_path / "ref.png").write_bytes(png_header(640, 480))
    opts = Options(batch="b", base_dir=tmp_path)
    job = expand(parse_manifest(b"prompt,reference\nx,ref.png\n", "m.csv"), opts).jobs[0]
    assert job.params.reference == str((tmp_path / "ref.png").resolve())


def test_several_references_are_kept_in_order_and_each_counts_toward_the_id_and_the_memory(tmp_path: Path) -> None:
    for name in ("front.png", "side.png", "back.png"):
        (tmp_path / name).write_bytes(png_header(640, 480) + name.encode())  # the same header, other content
    opts = Options(batch="b", base_dir=tmp_path)
    one, two, swapped = (expand(parse_manifest(f"id,prompt,reference\nx,p,{refs}\n".encode(), "m.csv"), opts).jobs[0]
                         for refs in ("front.png", "front.png | side.png", "side.png|front.png"))
    assert [Path(f.path).name for f in two.params.reference_files] == ["front.png", "side.png"]
    assert two.params.references == 2 and one.params.references == 1
    assert len({one.job_id, two.job_id, swapped.job_id}) == 3 and one.params.shape != two.params.shape
    many = "|".join(["front.png", "side.png", "back.png"] * 2)
    with pytest.raises(ManifestError, match='column "reference": 6 images; klein takes at most 4'):
        expand(parse_manifest(f"prompt,reference\nx,{many}\n".encode(), "m.csv"), opts)
    with pytest.raises(ManifestError, match="'gone.png' does not exist"):
        expand(parse_manifest(b"prompt,reference\nx,front.png|gone.png\n", "m.csv"), opts)


def test_row_count_is_capped_with_the_whole_file_counted() -> None:
    assert "m.csv: has 4 rows; the limit is 3 (--max-rows, KILN_MAX_ROWS): split it into several manifests" in \
        rejection("prompt\na\nb\nc\nd\n", max_rows=3)
    assert len(jobs_of("prompt\na\nb\nc\n", max_rows=3).jobs) == 3


def test_a_streamed_manifest_is_counted_without_keeping_jobs_and_says_where_duplicates_were(
        tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text("id,prompt,count\n" + "".join(f"r{i},p {i},2\n" for i in range(1000)), encoding="utf-8")
    opts = Options(batch="b", base_dir=tmp_path, model="tiny")
    counted = expand(read_manifest(path), opts, keep_jobs=False)
    kept = expand(read_manifest(path), opts)
    assert (counted.jobs, counted.count, counted.per_model) == ([], 2000, {"tiny": 2000})
    assert len(kept.jobs) == kept.count == 2000 and counted.first == kept.jobs[:3]
    assert counted.pixels == kept.pixels == sum(j.params.width * j.params.height for j in kept.jobs)
    path.write_text("id,prompt\na,x\nb,y\na,z\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="big.csv line 4: column \"id\": 'a' is also the id of big.csv line 2"):
        expand(read_manifest(path), opts, keep_jobs=False)
    document = b'{"items": [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]}'
    with pytest.raises(ManifestError, match=r"m.json items\[1\]: column \"id\": 'a' is also the id of "
                                            r"m.json items\[0\]"):
        expand(parse_manifest(document, "m.json"), opts)


def test_a_file_broken_far_down_is_reported_with_the_row_problems_before_it(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,prompt,steps\na,x,many\n" + b"".join(b"r%d,y,4\n" % i for i in range(5000))
                     + b"z,caf\xe9,4\n")
    with pytest.raises(ManifestError) as info:
        expand(read_manifest(path), Options(batch="b", base_dir=tmp_path, model="tiny"))
    assert 'm.csv line 2: column "steps"' in str(info.value)
    assert "m.csv line 5003: is not valid UTF-8 (byte 0xE9 at column 6)" in str(info.value)


def test_reference_images_over_20_mib_are_refused(tmp_path: Path) -> None:
    with open(tmp_path / "big.png", "wb") as big:  # sparse: 20 MiB and one byte, nothing written
        big.truncate(20 * 2**20 + 1)
    with pytest.raises(ManifestError) as caught:
        expand(parse_manifest(b"prompt,reference\nx,big.png\n", "m.csv"), Options(batch="b", base_dir=tmp_path))
    assert "m.csv line 2: column \"reference\": 'big.png' is over 20 MiB" in str(caught.value)


@pytest.mark.parametrize(("content", "message"), [
    (b"not an image at all", "'ref.png' is not a readable image"),
    (png_header(10000, 10000), "'ref.png' declares 10000x10000 pixels, over the 64 MP Kiln opens"),
    (png_header(200000, 200000), "declares more pixels than Pillow will open, over the 64 MP"),
])
def test_reference_images_are_checked_from_their_header_before_anything_starts(
        tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "ref.png").write_bytes(content)
    with pytest.raises(ManifestError) as caught:
        expand(parse_manifest(b"prompt,reference\nx,ref.png\n", "m.csv"), Options(batch="b", base_dir=tmp_path))
    assert message in str(caught.value)


@pytest.mark.parametrize(("data", "name", "message"), [
    ("prompt\nsoap\x00dish\n", "m.csv", 'column "prompt": contains a NUL character (\\x00), which PostgreSQL cannot'),
    ("prompt,colour\nx,r\x00ed\n", "m.csv", 'column "colour": contains a NUL character'),
    ('[{"prompt": "x", "tag": "\\ud800"}]', "m.json", 'column "tag": contains a lone surrogate'),
    ('{"prompt": "a {bg}", "matrix": {"bg": ["w\\u0000b"]}, "items": [{"id": "1"}]}', "m.json",
     "the prompt contains a NUL character"),
])
def test_text_no_supported_database_can_store_is_refused_at_validation(data: str, name: str, message: str) -> None:
    assert message in rejection(data, name)


def test_a_model_folder_is_resolved_at_submit_and_two_manifests_folders_are_two_models(tmp_path: Path) -> None:
    ids, models = [], []
    for shop in ("north", "south"):
        folder = tmp_path / shop / "model"
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline", "is_distilled": true}')
        job = expand(parse_manifest(b"prompt,model\nx,./model\n", "m.csv"),
                     Options(batch="b", base_dir=tmp_path / shop)).jobs[0]
        ids.append(job.job_id)
        models.append(job.params.model)
    assert models == [str((tmp_path / s / "model").resolve()) for s in ("north", "south")]  # any worker, any cwd
    assert ids[0] != ids[1]


def test_a_reference_edited_in_place_makes_a_new_job(tmp_path: Path) -> None:
    opts = Options(batch="b", base_dir=tmp_path)
    (tmp_path / "ref.png").write_bytes(png_header(640, 480))
    first = expand(parse_manifest(b"prompt,reference\nx,ref.png\n", "m.csv"), opts).jobs[0].job_id
    assert expand(parse_manifest(b"prompt,reference\nx,ref.png\n", "m.csv"), opts).jobs[0].job_id == first
    (tmp_path / "ref.png").write_bytes(png_header(800, 600))  # the packshot was replaced, same file name
    assert expand(parse_manifest(b"prompt,reference\nx,ref.png\n", "m.csv"), opts).jobs[0].job_id != first
