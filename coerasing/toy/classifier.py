"""The toy world's independent evaluator: a small CNN predicting an image's shape, colour and background.

It is trained only on the renderer's ground-truth labels (:mod:`coerasing.toy.world`), never on
anything the SD stack produced, and no part of the stack is trained with it. Besides the world's
shapes it knows ``"none"`` (an empty background), so an erased model that draws nothing is seen as
such rather than forced into a shape.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .world import BACKGROUNDS, COLOURS, SHAPES

NO_SHAPE = "none"
CLASSIFIER_SHAPES: tuple[str, ...] = (*SHAPES, NO_SHAPE)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.SiLU(),
    )


class ToyClassifier(nn.Module):
    """Conv net, three heads: shape (the world's shapes + ``"none"``), colour and background.

    Input: ``[B, 3, H, W]`` in ``[-1, 1]`` (any ``H = W`` divisible by 8; global pooling at the end).
    """

    def __init__(self, width: int = 16, resolution: int = 32) -> None:
        super().__init__()
        self.config = {
            "width": width,
            "resolution": resolution,
            "shapes": list(CLASSIFIER_SHAPES),
            "colours": list(COLOURS),
            "backgrounds": list(BACKGROUNDS),
        }
        self.features = nn.Sequential(
            _block(3, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.shape_head = nn.Linear(4 * width, len(CLASSIFIER_SHAPES))
        self.colour_head = nn.Linear(4 * width, len(COLOURS))
        self.background_head = nn.Linear(4 * width, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``(shape, colour, background)``."""
        h = self.features(x)
        return self.shape_head(h), self.colour_head(h), self.background_head(h)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (fp16 storage) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps({"_class_name": type(self).__name__, **self.config}, indent=2))
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu") -> ToyClassifier:
        """Load a classifier written by :meth:`save_pretrained` (fp32, eval mode)."""
        folder = Path(folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        model = cls(width=int(config["width"]), resolution=int(config["resolution"]))
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
        model.load_state_dict(state)
        return model.to(device).eval()

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | np.ndarray, batch_size: int = 256) -> list[dict[str, str]]:
        """Labels ``{"shape", "colour", "background"}`` of PIL images or a ``[N, H, W, 3]`` uint8 array."""
        return self.predict_with_features(images, batch_size)[0]

    @torch.no_grad()
    def predict_with_features(
        self, images: Sequence[Image.Image] | np.ndarray, batch_size: int = 256
    ) -> tuple[list[dict[str, str]], np.ndarray]:
        """Labels (as :meth:`predict`) and the pooled features ``[N, 4·width]`` the heads read.

        The features are the toy world's Inception features: the comparison's Fréchet distance is
        computed in this space.
        """
        array = images_to_array(images, int(self.config["resolution"]))
        device = next(self.parameters()).device
        out: list[dict[str, str]] = []
        features = []
        for start in range(0, len(array), batch_size):
            x = uint8_to_tensor(array[start : start + batch_size]).to(device)
            h = self.features(x)
            features.append(h.cpu().numpy().astype(np.float64))
            heads = (self.shape_head(h), self.colour_head(h), self.background_head(h))
            shape, colour, background = (logits.argmax(1).tolist() for logits in heads)
            for s, c, b in zip(shape, colour, background, strict=True):
                out.append(
                    {
                        "shape": CLASSIFIER_SHAPES[s],
                        "colour": list(COLOURS)[c],
                        "background": list(BACKGROUNDS)[b],
                    }
                )
        width = 4 * int(self.config["width"])
        return out, np.concatenate(features) if features else np.zeros((0, width))


def images_to_array(images: Sequence[Image.Image] | np.ndarray, resolution: int) -> np.ndarray:
    """PIL images (resized to ``resolution`` if needed) or an array → ``[N, H, W, 3]`` uint8."""
    if isinstance(images, np.ndarray):
        return images
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.uint8))
    return np.stack(arrays) if arrays else np.zeros((0, resolution, resolution, 3), np.uint8)


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 → ``[N, 3, H, W]`` float in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
