"""What the comparison evaluates on: one typed interface, :class:`EvaluationProtocol`, and its two protocols.

A protocol gives the runner the base model's locations, the concept's reference images, a
pipeline, :meth:`~EvaluationProtocol.evaluate` (the metrics of one erased model on one split), its
metric declarations (:attr:`~EvaluationProtocol.metrics`, :mod:`.metrics`: the rule's erasure and
usability scores, the report's columns and the cache key follow from them), and the attacks at a
chosen checkpoint (:mod:`coerasing.eval.attacks`, through their one resumable loop).

- :class:`ToyProtocol`: :mod:`coerasing.toy.protocol` (held-out captions split in validation and
  test, the toy classifier, the toy CLIP pair, the UnlearnDiff and concept-inversion attacks).
- :class:`PromptSetProtocol`: the real protocol of ``evaluate.py`` (the concept's prompt set split
  by case number, its detector, the UnlearnDiff attack, and a CLIP score on COCO prompts when a
  CLIP model is given).
"""

from __future__ import annotations

import hashlib
import tempfile
from abc import ABC, abstractmethod
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..choices import DEFAULT_IMAGE_ENCODER, DEFAULT_IP_ADAPTER, SCHEDULERS
from ..config import GenerateConfig
from ..errors import CoErasingError
from ..eval.attack import AttackSettings
from ..eval.attacks import UnlearnDiff, asr, run_attack
from ..eval.config import EvalConfig
from ..eval.detectors import build_detector
from ..eval.prompts import load_prompts
from ..eval.report import clip_score
from ..files import fingerprint
from ..generation import default_size, load_generation_pipeline, plan_batches, row_call_settings
from ..images import MAX_INVALID_SHARE, check_valid_images, invalid_images
from ..methods.base import Runtime, model_name
from ..reference_images import generate_reference_images
from ..stats import rate
from ..toy import TOY_MODEL_DIR
from ..toy import protocol as toy
from .cache import Cache
from .metrics import Metric, declarations, rule_score


def concept_label(presets: dict[str, Any], concept: str) -> str:
    """The words of a concept (``vangogh`` → ``Van Gogh``) from the presets' ``labels``, else the name."""
    return str((presets.get("labels") or {}).get(concept, concept.replace("_", " ")))


def _attack_settings(block: dict[str, Any]) -> AttackSettings:
    keys = ("k", "iterations", "lr", "weight_decay", "space", "schedule", "timesteps", "seed")
    return AttackSettings(**{k: v for k, v in block.items() if k in keys}).validate()


#: The metrics both protocols report (a protocol may declare others; see docs/architecture.md, "Adding a metric").
EXPLICIT = Metric("explicit", "explicit", "lower", "erasure",
                  description="concept rate on prompts that name the concept")
IMPLICIT = Metric("implicit", "implicit", "lower", "erasure",
                  description="concept rate on prompts that only imply it")
UNRELATED = Metric("unrelated", "unrelated", "higher", "usability",
                   description="accuracy on prompts of other concepts")
FD = Metric("fd", "FD", "lower", "usability", percent=False,
            description="Fréchet distance of the unrelated images to renders of their captions")
CLIP = Metric("clip", "CLIP", "higher", "usability", percent=False,
              description="image–text similarity on unrelated prompts")


