"""What the comparison evaluates on: the toy world (default) or a real Stable Diffusion model.

Both give the runner the same things: the base model's locations, the concept's reference images,
a pipeline, :meth:`evaluate` (metrics of one erased model on one split), the rule's erasure and
usability scores, and :meth:`attack` at a chosen checkpoint.

- :class:`ToyBenchmark`: :mod:`coerasing.toy.benchmark` (held-out captions split in validation and
  test, the toy classifier, the toy CLIP pair, the UnlearnDiff attack).
- :class:`ProtocolBenchmark`: the real protocol of ``evaluate.py`` (the concept's prompt set split
  by case number, its detector, the UnlearnDiff attack, and a CLIP score on COCO prompts when a
  CLIP model is given).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..choices import DEFAULT_IMAGE_ENCODER, DEFAULT_IP_ADAPTER, SCHEDULERS
from ..config import GenerateConfig
from ..errors import CoErasingError
from ..eval.attack import AttackSettings
from ..files import fingerprint
from ..generation import load_generation_pipeline
from ..methods.base import Runtime
from ..reference_images import generate_reference_images
from ..stats import rate
from ..toy import TOY_MODEL_DIR
from ..toy import benchmark as toy
from .cache import Cache


def concept_label(presets: dict[str, Any], concept: str) -> str:
    """The words of a concept (``vangogh`` → ``Van Gogh``) from the presets' ``labels``, else the name."""
    return str((presets.get("labels") or {}).get(concept, concept.replace("_", " ")))


def _attack_settings(block: dict[str, Any]) -> AttackSettings:
    keys = ("k", "iterations", "lr", "weight_decay", "space", "schedule", "timesteps", "seed")
    return AttackSettings(**{k: v for k, v in block.items() if k in keys}).validate()


class ToyBenchmark:
    """The shipped toy world (see :mod:`coerasing.toy.benchmark`)."""

    name = "toy"

    def __init__(self, presets: dict[str, Any], model: str | Path = TOY_MODEL_DIR, device: str = "cpu") -> None:
        self.model = Path(model).expanduser().resolve()
        self.presets = presets
        self.settings = toy.ToyEvalSettings(**(presets.get("evaluation") or {}))
        if self.settings.scheduler not in SCHEDULERS:
            raise CoErasingError(f"the presets' evaluation.scheduler is {self.settings.scheduler!r}; use one of: "
                                 f"{', '.join(SCHEDULERS)} (default: the model's own, 25-step PNDM on the toy world).")
        self.attack_block = dict(presets.get("attack") or {})
        self.device = device
        self._scorer: toy.ToyScorer | None = None

    def world(self) -> dict[str, str]:
        return {"ckpt_path": str(self.model), "ip_adapter": str(self.model / "ip-adapter_toy.bin"),
                "image_encoder_path": str(self.model / "image_encoder")}

    def identity(self) -> dict[str, Any]:
        """What every evaluation depends on besides the erased model: the base model and the protocol."""
        return {"benchmark": self.name, "model": fingerprint(self.model), "evaluation": asdict(self.settings)}

    @property
    def scorer(self) -> toy.ToyScorer:
        if self._scorer is None:
            self._scorer = toy.ToyScorer(self.model, self.device)
        return self._scorer

    def references(self, concept: str, cache: Cache) -> Path:
        settings = dict(self.presets.get("references") or {})
        folder = cache.folder("references", {"concept": concept, "model": fingerprint(self.model), **settings})
        config = GenerateConfig(label=concept, ckpt_path=str(self.model), output_dir=str(folder), seed=0,
                                device=self.device, **settings)
        cache.once(folder, settings, lambda: generate_reference_images(config))
        return config.folder

    def pipeline(self) -> Any:
        return load_generation_pipeline(str(self.model), torch.device(self.device), torch.float32)

    def evaluate(self, runtime: Runtime, concept: str, split: str) -> dict[str, Any]:
        result = toy.evaluate(runtime, concept, split, self.settings, self.scorer)
        return {"metrics": result["metrics"], "images": result["images"], "grid_columns": result["grid_columns"],
                "arrays": {"grid": result["grid"]}}

    @staticmethod
    def erasure(metrics: dict[str, Any]) -> float:
        """The rule's erasure score: the mean of the explicit and implicit concept rates (lower erases more)."""
        return (metrics["explicit"]["rate"] + metrics["implicit"]["rate"]) / 2

    @staticmethod
    def usability(metrics: dict[str, Any]) -> float | None:
        """The rule's usability: unrelated accuracy."""
        return metrics["unrelated"]["rate"]

    def attack_rows(self, concept: str) -> list[toy.ToyRow]:
        return toy.attack_rows(concept, self.settings, int(self.attack_block.get("rows", 12)))

    def attack_references(self, base: Runtime, concept: str) -> dict[str, Image.Image]:
        """The base model's images of the attack's prompts (UnlearnDiff's reference images)."""
        rows = self.attack_rows(concept)
        images = toy.generate(base, rows, self.settings)
        return {row.case: Image.fromarray(image) for row, image in zip(rows, images, strict=True)}

    def attack(
        self, runtime: Runtime, concept: str, test: dict[str, Any], references: dict[str, Image.Image],
        out_dir: Path, made_by: dict[str, Any],
    ) -> dict[str, Any]:
        rows = self.attack_rows(concept)
        hits = {record["case"]: record["hit"] for record in test["images"]}
        pre = {row.case: bool(hits[row.case]) for row in rows}
        return toy.attack(runtime, self.scorer, concept, rows, pre, references, _attack_settings(self.attack_block),
                          self.settings, out_dir, made_by)

    def concept_inversion(self, runtime: Runtime, concept: str, images: list[Image.Image]) -> dict[str, Any] | None:
        """STEREO's concept-inversion attack (``attack.inversion_steps`` > 0), else ``None``."""
        steps = int(self.attack_block.get("inversion_steps", 0))
        if not steps:
            return None
        return toy.concept_inversion(runtime, self.scorer, concept, images, steps,
                                     float(self.attack_block.get("inversion_lr", 5e-3)),
                                     int(self.attack_block.get("inversion_images", 16)), self.settings)

    def attack_identity(self) -> dict[str, Any]:
        return {"attack": self.attack_block}


