"""Measuring a toy-world SD stack with the independent classifier: text prompts and IP-Adapter images.

:func:`evaluate_quality` generates from the held-out prompt sets of :mod:`coerasing.toy.world` with a
plain diffusers ``StableDiffusionPipeline`` loaded from the built folder (and, for image prompts,
``pipe.load_ip_adapter``), classifies every image and reports accuracies against the issue's targets.
The generation helpers are reusable for measuring erasure on an edited UNet.

``python -m coerasing.toy.quality FOLDER [--guidance_scale G] [--update]`` measures a built folder
again (with the evaluation settings recorded in its ``quality.json``); ``--update`` writes the new
measurement into ``quality.json`` and ``quality_samples.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from .. import generation
from ..cli import run_cli
from ..errors import CoErasingError
from ..files import atomic_write, atomic_write_text
from ..grid import image_grid
from . import TOY_GUIDANCE
from .classifier import ToyClassifier
from .world import SHAPES, EvalPrompt, explicit_prompts, heldout_scenes, implicit_prompts, render

IP_ADAPTER_WEIGHT_NAME = "ip-adapter_toy.bin"
IP_ADAPTER_SAFETENSORS_NAME = "ip-adapter_toy.safetensors"

#: Quality targets of the toy world (fractions), measured on held-out prompts by the classifier.
TARGETS: dict[str, float] = {
    "explicit_shape": 0.90,
    "explicit_colour": 0.90,
    "implicit_shape": 0.80,
    "ip_adapter_shape": 0.80,
}


def load_pipeline(folder: str | Path, device: torch.device | str = "cpu") -> StableDiffusionPipeline:
    """The built folder as a plain ``StableDiffusionPipeline`` (fp32, no safety checker, quiet)."""
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def generate_for_prompts(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    images_per_prompt: int,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = TOY_GUIDANCE,
    batch_size: int = 64,
) -> np.ndarray:
    """``[len(prompts) * images_per_prompt, H, W, 3]`` uint8, prompt-major; image ``i`` uses seed ``seed + i``."""
    flat = [p for p in prompts for _ in range(images_per_prompt)]
    size = generation.default_size(pipe)
    out = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        seeds = [seed + start + i for i in range(len(chunk))]
        out.append(generation.render(pipe, seeds, guidance_scale, size, size, num_inference_steps, chunk,
                                     output_type="np"))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def generate_from_images(
    pipe: StableDiffusionPipeline,
    references: Sequence[Image.Image],
    images_per_reference: int,
    seed: int = 0,
    prompt: str = "",
    num_inference_steps: int = 25,
    guidance_scale: float = TOY_GUIDANCE,
) -> np.ndarray:
    """Image-prompted generation through the loaded IP-Adapter: one pipeline call per reference image."""
    device = pipe.device
    out = []
    for r, reference in enumerate(references):
        first = seed + r * images_per_reference
        generators = [torch.Generator(device).manual_seed(first + i) for i in range(images_per_reference)]
        images = pipe(
            prompt,
            ip_adapter_image=reference,
            num_images_per_prompt=images_per_reference,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
        ).images
        out.append(_to_uint8(images))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def accuracy(
    predictions: Sequence[dict[str, str]], expected: Sequence[tuple[str | None, str | None]]
) -> dict[str, float | int | None]:
    """Shape and colour accuracy; a ``None`` expectation is not scored."""
    shape_hits = [p["shape"] == s for p, (s, _) in zip(predictions, expected, strict=True) if s is not None]
    colour_hits = [p["colour"] == c for p, (_, c) in zip(predictions, expected, strict=True) if c is not None]
    return {
        "shape": float(np.mean(shape_hits)) if shape_hits else None,
        "colour": float(np.mean(colour_hits)) if colour_hits else None,
        "n_shape": len(shape_hits),
        "n_colour": len(colour_hits),
    }


def shape_histogram(predictions: Sequence[dict[str, str]]) -> dict[str, int]:
    """How often each predicted shape occurs."""
    counts: dict[str, int] = {}
    for p in predictions:
        counts[p["shape"]] = counts.get(p["shape"], 0) + 1
    return dict(sorted(counts.items()))


def _score_prompts(
    classifier: ToyClassifier, prompts: Sequence[EvalPrompt], images: np.ndarray, per_prompt: int
) -> dict[str, Any]:
    predictions = classifier.predict(images)
    expected = [(p.shape, p.colour) for p in prompts for _ in range(per_prompt)]
    result: dict[str, Any] = {"n_prompts": len(prompts), "images_per_prompt": per_prompt}
    result.update(accuracy(predictions, expected))
    result["per_prompt"] = {}
    for i, p in enumerate(prompts):
        part = slice(i * per_prompt, (i + 1) * per_prompt)
        result["per_prompt"][p.prompt] = accuracy(predictions[part], expected[part])
    return result


def evaluate_quality(
    folder: str | Path,
    images_per_prompt: int = 4,
    references_per_shape: int = 8,
    images_per_reference: int = 2,
    num_inference_steps: int = 25,
    guidance_scale: float = TOY_GUIDANCE,
    seed: int = 0,
    max_prompts: int | None = None,
    device: torch.device | str = "cpu",
    samples_path: str | Path | None = None,
) -> dict[str, Any]:
    """Generate from the held-out prompt sets and reference renders; score them with ``folder/classifier``."""
    folder = Path(folder)
    classifier = ToyClassifier.from_pretrained(folder / "classifier", device)
    pipe = load_pipeline(folder, device)
    settings = {
        "scheduler": type(pipe.scheduler).__name__,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
    result: dict[str, Any] = {"settings": settings}
    samples = []

    t0 = time.perf_counter()
    explicit = explicit_prompts()[:max_prompts]
    images = generate_for_prompts(
        pipe, [p.prompt for p in explicit], images_per_prompt, seed, num_inference_steps, guidance_scale
    )
    result["explicit"] = _score_prompts(classifier, explicit, images, images_per_prompt)
    samples.append(images[::images_per_prompt][:30])

    implicit = implicit_prompts()[:max_prompts]
    images = generate_for_prompts(
        pipe, [p.prompt for p in implicit], images_per_prompt, seed + 100_000, num_inference_steps, guidance_scale
    )
    result["implicit"] = _score_prompts(classifier, implicit, images, images_per_prompt)
    samples.append(images[::images_per_prompt][:30])

    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=IP_ADAPTER_WEIGHT_NAME)
    pipe.set_ip_adapter_scale(1.0)
    resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    scenes = [s for shape in SHAPES for s in heldout_scenes(references_per_shape, seed=seed + 7, shape=shape)]
    references = [render(s, resolution) for s in scenes]
    images = generate_from_images(
        pipe, references, images_per_reference, seed + 200_000, "", num_inference_steps, guidance_scale
    )
    predictions = classifier.predict(images)
    expected = [(s.shape, s.colour) for s in scenes for _ in range(images_per_reference)]
    result["ip_adapter"] = {"n_references": len(scenes), "images_per_reference": images_per_reference}
    result["ip_adapter"].update(accuracy(predictions, expected))
    result["ip_adapter"]["predicted_shapes"] = shape_histogram(predictions)
    ref_array = np.stack([np.asarray(r) for r in references])
    samples.append(np.stack([ref_array, images[::images_per_reference]], 1).reshape(-1, *ref_array.shape[1:])[:30])

    result["seconds"] = round(time.perf_counter() - t0, 1)
    measured = {
        "explicit_shape": result["explicit"]["shape"],
        "explicit_colour": result["explicit"]["colour"],
        "implicit_shape": result["implicit"]["shape"],
        "ip_adapter_shape": result["ip_adapter"]["shape"],
    }
    result["targets"] = {
        name: {"target": target, "measured": measured[name], "passed": bool((measured[name] or 0.0) >= target)}
        for name, target in TARGETS.items()
    }
    result["all_passed"] = all(t["passed"] for t in result["targets"].values())
    if samples_path is not None:
        images = [image for group in samples if len(group) for image in [*group, *[None] * (30 - len(group))]]
        if images:
            grid = image_grid([images[start : start + 10] for start in range(0, len(images), 10)],
                              cell=2 * resolution, pad=0)
            atomic_write(samples_path, lambda tmp: grid.save(tmp, format="PNG"))
    return result


def plan_settings(plan: dict[str, Any]) -> dict[str, Any]:
    """:func:`evaluate_quality`'s settings from a build plan's ``eval_*`` fields (``quality.json``'s ``plan``)."""
    return {
        "images_per_prompt": int(plan.get("eval_images_per_prompt", 8)),
        "references_per_shape": int(plan.get("eval_references_per_shape", 8)),
        "images_per_reference": int(plan.get("eval_images_per_reference", 2)),
        "num_inference_steps": int(plan.get("eval_steps", 25)),
        "guidance_scale": float(plan.get("eval_guidance", TOY_GUIDANCE)),
        "max_prompts": plan.get("eval_max_prompts"),
    }


def remeasure(folder: str | Path, guidance_scale: float | None = None, update: bool = False) -> dict[str, Any]:
    """:func:`evaluate_quality` of a built folder with the settings its ``quality.json`` records.

    ``guidance_scale`` overrides the recorded guidance. With ``update`` the result replaces the
    ``quality`` entry of ``quality.json`` (and the plan's ``eval_guidance``) and redraws
    ``quality_samples.png``; both are written atomically.
    """
    folder = Path(folder)
    report_path = folder / "quality.json"
    if not report_path.is_file() or not (folder / "classifier").is_dir():
        raise CoErasingError(
            f"{folder} is not a built toy-world folder (no quality.json or classifier/ in it). Pass the folder "
            "that python -m coerasing.toy.build wrote, e.g. coerasing/assets/toy_world."
        )
    report = json.loads(report_path.read_text())
    plan = report.get("plan", {})
    settings = plan_settings(plan)
    if guidance_scale is not None:
        settings["guidance_scale"] = float(guidance_scale)
    samples = folder / "quality_samples.png" if update else None
    quality = evaluate_quality(folder, **settings, seed=int(report.get("seed", 0)), samples_path=samples)
    if update:
        report["quality"] = quality
        report.setdefault("plan", {})["eval_guidance"] = settings["guidance_scale"]
        atomic_write_text(report_path, json.dumps(report, indent=2))
    return quality


def main(argv: Sequence[str] | None = None) -> None:
    description = (remeasure.__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m coerasing.toy.quality", description=description)
    parser.add_argument("folder", help="a folder written by python -m coerasing.toy.build")
    parser.add_argument("--guidance_scale", type=float, default=None, help="default: the one quality.json records")
    parser.add_argument("--update", action="store_true", help="write the result into quality.json")
    args = parser.parse_args(argv)
    if args.guidance_scale is not None and args.guidance_scale <= 0:
        raise CoErasingError(f"--guidance_scale must be positive, got {args.guidance_scale}.")
    quality = remeasure(args.folder, args.guidance_scale, args.update)
    for name, target in quality["targets"].items():
        verdict = "met" if target["passed"] else "MISSED"
        print(f"{name:18s} {target['measured']:.3f}  (target {target['target']:.2f}, {verdict})")
    print(f"guidance {quality['settings']['guidance_scale']}, {quality['seconds']} s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
