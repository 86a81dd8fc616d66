"""The relearning probe (docs/attacks.md §Relearning probe): how fast does fine-tuning bring an erased concept back?

An erased model is fine-tuned with the ordinary diffusion loss on a few images of the concept, and
the concept rate of its generations is measured after ``k`` steps for each ``k`` of a grid
(``0, 10, 25, 50``). The same curve for the base model (which never lost the concept) is the
reference. A concept that is only *hidden* comes back in far fewer steps than one the model must
learn from scratch.

One step: ``batch_size`` images (random order, each once per pass), resized and centre-cropped to
the model's resolution, a VAE posterior *sample* × ``scaling_factor``, ``t ~ U{0…T−1}``, Gaussian
noise, ``z_t`` by the model's training schedule, the prediction of the model being probed (its
runtime's :meth:`~coerasing.methods.base.Runtime.noise_pred`, so an eraser's add-on modules are
active) conditioned on the image's caption, MSE to the noise (velocity for v-prediction); AdamW
on every UNet weight (fp32), gradient norm clipped. All randomness comes from one CPU generator
seeded with ``seed``.

The probe trains the runtime's pipeline in memory (loaded from the files; nothing is ever written
to the model's or the artifact's folder) and puts the starting weights back afterwards. Its record
of step ``k`` (``k_<k>.json``: the concept rate with its interval, each prompt's detection, the
losses) is written as soon as it is measured; a rerun reuses current records and trains again,
from the same start with the same draws, only up to the largest missing ``k``.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CoErasingError, NonFiniteLossError
from ..files import atomic_write_json, atomic_write_text, fingerprint
from ..generation import GenerationSettings, ImageRow, default_size, row_call_settings, save_png
from ..images import list_image_files, load_images
from ..methods.base import Runtime
from ..stats import rate
from ..textual_inversion import LatentCache, denoising_target, encode_prompts
from .attack_records import as_json, is_current
from .detectors import Detector

RELEARN_DIR = "relearn"
#: Every curve of a run, by model (``relearn/curve.json``).
CURVE_FILE = "curve.json"


def parse_steps(text: str) -> tuple[int, ...]:
    """``"0,10,25,50"`` → ``(0, 10, 25, 50)`` (sorted, unique, each ≥ 0)."""
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise CoErasingError(f"--relearn_steps {text!r} must be comma-separated whole numbers, e.g. 0,10,25,50.") \
            from exc
    if not steps or steps[0] < 0:
        raise CoErasingError(f"--relearn_steps {text!r} must list step counts ≥ 0, e.g. 0,10,25,50.")
    return tuple(steps)


@dataclass
class RelearnSettings:
    """The probe's knobs (lr, weight decay and clipping: Meta-Unlearning's fine-tuning attack defaults)."""

    steps: tuple[int, ...] = (0, 10, 25, 50)
    lr: float = 1e-5
    batch_size: int = 4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0

    def validate(self) -> RelearnSettings:
        if not self.steps or min(self.steps) < 0 or list(self.steps) != sorted(set(self.steps)):
            raise CoErasingError(f"relearning steps must be sorted, unique and ≥ 0, got {self.steps}.")
        if not self.lr > 0:
            raise CoErasingError(f"--relearn_lr must be positive, got {self.lr}.")
        if self.batch_size < 1:
            raise CoErasingError(f"--relearn_batch_size must be at least 1, got {self.batch_size}.")
        if self.weight_decay < 0:
            raise CoErasingError(f"relearning weight decay must be >= 0, got {self.weight_decay}.")
        return self


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class ConceptImages:
    """The images the probe fine-tunes on, their captions, and what identifies them in the records."""

    images: list[Image.Image] = field(repr=False)
    captions: list[str]
    identity: dict[str, Any] = field(default_factory=dict)


def load_concept_images(folder: str | Path, number: int | None, caption: str | None,
                        flag: str = "--relearn_images") -> ConceptImages:
    """The first ``number`` images (sorted names; all if ``None``) of a ``generate_data.py`` folder.

    Captions: ``caption`` for every image if given, else each file's prompt in the folder's
    ``metadata.csv`` (``file, prompt, seed``).
    """

    files = list_image_files(folder, flag)
    if number is not None:
        if number > len(files):
            raise CoErasingError(f"{flag} {folder} has {len(files)} images; --relearn_num_images asks for {number}.")
        files = files[:number]
    captions: list[str]
    if caption is not None:
        captions = [caption] * len(files)
    else:
        metadata = Path(folder).expanduser() / "metadata.csv"
        prompts: dict[str, str] = {}
        if metadata.exists():
            with metadata.open(encoding="utf-8", newline="") as handle:
                prompts = {row.get("file", ""): row.get("prompt", "") for row in csv.DictReader(handle)}
        missing = [path.name for path in files if not prompts.get(path.name)]
        if missing:
            raise CoErasingError(f"{flag} {folder}: no caption for {missing[0]} (no metadata.csv row with its prompt, "
                                 "as generate_data.py writes); pass --relearn_caption TEXT.")
        captions = [prompts[path.name] for path in files]
    files, images = load_images(files, flag)
    identity = {"images": str(folder), "images_fingerprint": fingerprint(folder), "files": [p.name for p in files],
                "captions": captions}
    return ConceptImages(images, captions, identity)


# ----------------------------------------------------------------------------------------------
# Fine-tuning


@contextlib.contextmanager
def trainable_copy(unet: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Make every UNet weight trainable; on exit restore the starting weights exactly, and the flags.

    Yields the starting weights (CPU clones).
    """
    start = {key: value.detach().to("cpu", copy=True) for key, value in unet.state_dict().items()}
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    training = unet.training
    try:
        unet.requires_grad_(True)
        yield start
    finally:
        for p in unet.parameters():
            p.grad = None
        unet.load_state_dict(start, strict=True)
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])
        unet.train(training)


