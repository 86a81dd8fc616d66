"""The eraser interface: every method trains an *artifact*; an artifact applied to a pipeline is a *runtime*.

- :class:`Artifact`: what a trained eraser is on disk. Either a plain UNet checkpoint (ESD,
  Co-Erasing, STEREO: any format :mod:`coerasing.formats` reads), or a folder with
  ``artifact.json`` (``{"method": name, "settings": {...}, ...}``) and the method's own files
  (CPE's gate weights, GIE's settings and adapter).
- :class:`Runtime`: a ``StableDiffusionPipeline`` with one artifact applied. Everything that
  generates or attacks goes through it: :meth:`Runtime.render` (images for prompts or text
  states) and :meth:`Runtime.noise_pred` (the erased model's ε, the attack's objective), so add-on
  modules and attention processors are active in every evaluation path. :meth:`Runtime.close`
  gives the pipeline back unchanged.
- :class:`Method`: a named eraser; :meth:`Method.apply` turns an artifact into a runtime.
  Methods that the comparison trains also implement ``trace`` (see :mod:`coerasing.compare`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from ..errors import CoErasingError
from ..files import atomic_write_text
from ..formats import load_unet_checkpoint_into
from ..generation import render

ARTIFACT_FILE = "artifact.json"
#: ``Artifact.method`` of a plain UNet checkpoint that carries no ``artifact.json``.
UNET_CHECKPOINT = "unet"


@dataclass
class Artifact:
    """A trained eraser on disk: its method's name, its folder (or UNet file), settings and named files."""

    method: str
    path: Path
    settings: dict[str, Any] = field(default_factory=dict)
    #: What ``artifact.json`` names besides method and settings, e.g. ``{"weights": "cpe.safetensors"}``.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def file(self, key: str, default: str) -> Path:
        """The file ``artifact.json`` names under ``key`` (else ``default``), inside the artifact's folder.

        ``read_artifact`` has already refused names that leave the folder; the file may still be missing.
        """
        return self.folder / str(self.extra.get(key, default))

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "path": str(self.path), "settings": self.settings}


#: Keys of ``artifact.json`` that name a file of the artifact (checked to lie inside its folder).
FILE_KEYS = ("layout", "weights", "adapter")


def write_artifact(folder: str | Path, method: str, settings: dict[str, Any], **extra: Any) -> Path:
    """Write ``folder/artifact.json`` (atomically) for a method whose artifact is a folder."""
    folder = Path(folder)
    payload = {"method": method, "settings": settings, **extra}
    return atomic_write_text(folder / ARTIFACT_FILE, json.dumps(payload, indent=2, default=str) + "\n")


def _inside(folder: Path, name: Any, where: str) -> str:
    """``name`` if it is a relative file name that stays inside ``folder`` (no absolute path, no ``..``)."""
    if not isinstance(name, str) or not name.strip():
        raise CoErasingError(f"{where} must be a file name inside the artifact's folder, got {name!r}.")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise CoErasingError(f"{where} {name!r} points outside the artifact's folder {folder}; an artifact names "
                             "only its own files. Fix artifact.json or write the artifact again.")
    return name


def read_artifact(path: str | Path, flag: str = "--artifact") -> Artifact:
    """Any artifact: a folder with ``artifact.json``, else a UNet checkpoint (file or diffusers folder).

    ``artifact.json`` is checked: a mapping with a ``method`` name, ``settings`` a mapping, and every
    file it names (:data:`FILE_KEYS`) inside the folder and present.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CoErasingError(
            f"{flag} {path} does not exist; pass an erased UNet checkpoint (unet.pth, .pt, .safetensors, a "
            "diffusers UNet folder) or a method's artifact folder (with artifact.json)."
        )
    if not (path.is_dir() and (path / ARTIFACT_FILE).is_file()):
        return Artifact(method=UNET_CHECKPOINT, path=path)
    source = f"{flag} {path}: {ARTIFACT_FILE}"
    try:
        data = json.loads((path / ARTIFACT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CoErasingError(f"{source} is not readable JSON ({exc}); it may be truncated. Write the artifact "
                             "again.") from exc
    if not isinstance(data, dict):
        raise CoErasingError(f"{source} must be a JSON object with 'method' and 'settings', got "
                             f"{type(data).__name__}.")
    method, settings = data.get("method"), data.get("settings", {})
    if not isinstance(method, str) or not method.strip():
        raise CoErasingError(f"{source} names no method ('method' must be a method's name, e.g. \"cpe\").")
    if not isinstance(settings, dict):
        raise CoErasingError(f"{source}: 'settings' must be a mapping of setting names to values, got "
                             f"{type(settings).__name__}.")
    extra = {key: value for key, value in data.items() if key not in ("method", "settings")}
    for key in FILE_KEYS:
        if key in extra:
            name = _inside(path, extra[key], f"{source}: '{key}'")
            if not (path / name).is_file():
                raise CoErasingError(f"{source} names the file {name!r} ('{key}'), which is missing from the "
                                     "folder; the artifact is incomplete: write it again.")
    return Artifact(method=method, path=path, settings=settings, extra=extra)


def model_name(runtime: Runtime) -> str:
    """How errors name the model a runtime generates with: its artifact's method and path, or the base model."""
    if runtime.artifact is None:
        return "the base model"
    return f"the {runtime.artifact.method} model {runtime.artifact.path}"


