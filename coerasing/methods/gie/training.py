"""GIE's artifact writer and the adapter's training (labels by a detector, on training prompts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ...checkpoints import write_run_json
from ...errors import CoErasingError
from ..base import write_artifact
from ..concepts import toy_training_captions
from .adapter import GIEAdapter, fit_adapter
from .config import ADAPTER_FILE, METHOD_NAME, GIEConfig
from .runtime import GIERuntime


def write_gie_artifact(
    folder: str | Path, config: GIEConfig, adapter: GIEAdapter | None = None, **extra: Any
) -> Path:
    """Write GIE's artifact folder (``artifact.json``, ``run.json``, and ``adapter.safetensors`` if given).

    Returns the folder. ``run.json`` records the resolved settings with the library versions, as every
    other method's training does.
    """
    config.validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if adapter is not None:
        adapter.save(folder / ADAPTER_FILE)
        extra = {"adapter": ADAPTER_FILE, **extra}
    write_artifact(folder, METHOD_NAME, config.settings(), **extra)
    write_run_json(folder, {"method": METHOD_NAME, **config.settings()}, METHOD_NAME, status="finished",
                   adapter=adapter is not None)
    return folder


class Detector(Protocol):
    """What labels the adapter's training images: ``detect(images)[i].positive`` (the concept is shown)."""

    def detect(self, images: Sequence[Any]) -> list[Any]: ...


def toy_training_prompts(concept: str, count: int | None = None, seed: int = 0) -> list[str]:
    """Training captions of the toy world whose shape is ``concept`` (never held-out ones), ``count`` at most."""
    prompts = [text for text, (shape, _, _) in toy_training_captions().items() if shape == concept]
    if not prompts:
        raise CoErasingError(f"the toy world has no training captions of the shape {concept!r}.")
    if count is not None and count < len(prompts):
        chosen = np.random.default_rng(seed).choice(len(prompts), size=count, replace=False)
        prompts = [prompts[i] for i in sorted(chosen)]
    return prompts


def label_prompts(
    runtime: GIERuntime, detector: Detector, prompts: Sequence[str], seeds: Sequence[int], grid: Sequence[float],
    guidance: float, height: int, width: int, num_inference_steps: int, batch_size: int = 8,
) -> list[float]:
    """Each prompt's label: the least negative ``w`` of ``grid`` whose image is concept-free, else the most negative.

    ``grid`` is swept from its largest value down; a prompt leaves the sweep once labelled.
    """
    order = sorted(grid, reverse=True)
    labels: list[float | None] = [None] * len(prompts)
    for w in order:
        todo = [i for i, label in enumerate(labels) if label is None]
        if not todo:
            break
        runtime.fixed_w = w
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = runtime.render([seeds[i] for i in chunk], guidance, height, width, num_inference_steps,
                                    prompts=[prompts[i] for i in chunk])
            for i, detection in zip(chunk, detector.detect(images), strict=True):
                if not detection.positive:
                    labels[i] = w
    return [order[-1] if label is None else label for label in labels]


def train_gie_adapter(config: GIEConfig, detector: Detector, prompts: Sequence[str], pipe: Any = None) -> Path:
    """Train the ``w`` adapter by our procedure (module doc) and write the artifact; returns its folder.

    ``prompts``: training prompts of the concept (at most ``adapter_prompts`` are used; never
    evaluation prompts). ``pipe``: the pipeline to train on (default: load ``config.model``).
    """
    config.validate()
    prompts = list(prompts)[: config.adapter_prompts]
    if not prompts:
        raise CoErasingError("the GIE adapter needs training prompts of the concept.")
    if pipe is None:
        if not config.model:
            raise CoErasingError("--model is required to train the GIE adapter (a Stable Diffusion folder).")
        from ...generation import load_generation_pipeline
        from ...models import parse_device

        pipe = load_generation_pipeline(config.model, parse_device(config.device or "cpu"), torch.float32)
    grid = config.w_grid()
    steps = config.adapter_steps or config.num_inference_steps
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    seeds = [config.adapter_seed + i for i in range(len(prompts))]
    runtime = GIERuntime(pipe, replace(config, w=grid[0]))
    try:
        features = torch.cat([runtime.prompt_features(seeds[s : s + config.adapter_batch_size], size, size, steps,
                                                      prompts=prompts[s : s + config.adapter_batch_size])
                              for s in range(0, len(prompts), config.adapter_batch_size)]).cpu()
        labels = label_prompts(runtime, detector, prompts, seeds, grid, config.adapter_guidance, size, size, steps,
                               config.adapter_batch_size)
    finally:
        runtime.close()
    m = features.shape[1]
    x = features.reshape(len(prompts) * m, -1)
    y = torch.tensor(labels, dtype=torch.float32).repeat_interleave(m)
    adapter, losses = fit_adapter(x, y, config.adapter_epochs, config.adapter_lr, config.adapter_seed)
    training = {"prompts": prompts, "seeds": seeds, "labels": labels, "grid": grid, "steps": steps,
                "guidance": config.adapter_guidance, "size": size, "first_loss": losses[0], "final_loss": losses[-1],
                "detector": getattr(detector, "describe", lambda: type(detector).__name__)()}
    return write_gie_artifact(config.output_dir, config, adapter, adapter_training=training)
