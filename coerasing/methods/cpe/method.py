"""CPE behind the method interface: its runtime and :class:`CPEMethod`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..base import Artifact, CurvePoint, Method, Runtime, TraceContext, TrainingWorld
from .config import LAYOUT_FILE, METHOD_NAME, TRAIN_STATE_FILE, WEIGHTS_FILE, CPEConfig
from .io import load_cpe
from .modules import CPEAdapter, CPELayout, attach_cpe
from .training import stage_plan, train_cpe


class CPERuntime(Runtime):
    """A pipeline whose UNet carries CPE's ResAGs on every ``attn2.to_k``/``to_v`` (both CFG branches)."""

    def __init__(self, pipe: Any, artifact: Artifact, adapter: CPEAdapter, layout: CPELayout) -> None:
        super().__init__(pipe, artifact)
        self.adapter, self.layout = adapter, layout
        self.attachment = attach_cpe(pipe.unet, adapter, layout)

    def close(self) -> None:
        """Put the UNet's original Linear modules back."""
        self.attachment.detach()


class CPEMethod(Method):
    """CPE (Lee et al., ICLR 2025): residual attention gates; artifact = a folder (docs/baselines.md §CPE)."""

    name = METHOD_NAME
    summary = "Concept Pinpoint Eraser: per-concept residual attention gates on the cross-attention keys and values"
    artifact_kind = "addon"
    config_class = CPEConfig
    trainable = True
    candidate_blocks = (METHOD_NAME,)

    def apply(self, artifact: Artifact, pipe: Any) -> CPERuntime:
        adapter, layout = load_cpe(artifact.folder, artifact.file("layout", LAYOUT_FILE),
                                   artifact.file("weights", WEIGHTS_FILE))
        return CPERuntime(pipe, artifact, adapter, layout)

    def train(self, config: CPEConfig, world: TrainingWorld | None = None) -> Path:
        """:func:`train_cpe`; without ``--ckpt_path`` the base model is the one ``world`` lends for the concept."""
        if config.ckpt_path is None and world is not None and config.concepts:
            config = replace(config, ckpt_path=world.default_model(config.concepts[0]))
        return train_cpe(config)

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        """Train (cached) with the comparison's ``cpe`` preset block; one point per stage.

        A point's strength is the number of erase steps up to the end of its stage.
        """
        settings = {"prompt": context.preset("stage1").get("prompt", context.concept), **context.preset(METHOD_NAME),
                    "ckpt_path": context.world()["ckpt_path"], "seed": context.seed}
        config = CPEConfig(**settings).resolved()
        folder = context.run_folder(METHOD_NAME, settings)

        def work() -> None:
            resume = (folder / TRAIN_STATE_FILE).exists()
            train_cpe(CPEConfig(**settings, save_path=str(folder), device=context.device, resume=resume))

        context.once(folder, settings, work)
        points, steps = [], 0
        for stage in range(1, config.stages + 1):
            steps += stage_plan(config, stage).steps
            points.append(CurvePoint(f"stage{stage}", float(steps), folder / f"stage_{stage}"))
        return points

