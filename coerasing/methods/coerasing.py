"""ESD and Co-Erasing behind the method interface, with Co-Erasing's ablations (docs/method.md §7).

All five train the UNet with the one loop of :mod:`coerasing.train` and produce a plain UNet
state dict (``unet.pth``); they differ only in which stages run and how:

| method | stages |
|---|---|
| ``esd`` | stage 1 (text erasing, docs/method.md §4) |
| ``coerasing`` | stage 1, then stage 2 from its weights with images refined by the concept text (§5) |
| ``no-refinement`` | stage 1, then stage 2 without ``--text_guide`` |
| ``image-only`` | stage 2 from the base model (no stage 1) |
| ``esd-equal-compute`` | stage 1 run as long as stage 1 + stage 2 together |
"""

from __future__ import annotations

from pathlib import Path

from ..config import EraseConfig
from .base import Method


class _EraseMethod(Method):
    config_class = EraseConfig

    def train(self, config: EraseConfig) -> Path:
        from ..train import erase

        return erase(config)


class ESD(_EraseMethod):
    name = "esd"
    summary = "ESD: text erasing with negative guidance (Co-Erasing's stage 1)."


class CoErasing(_EraseMethod):
    name = "coerasing"
    summary = "Co-Erasing: stage 1 text erasing (ESD), stage 2 image erasing with text-guided refinement."


class NoRefinement(_EraseMethod):
    name = "no-refinement"
    summary = "Co-Erasing ablation: stage 2 without the text-guided refinement of the image tokens."


class ImageOnly(_EraseMethod):
    name = "image-only"
    summary = "Co-Erasing ablation: stage 2 only, from the base model."


class ESDEqualCompute(_EraseMethod):
    name = "esd-equal-compute"
    summary = "ESD given as many iterations as Co-Erasing's two stages together."


METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (ESD, CoErasing, NoRefinement, ImageOnly, ESDEqualCompute)
}
