"""IP-Adapter wiring through diffusers' own loader and attention processors (docs/method.md §5 setup, Eq. 8).

The h94 IP-Adapter adds an image projection ``P`` (Linear 1024 → 4×768, LayerNorm) and, in every
cross-attention layer, a decoupled image branch (``to_k_ip``/``to_v_ip``). diffusers installs both
with ``UNet2DConditionModel._load_ip_adapter_weights``; this module then

- takes ``P`` off the UNet (so refined tokens can be fed in directly, docs/method.md Eq. 5), and
- keeps two sets of attention processors: the plain ones, installed by default, and diffusers'
  ``IPAdapterAttnProcessor2_0`` ones, installed only inside :meth:`IPAdapterHandle.image_branch`.

So a text-only call is *exactly* the plain UNet (the released code instead routed the last four
text tokens through the image branch; docs/method.md §10 (b)), and the UNet's ``state_dict()``
outside the context has no IP-Adapter key (the released code saved ``to_v_ip`` keys into its
checkpoints; §10 (c)).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from .choices import DEFAULT_IMAGE_ENCODER, DEFAULT_IP_ADAPTER  # noqa: F401 - re-exported
from .errors import CoErasingError
from .models import hub_file, is_hub_id, quiet_dtype_cast, split_hub_path

_DEFAULT_WEIGHT_NAME = "models/ip-adapter_sd15.bin"


def _split_flat(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``image_proj.x`` / ``ip_adapter.y`` flat keys (the h94 .safetensors layout) → nested dict."""
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        if group in nested and rest:
            nested[group][rest] = value
    return nested


def _read_ip_adapter_file(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    try:
        if path.suffix == ".safetensors":
            state_dict: dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is the same user problem
        raise CoErasingError(
            f"--ip_adapter {path} could not be read as an IP-Adapter weight file ({exc}). Pass the "
            "h94 file models/ip-adapter_sd15.bin or models/ip-adapter_sd15.safetensors."
        ) from exc
    if not (isinstance(state_dict.get("image_proj"), dict) and isinstance(state_dict.get("ip_adapter"), dict)):
        state_dict = _split_flat(state_dict)
    if not state_dict["image_proj"] or not state_dict["ip_adapter"]:
        raise CoErasingError(
            f"--ip_adapter {path} has no 'image_proj' and 'ip_adapter' weights; it is not an "
            "IP-Adapter file in the h94 layout (nested .bin or flat .safetensors)."
        )
    if "proj.weight" not in state_dict["image_proj"]:
        raise CoErasingError(
            f"--ip_adapter {path} is not the plain IP-Adapter (its image projection has no "
            "'proj.weight'; Plus/FaceID variants are not supported). Use ip-adapter_sd15."
        )
    return state_dict


def resolve_ip_adapter_file(spec: str) -> Path:
    """Find the IP-Adapter weight file for ``--ip_adapter``.

    Accepts a local file, a local h94-like folder (``models/ip-adapter_sd15.bin`` inside), a Hub
    path ``owner/repo/sub/folder/file.bin``, or a bare Hub repo id (then the h94 default file).
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in (_DEFAULT_WEIGHT_NAME, "models/ip-adapter_sd15.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CoErasingError(
            f"--ip_adapter {spec} is a folder without models/ip-adapter_sd15.bin or .safetensors. "
            "Pass the weight file itself."
        )
    if not is_hub_id(spec):
        raise CoErasingError(
            f"--ip_adapter {spec} is neither a file nor a folder here, nor a Hugging Face Hub path. "
            "Pass the local h94 file, e.g. --ip_adapter /models/IP-Adapter/models/ip-adapter_sd15.bin."
        )
    repo_id, rest = split_hub_path(spec)
    return hub_file(repo_id, rest or _DEFAULT_WEIGHT_NAME, flag="--ip_adapter")


def load_ip_adapter_state_dict(spec: str) -> dict[str, dict[str, torch.Tensor]]:
    """Read ``--ip_adapter`` into diffusers' nested ``{"image_proj": …, "ip_adapter": …}`` layout."""
    return _read_ip_adapter_file(resolve_ip_adapter_file(spec))


@dataclass
class IPAdapterHandle:
    """The image branch of one UNet: its projection ``P`` and its two processor sets."""

    unet: UNet2DConditionModel
    image_proj: torch.nn.Module
    text_processors: dict
    image_processors: dict
    num_tokens: int

    @property
    def device(self) -> torch.device:
        return next(self.image_proj.parameters()).device

    def project(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``tokens = P(e)``: ``[B, E]`` image embeddings → ``[B, num_tokens, d]`` (docs/method.md §5 step 1)."""
        return self.image_proj(image_embeds.to(self.device))

    @contextlib.contextmanager
    def image_branch(self) -> Iterator[None]:
        """Install the IP-Adapter processors (docs/method.md Eq. 8) for the calls inside; restore the plain ones."""
        self.unet.set_attn_processor(dict(self.image_processors))
        try:
            yield
        finally:
            self.unet.set_attn_processor(dict(self.text_processors))


def attach_ip_adapter(
    unet: UNet2DConditionModel, state_dict: dict[str, dict[str, torch.Tensor]]
) -> IPAdapterHandle:
    """Load IP-Adapter weights into ``unet`` with diffusers' loader, frozen, image branch off."""
    text_processors = dict(unet.attn_processors)
    try:
        with quiet_dtype_cast():
            unet._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)
    except (KeyError, RuntimeError) as exc:
        raise CoErasingError(
            f"the IP-Adapter weights do not fit this UNet ({exc}). Use the IP-Adapter made for the "
            "base model (SD 1.x: h94/IP-Adapter models/ip-adapter_sd15.bin)."
        ) from exc
    image_processors = dict(unet.attn_processors)
    image_proj = unet.encoder_hid_proj.image_projection_layers[0]
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None
    unet.set_attn_processor(dict(text_processors))
    image_proj.requires_grad_(False).eval()
    for processor in image_processors.values():
        if isinstance(processor, torch.nn.Module):
            processor.requires_grad_(False)
    return IPAdapterHandle(
        unet=unet,
        image_proj=image_proj,
        text_processors=text_processors,
        image_processors=image_processors,
        num_tokens=image_proj.num_image_text_embeds,
    )


def unet_noise_pred(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    timestep: torch.Tensor | int,
    text_states: torch.Tensor,
    image_tokens: torch.Tensor | None = None,
    ip_adapter: IPAdapterHandle | None = None,
) -> torch.Tensor:
    """``ε(z, t, c)`` for text-only calls, ``ε(z, t, c ⊕ c_img)`` when ``image_tokens`` are given.

    With image tokens, the UNet gets ``encoder_hidden_states = (text, [tokens])``, diffusers'
    decoupled cross-attention input (docs/method.md Eq. 8, λ = 1), with the image branch installed for
    this call only. A text-only call is the plain UNet.
    """
    if image_tokens is None:
        return unet(latents, timestep, encoder_hidden_states=text_states).sample
    if ip_adapter is None:
        raise ValueError("image_tokens given without the UNet's IPAdapterHandle")
    with ip_adapter.image_branch():
        states = (text_states, [image_tokens.to(text_states.device, text_states.dtype)])
        return unet(latents, timestep, encoder_hidden_states=states).sample
