"""UNet checkpoint formats: detect, load safely, and save.

Accepted wherever a UNet checkpoint is (``--unet_ckpt_path``, ``python -m coerasing.convert``):

1. ``unet.pth`` written by this package: a full, plain diffusers UNet state dict.
2. A full diffusers UNet state dict saved by others as ``.pt``/``.pth``/``.bin`` (ESD's and
   UnlearnDiff's ``…-UNET.pt`` files), optionally wrapped as ``{"state_dict": {...}}``.
3. The released Co-Erasing checkpoints: a full state dict plus stray IP-Adapter keys
   (``….processor.to_k_ip.…`` / ``….processor.to_v_ip.…``), dropped with a warning.
4. A ``.safetensors`` file: either a full state dict, or only some parameters named like the
   UNet's (ESD's current release), overlaid on the base UNet's weights.
5. A diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``),
   or a diffusers pipeline folder with such a ``unet/`` subfolder.

The container is told from the file's first bytes (zip or pickle → PyTorch, JSON header →
safetensors), not from its name. PyTorch files are read with ``weights_only=True``, so loading
never executes pickled code. Every key is checked against the base UNet; anything else is a
:class:`CoErasingError` that says what was found and what is accepted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .choices import DEFAULT_MODEL, SAVE_FORMATS
from .errors import CoErasingError
from .files import atomic_write
from .models import load_unet, load_unet_config

logger = logging.getLogger(__name__)


FULL_TORCH = "coerasing unet.pth / full diffusers state dict"
FULL_SAFETENSORS = "full safetensors"
UNET_FOLDER = "diffusers UNet folder"
PIPELINE_FOLDER = "diffusers pipeline folder (unet/)"

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

ACCEPTED = (
    "Accepted: a full diffusers UNet state dict (.pth/.pt/.bin, e.g. Co-Erasing's unet.pth or ESD's "
    "and UnlearnDiff's …-UNET.pt, also wrapped as {'state_dict': …}); the released Co-Erasing "
    "checkpoints (their IP-Adapter keys are dropped); a .safetensors file holding all UNet parameters "
    "or only some of them (ESD's release, overlaid on the base UNet of --ckpt_path); or a diffusers "
    "UNet folder (config.json + diffusion_pytorch_model.safetensors or .bin)."
)

_IP_MARKERS = (".processor.to_k_ip.", ".processor.to_v_ip.")
_COMPVIS_PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "input_blocks.",
    "middle_block.",
    "output_blocks.",
)
_CONFIG_DROP = ("_name_or_path", "_ignore_files", "_use_default_values", "_pre_quantization_dtype")


@dataclass
class LoadedUNet:
    """A checkpoint read into a full, plain diffusers UNet state dict, and what it was."""

    state_dict: dict[str, torch.Tensor]
    format: str


@dataclass
class FoundCheckpoint:
    """A checkpoint's tensors, checked against the base UNet, before any overlay.

    ``tensors`` holds only UNet keys (IP-Adapter keys dropped). ``partial`` is true for a
    .safetensors file that holds only some of the UNet's parameters.
    """

    tensors: dict[str, torch.Tensor]
    format: str
    partial: bool = False
    config: dict[str, Any] | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------
# Small helpers


def _describe_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{', …' if len(keys) > limit else ''} ({len(keys)} in all)"


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fail(flag: str, path: Path, found: str, hint: str = "") -> CoErasingError:
    return CoErasingError(f"{flag} {path}: found {found}. {hint + ' ' if hint else ''}{ACCEPTED}")


def is_ip_adapter_key(key: str) -> bool:
    """Whether ``key`` is one of the IP-Adapter keys the released Co-Erasing code saved."""
    return any(marker in key for marker in _IP_MARKERS)


def sniff_container(path: Path) -> str:
    """``"torch"`` (zip or legacy pickle), ``"safetensors"`` (JSON header) or ``"unknown"``."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        (header_size,) = struct.unpack("<Q", head[:8])
        if 0 < header_size <= path.stat().st_size - 8:
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    return "unknown"


# ----------------------------------------------------------------------------------------------
# Reading containers


