"""Image generation, once for the whole project: reference images, evaluation images, the comparison.

One *row* is one image: its file name, prompt, seed, and optionally guidance and size
(:class:`ImageRow`). :func:`generate_images` makes a folder of rows:

- Image ``<case>.png`` comes from the row's prompt and seed; the initial noise comes from its own
  ``torch.Generator("cpu").manual_seed(seed)`` (as UnlearnDiff's and ESD's ``torch.manual_seed``),
  so it is the same on any device, for any batch size and any number of processes.
- Guidance and size are the flag's if given, else the row's, else the defaults (7.5; the model's
  native size, 512 px for SD v1.x).
- Consecutive rows with the same guidance and size share a call (up to ``batch_size``). Under
  ``accelerate launch``/``torchrun`` process ``r`` of ``N`` takes batches ``r, r+N, …`` of that plan,
  so every image is made in the same batch, and with the same bytes, whatever the number of
  processes. (A different batch size may change an image by a rounding step.)
- Resume: a rerun skips images that exist. The folder's ``generation.json`` records the model, the
  erased artifact, the sampler settings and every row's prompt/seed/guidance/size; an existing
  image made with other settings is never reused: the run stops with an error that says so.
- Every PNG is written atomically; the main process writes the manifest and ``run.json`` at the end.

Generation goes through a :class:`~coerasing.methods.Runtime`, so erasers that act at inference
(add-on modules, attention processors) generate exactly as they are evaluated.
"""

from __future__ import annotations

import csv
import importlib.util
import inspect
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .checkpoints import write_run_json
from .choices import SCHEDULERS
from .errors import CoErasingError
from .files import atomic_write, atomic_write_json, atomic_write_text, record_problem, remove_stale_temps
from .images import open_rgb_strict
from .models import check_mixed_precision, load_component, parse_device, resolve_dtype

#: Guidance when neither the flag nor the row gives one (SD's usual 7.5).
DEFAULT_GUIDANCE = 7.5
#: The folder's record of what made its images (see the module docstring).
GENERATION_RECORD = "generation.json"
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("file", "case", "prompt", "seed", "guidance", "width", "height")


@dataclass(frozen=True)
class ImageRow:
    """One image to generate: its case (the file name), prompt, seed, guidance and size.

    ``guidance``/``width``/``height`` are ``None`` where the row does not say (the run's defaults
    apply). ``extra`` keeps other columns of a prompt file (``categories``, …) for reports.
    """

    case: str
    prompt: str
    seed: int
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    index: int = 0
    extra: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def file(self) -> str:
        """The image's file name, ``<case>.png``."""
        return f"{self.case}.png"


@dataclass
class GenerationSettings:
    """How images are generated; ``None`` for guidance/size means "the row's value, else the default"."""

    num_inference_steps: int = 50
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    scheduler: str = "default"


