"""Loading Stable Diffusion components from a Hub id or a local folder; device and dtype placement.

Every size the rest of the package needs (latent channels and resolution, text width, image
embedding width, image-encoder resolution) is read from the loaded models' configs, so the same
code runs SD v1.4, SD v1.5 and the tiny offline test stack.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from .choices import DEFAULT_MODEL
from .errors import CoErasingError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w. -]+)*$")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Stable Diffusion v1.4's scheduler configuration.
SD14_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

#: CLIP's BPE tokenizer (SD v1.x's), shipped so that token counting and tests work offline.
CLIP_TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"


# ----------------------------------------------------------------------------------------------
# Devices


def parse_devices(spec: str | None, flag: str = "--devices") -> tuple[torch.device, torch.device]:
    """``--devices`` → (device of the frozen models, device of the trainable UNet).

    ``"0,1"``: frozen models on ``cuda:0``, trainable UNet on ``cuda:1``; one entry puts everything
    on it; entries are GPU indices, ``cuda:N``, ``cpu`` or ``mps``. ``None``: ``cuda:0`` if present,
    else CPU. A device that is not there is an error.
    """
    if spec is None or not str(spec).strip():
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        return device, device
    entries = [entry.strip() for entry in str(spec).split(",") if entry.strip()]
    if not entries or len(entries) > 2:
        raise CoErasingError(
            f"{flag} {spec!r} must name one or two devices, e.g. '0', '0,1', 'cuda:1' or 'cpu'."
        )
    devices = [_parse_device(entry, spec, flag) for entry in entries]
    return devices[0], devices[-1]


def _parse_device(entry: str, spec: str, flag: str = "--devices") -> torch.device:
    name = f"cuda:{entry}" if entry.isdigit() else entry
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise CoErasingError(
            f"{flag} {spec!r}: {entry!r} is not a device. Use GPU indices such as '0' or '0,1', or 'cpu'."
        ) from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise CoErasingError(
                f"{flag} {spec!r} asks for GPU {index}, but this machine has "
                f"{count} CUDA GPU(s). Pass existing GPU indices (0..{count - 1}) or '{flag} cpu'."
                if count
                else f"{flag} {spec!r} asks for GPU {index}, but PyTorch sees no CUDA GPU on this "
                f"machine. Run with '{flag} cpu' (slow), or check CUDA_VISIBLE_DEVICES and that the "
                "CUDA build of torch is installed."
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CoErasingError(f"{flag} {spec!r}: MPS is not available here; use 'cpu'.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CoErasingError(f"{flag} {spec!r}: {entry!r} is not a device this project runs on; use a GPU index "
                             "or 'cpu'.")
    return device


def parse_device(spec: str | None, flag: str = "--device") -> torch.device:
    """A single device (``0``, ``cuda:1``, ``cpu``; default ``cuda:0`` if present, else CPU)."""
    if spec is not None and "," in str(spec):
        raise CoErasingError(f"{flag} {spec!r} names several devices; this command runs on one, e.g. {flag} 0.")
    return parse_devices(spec, flag)[0]


def check_mixed_precision(mixed_precision: str, devices: tuple[torch.device, ...]) -> None:
    """fp16 needs a GPU; bf16 works on CPU (slowly); ``no`` works everywhere."""
    if mixed_precision == "fp16" and any(device.type == "cpu" for device in devices):
        raise CoErasingError(
            "--mixed_precision fp16 needs a GPU (fp16 on CPU is unsupported by several kernels and very slow). "
            "Use --mixed_precision no on CPU (or bf16, which works but is slow there)."
        )


@contextlib.contextmanager
def quiet_dtype_cast() -> Iterator[None]:
    """Silence diffusers' "modules that should be kept in float32: []" warning.

    diffusers warns on every ``ModelMixin.to(dtype=…)``, even when the UNet has no such modules
    (its own IP-Adapter loader casts that way too); for SD's UNet the warning is empty noise.
    """
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def resolve_dtype(mixed_precision: str | None, device: torch.device) -> torch.dtype:
    """The dtype of frozen models for ``--mixed_precision`` (fp32 for ``no``)."""
    return DTYPES[mixed_precision or "no"]


# ----------------------------------------------------------------------------------------------
# Hub ids and local folders


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` looks like ``owner/repo[/sub/path]`` (and is not a local path)."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def split_hub_path(spec: str) -> tuple[str, str]:
    """``owner/repo/sub/path`` → (``owner/repo``, ``sub/path``)."""
    parts = spec.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _offline_help(spec: str, flag: str) -> str:
    return (
        f"Could not load {flag} {spec}: it is not a local folder here and it could not be fetched "
        "from the Hugging Face Hub (no network, HF_HUB_OFFLINE=1, or no access). Download it once "
        f"where you have network (`hf download {split_hub_path(spec)[0]} --local-dir DIR`; older "
        f"huggingface_hub: `huggingface-cli download`) and pass {flag} with that local folder."
    )


def hub_file(repo_id: str, filename: str, flag: str) -> Path:
    """Download (or find in the cache) one file of a Hub repo; a clear error when offline."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:  # noqa: BLE001 - network, auth and missing files alike
        raise CoErasingError(_offline_help(f"{repo_id}/{filename}", flag) + f" ({type(exc).__name__})") from exc


