"""ESD and Co-Erasing behind the method interface, with Co-Erasing's ablations (docs/method.md §7).

All five train the UNet with the one loop of :mod:`coerasing.train` and produce a plain UNet
state dict (``unet.pth``); they differ only in which stages run and how:

- ``esd``: stage 1 (text erasing, docs/method.md §4); curve: stage 1's periodic checkpoints.
- ``coerasing``: stage 1, then stage 2 from its final weights (a comparison's tuning candidate may
  start it from an earlier stage-1 checkpoint: ``stage2_start``) with images refined by the concept
  text (§5); curve: stage 1's checkpoints up to stage 2's start, then stage 2's checkpoints.
- ``no-refinement``: as ``coerasing``, stage 2 without ``--text_guide``.
- ``image-only``: stage 2 from the base model (no stage 1); curve: stage 2's checkpoints.
- ``esd-equal-compute``: stage 1 run as long as stages 1 + 2 together; curve: its checkpoints.
- ``coerasing-preserve``: as ``coerasing``, stage 2 with the anchor-preservation term (docs/method.md
  §13, Eq. 9) at the presets' ``preserve.weight``; an option of ours, not the paper's method.

A run is cached by every setting except its length, and a longer request resumes it: stage 1 of
``esd``, ``coerasing``, ``no-refinement`` and ``esd-equal-compute`` is one training run (``--resume``
is bit-identical to an uninterrupted run, so sharing it changes no weight).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import train as erasing
from ..config import EraseConfig
from ..errors import CoErasingError
from ..files import atomic_write_json, atomic_write_text, read_json_record
from .base import CurvePoint, Method, TraceContext, TrainingWorld
from .concepts import concept_kind, toy_anchor_prompts

PROGRESS = "progress.json"


def checkpoints(iterations: int, every: int) -> list[int]:
    """The iterations with a periodic checkpoint: every ``every`` and the last one."""
    return sorted({*range(every, iterations + 1, every), iterations})


def train_run(context: TraceContext, kind: str, settings: dict[str, Any]) -> Path:
    """Train ``settings`` (an :class:`EraseConfig` as a dict) into its cache folder, or extend it.

    The folder is keyed by every setting but ``iterations``; ``progress.json`` records how far it
    got, so a request for fewer iterations reuses it and a request for more resumes it. The work
    runs under the folder's lock (:meth:`TraceContext.once`), so two comparisons sharing an output
    folder train it once. A ``progress.json`` that does not read back (truncated, garbled) counts as
    no progress, with a warning: the run's done mark (``done.json``) or its saved training state
    decide, and the file is written again.
    """
    key = {k: v for k, v in settings.items() if k != "iterations"}
    folder = context.run_folder(kind, key)

    def reached(warn: str | None = None) -> int:
        record = read_json_record(folder / PROGRESS, {"iterations": int}, warn=warn)
        return record["iterations"] if record is not None else 0

    def work() -> None:
        if reached(warn="resuming from the saved training state") >= settings["iterations"]:
            return
        resume = (folder / "train_state.pt").exists()
        config = EraseConfig(**settings, save_path=str(folder), devices=context.device, resume=resume,
                             overwrite=not resume)
        erasing.erase(config)
        atomic_write_json(folder / PROGRESS, {"iterations": settings["iterations"]})

    if reached(warn="looking at the run under its lock") < settings["iterations"]:
        context.once(folder, {"iterations": settings["iterations"]}, work)
        if reached() < settings["iterations"]:  # the run's done mark says it got there: record it again
            atomic_write_json(folder / PROGRESS, {"iterations": settings["iterations"]})
    return folder


def stage1_settings(context: TraceContext, iterations: int | None = None) -> dict[str, Any]:
    """Stage 1 (text erasing) of the concept with the preset's settings and the context's seed."""
    preset = dict(context.preset("stage1"))
    world = context.world()
    preset.setdefault("prompt", context.concept)
    if iterations is not None:
        preset["iterations"] = iterations
    return {**preset, "modality": "text", "ckpt_path": world["ckpt_path"], "seed": context.seed}


def stage2_settings(context: TraceContext, start: Path | None, refine: bool) -> dict[str, Any]:
    """Stage 2 (image erasing) from ``start`` (``None``: the base model); ``refine`` adds ``--text_guide``."""
    preset = dict(context.preset("stage2"))
    world = context.world()
    preset.setdefault("prompt", context.concept)
    guide = preset.pop("text_guide", None) or preset["prompt"]
    return {
        **preset, "modality": "image", "ckpt_path": world["ckpt_path"], "ip_adapter": world["ip_adapter"],
        "image_encoder_path": world["image_encoder_path"], "image": str(context.references()),
        "unet_ckpt_path": str(start) if start is not None else None, "text_guide": guide if refine else None,
        "seed": context.seed,
    }


def stage2_start(context: TraceContext, length: int, every: int) -> int:
    """The stage-1 iteration whose checkpoint stage 2 starts from: the tuning candidate's ``stage2_start``
    (``context.preset("candidate")``, docs/comparison.md §2), else stage 1's end; it must be a save point."""
    start = context.preset("candidate").get("stage2_start")
    if start is None:
        return length
    saved = checkpoints(length, every)
    if start not in saved:
        raise CoErasingError(f"stage2_start {start} is not a checkpoint of stage 1 (it saves at iterations "
                             f"{', '.join(map(str, saved))}: every stage1.save_iter and its end); choose one of them.")
    return int(start)


