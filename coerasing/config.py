"""Run configurations as data: one validated object per command (flags ⇄ YAML ⇄ dataclass)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import CoErasingError
from .formats import parse_save_formats
from .images import DIFF_METHODS
from .ip_adapter import DEFAULT_IMAGE_ENCODER, DEFAULT_IP_ADAPTER
from .models import DEFAULT_MODEL, DTYPES
from .params import check_train_method
from .sampling import SAMPLERS

ARTISTS = {
    "van gogh", "vincent van gogh", "picasso", "pablo picasso", "monet", "claude monet",
    "andy warhol", "caravaggio", "rembrandt", "salvador dali", "dali", "kelly mckernan",
    "thomas kinkade", "kilian eng", "ajin demi human", "leonardo da vinci", "michelangelo",
    "frida kahlo", "gustav klimt", "edvard munch", "hokusai", "greg rutkowski",
}


def safe_name(text: str, what: str = "name") -> str:
    """A folder name from free text: no separators, no traversal, never empty.

    Whitespace becomes ``_``; characters other than letters, digits, ``.``, ``_``, ``-`` and ``,``
    become ``_``; leading dots are dropped.
    """
    name = re.sub(r"\s+", "_", text.strip())
    name = re.sub(r"[^\w.,-]", "_", name).lstrip(".")
    if not name or set(name) <= {"_", "-", ".", ","}:
        raise CoErasingError(
            f"the {what} {text!r} gives no usable folder name; use letters or digits, e.g. 'nudity'."
        )
    return name[:120]


def default_prompt_template(label: str) -> str:
    """``a drawing of {label}`` for artists (Van Gogh, Picasso, …), else ``a photo of {label}``."""
    return "a drawing of {label}" if label.strip().lower() in ARTISTS else "a photo of {label}"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CoErasingError(message)


@dataclass
class EraseConfig:
    """Everything one ``erase_pipeline.py`` run depends on (flag names of the released code)."""

    modality: str = "text"
    train_method: str | None = None
    prompt: str | None = None
    iterations: int = 1000
    lr: float = 1e-5
    devices: str | None = None
    ckpt_path: str = DEFAULT_MODEL
    unet_ckpt_path: str | None = None
    image_encoder_path: str = DEFAULT_IMAGE_ENCODER
    ip_adapter: str = DEFAULT_IP_ADAPTER
    output_dir: str = "checkpoints"
    save_iter: int = 500
    negative_guidance: float = 1.0
    image: str | None = None
    contrastive_image: str | None = None
    diff_method: str = "diff"
    use_average: bool = False
    contrastive_size: int = 1
    image_number: int = 1000
    noise_factor: float = 0.0
    blur_factor: int = 3
    seed: int = 0
    save_path: str | None = None
    text_uncond: bool = False
    text_guide: str | None = None
    logging_dir: str | None = None
    num_inference_steps: int = 50
    sampler: str = "ddpm"
    sampling_guidance: float = 1.0
    mixed_precision: str = "no"
    resume: bool = False
    save_format: str = "pth"
    batch_reference: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False

    @property
    def save_formats(self) -> list[str]:
        """``--save_format`` as a list, always starting with ``pth`` (stage 2 and --resume read it)."""
        return ["pth", *(fmt for fmt in parse_save_formats(self.save_format) if fmt != "pth")]

    @property
    def prompts(self) -> list[str]:
        """The comma-separated ``--prompt`` list."""
        return [p.strip() for p in (self.prompt or "").split(",") if p.strip()]

    @property
    def image_stage(self) -> bool:
        return self.modality == "image"

    def validate(self) -> EraseConfig:
        """Check every value; raise :class:`CoErasingError` naming the flag and the fix."""
        _require(self.modality in ("text", "image"), f"--modality {self.modality!r} must be 'text' or 'image'.")
        _require(self.train_method is not None, "--train_method is required, e.g. --train_method noxattn.")
        check_train_method(self.train_method)
        _require(bool(self.prompts), "--prompt is empty. Name the concept to erase, e.g. --prompt 'nudity'.")
        _require(self.iterations > 0, f"--iterations must be a positive number, got {self.iterations}.")
        _require(self.save_iter > 0, f"--save_iter must be a positive number, got {self.save_iter}.")
        _require(self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}.")
        _require(math.isfinite(self.negative_guidance), "--negative_guidance must be a finite number.")
        _require(self.num_inference_steps > 0, "--num_inference_steps must be a positive number.")
        _require(self.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}.")
        _require(self.mixed_precision in DTYPES, f"--mixed_precision must be one of {', '.join(DTYPES)}.")
        _require(
            self.blur_factor == 0 or (self.blur_factor > 0 and self.blur_factor % 2 == 1),
            f"--blur_factor must be 0 (off) or a positive odd kernel size such as 3 or 5, got {self.blur_factor}.",
        )
        self.save_formats  # noqa: B018 - raises for unknown formats
        if self.image_stage:
            _require(
                (self.image is None) != (self.contrastive_image is None),
                "--modality image needs exactly one of --image (a folder of reference images or one "
                "image) and --contrastive_image (a folder of positive/negative pair folders).",
            )
            _require(self.image_number > 0, f"--image_number must be positive, got {self.image_number}.")
            _require(self.diff_method in DIFF_METHODS, f"--diff_method must be one of {', '.join(DIFF_METHODS)}.")
            _require(self.contrastive_size > 0, "--contrastive_size must be positive.")
            _require(self.text_guide is None or bool(self.text_guide.strip()), "--text_guide is empty.")
        return self

    def run_folder(self) -> Path:
        """Where checkpoints go: ``--save_path`` or the released code's default layout."""
        if self.save_path:
            return Path(self.save_path)
        base = Path(self.output_dir) / self.modality / safe_name(self.prompt or "", "--prompt")
        if not self.image_stage:
            return base / "unet"
        name = f"unet_{self.train_method}_im{self.image_number}_ng{self.negative_guidance}_it{self.iterations}"
        return base / name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerateConfig:
    """Everything one ``generate_data.py`` run depends on."""

    label: str | None = None
    ckpt_path: str = DEFAULT_MODEL
    num_images: int = 500
    prompt_template: str | None = None
    output_dir: str = "generation_dataset"
    seed: int = 0
    batch_size: int = 1
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    device: str | None = None
    mixed_precision: str = "no"

    @property
    def prompt(self) -> str:
        template = self.prompt_template or default_prompt_template(self.label or "")
        return template.format(label=self.label)

    @property
    def folder(self) -> Path:
        return Path(self.output_dir) / safe_name(self.label or "", "--label")

    def validate(self) -> GenerateConfig:
        _require(bool(self.label and self.label.strip()), "--label is required, e.g. --label nudity.")
        self.folder  # noqa: B018 - raises for labels that give no folder name
        if self.prompt_template is not None:
            _require("{label}" in self.prompt_template, "--prompt_template must contain {label}.")
        _require(self.num_images > 0, f"--num_images must be positive, got {self.num_images}.")
        _require(self.batch_size > 0, f"--batch_size must be positive, got {self.batch_size}.")
        _require(self.num_inference_steps > 0, "--num_inference_steps must be positive.")
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(value is None or (value > 0 and value % 8 == 0), f"--{name} must be a positive multiple of 8.")
        _require(self.mixed_precision in DTYPES, f"--mixed_precision must be one of {', '.join(DTYPES)}.")
        return self


def config_fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}
