"""Loading FLUX.2 [klein] as its plan says, and running it: prompts through the text encoder (cached), then the
transformer and the VAE through diffusers' Flux2KleinPipeline with `prompt_embeds`.

The only worker module that knows about the Hugging Face hub.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# torchao and torch announce optional kernels they cannot load on this machine at import; Kiln reports what it uses.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
import diffusers.utils.logging as diffusers_logging  # noqa: E402
import transformers.utils.logging as transformers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline  # noqa: E402
from huggingface_hub import snapshot_download  # noqa: E402
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError  # noqa: E402

from schemas.errors import ModelError, RenderError  # noqa: E402
from schemas.models import SMALL_DECODER, ModelSpec, hub_source, weights_location  # noqa: E402
from schemas.params import Lora  # noqa: E402
from schemas.plan import ENCODE_CHUNK, Plan  # noqa: E402
from worker.checkpoints import TEXT_ENCODER_OUT_LAYERS, load_text_encoder, load_transformer, load_vae  # noqa: E402
from worker.placement import slot, to_fp8  # noqa: E402
from worker.prompts import PromptCache  # noqa: E402
from worker.speedups import (  # noqa: E402
    CompileTrial,
    attention_tokens,
    choose_attention,
    compile_blocks,
    compile_failure,
    compile_reason,
    uncompile_blocks,
)
from worker.tiny import ensure_tiny, ensure_tiny_small_decoder  # noqa: E402

log = logging.getLogger("kiln.worker")

MAX_SEQUENCE_LENGTH = 512
StepCallback = Callable[[int, int], None]


def quiet_libraries() -> None:
    """Kiln draws its own progress; keep diffusers' and transformers' loading bars and chatter off the terminal."""
    for lib in (diffusers_logging, transformers_logging):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def weights_folder(spec: ModelSpec, cache_dir: Path) -> Path:
    """The local folder holding `spec`'s weights (for a checkpoint: its base folder, configs and tokenizer and
    the parts its files lack): built (tiny) or downloaded from the hub when missing."""
    local = weights_location(spec, cache_dir)
    if local:
        return local
    if spec.parts and not Path(spec.parts.transformer).is_file():
        raise ModelError(f"the transformer file {spec.parts.transformer} of {spec.name} is not on this machine: "
                         "copy it to the same path here, or name a model this machine has")
    hub = hub_source(spec)
    if spec.is_tiny or (spec.parts and not hub):
        return ensure_tiny(cache_dir)
    if not hub:
        raise ModelError(f"{spec.source} holds no diffusers model (no model_index.json)")
    repo, patterns = hub
    try:
        size = "16 GB" if "4b" in spec.profile else "35 GB"
        log.info("downloading %s from the Hugging Face hub (once; %s)", repo,
                 f"what the checkpoint lacks: {', '.join(patterns)}" if patterns else f"about {size}")
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelError(f"{repo} is gated: accept its licence at https://huggingface.co/{repo} "
                         "while logged in, then run `hf auth login` here (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo} was not found on the hub: check the name, or log in with "
                         "`hf auth login` if it is gated") from None
    except (LocalEntryNotFoundError, OSError) as exc:
        raise ModelError(_missing(spec, f"could not be downloaded ({type(exc).__name__})")) from None


def small_decoder_folder(spec: ModelSpec, cache_dir: Path) -> Path:
    """Where FLUX.2-small-decoder is (for the tiny model: a tiny one, built once), downloaded when missing."""
    if spec.is_tiny or spec.profile == "tiny":
        return ensure_tiny_small_decoder(cache_dir)
    try:
        try:
            return Path(snapshot_download(SMALL_DECODER, local_files_only=True))
        except LocalEntryNotFoundError:
            log.info("downloading %s from the Hugging Face hub (once; about 0.2 GB)", SMALL_DECODER)
            return Path(snapshot_download(SMALL_DECODER))
    except (LocalEntryNotFoundError, OSError) as exc:
        raise ModelError(f"the small decoder ({SMALL_DECODER}) is not on this machine and could not be downloaded "
                         f"({type(exc).__name__}): run `hf download {SMALL_DECODER}` while online, or render with "
                         "the full decoder") from None


def _missing(spec: ModelSpec, what: str) -> str:
    return (f"the weights of {spec.name} ({spec.source}) {what}: connect to the internet and run "
            f"`hf download {spec.source}` (gated models need `hf auth login` and the licence accepted on "
            "huggingface.co), or set --model to a local diffusers folder, or try --model tiny")


def compute_dtype(spec: ModelSpec) -> torch.dtype:
    """bf16 for real weights; the tiny model computes in float32 (a CPU's bf16 is slow and tiny needs no savings)."""
    return torch.float32 if spec.is_tiny or spec.profile == "tiny" else torch.bfloat16


class LoadedModel:
    """One model loaded on one device as its plan says, with the prompt embeddings it has computed."""

    def __init__(self, spec: ModelSpec, folder: Path, plan: Plan, device: torch.device, cache: PromptCache,
                 cache_dir: Path | None = None, *, compile: str = "off", attention: str = "auto") -> None:
        self.spec, self.plan, self.device, self.cache, self.cache_dir = spec, plan, device, cache, cache_dir
        self.dtype = compute_dtype(spec)
        self.attention_setting = attention
        self.attention: str | None = None  # the backend set on the transformer (None: diffusers' default, SDPA)
        self.attention_timings: dict[str, float] | None = None  # measured at the first call (auto on CUDA)
        not_compiled = compile_reason(compile, device, plan)
        self.compiled = not_compiled is None and compile == "on"  # the transformer's repeated blocks are compiled
        # auto, where a compile can work: eager first, then compiled, and the faster kept (decided: the verdict)
        self.trial = CompileTrial() if not_compiled is None and compile == "auto" else None
        self.compile_verdict: bool | None = None  # whether this card keeps the compile, once a trial or failure says
        self._verdict: str | None = None  # the trial's word after the last call, acted on before the next
        self.clock = time.perf_counter
        if compile == "on" and not_compiled:
            log.warning("not compiling %s: %s", spec.name, not_compiled)
        staged, release = plan.strategy.staged, plan.release_staged
        parts = spec.parts
        vae = {"vae": load_vae(folder / "vae", parts.vae, self.dtype)} if parts and parts.vae else {}
        self.pipe = Flux2KleinPipeline.from_pretrained(folder, text_encoder=None, transformer=None, dtype=self.dtype,
                                                       **vae)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.vae.to(device).enable_slicing()  # decode one image at a time: the plan counts one
        self.vaes: dict[str, Any] = {"full": self.pipe.vae}  # the small decoder joins it when a job asks for it
        self.encoder = slot(self._loader(lambda: load_text_encoder(
            folder / "text_encoder", parts.text_encoder if parts else None, self.dtype), folder),
                            device, staged, release)
        self.transformer = slot(self._loader(lambda: self._load_transformer(folder), folder), device, staged, release)

    def _loader(self, load: Callable[[], Any], folder: Path) -> Callable[[], Any]:
        # A released component loads again at its next stage, long after load_model returned: its failures must
        # read the same as the first load's.
        def guarded() -> Any:
            try:
                return load()
            except (OSError, ValueError, ModelError) as exc:
                raise ModelError(f"cannot load {self.spec.name} from {folder}: {exc}") from None
        return guarded

    def _load_transformer(self, folder: Path) -> Any:
        transformer = load_transformer(folder / "transformer", self.spec.parts.transformer if self.spec.parts else None,
                                       self.dtype)
        if self.plan.fp8:
            transformer = to_fp8(transformer, self.plan.fp8, self.dtype, self.device)
        if self.attention:
            transformer.set_attention_backend(self.attention)
        if self.compiled:
            compile_blocks(transformer)  # compiled on its first call
        return transformer.eval()

    def _choose_attention(self, transformer: Any, tokens: int) -> None:
        """Set the attention backend, once per loaded model: timed at the first call's shape under auto."""
        if self.attention_timings is not None:
            return
        self.attention, self.attention_timings = choose_attention(self.attention_setting, transformer, self.device,
                                                                  self.dtype, tokens)
        if self.attention:
            transformer.set_attention_backend(self.attention)

    def describe(self) -> str:
        """How this model renders, for results and `kiln workers`: the plan, the attention kernel chosen when
        not SDPA's own choice, and whether the transformer runs compiled."""
        extras = ([f"attention {self.attention}"] if self.attention not in (None, "native") else []) \
            + (["compiled"] if self.compiled else [])
        return (self.plan.describe() + (f"; {', '.join(extras)}" if extras else ""))[:120]  # the plan columns' width

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Host-memory embeddings of `prompts` (and of "" when the model runs real CFG), from the cache or from
        one encoder stage for all that are missing: on a staged plan the transformer leaves the card for it."""
        wanted = dict.fromkeys([*prompts, *([""] if self.needs_negative else [])])
        found = {p: self.cache.get(self.spec.name, p) for p in wanted}
        missing = [p for p, e in found.items() if e is None]
        if missing:
            self.transformer.park()
            encoder = self.encoder.acquire()
            with torch.no_grad():
                for i in range(0, len(missing), ENCODE_CHUNK):
                    chunk = missing[i:i + ENCODE_CHUNK]
                    embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                        text_encoder=encoder, tokenizer=self.pipe.tokenizer, prompt=chunk, dtype=self.dtype,
                        device=self.device, max_sequence_length=MAX_SEQUENCE_LENGTH,
                        hidden_states_layers=list(TEXT_ENCODER_OUT_LAYERS))
                    for prompt, embedding in zip(chunk, embeds.to("cpu"), strict=True):
                        found[prompt] = embedding
                        self.cache.put(self.spec.name, prompt, embedding)
                    del embeds
            del encoder  # the slot's reference is the only one left, so parking frees it
            self.encoder.park()
        return found  # type: ignore[return-value]

    def use_loras(self, transformer: Any, loras: Sequence[Lora]) -> None:
        """Apply exactly `loras` to the transformer: kept when they are the ones it has, else the ones it has are
        unloaded (which puts back the very modules and weights they wrapped: nothing was fused) and these loaded.
        A LoRA that is not for this model fails the job as bad input, and leaves the transformer bare."""
        wanted = tuple((lora.sha256, lora.scale) for lora in loras)
        if getattr(transformer, "_kiln_loras", ()) == wanted:
            return
        if getattr(transformer, "peft_config", None):
            transformer.unload_lora()
        transformer._kiln_loras = ()
        names = []
        for i, lora in enumerate(loras):
            name = Path(lora.path).name
            try:
                state = Flux2KleinPipeline.lora_state_dict(lora.path)
                transformer.load_lora_adapter(state, adapter_name=f"kiln{i}", prefix="transformer")
                if f"kiln{i}" not in (getattr(transformer, "peft_config", None) or {}):
                    raise ValueError("it holds no weights for the klein transformer")
            except (ValueError, RuntimeError, KeyError) as exc:
                if getattr(transformer, "peft_config", None):
                    transformer.unload_lora()
                raise RenderError(f"the LoRA {name} does not fit {self.spec.name} (one trained for another model, "
                                  f"e.g. a 9B LoRA on 4B?): {type(exc).__name__}: {str(exc).strip()[:300]}",
                                  "bad_input") from None
            names.append(f"kiln{i}")
        if names:
            transformer.set_adapters(names, weights=[lora.scale for lora in loras])
            # peft gives a LoRA its base layer's dtype: on an fp8 plan that is float8, which nothing computes in.
            # The LoRA's own weights are small: they stay in the compute dtype.
            for name, param in transformer.named_parameters():
                if ".lora_" in name and param.dtype != self.dtype:
                    param.data = param.data.to(self.dtype)
        transformer._kiln_loras = wanted

    def vae(self, decoder: str) -> Any:
        """The VAE a job's `decoder` names, loaded once: the small decoder is about a sixth of the VAE's 0.17 GB."""
        if decoder not in self.vaes:
            folder = small_decoder_folder(self.spec, self.cache_dir or Path.cwd())
            try:
                vae = AutoencoderKLFlux2.from_pretrained(folder, dtype=self.dtype)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot load the small decoder from {folder}: {exc}") from None
            self.vaes[decoder] = vae.to(self.device)
            self.vaes[decoder].enable_slicing()
        return self.vaes[decoder]

    @property
    def needs_negative(self) -> bool:
        """Base models run real CFG, with the empty prompt as the negative (distilled ones ignore guidance)."""
        return not self.pipe.config.is_distilled

    def generate(self, prompts: Sequence[str], *, width: int, height: int, steps: int, guidance: float,
                 seeds: Sequence[int], image: Any = None, on_step: StepCallback | None = None,
                 embeddings: dict[str, torch.Tensor] | None = None, output_type: str = "np",
                 loras: Sequence[Lora] = (), decoder: str = "full") -> Any:
        """Denoise and decode one image per prompt, each from its own seed, in one pipeline call, with `loras`
        applied to the transformer. `embeddings` (from `encode`) saves the encoder stage; prompts missing from it
        are encoded first."""
        if embeddings is None or any(p not in embeddings for p in prompts):
            embeddings = self.encode(prompts)
        embeds = torch.stack([embeddings[p] for p in prompts]).to(self.device)
        negative = None
        if guidance > 1 and self.needs_negative:
            negative = torch.stack([embeddings[""]] * len(prompts)).to(self.device)

        def step_end(_pipe: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if on_step:
                on_step(step + 1, steps)
            return tensors

        # The pipeline holds the transformer only during the call, so parking it (or releasing it) frees it.
        transformer = self.transformer.acquire()
        self.use_loras(transformer, loras)
        self._choose_attention(transformer, attention_tokens(width, height, len(image) if image else 0))

        def call() -> Any:
            return self.pipe(
                prompt_embeds=embeds, negative_prompt_embeds=negative, image=image, width=width, height=height,
                num_inference_steps=steps, guidance_scale=guidance,
                # one CPU generator per image: each job's seed alone decides its noise, batched or not, anywhere
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type=output_type, callback_on_step_end=step_end).images

        self.pipe.register_modules(transformer=transformer, vae=self.vae(decoder))
        try:
            return self._run(call, transformer, (width, height, len(seeds), steps, len(image) if image else 0))
        finally:
            self.pipe.register_modules(transformer=None, vae=self.vaes["full"])

    def _run(self, call: Callable[[], Any], transformer: Any, shape: tuple[int, ...]) -> Any:
        """One pipeline call. A compile that fails on this machine falls back to eager; under a compile trial the
        call's seconds per image go to the trial, which may compile the blocks or put them back to eager."""
        if self._verdict is not None:  # what the trial decided after the last call, before this one runs
            self._judge(transformer, self._verdict)
            self._verdict = None
        started = self.clock()
        try:
            images = call()
        except Exception as exc:
            failure = compile_failure(exc) if self.compiled else None
            if failure is None:
                raise
        else:
            if self.trial is not None:  # acted on at the next call, so that describe() tells how this one ran
                self._verdict = self.trial.record(shape, (self.clock() - started) / shape[2])
                if self._verdict in ("keep", "eager"):
                    self.compile_verdict = self._verdict == "keep"
            return images
        # Out of the except block, so the failed call's frames are gone before the eager call runs.
        log.warning("torch.compile failed on this machine (%s): rendering %s without it; KILN_COMPILE=off "
                    "skips trying", failure, self.spec.name)
        uncompile_blocks(transformer)
        self.compiled, self.trial, self.compile_verdict, self._verdict = False, None, False, None
        return call()

    def compile_transformer(self) -> None:
        """Compile the transformer's repeated blocks in place (they build their kernels on the next call)."""
        compile_blocks(self.transformer.acquire())
        self.compiled = True

    def _judge(self, transformer: Any, verdict: str) -> None:
        if verdict == "compile":
            self.compile_transformer()
            return
        log.info("%s on this card: %s, %s", self.spec.name, self.trial,
                 "keeping the compile" if verdict == "keep" else "back to eager")
        if verdict == "eager":
            uncompile_blocks(transformer)
            self.compiled = False
        self.trial = None

    def rest(self) -> None:
        """Put every component where the plan keeps it between calls: staged ones off the card. After an OOM,
        this (with the failed call's frames gone) is what lets the next call start from a clean card."""
        self.encoder.park()
        self.transformer.park()

    def unload(self) -> None:
        """Drop every component (before loading another model)."""
        self.rest()
        self.pipe = None
        self.encoder = self.transformer = None  # type: ignore[assignment]


def load_model(spec: ModelSpec, cache_dir: Path, plan: Plan, device: torch.device, cache: PromptCache, *,
               compile: str = "off", attention: str = "auto") -> LoadedModel:
    """Load `spec` on `device` as `plan` says, with the speed-ups `compile` and `attention` ask for (KILN_COMPILE,
    KILN_ATTENTION), or raise ModelError saying why not (an OOM while loading is raised as torch.OutOfMemoryError,
    for the caller to treat like any other)."""
    folder = weights_folder(spec, cache_dir)
    if device.type == "cpu" and compute_dtype(spec) != torch.float32:
        log.warning("rendering %s on the CPU: expect minutes per image; a CUDA GPU takes about a second", spec.name)
    try:
        model = LoadedModel(spec, folder, plan, device, cache, cache_dir, compile=compile, attention=attention)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {spec.name} from {folder}: {exc}") from None
    log.info("loaded %s on %s: %s", spec.name, device, model.describe())
    return model
