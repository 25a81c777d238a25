"""`kiln worker`'s command line: light, so that `kiln --help` lists it without importing torch."""

from __future__ import annotations

import logging
import socket
from typing import Any

import click

from schemas.settings import load_settings


@click.command("worker")
@click.option("--name", help="Worker name [default: host name].")
@click.option("--vram", type=float, help="[env KILN_VRAM] GB of GPU memory to use, CUDA context included; the "
              "process is capped there, so a game keeps the rest [default: the whole card; a CPU: none].")
@click.option("--models", help="[env KILN_MODELS] Models to serve, comma-separated (registry names or diffusers "
              "folders); their weights are downloaded or checked before any work is taken [default: the models "
              "this card fits whose weights are here, else klein-4b].")
@click.option("--device", type=click.Choice(["auto", "cuda", "mps", "cpu"]), help="[env KILN_DEVICE; auto]")
@click.option("--broker-url", help="[env KILN_BROKER_URL] The fleet's Redis.")
@click.option("--cache-dir", type=click.Path(), help="[env KILN_CACHE_DIR; ~/.cache/kiln]")
@click.option("--compile", type=click.Choice(["auto", "on", "off"]),
              help="[env KILN_COMPILE; auto: tried on a CUDA card with Triton, kept where faster] Regional "
                   "torch.compile of the transformer.")
@click.option("--attention", help="[env KILN_ATTENTION; auto: the fastest exact kernel, timed on this card] "
                                  "Attention backend, a diffusers name.")
def command(name: str | None, **options: Any) -> None:
    """Render for the fleet: take the jobs that fit this card from the broker until stopped.

    Needs only KILN_BROKER_URL: uploads go through signed URLs, results back through the broker.
    """
    settings = load_settings(**options)
    logging.getLogger("kiln").setLevel(logging.INFO)  # a service tells its log what it does
    # torch and diffusers load here, before Celery forks the GPU process, so a replacement process (after a crash
    # or a time limit) starts rendering in a second instead of importing them again
    from worker import fleet

    fleet.run(settings, name or socket.gethostname())
