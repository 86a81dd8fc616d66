"""Reference images for stage 2: discovery, validation, seeded subset, CLIP preprocessing, embedding.

Preprocessing is transformers' CLIP image processor (resize the short side, centre crop to the
encoder's resolution, CLIP mean/std), as IP-Adapter was trained with; the released code
normalised with mean 0.5 / std 0.5 instead (docs/method.md §10 (d)).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .choices import DIFF_METHODS
from .errors import CoErasingError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def clip_image_processor(image_size: int):
    """transformers' CLIP image processor for an encoder of resolution ``image_size``."""
    try:  # transformers >= 5 names the PIL backend explicitly (no torchvision needed)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def list_image_files(source: str | Path, flag: str = "--image") -> list[Path]:
    """Image files of a folder (sorted, non-recursive), or the single file given."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        raise CoErasingError(
            f"{flag} {source} does not exist. Pass the folder written by generate_data.py, e.g. "
            "generation_dataset/nudity, or a single image file."
        )
    if not path.is_dir():
        raise CoErasingError(f"{flag} {source} is neither a file nor a folder.")
    try:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    except PermissionError as exc:
        raise CoErasingError(f"{flag} {source} cannot be read ({exc}); check its permissions.") from exc
    if not files:
        raise CoErasingError(
            f"{flag} {source} contains no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}). Generate "
            "reference images first: python generate_data.py --label <concept>."
        )
    return files


def choose_subset(files: list[Path], number: int, seed: int, flag: str = "--image") -> list[Path]:
    """A seeded random subset of ``number`` files; all of them (with a warning) if fewer exist."""
    if number >= len(files):
        if number > len(files):
            warnings.warn(
                f"--image_number {number} is larger than the {len(files)} images in {flag}; using all "
                f"{len(files)}.",
                stacklevel=2,
            )
        return list(files)
    return sorted(random.Random(seed).sample(list(files), number))


def to_rgb(image: Image.Image, where: str = "the image") -> Image.Image:
    """Any image PIL opens as 8-bit RGB, faithfully, or a clear error.

    Transparency (``RGBA``, ``LA``, ``PA``, palette transparency) is composited onto white, as an
    image viewer shows it; 16-bit and 32-bit integer images are scaled to 8 bits (not clipped, which
    is what PIL's plain ``convert("RGB")`` does); float images must hold values in [0, 1] or
    [0, 255]. Animated images use their first frame.
    """

    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        high = float(values.max()) if values.size else 0.0
        low = float(values.min()) if values.size else 0.0
        if mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255.0
        elif low >= 0 and high <= 255 and mode in ("I", "F"):
            scaled = values
        elif low >= 0 and high <= 65535 and mode != "F":
            scaled = values / 257.0
        else:
            raise CoErasingError(
                f"{where} is a {mode} image with values in [{low:g}, {high:g}], which has no faithful 8-bit "
                "RGB form; save it as an 8- or 16-bit PNG."
            )
        gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        converted = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise CoErasingError(f"{where} is a {mode} image that cannot be converted to RGB ({exc}).") from exc
    return converted


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.seek(0)
        image.load()
        return to_rgb(image, f"the image {path}")


_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, EOFError)


def open_rgb_strict(path: Path) -> Image.Image:
    """Open an image file fully into memory as 8-bit RGB (:func:`to_rgb`); a clear error if unreadable."""
    try:
        return _read_rgb(path)
    except _UNREADABLE as exc:
        raise CoErasingError(f"the image {path} could not be read ({exc}).") from exc


def open_rgb(path: Path) -> Image.Image | None:
    """Open an image as 8-bit RGB, or ``None`` (with a warning) if it is unreadable or unconvertible."""
    try:
        return _read_rgb(path)
    except (*_UNREADABLE, CoErasingError) as exc:
        warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=2)
        return None


def load_images(files: list[Path], flag: str = "--image") -> tuple[list[Path], list[Image.Image]]:
    """Open every file; skip corrupt ones with a warning; fail if none is left."""
    kept = [(path, image) for path in files if (image := open_rgb(path)) is not None]
    if not kept:
        raise CoErasingError(
            f"none of the {len(files)} image file(s) from {flag} could be read (all corrupt or not "
            "images). Regenerate them with generate_data.py."
        )
    return [p for p, _ in kept], [image for _, image in kept]


@torch.no_grad()
def encode_images(image_encoder, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
    """``e = E_img(x)``: projected CLIP image embeddings ``[N, E]`` (docs/method.md §5 step 1)."""
    processor = clip_image_processor(image_encoder.config.image_size)
    device, dtype = image_encoder.device, image_encoder.dtype
    embeds = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=images[start : start + batch_size], return_tensors="pt").pixel_values
        embeds.append(image_encoder(pixel_values=pixels.to(device, dtype)).image_embeds.float())
    return torch.cat(embeds)


def list_contrastive_pairs(source: str | Path) -> list[tuple[Path, Path]]:
    """``--contrastive_image``: sub-folders each holding ``positive.<ext>`` and ``negative.<ext>``.

    ``positive`` shows the concept, ``negative`` the same scene without it; sub-folders missing
    either image are skipped with a warning.
    """
    root = Path(source).expanduser()
    if not root.is_dir():
        raise CoErasingError(
            f"--contrastive_image {source} is not a folder. It must hold one sub-folder per pair, each "
            "with positive.png (shows the concept) and negative.png (the same without it)."
        )
    pairs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        found = {}
        for role in ("positive", "negative"):
            matches = [p for p in folder.iterdir() if p.stem == role and p.suffix.lower() in IMAGE_EXTENSIONS]
            if matches:
                found[role] = matches[0]
        if len(found) == 2:
            pairs.append((found["positive"], found["negative"]))
        else:
            warnings.warn(f"skipping {folder}: it lacks positive.png or negative.png", stacklevel=2)
    if not pairs:
        raise CoErasingError(
            f"--contrastive_image {source} has no pair folder with both positive.png and negative.png."
        )
    return pairs


def contrastive_embedding(positive: torch.Tensor, negative: torch.Tensor, method: str) -> torch.Tensor:
    """The concept direction between paired embeddings: ``p − n``, ``|p − n|`` or ``(p − n)²``."""
    difference = positive - negative
    if method == "diff":
        return difference
    if method == "l1":
        return difference.abs()
    if method == "l2":
        return difference.square()
    raise CoErasingError(f"--diff_method {method!r} is not one of {', '.join(DIFF_METHODS)}.")


# ----------------------------------------------------------------------------------------------
# Degenerate images


#: A model whose share of invalid images is above this is an error, not an erasure (see :func:`check_valid_images`).
MAX_INVALID_SHARE = 0.5


def invalid_images(images: Any) -> Any:
    """Per image, whether it is degenerate: a non-finite value (NaN or inf, float arrays), or one colour
    everywhere (every pixel equal, e.g. all black: what a broken model's NaN output becomes in 8 bits).

    ``images``: an array ``[N, H, W, C]`` (uint8 or float) or a sequence of PIL images. Returns a bool
    array ``[N]``.
    """

    if not isinstance(images, np.ndarray):
        images = [np.asarray(to_rgb(image) if isinstance(image, Image.Image) else image) for image in images]
        return np.array([bool(invalid_images(image[None])[0]) for image in images], dtype=bool)
    if len(images) == 0:
        return np.zeros(0, dtype=bool)
    flat = images.reshape(len(images), -1, images.shape[-1] if images.ndim == 4 else 1)
    finite = np.isfinite(flat).all(axis=(1, 2)) if np.issubdtype(flat.dtype, np.floating) else np.ones(len(flat), bool)
    constant = (flat == flat[:, :1]).all(axis=(1, 2))
    return ~finite | constant


def check_valid_images(invalid: int, total: int, model: str, where: str = "") -> None:
    """Stop when more than :data:`MAX_INVALID_SHARE` of a model's ``total`` images are invalid.

    Such a model does not erase a concept, it is broken; its low concept rate would read as a perfect
    eraser. ``model`` names it in the error; ``where`` says which images (e.g. a split).
    """
    if total and invalid / total > MAX_INVALID_SHARE:
        raise CoErasingError(
            f"{invalid} of {total} images of {model}{' ' + where if where else ''} are invalid (non-finite values, "
            "or one colour everywhere such as all black): the model is broken, not erasing. Check its weights "
            "(the artifact's tensors) for NaN or infinite values and its settings for extreme values (guidance "
            "scale, GIE's w, learning rate), then train or evaluate again."
        )
