"""Run configurations as data: one validated dataclass per command, each field declared once as a flag.

:class:`EraseConfig` is ``erase_pipeline.py`` (stages 1 and 2), :class:`GenerateConfig` is
``generate_data.py``. Every field is a :func:`coerasing.flags.flag`: the parser, the YAML reader,
the typed conversion, the range checks and the ``--resume`` fingerprint all come from it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .choices import (
    DEFAULT_IMAGE_ENCODER,
    DEFAULT_IP_ADAPTER,
    DEFAULT_MODEL,
    DIFF_METHODS,
    MODALITIES,
    PRECISIONS,
    SAMPLERS,
    SAVE_FORMATS,
    TRAIN_METHODS,
)
from .errors import CoErasingError
from .flags import SEED_MAX, check_fields, check_output_fields, flag

ARTISTS = {
    "van gogh", "vincent van gogh", "picasso", "pablo picasso", "monet", "claude monet",
    "andy warhol", "caravaggio", "rembrandt", "salvador dali", "dali", "kelly mckernan",
    "thomas kinkade", "kilian eng", "ajin demi human", "leonardo da vinci", "michelangelo",
    "frida kahlo", "gustav klimt", "edvard munch", "hokusai", "greg rutkowski",
}

#: Upper bound of step counts: SD's DDPM schedule has 1000 training timesteps.
MAX_STEPS = 1000


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


def parse_save_formats(spec: str) -> list[str]:
    """``"pth,safetensors"`` → ``["pth", "safetensors"]`` (order kept, duplicates dropped)."""
    formats: list[str] = []
    for item in (str(item).strip().lower() for item in spec.split(",")):
        if item and item not in formats:
            formats.append(item)
    unknown = [item for item in formats if item not in SAVE_FORMATS]
    if unknown or not formats:
        found = f"unknown format(s) {', '.join(unknown)}" if unknown else "no format"
        raise CoErasingError(
            f"--save_format {spec!r}: found {found}. Accepted: a comma-separated subset of "
            f"{', '.join(SAVE_FORMATS)} (e.g. 'pth,safetensors')."
        )
    return formats


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CoErasingError(message)


WHAT, MODELS, IMAGE, OUTPUTS = "what to erase", "models and devices", "stage 2 (image)", "outputs"
PRESERVE = "preservation (an option of ours, off by default)"
#: The shipped anchor captions (``--preserve_prompts everyday``): plain scenes written for this project.
EVERYDAY_CAPTIONS = Path(__file__).resolve().parent / "assets" / "anchors" / "everyday_captions.txt"


def read_prompt_list(spec: str, flag: str) -> list[str]:
    """Prompts from a text file (one a line; blank lines and ``#`` comments skipped), ``everyday`` (the
    shipped captions) or a comma-separated list."""
    path = EVERYDAY_CAPTIONS if spec == "everyday" else Path(spec).expanduser()
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CoErasingError(f"{flag} {spec} cannot be read as text ({exc}).") from exc
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        prompts = [item.strip() for item in spec.split(",") if item.strip()]
    if not prompts:
        raise CoErasingError(f"{flag} {spec!r} holds no prompt; pass a text file with one prompt a line, "
                             "'everyday' for the shipped captions, or a comma-separated list.")
    return prompts


@dataclass
class EraseConfig:
    """Everything one ``erase_pipeline.py`` run depends on (flag names of the released code)."""

    modality: str = flag("text", group=WHAT, choices=MODALITIES, resume=True,
                         help="text = stage 1 (ESD), image = stage 2 (Co-Erasing)")
    prompt: str | None = flag(None, group=WHAT, resume=True,
                              help="(required) concept to erase; a comma-separated list picks one per iteration")
    train_method: str | None = flag(None, group=WHAT, choices=TRAIN_METHODS, resume=True,
                                    help="(required) which UNet parameters are trained")
    negative_guidance: float = flag(1.0, group=WHAT, min=-100, max=100, resume=True,
                                    help="η in the target ε_u − η(ε_c − ε_u) (docs/method.md Eq. 3)")
    iterations: int = flag(1000, group=WHAT, min=1, max=10_000_000, help="training iterations (batch 1)")
    lr: float = flag(1e-5, group=WHAT, min=0, max=10.0, exclusive_min=True, resume=True, help="Adam learning rate")
    seed: int = flag(0, group=WHAT, min=0, max=SEED_MAX, resume=True, help="seeds all randomness")
    num_inference_steps: int = flag(50, group=WHAT, min=1, max=MAX_STEPS, resume=True,
                                    help="S, the number of steps of the partial-denoising schedule")
    sampler: str = flag("ddpm", group=WHAT, choices=SAMPLERS, resume=True,
                        help="partial-denoising sampler: ddpm (released code) or ddim (original ESD)")
    sampling_guidance: float = flag(1.0, group=WHAT, min=0, max=100, resume=True,
                                    help="classifier-free guidance of the partial denoising (1 = conditional only)")
    ckpt_path: str = flag(DEFAULT_MODEL, group=MODELS, resume=True, path=True,
                          help="base SD model: Hub id or local diffusers folder")
    unet_ckpt_path: str | None = flag(None, group=MODELS, resume=True, path=True,
                                      help="UNet weights to start from (stage 1's unet.pth or any accepted format)")
    ip_adapter: str = flag(DEFAULT_IP_ADAPTER, group=MODELS, resume=True, path=True,
                           help="IP-Adapter weights (stage 2): file, h94-like folder or Hub path")
    image_encoder_path: str = flag(DEFAULT_IMAGE_ENCODER, group=MODELS, resume=True, path=True,
                                   help="IP-Adapter image encoder: folder or Hub path")
    devices: str | None = flag(None, group=MODELS,
                               help="'0,1': frozen models on GPU 0, trained UNet on GPU 1; '0'; 'cpu' "
                                    "(default: cuda:0 if present, else cpu)")
    mixed_precision: str = flag("no", group=MODELS, choices=PRECISIONS, resume=True,
                                help="frozen models in fp16/bf16, trained UNet in fp32 with autocast")
    batch_reference: bool = flag(False, group=MODELS, resume=True,
                                 help="frozen ε_c and ε_u in one batched call (fp32 results change in the last bits)")
    gradient_checkpointing: bool = flag(False, group=MODELS,
                                        help="recompute UNet activations in backward: less memory, slower")
    compile: bool = flag(False, group=MODELS,
                         help="torch.compile the no-gradient UNet calls (partial denoising, frozen model)")
    image: str | None = flag(None, group=IMAGE, resume=True, path=True,
                             help="folder of reference images of the concept, or one image")
    image_number: int = flag(1000, group=IMAGE, min=1, max=10_000_000, resume=True,
                             help="size of the seeded random subset of --image")
    text_guide: str | None = flag(None, group=IMAGE, resume=True,
                                  help="text that refines the image tokens (docs/method.md Eq. 5)")
    text_uncond: bool = flag(False, group=IMAGE, resume=True,
                             help="the reference's ε_u is a text-only call (no image branch)")
    blur_factor: int = flag(3, group=IMAGE, max=255, resume=True,
                            help="odd Gaussian kernel on the latent; 0 = off")
    noise_factor: float = flag(0.0, group=IMAGE, min=0, max=1e6, resume=True,
                               help="add f·U[0,1) to the image tokens")
    contrastive_image: str | None = flag(None, group=IMAGE, resume=True, path=True,
                                         help="folder of pair folders with positive.png / negative.png")
    diff_method: str = flag("diff", group=IMAGE, choices=DIFF_METHODS, resume=True, help="contrastive direction")
    use_average: bool = flag(False, group=IMAGE, resume=True,
                             help="contrastive: average all pairs instead of random pairs per iteration")
    contrastive_size: int = flag(1, group=IMAGE, min=1, max=1_000_000, resume=True,
                                 help="contrastive: random pairs averaged per iteration")
    preserve_prompts: str | None = flag(None, group=PRESERVE, resume=True,
                                        help="anchor prompts whose predictions training keeps: a text file (one a "
                                        "line), 'everyday' (shipped captions) or a comma list")
    preserve_weight: float = flag(0.0, group=PRESERVE, min=0, max=1e4, resume=True,
                                  help="λ of the anchor-preservation term (docs/method.md Eq. 9); 0: off, the "
                                  "paper's method")
    output_dir: str = flag("checkpoints", group=OUTPUTS, output=True, help="root of the default checkpoint folders")
    save_path: str | None = flag(None, group=OUTPUTS, output=True,
                                 help="checkpoint folder (overrides the default layout)")
    save_format: str = flag("pth", group=OUTPUTS,
                            help="final checkpoint formats, comma-separated: pth, safetensors, diffusers")
    save_iter: int = flag(500, group=OUTPUTS, min=1, max=10_000_000, help="write unet_<iter>.pth every N iterations")
    logging_dir: str | None = flag(None, group=OUTPUTS, output=True,
                                   help="TensorBoard folder (default: <save folder>/log)")
    resume: bool = flag(False, group=OUTPUTS, help="continue from the newest periodic checkpoint")
    overwrite: bool = flag(False, group=OUTPUTS,
                           help="start afresh in a folder that already holds a run (its files are replaced)")

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
        _require(self.train_method is not None, "--train_method is required, e.g. --train_method noxattn.")
        check_fields(self)
        _require(bool(self.prompts), "--prompt is empty. Name the concept to erase, e.g. --prompt 'nudity'.")
        _require(
            self.blur_factor == 0 or (self.blur_factor > 0 and self.blur_factor % 2 == 1),
            f"--blur_factor must be 0 (off) or a positive odd kernel size such as 3 or 5, got {self.blur_factor}.",
        )
        _require(not (self.resume and self.overwrite), "--resume and --overwrite contradict each other; pick one.")
        self.save_formats  # noqa: B018 - raises for unknown formats
        if self.image_stage:
            _require(
                (self.image is None) != (self.contrastive_image is None),
                "--modality image needs exactly one of --image (a folder of reference images or one "
                "image) and --contrastive_image (a folder of positive/negative pair folders).",
            )
            _require(self.text_guide is None or bool(self.text_guide.strip()), "--text_guide is empty.")
        _require(self.preserve_weight == 0 or self.preserve_prompts is not None,
                 f"--preserve_weight {self.preserve_weight} needs --preserve_prompts (a file of anchor prompts, "
                 "'everyday', or a comma list).")
        if self.preserve_weight > 0:
            self.preserve_list  # noqa: B018 - raises for an empty or unreadable list
        check_output_fields(self)
        self.run_folder()  # noqa: B018 - raises for prompts that give no folder name
        return self

    @property
    def preserve_list(self) -> list[str]:
        """The anchor prompts of the preservation term (empty when it is off)."""
        if self.preserve_weight == 0 or self.preserve_prompts is None:
            return []
        return read_prompt_list(self.preserve_prompts, "--preserve_prompts")

    def run_folder(self) -> Path:
        """Where checkpoints go: ``--save_path`` or the released code's default layout."""
        if self.save_path:
            return Path(self.save_path).expanduser()
        base = Path(self.output_dir).expanduser() / self.modality / safe_name(self.prompt or "", "--prompt")
        if not self.image_stage:
            return base / "unet"
        name = f"unet_{self.train_method}_im{self.image_number}_ng{self.negative_guidance}_it{self.iterations}"
        return base / name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerateConfig:
    """Everything one ``generate_data.py`` run depends on."""

    label: str | None = flag(None, help="(required) the concept, e.g. nudity, 'van gogh', church")
    ckpt_path: str = flag(DEFAULT_MODEL, help="base SD model: Hub id or local diffusers folder")
    num_images: int = flag(500, min=1, max=1_000_000, help="number of images")
    prompt_template: str | None = flag(
        None, help="prompt with {label}; default 'a photo of {label}' ('a drawing of {label}' for artists)")
    output_dir: str = flag("generation_dataset", output=True, help="images go to <output_dir>/<label>/")
    seed: int = flag(0, min=0, max=SEED_MAX, help="image i uses seed + i")
    batch_size: int = flag(1, min=1, max=4096, help="images per pipeline call")
    num_inference_steps: int = flag(50, min=1, max=MAX_STEPS, help="sampler steps")
    guidance_scale: float = flag(7.5, min=0, max=100, help="classifier-free guidance")
    height: int | None = flag(None, min=8, max=8192, help="image height, a multiple of 8 (default: the model's)")
    width: int | None = flag(None, min=8, max=8192, help="image width, a multiple of 8 (default: the model's)")
    device: str | None = flag(None, help="e.g. 0, cuda:1, cpu (default: cuda:0 if present)")
    mixed_precision: str = flag("no", choices=PRECISIONS, help="fp16 (GPU only) or bf16")

    @property
    def prompt(self) -> str:
        template = self.prompt_template or default_prompt_template(self.label or "")
        return template.replace("{label}", self.label or "")

    @property
    def folder(self) -> Path:
        return Path(self.output_dir).expanduser() / safe_name(self.label or "", "--label")

    def validate(self) -> GenerateConfig:
        _require(bool(self.label and self.label.strip()), "--label is required, e.g. --label nudity.")
        check_fields(self)
        self.folder  # noqa: B018 - raises for labels that give no folder name
        if self.prompt_template is not None:
            _require("{label}" in self.prompt_template, "--prompt_template must contain {label}.")
            unknown = sorted(set(re.findall(r"{([^{}]*)}", self.prompt_template)) - {"label"})
            _require(not unknown, f"--prompt_template {self.prompt_template!r} has the unknown placeholder(s) "
                     f"{', '.join('{' + name + '}' for name in unknown)}; the only placeholder is {{label}}, "
                     "replaced by --label.")
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(value is None or value % 8 == 0, f"--{name} must be a positive multiple of 8, got {value}.")
        _require(self.seed + self.num_images - 1 <= 2**64 - 1,
                 f"--seed {self.seed} + --num_images {self.num_images} runs past the largest seed (2**64 - 1).")
        check_output_fields(self)
        return self
