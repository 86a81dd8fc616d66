"""The values users choose between, in one light module (no torch import).

Command-line declarations (:mod:`coerasing.config`, :mod:`coerasing.eval.config`) and the domain
modules that act on these names both import them from here, so a name is defined once.
"""

from __future__ import annotations

#: Default base model, IP-Adapter weights and image encoder (Hub paths; a local path works too).
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_IP_ADAPTER = "h94/IP-Adapter/models/ip-adapter_sd15.bin"
DEFAULT_IMAGE_ENCODER = "h94/IP-Adapter/models/image_encoder"

#: ``--mixed_precision``: ``no`` (fp32), ``fp16`` (GPU only), ``bf16``.
PRECISIONS: tuple[str, ...] = ("no", "fp16", "bf16")
#: ``--sampler`` of the partial denoising (docs/method.md §4).
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
#: ``--train_method`` names (docs/method.md §6; the parameter rules are in :mod:`coerasing.params`).
TRAIN_METHODS: tuple[str, ...] = ("full", "noxattn", "xattn", "selfattn", "notime", "xlayer", "selflayer")
#: ``--save_format`` of the final checkpoint.
SAVE_FORMATS: tuple[str, ...] = ("pth", "safetensors", "diffusers")
#: ``--diff_method`` of contrastive pairs: p − n, |p − n|, (p − n)².
DIFF_METHODS: tuple[str, ...] = ("diff", "l1", "l2")
#: ``--modality``: stage 1 (text, ESD) or stage 2 (image, Co-Erasing).
MODALITIES: tuple[str, ...] = ("text", "image")
#: ``--scheduler`` of evaluation generation; ``default`` keeps the model's own.
SCHEDULERS: tuple[str, ...] = ("default", "pndm", "lms", "ddim", "euler", "dpm", "unipc")
