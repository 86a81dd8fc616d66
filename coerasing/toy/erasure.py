"""Did erasing work? Concept rates and usability of base / erased UNets on the toy world.

``python -m coerasing.toy.erasure --model DIR --concept circle --unet text=PATH --unet image=PATH --out DIR``
generates, with fixed seeds and a plain diffusers ``StableDiffusionPipeline``, from three held-out
prompt sets of :mod:`coerasing.toy.world` and scores every image with the model folder's
independent classifier (:mod:`coerasing.toy.classifier`):

- ``target_rate_explicit``: prompts that name the concept ("a red circle"): share of images in which
  the classifier sees the concept's shape (the erasure's effect; lower is better);
- ``target_rate_implicit``: prompts that only imply it ("an apple", "a coin", "a ball"): the toy
  world's I2P (lower is better);
- ``unrelated_accuracy``: explicit and implicit prompts of the *other* shapes: share of images that
  show what was asked (the asked shape, and the asked colour where the prompt fixes one; what must
  survive, higher is better).

It writes ``report.json`` (the issue's layout plus counts, per-prompt numbers and settings) and a
labelled ``grid.png`` (rows: the models, columns: a fixed selection of prompts, first seed each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cli import run_cli
from ..errors import CoErasingError
from ..files import atomic_write
from ..formats import load_unet_checkpoint_into
from ..grid import image_grid
from . import TOY_GUIDANCE
from .classifier import ToyClassifier
from .quality import generate_for_prompts, load_pipeline
from .world import SHAPES, EvalPrompt, explicit_prompts, implicit_prompts, unrelated_prompts

#: The three prompt groups, in report order.
GROUPS: tuple[str, ...] = ("explicit", "implicit", "unrelated")


@dataclass(frozen=True)
class ErasureEvalSettings:
    """How many images and which sampler settings; the defaults are ``make demo``'s."""

    images_per_prompt: int = 8
    unrelated_images_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = TOY_GUIDANCE
    seed: int = 0
    batch_size: int = 64


def concept_prompts(concept: str) -> dict[str, list[EvalPrompt]]:
    """Held-out prompts that name ``concept`` (a shape), imply it, or ask for another shape."""
    if concept not in SHAPES:
        raise CoErasingError(
            f"--concept {concept!r} is not a shape of the toy world; erase one of: {', '.join(SHAPES)}."
        )
    return {
        "explicit": explicit_prompts([concept]),
        "implicit": implicit_prompts([concept]),
        "unrelated": unrelated_prompts(concept),
    }


def shows_concept(prediction: dict[str, str], concept: str) -> bool:
    """The classifier sees the concept's shape in the image."""
    return prediction["shape"] == concept


def shows_prompt(prediction: dict[str, str], prompt: EvalPrompt) -> bool:
    """The image shows what ``prompt`` asked: its shape, and its colour where the prompt fixes one."""
    return prediction["shape"] == prompt.shape and (prompt.colour is None or prediction["colour"] == prompt.colour)


def score_group(
    group: str, concept: str, prompts: Sequence[EvalPrompt], predictions: Sequence[dict[str, str]], per_prompt: int
) -> dict[str, Any]:
    """The group's rate (concept rate for explicit/implicit, accuracy for unrelated) overall and per prompt."""
    if len(predictions) != len(prompts) * per_prompt:
        raise ValueError(f"{len(predictions)} predictions for {len(prompts)} prompts × {per_prompt} images")
    hits = []
    for i, prompt in enumerate(prompts):
        for prediction in predictions[i * per_prompt : (i + 1) * per_prompt]:
            hit = shows_prompt(prediction, prompt) if group == "unrelated" else shows_concept(prediction, concept)
            hits.append(hit)
    rates = np.asarray(hits, dtype=np.float64).reshape(len(prompts), per_prompt).mean(axis=1) if hits else []
    return {
        "rate": float(np.mean(hits)) if hits else float("nan"),
        "n_images": len(hits),
        "n_prompts": len(prompts),
        "per_prompt": {p.prompt: float(r) for p, r in zip(prompts, rates, strict=True)},
    }