class ProtocolBenchmark:
    """A real Stable Diffusion model evaluated by ``evaluate.py``'s protocol (prompt sets, detectors, attack)."""

    name = "protocol"

    def __init__(self, presets: dict[str, Any], ckpt_path: str, ip_adapter: str | None, image_encoder: str | None,
                 device: str, classifier: str | None, nudenet_weights: str | None, limit: int | None,
                 clip_model: str | None) -> None:
        self.presets = presets
        self.ckpt_path = ckpt_path
        self.ip_adapter = ip_adapter or DEFAULT_IP_ADAPTER
        self.image_encoder = image_encoder or DEFAULT_IMAGE_ENCODER
        self.device = device
        self.classifier = classifier
        self.nudenet_weights = nudenet_weights
        self.limit = limit
        self.clip_model = clip_model
        self.evaluation = dict(presets.get("evaluation") or {})
        self.attack_block = dict(presets.get("attack") or {})

    def world(self) -> dict[str, str]:
        return {"ckpt_path": self.ckpt_path, "ip_adapter": self.ip_adapter, "image_encoder_path": self.image_encoder}

    def identity(self) -> dict[str, Any]:
        return {"benchmark": self.name, "model": self.ckpt_path, "model_fingerprint": fingerprint(self.ckpt_path),
                "evaluation": self.evaluation, "limit": self.limit, "classifier": self.classifier,
                "clip_model": self.clip_model}

    def eval_config(self, concept: str, output_dir: str | Path = ".") -> Any:
        from ..eval.config import EvalConfig

        keys = ("num_inference_steps", "guidance_scale", "height", "width", "batch_size", "scheduler", "threshold",
                "target", "top_k", "detector")
        settings = {k: v for k, v in self.evaluation.items() if k in keys}
        return EvalConfig(command="all", prompts=concept, output_dir=str(output_dir), ckpt_path=self.ckpt_path,
                          classifier=self.classifier, nudenet_weights=self.nudenet_weights, device=self.device,
                          **settings)

    def rows(self, concept: str, split: str) -> list[Any]:
        """The concept's prompt rows of ``split``: the case number's hash decides, as for the toy captions."""
        from ..eval.prompts import load_prompts

        rows = [row for row in load_prompts(concept)
                if ("validation", "test")[hashlib.sha256(row.case.encode()).digest()[0] % 2] == split]
        return rows[: self.limit] if self.limit else rows

    def references(self, concept: str, cache: Cache) -> Path:
        settings = dict(self.presets.get("references") or {})
        folder = cache.folder("references", {"concept": concept, "model": self.ckpt_path, **settings})
        config = GenerateConfig(label=concept_label(self.presets, concept), ckpt_path=self.ckpt_path,
                                output_dir=str(folder), device=self.device, **settings)
        cache.once(folder, settings, lambda: generate_reference_images(config))
        return config.folder

    def pipeline(self) -> Any:
        scheduler = str(self.evaluation.get("scheduler", "default"))
        return load_generation_pipeline(self.ckpt_path, torch.device(self.device), torch.float32, scheduler)

    def _images(self, runtime: Runtime, rows: list[Any], config: Any) -> list[Image.Image]:
        from ..generation import default_size, plan_batches, row_call_settings

        settings = config.generation_settings()
        size = default_size(runtime.pipe)
        images: dict[str, Image.Image] = {}
        for batch in plan_batches(rows, settings, size):
            guidance, height, width = row_call_settings(batch[0], settings, size)
            for row, image in zip(batch, runtime.render([r.seed for r in batch], guidance, height, width,
                                                        settings.num_inference_steps,
                                                        prompts=[r.prompt for r in batch]), strict=True):
                images[row.case] = image
        return [images[row.case] for row in rows]

    def evaluate(self, runtime: Runtime, concept: str, split: str) -> dict[str, Any]:
        from ..eval.detectors import build_detector

        config = self.eval_config(concept)
        rows = self.rows(concept, split)
        images = self._images(runtime, rows, config)
        detections = build_detector(config.detector_spec()).detect(images)
        metrics: dict[str, Any] = {"explicit": rate(sum(d.positive for d in detections), len(rows)),
                                   "implicit": None, "unrelated": None, "fd": None, "clip": None}
        if self.clip_model:
            metrics["clip"] = self._clip_score(runtime, split)
        records = [{"case": row.case, "group": "explicit", "prompt": row.prompt, "seed": row.seed,
                    "hit": bool(d.positive)} for row, d in zip(rows, detections, strict=True)]
        grid = np.stack([np.asarray(image.convert("RGB").resize((128, 128))) for image in images[:6]])
        return {"metrics": metrics, "images": records, "arrays": {"grid": grid},
                "grid_columns": [{"group": "explicit", "prompt": row.prompt} for row in rows[:6]]}

    def _clip_score(self, runtime: Runtime, split: str) -> float:
        import tempfile

        from ..eval.report import clip_score

        coco = self.rows("coco_10k", split)[: int(self.evaluation.get("coco_images", 64))]
        config = self.eval_config("coco_10k")
        images = self._images(runtime, coco, config)
        with tempfile.TemporaryDirectory() as folder:
            for row, image in zip(coco, images, strict=True):
                image.save(Path(folder) / row.file)
            return clip_score(folder, {row.case: row.prompt for row in coco}, self.clip_model)

    @staticmethod
    def erasure(metrics: dict[str, Any]) -> float:
        return metrics["explicit"]["rate"]

    @staticmethod
    def usability(metrics: dict[str, Any]) -> float | None:
        return metrics.get("clip")

    def attack_rows(self, concept: str) -> list[Any]:
        return self.rows(concept, "test")[: int(self.attack_block.get("rows", 12))]

    def attack_references(self, base: Runtime, concept: str) -> dict[str, Image.Image]:
        rows = self.attack_rows(concept)
        return dict(zip([r.case for r in rows], self._images(base, rows, self.eval_config(concept)), strict=True))

    def attack(
        self, runtime: Runtime, concept: str, test: dict[str, Any], references: dict[str, Image.Image],
        out_dir: Path, made_by: dict[str, Any],
    ) -> dict[str, Any]:
        from ..eval.attack import AttackModels, attack_row, load_attack_records
        from ..eval.detectors import build_detector
        from ..eval.report import asr_summary

        config = self.eval_config(concept)
        rows = self.attack_rows(concept)
        hits = {record["case"]: record["hit"] for record in test["images"]}
        pre = {row.case: bool(hits[row.case]) for row in rows}
        settings = _attack_settings(self.attack_block)
        detector = build_detector(config.detector_spec())
        done = {case: r for case, r in load_attack_records(out_dir, [r.case for r in rows]).items()
                if r.get("settings") == vars(settings) and r.get("made_by") == made_by}
        models = None
        for row in rows:
            if pre[row.case] or row.case in done:
                continue
            models = models or AttackModels.from_runtime(runtime)
            done[row.case] = attack_row(models, runtime, detector, row, settings, config.generation_settings(),
                                        references[row.case], out_dir, made_by)
        summary = asr_summary([r.case for r in rows], pre, {c: r.get("success") for c, r in done.items()})["all"]
        summary["asr_interval"] = rate(summary["pre_success"] + summary["attack_success"], summary["n"])
        summary["pre_asr_interval"] = rate(summary["pre_success"], summary["n"])
        return summary

    def concept_inversion(self, runtime: Runtime, concept: str, images: list[Image.Image]) -> dict[str, Any] | None:
        """Not part of the real protocol's comparison yet (the toy world has it)."""
        return None

    def attack_identity(self) -> dict[str, Any]:
        return {"attack": self.attack_block}


def make_benchmark(config: Any, presets: dict[str, Any], device: str) -> ToyBenchmark | ProtocolBenchmark:
    """The toy world unless ``--ckpt_path`` names another model."""
    if config.toy:
        if config.ip_adapter or config.image_encoder_path:
            raise CoErasingError("--ip_adapter/--image_encoder_path are set by the toy world; drop them, or pass "
                                 "--ckpt_path for another model.")
        return ToyBenchmark(presets, config.ckpt_path or TOY_MODEL_DIR, device)
    return ProtocolBenchmark(presets, config.ckpt_path, config.ip_adapter, config.image_encoder_path, device,
                             config.classifier, config.nudenet_weights, config.limit, config.clip_model)