def _read_safetensors(path: Path, flag: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated files alike
        raise _fail(flag, path, f"a file with a safetensors header that could not be read ({_short(exc)})") from exc


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first key whose floating-point tensor holds a NaN or an infinity, else ``None``."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def check_finite(tensors: dict[str, torch.Tensor], flag: str, path: str | Path) -> None:
    """Refuse weights with NaN or infinite values: a model made of them draws blank images, never erasure."""
    key = first_non_finite(tensors)
    if key is not None:
        raise CoErasingError(
            f"{flag} {path}: the weights hold NaN or infinite values (first in {key}), so every image it made "
            "would be blank. The run that wrote them diverged or the file is damaged: use an earlier checkpoint, "
            "or train again (a lower learning rate, or --mixed_precision no)."
        )


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a file that must be safetensors (an artifact's weights), checked finite.

    Anything else (a PyTorch pickle or zip, a truncated or garbled file) is refused with an error that
    names the file, and is never unpickled.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CoErasingError(f"{what} {path} is missing; the artifact is incomplete: write it again.")
    kind = sniff_container(path)
    if kind != "safetensors":
        found = "a PyTorch pickle or zip" if kind == "torch" else "no complete safetensors header (truncated, or "\
            "another format)"
        raise CoErasingError(f"{what} {path} must be a safetensors file but holds {found}; it is not read (a "
                             "pickle could run code). Write the artifact again.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # noqa: BLE001 - SafetensorError is no OSError: truncated or garbled files alike
        raise CoErasingError(f"{what} {path} is not a readable safetensors file ({_short(exc)}); it may be "
                             "truncated. Write the artifact again.") from exc
    check_finite(tensors, what, path)
    return tensors, metadata


def _read_torch(path: Path, flag: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of a weights-only PyTorch file, and whether they were wrapped in ``state_dict``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled code, truncated files alike
        text = str(exc)
        if "weights only" in text.lower() or "weights_only" in text:
            lines = [line.strip() for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line]
            reason = lines[0] if lines else _short(exc)
            found = (
                f"a PyTorch file that pickles objects other than tensors ({reason}); such files are never "
                "unpickled here, since that could run code"
            )
        else:
            found = f"a PyTorch file that could not be read ({_short(exc)}); it may be truncated or corrupt"
        raise _fail(flag, path, found) from exc
    wrapped = False
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, wrapped = obj["state_dict"], True
    if not isinstance(obj, dict):
        raise _fail(flag, path, f"a PyTorch file holding a {type(obj).__name__}, not a dict of tensors")
    others = [f"{key!s} ({type(value).__name__})" for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if others:
        hint = ""
        if {"image_proj", "ip_adapter"} <= set(map(str, obj)):
            hint = "This is an IP-Adapter weight file (pass it as --ip_adapter), not a UNet checkpoint."
        raise _fail(
            flag,
            path,
            f"a PyTorch dict with {len(others)} non-tensor entries: {_describe_keys(others)}",
            hint,
        )
    if not all(isinstance(key, str) for key in obj):
        raise _fail(flag, path, "a PyTorch dict of tensors whose keys are not all strings")
    return obj, wrapped


def _read_folder(path: Path, flag: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Tensors and config of a diffusers UNet folder (or a pipeline folder's ``unet/``)."""
    kind = UNET_FOLDER
    folder = path
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        folder, kind = folder / "unet", PIPELINE_FOLDER
    files = sorted(p.name for p in path.iterdir())[:8]
    if not (folder / "config.json").is_file():
        raise _fail(flag, path, f"a folder without config.json (it holds: {', '.join(files) or 'nothing'})")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _fail(flag, path, f"a folder whose config.json is not readable JSON ({_short(exc)})") from exc
    class_name = config.get("_class_name", "UNet2DConditionModel") if isinstance(config, dict) else None
    if class_name != "UNet2DConditionModel":
        raise _fail(flag, path, f"a diffusers folder of {class_name or 'something that is not a model'}, not a UNet")
    weights: dict[str, torch.Tensor] = {}
    if (folder / WEIGHT_FILES[0]).is_file():
        weights = _read_safetensors(folder / WEIGHT_FILES[0], flag)
    elif (folder / SAFETENSORS_INDEX).is_file():
        try:
            index = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise _fail(flag, path, f"a sharded diffusers folder with an unreadable {SAFETENSORS_INDEX}") from exc
        for shard in shards:
            weights.update(_read_safetensors(folder / shard, flag))
    elif (folder / WEIGHT_FILES[1]).is_file():
        if sniff_container(folder / WEIGHT_FILES[1]) != "torch":
            raise _fail(flag, path, f"a diffusers folder whose {WEIGHT_FILES[1]} is not a PyTorch file")
        weights, _ = _read_torch(folder / WEIGHT_FILES[1], flag)
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:8])
        raise _fail(
            flag, path, f"a diffusers folder with config.json but no {' or '.join(WEIGHT_FILES)} (it holds: {found})"
        )
    return weights, config, kind


# ----------------------------------------------------------------------------------------------
# Detection


def _check_keys(
    tensors: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    path: Path,
    flag: str,
    what: str,
    allow_partial: bool,
) -> list[str]:
    """Raise for CompVis keys, unknown keys and wrong shapes (and missing keys unless partial)."""
    if not tensors:
        raise _fail(flag, path, f"{what} holding no UNet tensor")
    compvis = [key for key in tensors if key.startswith(_COMPVIS_PREFIXES)]
    if compvis:
        raise _fail(
            flag,
            path,
            f"{what} in the original CompVis/LDM layout (keys such as {_describe_keys(compvis, 3)})",
            "Convert it to diffusers first, e.g. StableDiffusionPipeline.from_single_file(path) and save "
            "pipe.unet.state_dict(), or diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py.",
        )
    unexpected = [key for key in tensors if key not in base]
    missing = [key for key in base if key not in tensors]
    mis_shaped = [
        f"{key} {tuple(tensors[key].shape)} vs {tuple(base[key].shape)}"
        for key in tensors
        if key in base and tensors[key].shape != base[key].shape
    ]
    problems = []
    hint = ""
    if unexpected:
        problems.append(f"{len(unexpected)} keys that are not base UNet parameters: {_describe_keys(unexpected)}")
        if all(key.startswith(("image_proj.", "ip_adapter.")) for key in unexpected):
            hint = "This is an IP-Adapter weight file (pass it as --ip_adapter), not a UNet checkpoint."
        for prefix in ("unet.", "module.", "model."):
            if all(key.startswith(prefix) and key[len(prefix):] in base for key in unexpected):
                hint = f"Its keys carry a {prefix!r} prefix; save the UNet's own state_dict() instead."
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} tensors of the wrong shape: {_describe_keys(mis_shaped, 3)}")
        hint = hint or "It was saved from a different base model than --ckpt_path (SD v1.4/v1.5 for the default)."
    if missing and not allow_partial:
        problems.append(f"{len(missing)} of the base UNet's {len(base)} keys missing: {_describe_keys(missing)}")
        hint = hint or (
            "A partial checkpoint is accepted only as .safetensors (ESD's release), overlaid on the base UNet."
        )
    if problems:
        raise _fail(flag, path, f"{what} with {len(tensors)} tensors that does not fit the base UNet: "
                    + "; ".join(problems), hint)
    return missing


def _drop_ip_keys(tensors: dict[str, torch.Tensor], path: Path, flag: str) -> tuple[dict[str, torch.Tensor], int]:
    dropped = [key for key in tensors if is_ip_adapter_key(key)]
    if not dropped:
        return tensors, 0
    warnings.warn(
        f"{flag} {path}: dropped {len(dropped)} IP-Adapter keys (….processor.to_k_ip./to_v_ip.…, saved by the "
        "released Co-Erasing code); they are not UNet weights.",
        UserWarning,
        stacklevel=3,
    )
    drop = set(dropped)
    return {key: value for key, value in tensors.items() if key not in drop}, len(drop)


def read_checkpoint(
    path: str | Path, base_state_dict: dict[str, torch.Tensor], flag: str = "--unet_ckpt_path"
) -> FoundCheckpoint:
    """Read ``path``, detect its format and check its keys and shapes against ``base_state_dict``.

    ``base_state_dict`` only needs the right keys and shapes (meta tensors do). A partial
    .safetensors comes back with ``partial=True`` and only its own tensors; see :func:`overlay`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CoErasingError(f"{flag} {path} does not exist. {ACCEPTED}")
    config = None
    wrapped = False
    if path.is_dir():
        tensors, config, kind = _read_folder(path, flag)
        container = "folder"
        what = f"a {kind}"
    else:
        container = sniff_container(path)
        if container == "torch":
            tensors, wrapped = _read_torch(path, flag)
            kind = FULL_TORCH
            what = "a PyTorch state dict" + (" (wrapped as {'state_dict': …})" if wrapped else "")
        elif container == "safetensors":
            tensors = _read_safetensors(path, flag)
            kind = FULL_SAFETENSORS
            what = "a safetensors file"
        else:
            raise _fail(flag, path, "a file that is neither a PyTorch file (zip or pickle) nor a safetensors file")
    check_finite(tensors, flag, path)
    tensors, dropped = _drop_ip_keys(tensors, path, flag)
    missing = _check_keys(tensors, base_state_dict, path, flag, what, allow_partial=container == "safetensors")
    partial = bool(missing)
    released = bool(dropped) and container == "torch"
    notes = []
    if partial:
        description = f"ESD partial safetensors (overlay of {len(tensors)} tensors)"
    elif released:
        description = f"released Co-Erasing (dropped {dropped} IP-Adapter keys)"
    else:
        description = kind
    if wrapped:
        notes.append("unwrapped from {'state_dict': …}")
    if dropped and not released:
        notes.append(f"dropped {dropped} IP-Adapter keys")
    if notes:
        description += f" ({'; '.join(notes)})"
    return FoundCheckpoint(tensors=tensors, format=description, partial=partial, config=config)


def overlay(
    found: FoundCheckpoint, base_state_dict: dict[str, torch.Tensor], to_cpu: bool = True
) -> dict[str, torch.Tensor]:
    """The full state dict: ``found``'s tensors, the base's for the keys it lacks.

    Overlaid tensors take the base's dtype, so the result is uniform. The base's tensors are
    not copied (only moved to the CPU when ``to_cpu`` and they live elsewhere).
    """
    if not found.partial:
        return dict(found.tensors)
    state = {}
    for key, base_value in base_state_dict.items():
        value = found.tensors.get(key)
        if value is None:
            if base_value.is_meta:
                raise RuntimeError("overlaying a partial checkpoint needs the base UNet's weights, not meta tensors")
            value = base_value.detach()
            value = value.to("cpu") if to_cpu else value
        elif value.dtype != base_value.dtype and value.is_floating_point():
            value = value.to(base_value.dtype)
        state[key] = value
    return state


def detect_and_load(
    path: str | Path, base_state_dict: dict[str, torch.Tensor], flag: str = "--unet_ckpt_path"
) -> LoadedUNet:
    """Load any accepted checkpoint as a full, plain diffusers UNet state dict (CPU tensors).

    ``base_state_dict`` (the base UNet of ``--ckpt_path``) gives the expected keys and shapes, and
    the weights a partial .safetensors is overlaid on.
    """
    found = read_checkpoint(path, base_state_dict, flag)
    return LoadedUNet(state_dict=overlay(found, base_state_dict), format=found.format)


def load_unet_checkpoint_into(unet: torch.nn.Module, path: str | Path, flag: str = "--unet_ckpt_path") -> str:
    """Load any accepted checkpoint strictly into ``unet``; log and return its format description."""
    base = unet.state_dict()
    found = read_checkpoint(path, base, flag)
    state = overlay(found, base, to_cpu=False)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # the checks above should make this unreachable
        raise CoErasingError(f"{flag} {path} does not load strictly into the UNet of --ckpt_path: {exc}") from exc
    logger.info("loaded UNet weights from %s: %s", path, found.format)
    return found.format


# ----------------------------------------------------------------------------------------------
# Saving


def cpu_state_dict(state: dict[str, torch.Tensor], keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``state`` (restricted to ``keys``), none sharing memory with another.

    Copies, so that later in-place updates of a training model never change what is being saved
    (and safetensors, which refuses shared storage, can write them).
    """
    if keys is not None:
        missing = [key for key in keys if key not in state]
        if missing:
            raise RuntimeError(f"UNet lost {len(missing)} keys, e.g. {missing[:3]}")
        state = {key: state[key] for key in keys}
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def unet_state_dict(unet: torch.nn.Module, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """CPU copy of ``unet``'s weights restricted to ``keys`` (the plain UNet's keys)."""
    return cpu_state_dict(unet.state_dict(), keys)


def save_unet(unet: torch.nn.Module, path: str | Path, keys: list[str] | None = None) -> Path:
    """Atomically save a plain UNet state dict (``unet.pth``: loads with ``torch.load(weights_only=True)``)."""
    return write_pth(unet_state_dict(unet, keys), path)


def unet_config_json(config: dict[str, Any]) -> str:
    """``config.json`` text of a diffusers ``UNet2DConditionModel`` from its config dict."""
    import diffusers

    data = {key: value for key, value in dict(config).items() if key not in _CONFIG_DROP}
    data["_class_name"] = "UNet2DConditionModel"
    data["_diffusers_version"] = diffusers.__version__

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return value.as_posix()
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return json.dumps({key: plain(value) for key, value in data.items()}, indent=2, sort_keys=True) + "\n"


def write_pth(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Atomically write a plain state dict with ``torch.save``."""
    state = cpu_state_dict(state)
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Atomically write a state dict as .safetensors."""
    from safetensors.torch import save_file

    state = cpu_state_dict(state)
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def write_diffusers_folder(state: dict[str, torch.Tensor], folder: str | Path, config: dict[str, Any]) -> Path:
    """Write ``folder`` (config.json + diffusion_pytorch_model.safetensors) via a temporary folder.

    The temporary folder is renamed into place; an existing ``folder`` is moved aside first and
    removed only after the new one is in place.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not folder.is_dir():
        raise CoErasingError(f"{folder} exists and is not a folder; a diffusers UNet folder cannot be written there.")
    state = cpu_state_dict(state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old: Path | None = None
    try:
        (tmp / "config.json").write_text(unet_config_json(config), encoding="utf-8")
        save_file(state, str(tmp / WEIGHT_FILES[0]), metadata={"format": "pt"})
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if not folder.exists() and (old / folder.name).exists():
                os.replace(old / folder.name, folder)
            shutil.rmtree(old, ignore_errors=True)
    return folder


def save_formats(
    unet_or_state_dict: torch.nn.Module | dict[str, torch.Tensor],
    folder: str | Path,
    formats: list[str] | tuple[str, ...],
    unet_config: dict[str, Any] | None = None,
    *,
    name: str = "unet",
    keys: list[str] | None = None,
) -> list[Path]:
    """Save the UNet as ``{name}.pth``, ``{name}.safetensors`` and/or ``{name}_diffusers/`` in ``folder``.

    ``formats`` is a subset of :data:`SAVE_FORMATS`. IP-Adapter keys are never saved; ``keys``
    restricts a module's state dict to the plain UNet's keys. ``unet_config`` (needed for
    ``diffusers``) defaults to a module's ``config``.
    """
    unknown = [fmt for fmt in formats if fmt not in SAVE_FORMATS]
    if unknown:
        raise CoErasingError(f"unknown checkpoint format(s) {', '.join(unknown)}; accepted: {', '.join(SAVE_FORMATS)}.")
    formats = list(dict.fromkeys(formats))
    if isinstance(unet_or_state_dict, torch.nn.Module):
        state = unet_state_dict(unet_or_state_dict, keys)
        if unet_config is None and getattr(unet_or_state_dict, "config", None) is not None:
            unet_config = dict(unet_or_state_dict.config)
    else:
        state = dict(unet_or_state_dict) if keys is None else {key: unet_or_state_dict[key] for key in keys}
    state = {key: value for key, value in state.items() if not is_ip_adapter_key(key)}
    folder = Path(folder)
    written = []
    for fmt in formats:
        if fmt == "pth":
            written.append(write_pth(state, folder / f"{name}.pth"))
        elif fmt == "safetensors":
            written.append(write_safetensors(state, folder / f"{name}.safetensors"))
        else:
            if unet_config is None:
                raise CoErasingError(
                    "--save_format diffusers needs the UNet's config (found none); pass the UNet module or "
                    "its config. Accepted without a config: pth, safetensors."
                )
            written.append(write_diffusers_folder(state, folder / f"{name}_diffusers", unet_config))
    return written


# ----------------------------------------------------------------------------------------------
# Converting (python -m coerasing.convert)


def unet_skeleton(config: dict[str, Any]) -> torch.nn.Module:
    """A ``UNet2DConditionModel`` built from ``config`` on the meta device: names and shapes, no weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    try:
        with init_empty_weights():
            return UNet2DConditionModel.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any bad config is the same user problem
        raise CoErasingError(f"the UNet config could not build a UNet2DConditionModel ({exc}).") from exc


CONVERT_FLAG = "input"


def folder_unet_config(path: Path) -> dict[str, Any] | None:
    """The config.json of a diffusers UNet folder (or of a pipeline folder's ``unet/``), if any."""
    for candidate in (path / "config.json", path / "unet" / "config.json"):
        if path.is_dir() and candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
    return None


def resolve_unet_config(in_path: Path, ckpt_path: str | None) -> dict[str, Any]:
    """The UNet config to check against: ``--ckpt_path``'s, else the input folder's, else the default model's."""
    if ckpt_path is None:
        config = folder_unet_config(in_path)
        if config is not None:
            return config
    return load_unet_config(ckpt_path or DEFAULT_MODEL)


def skeleton_state_dict(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keys and shapes of a UNet built from ``config`` on the meta device (no memory, no weights)."""
    return unet_skeleton(config).state_dict()


def full_state_dict(found: FoundCheckpoint, ckpt_path: str | None) -> dict[str, torch.Tensor]:
    """``found`` as a full state dict; a partial one is overlaid on the base UNet's weights."""
    if not found.partial:
        return dict(found.tensors)
    base = load_unet(ckpt_path or DEFAULT_MODEL, torch.device("cpu")).state_dict()
    return overlay(found, base)


def check_output(in_path: Path, out_path: Path, to: str, overwrite: bool) -> None:
    """Refuse to overwrite the input, an existing output (without ``overwrite``), or the wrong kind of path."""
    if out_path.resolve() == in_path.resolve():
        raise CoErasingError(f"the output {out_path} is the input; write the converted checkpoint elsewhere.")
    if not out_path.exists():
        return
    if to == "diffusers" and not out_path.is_dir():
        raise CoErasingError(f"--to diffusers writes a folder, but {out_path} exists and is a file.")
    if to != "diffusers" and out_path.is_dir():
        raise CoErasingError(f"--to {to} writes a file, but {out_path} exists and is a folder.")
    if not overwrite:
        raise CoErasingError(f"{out_path} already exists; pass --overwrite to replace it.")


def convert_checkpoint(
    in_path: str | Path, out_path: str | Path, to: str, ckpt_path: str | None = None, overwrite: bool = False
) -> tuple[str, Path]:
    """Convert ``in_path`` to a full UNet in format ``to`` at ``out_path``; returns (input format, output path)."""
    if to not in SAVE_FORMATS:
        raise CoErasingError(f"--to {to!r} is not a format. Accepted: {', '.join(SAVE_FORMATS)}.")
    in_path, out_path = Path(in_path).expanduser(), Path(out_path).expanduser()
    if not in_path.exists():
        raise CoErasingError(f"the input {in_path} does not exist.")
    check_output(in_path, out_path, to, overwrite)
    config = resolve_unet_config(in_path, ckpt_path)
    found = read_checkpoint(in_path, skeleton_state_dict(config), CONVERT_FLAG)
    state = full_state_dict(found, ckpt_path)
    if to == "pth":
        written = write_pth(state, out_path)
    elif to == "safetensors":
        written = write_safetensors(state, out_path)
    else:
        written = write_diffusers_folder(state, out_path, found.config or config)
    return found.format, written