def distributed_state(cpu: bool) -> Any:
    """accelerate's process state: rank, world size and device under ``accelerate launch``/``torchrun``.

    ``cpu=True`` lets several CPU processes (gloo) form one group, as ``torchrun`` starts them.
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu)


# ----------------------------------------------------------------------------------------------
# Pipelines


def set_scheduler(pipe: Any, name: str, first_timestep: int | None = None) -> None:
    """Swap the pipeline's sampler (same noise schedule, from the model's scheduler config).

    ``first_timestep``: the sampler's steps span ``first_timestep`` down to the model's last timestep
    (:func:`start_sampling_at`) instead of the sampler's own spacing.
    """
    if name == "default":
        if first_timestep is not None:  # a copy: start_sampling_at rewires the instance it is given
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
            start_sampling_at(pipe.scheduler, first_timestep)
        return
    import diffusers

    classes = {
        "pndm": "PNDMScheduler",
        "lms": "LMSDiscreteScheduler",
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "dpm": "DPMSolverMultistepScheduler",
        "unipc": "UniPCMultistepScheduler",
    }
    if name not in classes:
        raise CoErasingError(f"--scheduler {name!r} is not one of {', '.join(SCHEDULERS)}.")
    if name == "lms" and importlib.util.find_spec("scipy") is None:
        raise CoErasingError(
            "--scheduler lms (UnlearnDiff's sampler) needs scipy, which diffusers' LMSDiscreteScheduler uses to "
            "integrate its coefficients. Install it (pip install scipy) or pick another --scheduler."
        )
    pipe.scheduler = getattr(diffusers, classes[name]).from_config(pipe.scheduler.config)
    if first_timestep is not None:
        start_sampling_at(pipe.scheduler, first_timestep)


def spanned_timesteps(first_timestep: int, last_timestep: int, num_inference_steps: int) -> list[int]:
    """``num_inference_steps`` integer timesteps evenly spaced from ``first_timestep`` down to ``last_timestep``."""
    if num_inference_steps < 2 or first_timestep - last_timestep + 1 < num_inference_steps:
        raise CoErasingError(
            f"{num_inference_steps} sampler steps cannot start at timestep {first_timestep} and end at "
            f"{last_timestep}: they need at least 2 steps and at most one step per timestep in between. Use "
            "more steps, or a later first timestep.")
    return [int(t) for t in np.linspace(first_timestep, last_timestep, num_inference_steps).round()]


def start_sampling_at(scheduler: Any, first_timestep: int) -> None:
    """Make ``scheduler`` sample from ``first_timestep`` down to its last timestep (``steps_offset``), evenly.

    Samplers place their N steps by their own ``timestep_spacing``; with SD v1.4's "leading" spacing
    the first step is ``(N - 1) · (1000 // N) + 1``: 961 for 25 steps, 901 for 10. Pure noise is
    then taken for the latent at a different noise level for each N, so a few-step sampler solves a
    different problem from the 25-step protocol, not the same one more coarsely. Starting at the
    protocol's own first timestep keeps the problem and changes only the step count (docs/comparison.md
    §8 measures it). Needs a sampler whose ``set_timesteps`` takes ``timesteps`` (here ``dpm`` and ``euler``).
    """
    own = scheduler.set_timesteps
    if "timesteps" not in inspect.signature(own).parameters:
        raise CoErasingError(
            f"the sampler {type(scheduler).__name__} cannot start at a chosen timestep (its set_timesteps takes "
            "no timesteps). Use the sampler dpm or euler, or leave first_timestep unset.")
    last = int(scheduler.config.get("steps_offset", 0) or 0)
    if not last < first_timestep < int(scheduler.config.num_train_timesteps):
        raise CoErasingError(
            f"first_timestep {first_timestep} is outside the model's timesteps ({last + 1}…"
            f"{int(scheduler.config.num_train_timesteps) - 1}); the 25-step protocol of SD v1.4 starts at 961.")

    def set_timesteps(num_inference_steps: int | None = None, device: Any = None, **kwargs: Any) -> None:
        if num_inference_steps is not None and kwargs.get("timesteps") is None:
            kwargs["timesteps"] = spanned_timesteps(first_timestep, last, num_inference_steps)
            num_inference_steps = None
        own(num_inference_steps=num_inference_steps, device=device, **kwargs)

    scheduler.set_timesteps = set_timesteps


@contextmanager
def scheduler_swapped(pipe: Any, name: str, first_timestep: int | None = None) -> Iterator[None]:
    """Sample with ``name`` inside the block (:func:`set_scheduler`); the pipeline's own sampler afterwards."""
    original = pipe.scheduler
    set_scheduler(pipe, name, first_timestep)
    try:
        yield
    finally:
        pipe.scheduler = original


def load_generation_pipeline(ckpt_path: str, device: torch.device, dtype: torch.dtype, scheduler: str = "default"):
    """The base SD pipeline with the safety checker off (it would blank the concept's images)."""
    from diffusers import StableDiffusionPipeline

    pipe = load_component(
        StableDiffusionPipeline, ckpt_path, None, "--ckpt_path",
        safety_checker=None, requires_safety_checker=False, dtype=dtype,
    )
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)
    return pipe.to(device)


def default_size(pipe: Any) -> int:
    """The model's native resolution: ``unet.config.sample_size × vae_scale_factor`` (512 for SD v1.x)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


# ----------------------------------------------------------------------------------------------
# Rendering


def row_call_settings(row: ImageRow, settings: GenerationSettings, size: int) -> tuple[float, int, int]:
    """(guidance, height, width) for one row: the flag if given, else the row's value, else the default."""
    guidance = settings.guidance_scale if settings.guidance_scale is not None else row.guidance
    height = settings.height or row.height or size
    width = settings.width or row.width or size
    return float(guidance if guidance is not None else DEFAULT_GUIDANCE), int(height), int(width)


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with the row's seed (UnlearnDiff's ``torch.manual_seed(seed)``)."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


@torch.no_grad()
def render(
    pipe: Any,
    seeds: Sequence[int],
    guidance: float,
    height: int,
    width: int,
    num_inference_steps: int,
    prompts: Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    output_type: str = "pil",
) -> list[Image.Image] | np.ndarray:
    """Generate one image per seed from ``prompts`` or from ready text states ``prompt_embeds`` ``[B, 77, d]``.

    The unconditional branch of classifier-free guidance is the empty prompt either way.
    ``output_type="np"`` returns ``[B, H, W, 3]`` uint8 instead of PIL images.
    """
    kwargs: dict[str, Any] = {"prompt": list(prompts)} if prompts is not None else {"prompt_embeds": prompt_embeds}
    images = pipe(
        **kwargs,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        generator=seeded_generators(seeds),
        output_type="np",
    ).images
    return finish_images(images, output_type)