def _points(folder: Path, iterations: list[int], offset: int = 0) -> list[CurvePoint]:
    return [CurvePoint(f"it{offset + i}", float(offset + i), folder / f"unet_{i}.pth") for i in iterations]


class _EraseMethod(Method):
    config_class = EraseConfig

    def train(self, config: EraseConfig, world: TrainingWorld | None = None) -> Path:

        return erasing.erase(config)

    @staticmethod
    def _stage1(context: TraceContext, extra: int = 0) -> tuple[Path, int, int]:
        """The shared stage-1 run, trained to its preset length plus ``extra`` iterations."""
        settings = stage1_settings(context)
        length = settings["iterations"]
        folder = train_run(context, "stage1", {**settings, "iterations": length + extra})
        return folder, length, settings["save_iter"]

    def _two_stage(self, context: TraceContext, refine: bool, extra: dict[str, Any] | None = None) -> list[CurvePoint]:
        """Every checkpoint the weights pass through: stage 1's (the same run and files as ESD's) up to where stage 2
        starts (stage 1's end, or the candidate's ``stage2_start``), then stage 2's; ``extra``: more stage-2
        settings."""
        stage1, length, every = self._stage1(context)
        start = stage2_start(context, length, every)
        settings = {**stage2_settings(context, stage1 / f"unet_{start}.pth", refine), **(extra or {})}
        folder = train_run(context, "stage2", settings)
        return [*_points(stage1, [i for i in checkpoints(length, every) if i <= start]),
                *_points(folder, checkpoints(settings["iterations"], settings["save_iter"]), offset=start)]


class ESD(_EraseMethod):
    name = "esd"
    candidate_blocks = ("stage1",)
    summary = "ESD: text erasing with negative guidance (Co-Erasing's stage 1)."

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        folder, length, every = self._stage1(context)
        return _points(folder, checkpoints(length, every))


class CoErasing(_EraseMethod):
    name = "coerasing"
    trainable = True
    candidate_blocks = ("stage2", "stage2_start")
    summary = "Co-Erasing: stage 1 text erasing (ESD), stage 2 image erasing with text-guided refinement."

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        return self._two_stage(context, refine=True)


class NoRefinement(_EraseMethod):
    name = "no-refinement"
    candidate_blocks = ("stage2", "stage2_start")
    summary = "Co-Erasing ablation: stage 2 without the text-guided refinement of the image tokens."

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        return self._two_stage(context, refine=False)


class ImageOnly(_EraseMethod):
    name = "image-only"
    candidate_blocks = ("stage2",)
    summary = "Co-Erasing ablation: stage 2 only, from the base model."

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        settings = stage2_settings(context, None, refine=True)
        folder = train_run(context, "stage2", settings)
        return _points(folder, checkpoints(settings["iterations"], settings["save_iter"]))


class CoErasingPreserve(_EraseMethod):
    name = "coerasing-preserve"
    candidate_blocks = ("stage2", "preserve", "stage2_start")
    summary = "Co-Erasing with the anchor-preservation term in stage 2 (docs/method.md §13; not in the paper)."

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        """Stage 1's checkpoints (shared), then stage 2's with ``preserve.weight`` λ and the concept's anchors:
        the presets' ``preserve.prompts``, else, for a toy shape, the other shapes' training captions."""

        preserve = dict(context.preset("preserve"))
        weight = float(preserve.get("weight", 1.0))
        prompts = preserve.get("prompts")
        if prompts is None:
            if concept_kind(context.concept) == "toy":
                anchors = toy_anchor_prompts(context.concept)
                folder = context.run_folder("anchors", {"concept": context.concept, "anchors": anchors})
                path = folder / "anchors.txt"
                context.once(folder, {"anchors": anchors},
                             lambda: atomic_write_text(path, "\n".join(anchors) + "\n"))
                prompts = str(path)
            else:
                prompts = "everyday"
        return self._two_stage(context, refine=True,
                               extra={"preserve_prompts": prompts, "preserve_weight": weight})


class ESDEqualCompute(_EraseMethod):
    name = "esd-equal-compute"
    candidate_blocks = ("stage1",)
    summary = "ESD given as many iterations as Co-Erasing's two stages together."

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        extra = int(context.preset("stage2")["iterations"])
        folder, length, every = self._stage1(context, extra)
        return _points(folder, checkpoints(length + extra, every))

