"""Step 1 of the evaluation: one image per prompt row, from the base model plus an optional erased UNet.

Protocol (METHOD.md §9; UnlearnDiff's ``generate_dataset.py`` and ``ClassifierTask.sampling``):

- Image ``<case_number>.png`` comes from the row's prompt, its ``evaluation_seed`` and its
  ``evaluation_guidance`` (7.5 when the row has none), at the row's ``sd_image_width`` ×
  ``sd_image_height`` when given, else the model's default size (512 px for SD v1.x), with 50 steps.
  ``--guidance_scale``/``--height``/``--width`` override every row.
- The initial noise of each image comes from its own ``torch.Generator("cpu").manual_seed(seed)``,
  as UnlearnDiff's and ESD's ``torch.manual_seed(seed)``: the same latents on any device, for any
  batch size and any number of processes (diffusers draws each image's latents from its own
  generator on the CPU and moves them to the device).
- The sampler is the model's own (PNDM for SD v1.4) unless ``--scheduler`` says otherwise;
  UnlearnDiff sampled with ``LMSDiscreteScheduler`` (``--scheduler lms``, needs scipy).
- Consecutive rows with the same guidance and size share a call (up to ``--batch_size``), a rerun
  skips images that exist (resume), and each PNG is written atomically. Under ``accelerate
  launch``/``torchrun`` process ``r`` of ``N`` takes batches ``r, r+N, …`` of that plan (rows
  ``r, r+N, …`` at batch size 1), so every image is made in the same batch, and comes out with the
  same bytes, whatever the number of processes; the main process writes ``manifest.csv`` and
  ``run.json`` once all are done. (A different batch size may change an image by a rounding step.)
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..checkpoints import atomic_write, atomic_write_text, library_versions
from ..errors import CoErasingError
from ..formats import load_unet_checkpoint_into
from ..models import check_mixed_precision, parse_device, resolve_dtype
from ..reference_images import distributed_state, load_generation_pipeline
from .prompts import DEFAULT_GUIDANCE, PromptRow

logger = logging.getLogger(__name__)

#: ``--scheduler`` choices; ``default`` keeps the model's own scheduler config.
SCHEDULERS: tuple[str, ...] = ("default", "pndm", "lms", "ddim", "euler", "dpm")

MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("file", "case", "prompt", "seed", "guidance", "width", "height")


@dataclass
class GenerationSettings:
    """How images are generated; ``None`` for guidance/size means "the row's value, else the default"."""

    num_inference_steps: int = 50
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 1
    scheduler: str = "default"


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap the pipeline's sampler (same noise schedule, from the model's scheduler config)."""
    if name == "default":
        return
    import diffusers

    classes = {
        "pndm": "PNDMScheduler",
        "lms": "LMSDiscreteScheduler",
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "dpm": "DPMSolverMultistepScheduler",
    }
    if name not in classes:
        raise CoErasingError(f"--scheduler {name!r} is not one of {', '.join(SCHEDULERS)}.")
    if name == "lms" and importlib.util.find_spec("scipy") is None:
        raise CoErasingError(
            "--scheduler lms (UnlearnDiff's sampler) needs scipy, which diffusers' LMSDiscreteScheduler uses to "
            "integrate its coefficients. Install it (pip install scipy) or pick another --scheduler."
        )
    pipe.scheduler = getattr(diffusers, classes[name]).from_config(pipe.scheduler.config)


def load_eval_pipeline(
    ckpt_path: str, unet: str | None, device: torch.device, dtype: torch.dtype, scheduler: str = "default"
) -> Any:
    """The base SD pipeline (safety checker off) with the erased UNet ``unet`` loaded strictly, if given.

    ``unet`` takes every format :mod:`coerasing.formats` reads (``unet.pth``, ESD/UnlearnDiff ``.pt``,
    released Co-Erasing checkpoints, full or partial ``.safetensors``, diffusers folders).
    """
    pipe = load_generation_pipeline(ckpt_path, device, dtype)
    if unet:
        description = load_unet_checkpoint_into(pipe.unet, unet, "--unet")
        print(f"erased UNet {unet}: {description}")
    set_scheduler(pipe, scheduler)
    return pipe


