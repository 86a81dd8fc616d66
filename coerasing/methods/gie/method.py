"""GIE behind the method interface (:class:`GIEMethod`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ...checkpoints import claim_run_folder
from ...errors import CoErasingError
from ..base import ARTIFACT_FILE, Artifact, CurvePoint, Method, TraceContext, TrainingWorld
from ..concepts import concept_kind
from .adapter import GIEAdapter
from .config import ADAPTER_FILE, METHOD_NAME, GIEConfig
from .runtime import GIERuntime
from .training import toy_training_prompts, train_gie_adapter, write_gie_artifact


class GIEMethod(Method):
    """GIE behind the method interface: an ``addon`` artifact (settings, optional adapter) applied as processors."""

    name = METHOD_NAME
    summary = "GIE: growth inhibitors injected into the attention maps at inference (Chen et al., ICLR 2025)."
    artifact_kind = "addon"
    config_class = GIEConfig
    trainable = True
    tuned_by_curve = True  # its `w` grid is its curve and its tuning budget: no candidates

    def train(self, config: GIEConfig, world: TrainingWorld | None = None) -> Path:
        """A fixed ``w``: just the artifact. No ``w``: train the adapter, labelled by the detector that ``world``
        lends (``erase_pipeline.py``: the toy classifier for a toy shape) on the toy world's training captions."""
        config.validate()
        claim_run_folder(config.output_dir, METHOD_NAME, overwrite=config.overwrite,
                         owned=(ARTIFACT_FILE, ADAPTER_FILE, "run.json"), save_flag="--output_dir")
        if (Path(config.output_dir) / ARTIFACT_FILE).exists() and not config.overwrite:
            raise CoErasingError(f"{config.output_dir} already holds a GIE artifact; pass --overwrite true to "
                                 "replace it, or another --output_dir.")
        if config.w is not None:
            return write_gie_artifact(config.output_dir, config)
        if config.model is None and world is not None:
            config = replace(config, model=world.default_model(config.target))
        detector = world.detector(config.model, config.target, config.device) if world and config.model else None
        if detector is not None and concept_kind(config.target) == "toy":
            prompts = toy_training_prompts(config.target, config.adapter_prompts, config.adapter_seed)
            return train_gie_adapter(config, detector, prompts)
        raise CoErasingError(
            "GIE without --w needs an adapter: for a toy-world shape pass --model <toy folder> (erase_pipeline.py "
            "lends the toy classifier as its detector); otherwise call "
            "coerasing.methods.gie.train_gie_adapter(config, detector, training_prompts), or set a fixed --w."
        )

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        """GIE's curve in a comparison: one fixed-``w`` artifact per value of the presets' ``gie.w`` list.

        Nothing is trained, so the curve is the same for every training seed (its spread is 0).
        """
        preset = dict(context.preset("gie"))
        values = preset.pop("w", [-1.0, -2.0, -4.0, -8.0])
        target = preset.pop("target", None) or context.preset("stage1").get("prompt", context.concept)
        points = []
        for w in sorted((float(v) for v in values), key=abs):
            config = GIEConfig(target=target, w=w, **preset)
            folder = context.run_folder("gie", config.settings())
            context.once(folder, config.settings(), lambda folder=folder, config=config: write_gie_artifact(
                folder, replace(config, output_dir=str(folder))))
            points.append(CurvePoint(f"w{w:g}", abs(w), folder))
        return points

    def apply(self, artifact: Artifact, pipe: Any) -> GIERuntime:
        config = GIEConfig.from_settings(artifact.settings, f"{artifact.path}/{ARTIFACT_FILE}")
        adapter = None
        if config.w is None:
            path = artifact.file("adapter", ADAPTER_FILE)
            if not path.is_file():
                raise CoErasingError(f"the GIE artifact {artifact.path} has no fixed w and no {ADAPTER_FILE}; "
                                     "write it with a --w or train its adapter.")
            adapter = GIEAdapter.load(path)
        return GIERuntime(pipe, config, artifact, adapter)
