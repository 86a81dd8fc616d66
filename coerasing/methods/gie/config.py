"""GIE's constants and settings (:class:`GIEConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from ...errors import CoErasingError
from ...flags import SEED_MAX, check_fields, flag, typed_settings

METHOD_NAME = "gie"
ADAPTER_FILE = "adapter.safetensors"
#: The adapter's hidden widths (16 → 64 → 32 → 1, official ``use_adapter.py``).
ADAPTER_HIDDEN: tuple[int, int] = (64, 32)
#: Cross-attention layers of SD v1.x (the adapter's input size).
SD1_CROSS_LAYERS = 16
DEFAULT_W_GRID = "-0.5,-1,-2,-4,-8,-16"
#: Edit kinds (as recorded in :attr:`GIEController.trace`).
CROSS_INJECT, CROSS_EXTEND, SELF_COPY = "cross-inject", "cross-extend", "self-copy"
#: Batch layouts: classifier-free guidance ``[uncond…, cond…]``, or every row conditional.
CFG, COND = "cfg", "cond"
#: Processors GIE may replace (anything else, e.g. IP-Adapter's, would be lost silently).
REPLACEABLE_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


@dataclass
class GIEConfig:
    """GIE's settings (docs/baselines.md §GIE): the artifact's ``settings`` and the adapter's training."""

    target: str | None = flag(None, group="GIE", help="the target words T appended to every prompt, e.g. 'nudity' "
                              "(required)")
    w: float | None = flag(None, group="GIE", min=-100, max=100,
                           help="fixed growth-inhibitor weight (negative erases, more negative erases more); none: "
                           "predict it with the artifact's adapter")
    cross_fraction: float = flag(0.8, group="GIE", min=0.0, max=1.0,
                                 help="cross-attention maps are injected while t > (1 - this) * T_train")
    self_fraction: float = flag(0.4, group="GIE", min=0.0, max=1.0,
                                help="self-attention maps are copied while t > (1 - this) * T_train")
    self_max_query: int = flag(256, group="GIE", min=0,
                               help="self-attention maps are copied only with at most this many queries (16x16)")
    num_inference_steps: int = flag(40, group="GIE", min=1,
                                    help="GIE's reference number of steps (recorded; generation uses the caller's); "
                                    "also the schedule whose first timestep the attack's adapter features use")
    adapter_grid: str = flag(DEFAULT_W_GRID, group="adapter",
                             help="comma-separated w values swept to label the adapter's training prompts")
    adapter_prompts: int = flag(60, group="adapter", min=1, help="training prompts for the adapter (at most)")
    adapter_seed: int = flag(0, group="adapter", min=0, max=SEED_MAX,
                             help="seed of the training prompts' images and of the adapter's initialisation")
    adapter_epochs: int = flag(2000, group="adapter", min=1, help="full-batch Adam steps fitting the adapter")
    adapter_lr: float = flag(1e-3, group="adapter", min=0.0, exclusive_min=True, help="the adapter's learning rate")
    adapter_guidance: float = flag(7.5, group="adapter", min=0.0,
                                   help="guidance of the images that label the training prompts")
    adapter_steps: int | None = flag(None, group="adapter", min=1,
                                     help="steps of the labelling images (none: --num_inference_steps)")
    adapter_batch_size: int = flag(8, group="adapter", min=1, help="images per pipeline call while labelling")
    model: str | None = flag(None, group="adapter", help="Stable Diffusion folder the adapter is trained on")
    device: str | None = flag(None, group="adapter", help="device for the adapter's training (default: cpu)")
    output_dir: str = flag("gie_artifact", group="output", output=True, help="the artifact folder")
    overwrite: bool = flag(False, group="output", help="replace the artifact a folder already holds")

    def validate(self) -> GIEConfig:
        """Check every value; raise :class:`CoErasingError` naming the flag and the fix."""
        check_fields(self)
        if not (self.target and self.target.strip()):
            raise CoErasingError("--target is required: the words GIE appends to every prompt, e.g. --target nudity.")
        self.w_grid()
        return self

    def w_grid(self) -> list[float]:
        """``adapter_grid`` as numbers, from the least to the most negative (the labelling order)."""
        try:
            values = [float(v) for v in self.adapter_grid.split(",") if v.strip()]
        except ValueError:
            raise CoErasingError(f"--adapter_grid {self.adapter_grid!r} must be comma-separated numbers, "
                                 f"e.g. '{DEFAULT_W_GRID}'.") from None
        if not values or not all(math.isfinite(v) for v in values):
            raise CoErasingError(f"--adapter_grid {self.adapter_grid!r} needs finite numbers, e.g. '{DEFAULT_W_GRID}'.")
        return sorted(set(values), reverse=True)

    def settings(self) -> dict[str, Any]:
        """What ``artifact.json`` records (every setting but the output folder, device and --overwrite)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("output_dir", "device", "overwrite")}

    @classmethod
    def from_settings(cls, settings: dict[str, Any], source: str = "the GIE artifact") -> GIEConfig:
        """The config of an artifact's ``settings`` (unknown keys are ignored), typed like the flags, validated."""
        return cls(**typed_settings(cls, settings, source)).validate()


def window_active(timestep: float, fraction: float, num_train_timesteps: int) -> bool:
    """Whether an edit of the first ``fraction`` of the schedule acts at ``timestep`` (see the module doc)."""
    return fraction >= 1.0 or timestep > (1.0 - fraction) * num_train_timesteps