def relearn_checkpoints(runtime: Runtime, data: ConceptImages, settings: RelearnSettings,
                        until: int | None = None, progress: Callable[[str], None] | None = None,
                        ) -> Iterator[tuple[int, list[float]]]:
    """Fine-tune ``runtime``'s UNet (see the module docstring); yield ``(k, losses so far)`` at each ``k`` of
    ``settings.steps`` up to ``until``, while the UNet holds the weights after ``k`` steps (``k = 0``: the
    model's own). The starting weights are restored when the iteration ends (or is abandoned)."""
    from diffusers import DDPMScheduler


    settings.validate()
    if not data.images:
        raise CoErasingError("the relearning probe needs at least one image of the concept.")
    pipe = runtime.pipe
    unet, vae = pipe.unet, pipe.vae
    if unet.dtype != torch.float32:
        raise CoErasingError("the relearning probe trains the UNet in float32; run it with --mixed_precision no.")
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(unet.config.sample_size) * vae_scale
    cache = LatentCache(vae, data.images, size)
    scaling = float(vae.config.scaling_factor)
    wanted = [k for k in settings.steps if until is None or k <= until]
    if not wanted:
        return
    last = max(wanted)
    generator = torch.Generator("cpu").manual_seed(int(settings.seed))
    T = int(schedule.config.num_train_timesteps)
    order: list[int] = []
    with torch.no_grad():
        states = encode_prompts(pipe.tokenizer, pipe.text_encoder, data.captions).to(unet.device, unet.dtype)
    losses: list[float] = []
    with trainable_copy(unet):
        unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        for step in range(last + 1):
            if step in settings.steps:
                unet.eval()
                yield step, list(losses)
                unet.train()
            if step == last:
                break
            picks = []
            for _ in range(settings.batch_size):
                if not order:
                    order = torch.randperm(len(data.images), generator=generator).tolist()
                picks.append(order.pop(0))
            t = torch.randint(0, T, (len(picks),), generator=generator)
            moments = [cache.moments(i, False) for i in picks]
            mean, std = torch.stack([m for m, _ in moments]), torch.stack([s for _, s in moments])
            z0 = (mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)) * scaling
            noise = torch.randn(mean.shape, generator=generator)
            z0, noise, t = z0.to(unet.device), noise.to(unet.device), t.to(unet.device)
            noisy = schedule.add_noise(z0, noise, t)
            prediction = runtime.noise_pred(noisy, t, states[picks])
            loss = F.mse_loss(prediction.float(), denoising_target(schedule, z0, noise, t).float())
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"the relearning loss became {float(loss)} at step {step}.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), settings.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None and (step + 1) % 10 == 0:
                progress(f"relearning step {step + 1}/{last}: loss {sum(losses[-10:]) / 10:.4f}")


# ----------------------------------------------------------------------------------------------
# The curve


def record_path(folder: Path, k: int) -> Path:
    return Path(folder) / f"k_{k:06d}.json"