def check_model_path(spec: str, flag: str = "--ckpt_path") -> None:
    """Fail early for a model path that is neither a folder nor a Hub id."""
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise CoErasingError(
            f"{flag} {spec} is a file; it must be a diffusers model folder (with model_index.json, "
            "unet/, text_encoder/, tokenizer/, vae/, scheduler/) or a Hub id such as "
            f"{DEFAULT_MODEL}."
        )
    if not path.is_dir() and not is_hub_id(spec):
        raise CoErasingError(
            f"{flag} {spec} is neither a local folder nor a Hugging Face Hub id. Pass the folder of a "
            f"diffusers Stable Diffusion model (e.g. a local copy of {DEFAULT_MODEL}) or its Hub id."
        )


def load_component(cls: Any, spec: str, subfolder: str | None, flag: str, **kwargs: Any) -> Any:
    check_model_path(spec, flag)
    local = Path(spec).expanduser()
    source = str(local) if local.is_dir() else spec
    extra = {"subfolder": subfolder} if subfolder else {}
    try:
        return cls.from_pretrained(source, **extra, **kwargs)
    except (OSError, ValueError) as exc:
        if local.is_dir():
            where = local / subfolder if subfolder else local
            raise CoErasingError(
                f"{flag} {spec}: could not load {cls.__name__} from {where} ({exc}). The folder must "
                "be in diffusers layout (model_index.json, unet/, text_encoder/, tokenizer/, vae/, "
                "scheduler/)."
            ) from exc
        raise CoErasingError(_offline_help(spec, flag)) from exc


# ----------------------------------------------------------------------------------------------
# Components


@dataclass
class TextComponents:
    """Tokenizer and text encoder of a Stable Diffusion model."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """CLIP text states ``[B, 77, d]`` (the UNet's ``encoder_hidden_states``)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        limit = self.tokenizer.model_max_length
        for prompt in prompts:
            count = len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids)
            if count > limit:
                warnings.warn(f"the prompt {prompt[:60]!r}… has {count} CLIP tokens; only the first {limit} "
                              "(start and end tokens included) are used, as Stable Diffusion does.", stacklevel=2)
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=limit,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


def load_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE tokenizer as SD v1.x uses it, from the shipped assets (no download)."""
    return CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))


def load_text_components(ckpt_path: str, device: torch.device, dtype: torch.dtype) -> TextComponents:
    """Load the tokenizer and frozen text encoder of ``ckpt_path``."""
    tokenizer = load_component(CLIPTokenizer, ckpt_path, "tokenizer", "--ckpt_path")
    text_encoder = load_component(CLIPTextModel, ckpt_path, "text_encoder", "--ckpt_path", dtype=dtype)
    text_encoder.requires_grad_(False).eval().to(device)
    return TextComponents(tokenizer, text_encoder)


def load_unet(ckpt_path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Load the UNet of ``ckpt_path`` on ``device``."""
    unet = load_component(UNet2DConditionModel, ckpt_path, "unet", "--ckpt_path", dtype=dtype)
    return unet.to(device)


def load_unet_config(ckpt_path: str) -> dict:
    """Only the UNet config (no weights), e.g. to check ``--train_method`` before loading."""
    check_model_path(ckpt_path)
    local = Path(ckpt_path).expanduser()
    try:
        source = str(local) if local.is_dir() else ckpt_path
        return dict(UNet2DConditionModel.load_config(source, subfolder="unet"))
    except (OSError, ValueError) as exc:
        if local.is_dir():
            raise CoErasingError(
                f"--ckpt_path {ckpt_path} has no readable unet/config.json ({exc}); it must be a "
                "diffusers Stable Diffusion folder."
            ) from exc
        raise CoErasingError(_offline_help(ckpt_path, "--ckpt_path")) from exc


def load_scheduler_config(ckpt_path: str) -> dict:
    """The model's scheduler config (``scheduler/scheduler_config.json``)."""
    from diffusers import DDPMScheduler

    local = Path(ckpt_path).expanduser()
    source = str(local) if local.is_dir() else ckpt_path
    try:
        return dict(DDPMScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError) as exc:
        raise CoErasingError(
            f"--ckpt_path {ckpt_path}: no readable scheduler/scheduler_config.json ({exc})."
        ) from exc


def load_image_encoder(spec: str, device: torch.device, dtype: torch.dtype) -> CLIPVisionModelWithProjection:
    """Load the frozen IP-Adapter image encoder from a local folder or ``owner/repo/sub/folder``."""
    local = Path(spec).expanduser()
    if local.is_dir():
        source, subfolder = str(local), None
    elif is_hub_id(spec):
        source, subfolder = split_hub_path(spec)
    else:
        raise CoErasingError(
            f"--image_encoder_path {spec} is neither a local folder nor a Hub path. Pass the folder "
            "of the IP-Adapter image encoder (h94/IP-Adapter models/image_encoder)."
        )
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            source, **({"subfolder": subfolder} if subfolder else {}), dtype=dtype
        )
    except (OSError, ValueError) as exc:
        if local.is_dir():
            raise CoErasingError(
                f"--image_encoder_path {spec}: could not load a CLIP vision model with projection "
                f"({exc})."
            ) from exc
        raise CoErasingError(_offline_help(spec, "--image_encoder_path")) from exc
    return encoder.requires_grad_(False).eval().to(device)