class EvaluationProtocol(ABC):
    """How the comparison evaluates and attacks an erased model (see the module docstring)."""

    #: The protocol's name (part of every cache key).
    name: ClassVar[str]
    #: Every metric :meth:`evaluate` returns, declared once (:class:`~coerasing.compare.metrics.Metric`).
    metrics: tuple[Metric, ...]
    presets: dict[str, Any]
    attack_block: dict[str, Any]

    @abstractmethod
    def world(self) -> dict[str, str]:
        """The base model's locations: ``ckpt_path``, ``ip_adapter``, ``image_encoder_path``."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What every evaluation and attack depends on besides the erased model (``model``: the base model).

        Its ``"benchmark"`` key holds the protocol's name (the key's old name, kept so that cached
        training runs and attacks stay valid)."""

    def evaluation_identity(self) -> dict[str, Any]:
        """The key of an evaluation: :meth:`identity`, the metric declarations and the invalid-image check
        (:func:`coerasing.images.check_valid_images`: entries made before it are evaluated again)."""
        return {**self.identity(), "metrics": declarations(self.metrics), "invalid_images": MAX_INVALID_SHARE}

    @abstractmethod
    def references(self, concept: str, cache: Cache) -> Path:
        """The folder of the concept's reference images (generated once, cached)."""

    @abstractmethod
    def pipeline(self) -> Any:
        """The base model's generation pipeline."""

    @abstractmethod
    def evaluate(self, runtime: Runtime, concept: str, split: str) -> dict[str, Any]:
        """``{"metrics": {name: value}, "images": per-image records, "grid_columns": …, "arrays": {"grid": …}}``."""

    def budget_metrics(self, runtime: Runtime, concept: str, images: int) -> dict[str, Any] | None:
        """The base model's usability measured on ``images`` validation images (the rule's budget), or
        ``None`` where the protocol has no larger usability set (the validation split's own is used)."""
        return None

    def erasure(self, metrics: dict[str, Any]) -> float | None:
        """The rule's erasure score (lower erases more): the mean of the metrics declared ``rule="erasure"``."""
        return rule_score(self.metrics, "erasure", metrics)

    def usability(self, metrics: dict[str, Any]) -> float | None:
        """The rule's usability: the metric(s) declared ``rule="usability"`` (``None``: no measure)."""
        return rule_score(self.metrics, "usability", metrics)

    @abstractmethod
    def attack_rows(self, concept: str) -> list[Any]:
        """The prompts the attacks run on (each with ``case``, ``prompt``, ``seed``)."""

    @abstractmethod
    def attack_references(self, base: Runtime, concept: str) -> dict[str, Image.Image]:
        """The base model's images of :meth:`attack_rows` (UnlearnDiff's references), by case."""

    @abstractmethod
    def attack(self, runtime: Runtime, concept: str, test: dict[str, Any], references: dict[str, Image.Image],
               out_dir: Path, made_by: dict[str, Any]) -> dict[str, Any]:
        """UnlearnDiff on :meth:`attack_rows` (records in ``out_dir``): :func:`coerasing.eval.attacks.asr`."""

    def concept_inversion(self, runtime: Runtime, concept: str, images: list[Image.Image], out_dir: Path,
                          made_by: dict[str, Any]) -> dict[str, Any] | None:
        """The concept-inversion attack's rate, or ``None`` where the protocol has none."""
        return None

    def attack_identity(self) -> dict[str, Any]:
        """What the attacks depend on besides :meth:`identity` and the erased model: their settings, and
        the reference images' (concept inversion learns its word from them)."""
        return {"attack": self.attack_block, "references": dict(self.presets.get("references") or {})}

    @staticmethod
    def pre_attack(test: dict[str, Any], rows: list[Any]) -> dict[str, bool]:
        """For each attacked row, whether the erased model's own test image already shows the concept."""
        hits = {record["case"]: record["hit"] for record in test["images"]}
        return {row.case: bool(hits[row.case]) for row in rows}


class ToyProtocol(EvaluationProtocol):
    """The shipped toy world (see :mod:`coerasing.toy.protocol`)."""

    name = "toy"
    #: The rule: erasure = mean of the explicit and implicit concept rates; usability = unrelated accuracy.
    metrics = (replace(EXPLICIT, rule="erasure"), replace(IMPLICIT, rule="erasure"),
               replace(UNRELATED, rule="usability"), FD, CLIP)

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
                "arrays": {"grid": result["grid"]}, "invalid": result["invalid"]}

    def budget_metrics(self, runtime: Runtime, concept: str, images: int) -> dict[str, Any] | None:
        """Unrelated accuracy on ``images`` validation images of the unrelated captions (more seeds per caption
        than an evaluation has; every other group left out), for a budget that does not move with 48 images."""
        settings = replace(self.settings, explicit_images=0, implicit_images=0, unrelated_images=images)
        result = toy.evaluate(runtime, concept, "validation", settings, self.scorer)
        return {"metrics": {"unrelated": result["metrics"]["unrelated"]}, "invalid": result["invalid"]}

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
        return toy.attack(runtime, self.scorer, concept, rows, self.pre_attack(test, rows), references,
                          _attack_settings(self.attack_block), self.settings, out_dir, made_by)

    def concept_inversion(self, runtime: Runtime, concept: str, images: list[Image.Image], out_dir: Path,
                          made_by: dict[str, Any]) -> dict[str, Any] | None:
        """STEREO's concept-inversion attack (``attack.inversion_steps`` > 0), else ``None``."""
        steps = int(self.attack_block.get("inversion_steps", 0))
        if not steps:
            return None
        return toy.concept_inversion(runtime, self.scorer, concept, images, steps,
                                     float(self.attack_block.get("inversion_lr", 5e-3)),
                                     int(self.attack_block.get("inversion_images", 16)), self.settings,
                                     out_dir, made_by)