def concept_rate(runtime: Runtime, rows: Sequence[ImageRow], generation: GenerationSettings, detector: Detector,
                 image_dir: Path | None = None) -> dict[str, Any]:
    """Generate each row (its seed, guidance, size) and detect: the rate and each case's detection."""
    size = default_size(runtime.pipe)
    positive, detections = 0, {}
    for row in rows:
        guidance, height, width = row_call_settings(row, generation, size)
        image = runtime.render([row.seed], guidance, height, width, generation.num_inference_steps,
                               prompts=[row.prompt])[0]
        detection = detector.detect([image])[0]
        positive += bool(detection.positive)
        detections[row.case] = detection.to_json()
        if image_dir is not None:
            save_png(image, image_dir / row.file)
    return {"rate": rate(positive, len(rows)), "detections": detections}


def relearn_curve(runtime: Runtime, rows: Sequence[ImageRow], data: ConceptImages, settings: RelearnSettings,
                  generation: GenerationSettings, detector: Callable[[], Detector], out_dir: str | Path,
                  made_by: Mapping[str, Any], on_stale: str = "error", save_images: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[int, dict[str, Any]]:
    """The concept rate of ``rows`` after each ``k`` of ``settings.steps`` (resumable; see the module docstring).

    Records ``out_dir/k_<k>.json`` carry ``settings`` (with the images' identity) and ``made_by``;
    one of other settings stops with an error (``on_stale="error"``) or is measured again
    (``"redo"``). Returns the records by ``k``.
    """
    settings.validate()
    out_dir = Path(out_dir)
    keyed = as_json({**vars(settings), **data.identity, "rows": [[r.case, r.prompt, r.seed] for r in rows],
                     "generation": vars(generation)})
    origin = as_json(dict(made_by))
    done: dict[int, dict[str, Any]] = {}
    for k in settings.steps:
        path = record_path(out_dir, k)
        if not path.exists():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CoErasingError(f"{path} could not be read ({exc}); delete it and rerun the probe.") from exc
        if is_current(record, keyed, origin):
            done[k] = record
        elif on_stale == "error":
            raise CoErasingError(f"{out_dir} holds relearning results made with other settings or another model "
                                 f"(k = {k}); use another --output_dir, or delete the folder to probe again.")
    todo = [k for k in settings.steps if k not in done]
    if not todo:
        return done
    judge = detector()
    for k, losses in relearn_checkpoints(runtime, data, settings, until=max(todo), progress=log):
        if k in done:
            continue
        measured = concept_rate(runtime, rows, generation, judge, out_dir / f"k_{k:06d}" if save_images else None)
        record = {"k": k, **measured, "losses": losses, "settings": keyed, "made_by": origin}
        atomic_write_json(record_path(out_dir, k), record)
        done[k] = record
        if log is not None:
            r = measured["rate"]
            log(f"after {k} relearning steps: concept in {r['k']}/{r['n']} images ({100 * r['rate']:.1f} %)")
    return done


def curve_summary(curves: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """``{model: [{"k", "rate", "k_pos", "n", "low", "high", "final_loss"}…]}`` for ``curve.json``."""
    summary: dict[str, Any] = {}
    for name, records in curves.items():
        summary[name] = [{"k": k, "rate": r["rate"]["rate"], "positives": r["rate"]["k"], "n": r["rate"]["n"],
                          "low": r["rate"]["low"], "high": r["rate"]["high"],
                          "final_loss": r["losses"][-1] if r["losses"] else None}
                         for k, r in sorted(records.items())]
    return summary


def write_curves(folder: Path, curves: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> Path:
    """``curve.json`` and ``curve.md`` (one row per ``k``, one column per model) in ``folder``."""
    summary = curve_summary(curves)
    atomic_write_json(folder / CURVE_FILE, summary)
    names = list(summary)
    ks = sorted({point["k"] for points in summary.values() for point in points})
    lines = ["| relearning steps | " + " | ".join(f"{name} concept rate" for name in names) + " |",
             "|---:|" + "---:|" * len(names)]
    for k in ks:
        cells = []
        for name in names:
            point = next((p for p in summary[name] if p["k"] == k), None)
            cells.append(f"{100 * point['rate']:.1f} % ({point['positives']}/{point['n']})" if point else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    atomic_write_text(folder / "curve.md", "\n".join(lines) + "\n")
    return folder / CURVE_FILE