def default_size(pipe: Any) -> int:
    """The model's native resolution: ``unet.config.sample_size × vae_scale_factor`` (512 for SD v1.x)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def row_call_settings(row: PromptRow, settings: GenerationSettings, size: int) -> tuple[float, int, int]:
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
) -> list[Image.Image]:
    """Generate one image per seed from ``prompts`` or from ready text states ``prompt_embeds`` ``[B, 77, d]``.

    The unconditional branch of classifier-free guidance is the empty prompt either way.
    """
    kwargs: dict[str, Any] = {"prompt": list(prompts)} if prompts is not None else {"prompt_embeds": prompt_embeds}
    return pipe(
        **kwargs,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        generator=seeded_generators(seeds),
    ).images


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as PNG atomically (a crash never leaves a half-written file)."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def plan_batches(rows: Sequence[PromptRow], settings: GenerationSettings, size: int) -> list[list[PromptRow]]:
    """Consecutive rows with the same (guidance, height, width), at most ``batch_size`` per call."""
    batches: list[list[PromptRow]] = []
    key = None
    for row in rows:
        row_key = row_call_settings(row, settings, size)
        if batches and row_key == key and len(batches[-1]) < settings.batch_size:
            batches[-1].append(row)
        else:
            batches.append([row])
            key = row_key
    return batches


def write_manifest(folder: Path, rows: Sequence[PromptRow], settings: GenerationSettings, size: int) -> None:
    """``manifest.csv``: file, case, prompt, seed and the guidance/size each image was made with."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        guidance, height, width = row_call_settings(row, settings, size)
        writer.writerow({"file": row.file, "case": row.case, "prompt": row.prompt, "seed": row.seed,
                         "guidance": guidance, "width": width, "height": height})
    atomic_write_text(folder / MANIFEST, buffer.getvalue())


def generate_images(
    rows: Sequence[PromptRow],
    folder: str | Path,
    settings: GenerationSettings,
    load_pipe: Callable[[torch.device, torch.dtype], Any],
    device: str | None = None,
    mixed_precision: str = "no",
    run_info: dict[str, Any] | None = None,
    desc: str = "generating",
    write_manifest_files: bool = True,
) -> Path:
    """Generate ``<case>.png`` for every row into ``folder`` (sharded, batched, resumable; see module doc).

    ``load_pipe(device, dtype)`` builds the pipeline; it is only called when this process has
    images left to make. ``write_manifest_files=False`` leaves ``manifest.csv``/``run.json`` alone
    (filling gaps in a folder made by another run).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = distributed_state(cpu=device == "cpu" or not torch.cuda.is_available())
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
        pipe = load_pipe(run_device, resolve_dtype(mixed_precision, run_device))
        size = default_size(pipe)
        for batch in tqdm(todo, desc=desc, unit="batch", disable=len(todo) < 2):
            guidance, height, width = row_call_settings(batch[0], settings, size)
            images = render(pipe, [row.seed for row in batch], guidance, height, width,
                            settings.num_inference_steps, prompts=[row.prompt for row in batch])
            for row, image in zip(batch, images, strict=True):
                save_png(image, folder / row.file)
    state.wait_for_everyone()
    if state.is_main_process and write_manifest_files:
        if size is None:
            size = _size_from_images(folder, rows)
        write_manifest(folder, rows, settings, size)
        info = {**(run_info or {}), "settings": vars(settings), "processes": state.num_processes,
                "images": len(rows), "versions": library_versions()}
        atomic_write_text(folder / "run.json", json.dumps(info, indent=2, default=str) + "\n")
        print(f"{len(rows)} images in {folder}")
    return folder


def _size_from_images(folder: Path, rows: Sequence[PromptRow]) -> int:
    """The default size when nothing was generated in this run: read from an existing image without a size."""
    for row in rows:
        if row.width is None and row.height is None and (folder / row.file).exists():
            with Image.open(folder / row.file) as image:
                return int(image.width)
    return 512


def load_image(path: Path) -> Image.Image:
    """Open an RGB image fully into memory (a clear error for a missing or corrupt file)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise CoErasingError(f"the image {path} could not be read ({exc}); delete it and rerun to remake it.") from exc