class Runtime:
    """A pipeline with an eraser applied (the base runtime applies nothing: the base model)."""

    def __init__(self, pipe: Any, artifact: Artifact | None = None) -> None:
        self.pipe = pipe
        self.artifact = artifact

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def render(
        self,
        seeds: Sequence[int],
        guidance: float,
        height: int,
        width: int,
        num_inference_steps: int,
        prompts: Sequence[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
    ) -> list[Image.Image] | Any:
        """One image per seed from ``prompts`` (or ready text states ``[B, 77, d]``); ``output_type="np"``
        gives ``[B, H, W, 3]`` uint8."""

        return render(self.pipe, seeds, guidance, height, width, num_inference_steps, prompts, prompt_embeds,
                      output_type)

    def noise_pred(self, latents: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """The erased model's ε(z_t, t, c) (what the white-box attack differentiates)."""
        return self.pipe.unet(latents, timestep, encoder_hidden_states=text_states).sample

    def describe(self) -> dict[str, Any]:
        return self.artifact.describe() if self.artifact is not None else {"method": "base"}

    def close(self) -> None:
        """Undo what :meth:`Method.apply` changed on the pipeline."""


class UNetRuntime(Runtime):
    """An erased UNet checkpoint loaded strictly into the pipeline's UNet (restored on close)."""

    def __init__(self, pipe: Any, artifact: Artifact, flag: str = "--artifact") -> None:

        super().__init__(pipe, artifact)
        self._base = {key: value.detach().clone() for key, value in pipe.unet.state_dict().items()}
        self.format = load_unet_checkpoint_into(pipe.unet, artifact.path, flag)

    def close(self) -> None:
        self.pipe.unet.load_state_dict(self._base, strict=True)


@dataclass(frozen=True)
class CurvePoint:
    """One checkpoint on a method's trade-off curve: its label, how far along the curve it is, its artifact.

    ``strength`` orders the points: training iterations (all stages counted), stages, or an
    inference-time strength such as GIE's ``|w|``.
    """

    label: str
    strength: float
    artifact: Path


class TraceContext(Protocol):
    """What a method needs to trace its curve for one concept and training seed (see :mod:`coerasing.compare`)."""

    concept: str
    seed: int
    device: str

    def preset(self, name: str) -> dict[str, Any]:
        """The settings block ``name`` of the comparison's presets for this concept (e.g. ``stage1``)."""

    def world(self) -> dict[str, str]:
        """``ckpt_path``, ``ip_adapter`` and ``image_encoder_path`` of the base model."""

    def references(self) -> Path:
        """The folder of the concept's reference images (made once by the base model, shared by methods)."""

    def run_folder(self, kind: str, settings: dict[str, Any]) -> Path:
        """A cache folder for a training run keyed by ``kind`` and every setting (a changed setting is a new folder)."""

    def once(self, folder: Path, request: dict[str, Any], work: Callable[[], None]) -> None:
        """Call ``work`` unless ``folder`` records that ``request`` was already completed."""


class TrainingWorld(Protocol):
    """What the script that trains a method lends it from an evaluation world (``erase_pipeline.py``: the
    toy world, :class:`coerasing.toy.training_world.ToyTrainingWorld`); methods never import a world."""

    def default_model(self, concept: str) -> str | None:
        """The base model of ``concept`` in this world (the toy model for a toy shape), else ``None``."""

    def detector(self, model: str, concept: str, device: str | None) -> Any | None:
        """A detector of ``concept`` in images of ``model`` (``detect(images)[i].positive``), else ``None``."""


class Method:
    """A named eraser. Subclasses set ``name`` and ``summary`` and implement :meth:`apply`."""

    name: str = ""
    summary: str = ""
    #: What the artifact is: ``"unet"`` (a UNet state dict) or ``"addon"`` (modules/processors, folder).
    artifact_kind: str = "unet"
    #: The config dataclass of :meth:`train` (its fields are the flags of ``erase_pipeline.py --method``).
    config_class: type | None = None
    #: Whether ``erase_pipeline.py --method <name>`` trains it (then :attr:`config_class` is set).
    trainable: bool = False
    #: The comparison presets' blocks that :meth:`trace` reads and a tuning candidate may override
    #: (``candidates:`` of the presets, docs/comparison.md §2); ``"stage2_start"`` is a single value (the
    #: stage-1 checkpoint stage 2 starts from). Empty: the method takes no candidates but its base presets.
    candidate_blocks: tuple[str, ...] = ()
    #: Whether the method's curve is a grid of fixed settings with nothing trained (GIE's ``w`` values): the
    #: grid is its tuning budget, so it takes no candidates and the equal-budget rule leaves it out.
    tuned_by_curve: bool = False

    def train(self, config: Any, world: TrainingWorld | None = None) -> Path:
        """Train with ``config`` (an instance of :attr:`config_class`); returns the final artifact's path.

        ``world`` lends defaults that depend on an evaluation world (a base model, a detector)."""
        raise CoErasingError(f"the method {self.name!r} has no training of its own.")

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        """Train (cached) and return the checkpoints of this method's curve, weakest first."""
        raise CoErasingError(f"the method {self.name!r} cannot be traced in a comparison.")

    def apply(self, artifact: Artifact, pipe: Any) -> Runtime:
        """The pipeline with ``artifact`` applied (default: load a UNet checkpoint)."""
        return UNetRuntime(pipe, artifact)

    def __repr__(self) -> str:
        return f"<method {self.name}>"