def summary(scores: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{target_rate_explicit, target_rate_implicit, unrelated_accuracy}`` of one model's group scores."""
    return {
        "target_rate_explicit": scores["explicit"]["rate"],
        "target_rate_implicit": scores["implicit"]["rate"],
        "unrelated_accuracy": scores["unrelated"]["rate"],
    }


def grid_prompts(prompts: dict[str, list[EvalPrompt]], per_group: Sequence[int] = (3, 3, 4)) -> list[EvalPrompt]:
    """A fixed, spread-out selection of prompts of each group for the grid's columns."""
    chosen = []
    for group, n in zip(GROUPS, per_group, strict=True):
        items = prompts[group]
        idx = np.linspace(0, len(items) - 1, num=min(n, len(items))).round().astype(int)
        chosen.extend(items[i] for i in dict.fromkeys(idx.tolist()))
    return chosen


def evaluate_erasure(
    model: str | Path,
    concept: str,
    unets: dict[str, str | Path | None],
    settings: ErasureEvalSettings | None = None,
    device: str | torch.device = "cpu",
    grid_path: str | Path | None = None,
) -> dict[str, Any]:
    """Generate and score every model of ``unets`` (name → erased UNet checkpoint, ``None``: the base UNet).

    Every model sees the same prompts and seeds (image ``i`` of a group uses seed ``seed + offset + i``),
    so rows differ only by the UNet weights.
    """
    settings = settings or ErasureEvalSettings()
    model = Path(model)
    prompts = concept_prompts(concept)
    classifier = ToyClassifier.from_pretrained(model / "classifier", device)
    pipe = load_pipeline(model, device)
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    columns = grid_prompts(prompts)
    per_prompt = {
        "explicit": settings.images_per_prompt,
        "implicit": settings.images_per_prompt,
        "unrelated": settings.unrelated_images_per_prompt,
    }
    report: dict[str, Any] = {"concept": concept, "models": {}, "details": {}}
    grid_rows: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for name, path in unets.items():
        pipe.unet.load_state_dict(base_state, strict=True)
        if path is not None:
            load_unet_checkpoint_into(pipe.unet, path, f"--unet {name}=")
        scores, firsts = {}, {}
        for g, group in enumerate(GROUPS):
            group_prompts = prompts[group]
            images = generate_for_prompts(
                pipe,
                [p.prompt for p in group_prompts],
                per_prompt[group],
                seed=settings.seed + 100_000 * g,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                batch_size=settings.batch_size,
            )
            scores[group] = score_group(group, concept, group_prompts, classifier.predict(images), per_prompt[group])
            for i, p in enumerate(group_prompts):
                firsts[p.prompt] = images[i * per_prompt[group]]
        report["models"][name] = summary(scores)
        report["details"][name] = {"unet": str(path) if path is not None else "base", **scores}
        grid_rows[name] = np.stack([firsts[p.prompt] for p in columns])
    report["settings"] = {**asdict(settings), "model": str(model), "scheduler": type(pipe.scheduler).__name__}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if grid_path is not None:
        groups = [next(g for g in GROUPS if p in prompts[g]) for p in columns]
        grid = image_grid(list(grid_rows.values()), row_labels=list(grid_rows),
                          column_labels=[p.prompt for p in columns], column_groups=groups)
        atomic_write(grid_path, lambda tmp: grid.save(tmp, format="PNG"))
        report["grid"] = str(grid_path)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report's three numbers per model as a Markdown table (percent)."""
    lines = [
        f"concept: {report['concept']}",
        "",
        "| model | target rate, explicit prompts | target rate, implicit prompts | unrelated accuracy |",
        "|---|---|---|---|",
    ]
    for name, m in report["models"].items():
        lines.append(
            f"| {name} | {100 * m['target_rate_explicit']:.1f} % | {100 * m['target_rate_implicit']:.1f} % "
            f"| {100 * m['unrelated_accuracy']:.1f} % |"
        )
    return "\n".join(lines)


def parse_unet_specs(specs: Sequence[str]) -> dict[str, str | None]:
    """``["text=a/unet.pth", "image=b/unet.pth"]`` → ``{"base": None, "text": ..., "image": ...}``."""
    unets: dict[str, str | None] = {"base": None}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CoErasingError(f"--unet {spec!r}: give NAME=PATH, e.g. --unet text=checkpoints/.../unet.pth.")
        if not Path(path).exists():
            raise CoErasingError(f"--unet {spec!r}: {path} does not exist; pass an erased UNet checkpoint.")
        unets[name] = path
    return unets


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coerasing.toy.erasure", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="toy-world model folder (e.g. coerasing/assets/toy_world)")
    parser.add_argument("--concept", default="circle", help=f"the erased shape: one of {', '.join(SHAPES)}")
    parser.add_argument("--unet", action="append", default=[], metavar="NAME=PATH", help="an erased UNet to score")
    parser.add_argument("--out", required=True, help="folder for report.json and grid.png")
    parser.add_argument("--images_per_prompt", type=int, default=ErasureEvalSettings.images_per_prompt)
    parser.add_argument(
        "--unrelated_images_per_prompt", type=int, default=ErasureEvalSettings.unrelated_images_per_prompt
    )
    parser.add_argument("--num_inference_steps", type=int, default=ErasureEvalSettings.num_inference_steps)
    parser.add_argument("--guidance_scale", type=float, default=ErasureEvalSettings.guidance_scale)
    parser.add_argument("--seed", type=int, default=ErasureEvalSettings.seed)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not (model / "model_index.json").is_file() or not (model / "classifier").is_dir():
        raise CoErasingError(
            f"--model {args.model} is not a toy-world model folder (model_index.json and classifier/ are needed); "
            "use coerasing/assets/toy_world or a folder built by python -m coerasing.toy.build."
        )
    for flag in ("images_per_prompt", "unrelated_images_per_prompt", "num_inference_steps"):
        if getattr(args, flag) < 1:
            raise CoErasingError(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    settings = ErasureEvalSettings(
        images_per_prompt=args.images_per_prompt,
        unrelated_images_per_prompt=args.unrelated_images_per_prompt,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate_erasure(model, args.concept, parse_unet_specs(args.unet), settings, args.device, out / "grid.png")
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    print(format_table(report))
    print(f"\nwrote {out / 'report.json'} and {out / 'grid.png'}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