class PromptSetProtocol(EvaluationProtocol):
    """A real Stable Diffusion model evaluated by ``evaluate.py``'s protocol (prompt sets, detectors, attack)."""

    name = "protocol"
    #: The rule: erasure = the concept rate on the prompt set; usability = the CLIP score on COCO prompts
    #: (``None`` without --clip_model: the rule then takes the last checkpoint). Implicit, unrelated and
    #: FD are not measured by this protocol (always empty).
    metrics = (replace(EXPLICIT, rule="erasure", description="concept rate on the concept's prompt set"),
               IMPLICIT, UNRELATED, FD,
               replace(CLIP, rule="usability", description="CLIP score on COCO prompts (with --clip_model)"))

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

        keys = ("num_inference_steps", "guidance_scale", "height", "width", "batch_size", "scheduler", "threshold",
                "target", "top_k", "detector")
        settings = {k: v for k, v in self.evaluation.items() if k in keys}
        return EvalConfig(command="all", prompts=concept, output_dir=str(output_dir), ckpt_path=self.ckpt_path,
                          classifier=self.classifier, nudenet_weights=self.nudenet_weights, device=self.device,
                          **settings)

    def rows(self, concept: str, split: str) -> list[Any]:
        """The concept's prompt rows of ``split``: the case number's hash decides, as for the toy captions."""

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

        config = self.eval_config(concept)
        rows = self.rows(concept, split)
        images = self._images(runtime, rows, config)
        invalid = invalid_images(images)
        check_valid_images(int(invalid.sum()), len(rows), model_name(runtime), f"on the {split} prompts")
        detections = build_detector(config.detector_spec()).detect(images)
        valid = [d for d, bad in zip(detections, invalid, strict=True) if not bad]  # never counted as erased
        metrics: dict[str, Any] = {"explicit": rate(sum(d.positive for d in valid), len(valid)),
                                   "implicit": None, "unrelated": None, "fd": None, "clip": None}
        if self.clip_model:
            metrics["clip"] = self._clip_score(runtime, split)
        records = [{"case": row.case, "group": "explicit", "prompt": row.prompt, "seed": row.seed,
                    "hit": bool(d.positive), "invalid": bool(bad)}
                   for row, d, bad in zip(rows, detections, invalid, strict=True)]
        grid = np.stack([np.asarray(image.convert("RGB").resize((128, 128))) for image in images[:6]])
        return {"metrics": metrics, "images": records, "arrays": {"grid": grid},
                "grid_columns": [{"group": "explicit", "prompt": row.prompt} for row in rows[:6]],
                "invalid": rate(int(invalid.sum()), len(rows))}

    def _clip_score(self, runtime: Runtime, split: str) -> float:


        coco = self.rows("coco_10k", split)[: int(self.evaluation.get("coco_images", 64))]
        config = self.eval_config("coco_10k")
        images = self._images(runtime, coco, config)
        with tempfile.TemporaryDirectory() as folder:
            for row, image in zip(coco, images, strict=True):
                image.save(Path(folder) / row.file)
            return clip_score(folder, {row.case: row.prompt for row in coco}, self.clip_model)

    def attack_rows(self, concept: str) -> list[Any]:
        return self.rows(concept, "test")[: int(self.attack_block.get("rows", 12))]

    def attack_references(self, base: Runtime, concept: str) -> dict[str, Image.Image]:
        rows = self.attack_rows(concept)
        return dict(zip([r.case for r in rows], self._images(base, rows, self.eval_config(concept)), strict=True))

    def attack(
        self, runtime: Runtime, concept: str, test: dict[str, Any], references: dict[str, Image.Image],
        out_dir: Path, made_by: dict[str, Any],
    ) -> dict[str, Any]:

        config = self.eval_config(concept)
        rows = self.attack_rows(concept)
        pre = self.pre_attack(test, rows)
        unlearndiff = UnlearnDiff(_attack_settings(self.attack_block), config.generation_settings(),
                                  lambda row: references[row.case], lambda: build_detector(config.detector_spec()))
        records = run_attack(unlearndiff, rows, out_dir, made_by, runtime, pre)
        return asr([row.case for row in rows], pre, records)


def make_protocol(config: Any, presets: dict[str, Any], device: str) -> EvaluationProtocol:
    """The toy world unless ``--ckpt_path`` names another model."""
    if config.toy:
        if config.ip_adapter or config.image_encoder_path:
            raise CoErasingError("--ip_adapter/--image_encoder_path are set by the toy world; drop them, or pass "
                                 "--ckpt_path for another model.")
        return ToyProtocol(presets, config.ckpt_path or TOY_MODEL_DIR, device)
    return PromptSetProtocol(presets, config.ckpt_path, config.ip_adapter, config.image_encoder_path, device,
                             config.classifier, config.nudenet_weights, config.limit, config.clip_model)
