"""Image encoding, with the generation parameters embedded where the usual image readers look: PNG text chunks
(as Stable Diffusion tools write them), and for WebP and JPEG the EXIF UserComment (the same `parameters` text)
with Kiln's own record in an XMP packet."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from schemas.job import JobSpec

SAMPLER = "Euler (flow matching)"
# zlib level 1, not Pillow's 6: about a third of the time for a 1024x1024 render, about 15% more bytes on a
# studio-like image and the same on noise (benchmarks/png.py; figures in the README). Encoding runs between renders.
PNG_LEVEL = 1
WEBP_METHOD = 4  # Pillow's default effort: method 6 is about twice as slow for a few percent fewer bytes
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
KILN_NS = "urn:kiln:1.0#"  # the kiln: XMP namespace


def parameters_text(job: JobSpec) -> str:
    """The A1111-style `parameters` text: the prompt, then one line of settings."""
    p = job.params
    return (f"{p.prompt}\nSteps: {p.steps}, Sampler: {SAMPLER}, CFG scale: {p.guidance:g}, "
            f"Seed: {p.seed}, Size: {p.width}x{p.height}, Model: {p.model}, Version: kiln")


def kiln_text(job: JobSpec, plan: str) -> str:
    """Kiln's record, as JSON: where the image came from, every render parameter, and how the model was loaded.
    References by content only: their paths are where some machine kept them."""
    params = job.params.model_dump(mode="json", exclude={"reference": True, "more_references": {"__all__": {"path"}},
                                                         "loras": {"__all__": {"path"}}})
    return json.dumps({"job_id": job.job_id, "batch_id": job.batch_id, "manifest": job.manifest,
                       "manifest_row": job.manifest_row, "row_id": job.row_id, "attempt": job.attempt,
                       "plan": plan, "params": params}, ensure_ascii=False)


def xmp_packet(record: str) -> bytes:
    """An XMP packet holding Kiln's record as the `kiln:record` property (exiftool -XMP-kiln:all, or any XMP reader)."""
    return (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:kiln="{KILN_NS}" kiln:record={quoteattr(record)}/>'
            f'</rdf:RDF></x:xmpmeta>').encode()


def encode(pixels: np.ndarray, job: JobSpec, plan: str) -> bytes:
    """Encode an HxWx3 float image in [0, 1] in the job's format, with Kiln's metadata."""
    image = Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    if job.params.format == "png":
        info = PngInfo()
        info.add_text("parameters", parameters_text(job))  # iTXt where the prompt is not Latin-1
        info.add_text("kiln", kiln_text(job, plan))
        image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_LEVEL)
    else:
        exif = Image.Exif()
        # UserComment as EXIF says text in it is marked: an 8-byte charset code, then UCS-2 (big-endian, as written)
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + parameters_text(job).encode("utf-16-be")
        extra = {"method": WEBP_METHOD} if job.params.format == "webp" else {"optimize": False}
        image.save(buffer, format=job.params.format.upper(), quality=job.params.quality, exif=exif,
                   xmp=xmp_packet(kiln_text(job, plan)), **extra)
    return buffer.getvalue()


def read_parameters(data: bytes) -> dict[str, str]:
    """The `parameters` text and Kiln's record of an image Kiln encoded, in whichever format (for `kiln` commands
    and tests that read outputs back)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return {"parameters": image.info["parameters"], "kiln": image.info["kiln"]}
        comment = image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
        packet = image.info["xmp"]
    root = ET.fromstring(packet)
    description = root.find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    assert description is not None, "Kiln's XMP packet has a description"
    return {"parameters": comment[8:].decode("utf-16-be"), "kiln": description.attrib[f"{{{KILN_NS}}}record"]}