def finish_images(images: np.ndarray, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
    """A pipeline's float images ``[B, H, W, 3]`` in [0, 1] as uint8 ``[B, H, W, 3]`` (``"np"``) or PIL images.

    The same bytes as diffusers' own conversion, except that an image holding a non-finite value (NaN
    or inf: non-finite weights or extreme settings) becomes all black, with a warning, rather than
    whatever the cast makes of NaN: one colour everywhere, so that
    :func:`coerasing.images.invalid_images` counts it as invalid and it never passes for an erased image.
    """
    images = np.asarray(images)
    broken = ~np.isfinite(images.reshape(len(images), -1)).all(axis=1) if len(images) else np.zeros(0, bool)
    if broken.any():
        print(f"warning: {int(broken.sum())} of {len(images)} generated images hold non-finite values (NaN or inf); "
              "they are made all black and counted as invalid.", file=sys.stderr, flush=True)
        images = np.where(broken[:, None, None, None], 0.0, images).astype(images.dtype)
    array = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    if output_type == "np":
        return array
    return [Image.fromarray(image) for image in array]


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as PNG atomically (a crash never leaves a half-written file)."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def load_image(path: Path) -> Image.Image:
    """Open a generated image fully into memory as 8-bit RGB (a clear error for a missing or corrupt file)."""
    try:
        return open_rgb_strict(path)
    except CoErasingError as exc:
        raise CoErasingError(f"{exc} Delete it and rerun to remake it.") from exc


# ----------------------------------------------------------------------------------------------
# Folders of rows


def plan_batches(rows: Sequence[ImageRow], settings: GenerationSettings, size: int) -> list[list[ImageRow]]:
    """Consecutive rows with the same (guidance, height, width), at most ``batch_size`` per call."""
    batches: list[list[ImageRow]] = []
    key = None
    for row in rows:
        row_key = row_call_settings(row, settings, size)
        if batches and row_key == key and len(batches[-1]) < settings.batch_size:
            batches[-1].append(row)
        else:
            batches.append([row])
            key = row_key
    return batches


def _row_record(row: ImageRow, settings: GenerationSettings) -> list[Any]:
    """What makes one image: prompt, seed and the guidance/size it asks for (``None``: the default)."""
    guidance = settings.guidance_scale if settings.guidance_scale is not None else row.guidance
    return [row.prompt, int(row.seed), guidance, settings.height or row.height, settings.width or row.width]


def check_generation_record(
    folder: Path, rows: Sequence[ImageRow], settings: GenerationSettings, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """Refuse a folder whose existing images were made with other settings; return the updated record.

    ``fingerprint`` says what model and artifact make the images (see :func:`generate_images`).
    """
    run = {**fingerprint, "num_inference_steps": settings.num_inference_steps, "scheduler": settings.scheduler}
    wanted = {row.file: _row_record(row, settings) for row in rows}
    existing = [name for name in wanted if (folder / name).exists()]
    path = folder / GENERATION_RECORD
    record: dict[str, Any] = {"run": run, "rows": {}}
    if path.exists():
        problem = record_problem(path, {"run": dict, "rows": dict})
        if problem is None:
            record = json.loads(path.read_text(encoding="utf-8"))
        elif existing:  # what made the images is unknown: they cannot be reused
            raise CoErasingError(f"{path} is not a valid record: {problem}; it is unknown what made the "
                                 f"{len(existing)} images of {folder}. Delete the folder {folder} to generate "
                                 "them afresh.")
        else:
            print(f"warning: {path} is not a valid record: {problem}; no image depends on it, writing it afresh.",
                  file=sys.stderr, flush=True)
    if existing:
        how = "use another output folder, or delete it to generate afresh"
        if not path.exists():
            raise CoErasingError(
                f"{folder} already holds {len(existing)} images (e.g. {existing[0]}) but no {GENERATION_RECORD}, so "
                f"it is unknown what made them; {how}."
            )
        if record.get("run") != run:
            changed = sorted(k for k in set(run) | set(record.get("run", {}))
                             if run.get(k) != record.get("run", {}).get(k))
            raise CoErasingError(
                f"{folder} holds images made with other settings ({', '.join(changed)} differ: "
                f"{ {k: record.get('run', {}).get(k) for k in changed} } before, { {k: run.get(k) for k in changed} } "
                f"now). They are not reused; {how}."
            )
        stale = [name for name in existing if record.get("rows", {}).get(name) != json.loads(json.dumps(wanted[name]))]
        if stale:
            raise CoErasingError(
                f"{folder}: {len(stale)} existing images were made from other prompts, seeds, guidance or sizes "
                f"(e.g. {stale[0]}: {record.get('rows', {}).get(stale[0])} before, {wanted[stale[0]]} now). "
                f"They are not reused; {how}."
            )
    record = {"run": run, "rows": {**record.get("rows", {}), **wanted}}
    return record


def write_manifest(
    folder: Path, rows: Sequence[ImageRow], settings: GenerationSettings, size: int,
    name: str = MANIFEST, columns: Sequence[str] = MANIFEST_FIELDS,
) -> None:
    """The manifest CSV (default ``manifest.csv``): file, case, prompt, seed, guidance and size of each image."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        guidance, height, width = row_call_settings(row, settings, size)
        writer.writerow({"file": row.file, "case": row.case, "prompt": row.prompt, "seed": row.seed,
                         "guidance": guidance, "width": width, "height": height})
    atomic_write_text(folder / name, buffer.getvalue())


def generate_images(
    rows: Sequence[ImageRow],
    folder: str | Path,
    settings: GenerationSettings,
    load_pipe: Callable[[torch.device, torch.dtype], Any],
    device: str | None = None,
    mixed_precision: str = "no",
    run_info: dict[str, Any] | None = None,
    desc: str = "generating",
    write_manifest_files: bool = True,
    fingerprint: dict[str, Any] | None = None,
    manifest: str = MANIFEST,
    manifest_columns: Sequence[str] = MANIFEST_FIELDS,
) -> Path:
    """Generate ``<case>.png`` for every row into ``folder`` (sharded, batched, resumable; see module doc).

    ``load_pipe(device, dtype)`` builds the pipeline or a runtime (:func:`coerasing.methods.load_runtime`); it is
    only called when this process has images left to make. ``fingerprint`` (model, artifact, …) is
    compared with the folder's record so that images made otherwise are never reused.
    ``write_manifest_files=False`` leaves the manifest and ``run.json`` alone.
    """

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    state = distributed_state(cpu=device == "cpu" or not torch.cuda.is_available())
    record = check_generation_record(folder, rows, settings, {"mixed_precision": mixed_precision,
                                                              **(fingerprint or {})})
    state.wait_for_everyone()  # every process checked the old record before any writes it
    if state.is_main_process:
        atomic_write_json(folder / GENERATION_RECORD, record)
    # The batch plan is made on all rows (rows without a size share the model's, whatever it is), so an
    # image's batch, and so its bytes, do not depend on the number of processes.
    mine = plan_batches(rows, settings, 0)[state.process_index :: state.num_processes]
    todo = [[row for row in batch if not (folder / row.file).exists()] for batch in mine]
    todo = [batch for batch in todo if batch]
    total, left = sum(map(len, mine)), sum(map(len, todo))
    if left < total:
        rest = "generating the rest" if left else "nothing to generate"
        print(f"{total - left} of {total} images already exist in {folder}; {rest}")
    size = None
    if todo:
        run_device = parse_device(device) if device or state.num_processes == 1 else state.device
        check_mixed_precision(mixed_precision, (run_device,))
        loaded = load_pipe(run_device, resolve_dtype(mixed_precision, run_device))
        # a runtime (an eraser applied: coerasing.methods.Runtime) renders itself; a plain pipeline with render()
        pipe = getattr(loaded, "pipe", loaded)
        draw = loaded.render if hasattr(loaded, "render") else (lambda *args, **kwargs: render(pipe, *args, **kwargs))
        size = default_size(pipe)
        for batch in tqdm(todo, desc=desc, unit="batch", disable=len(todo) < 2):
            guidance, height, width = row_call_settings(batch[0], settings, size)
            images = draw([row.seed for row in batch], guidance, height, width, settings.num_inference_steps,
                          prompts=[row.prompt for row in batch])
            for row, image in zip(batch, images, strict=True):
                save_png(image, folder / row.file)
    state.wait_for_everyone()
    if state.is_main_process and write_manifest_files:
        if size is None:
            size = _size_from_images(folder, rows)
        write_manifest(folder, rows, settings, size, manifest, manifest_columns)
        info = {**(run_info or {}), "settings": asdict(settings), "processes": state.num_processes,
                "images": len(rows)}
        write_run_json(folder, info.pop("config", {}), **info)
        print(f"{len(rows)} images in {folder}")
    return folder


def _size_from_images(folder: Path, rows: Sequence[ImageRow]) -> int:
    """The default size when nothing was generated in this run: read from an existing image without a size."""
    for row in rows:
        if row.width is None and row.height is None and (folder / row.file).exists():
            with Image.open(folder / row.file) as image:
                return int(image.width)
    return 512
