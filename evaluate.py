#!/usr/bin/env python
"""Evaluate an erased Stable Diffusion model by the field's protocol (UnlearnDiff; docs/method.md §9).

    python evaluate.py {generate,detect,attack,report,all} --prompts SET --output_dir DIR [flags]

One command per erased model: ``--artifact`` is any method's artifact (a UNet checkpoint in any
format, or a folder with artifact.json such as CPE's gates or GIE's settings; ``--unet`` is the same
flag under its old name). ``generate`` makes DIR/images/<case_number>.png (one image per prompt row,
with the row's seed and guidance; sharded under ``accelerate launch`` or ``torchrun``), ``detect``
writes DIR/images/detections.json, ``attack`` runs the UnlearnDiff attack (or ``--attack_method
concept_inversion|p4d``) into DIR/attack/ (``--attack_method relearn``: the relearning probe into
DIR/relearn/, docs/attacks.md),
``report`` writes DIR/report.json, report.md and grid.png; ``all`` runs the four. Every step
resumes, and results made with other settings are never reused.

Nudity (the paper's main table; NudeNet 3.0.x weights: pip install nudenet==3.0.8 onnxruntime;
UnlearnDiff sampled with LMS: pip install scipy):

    python evaluate.py all --prompts nudity --output_dir eval/nudity/coerasing \\
        --unet checkpoints/image/nudity/unet_noxattn_im100_ng1.0_it1000/unet.pth --scheduler lms
    # 8 GPUs: accelerate launch --num_processes 8 evaluate.py all … (same flags)

Van Gogh (style; UnlearnDiff's artist classifier, downloaded separately, top-1 or top-3):

    python evaluate.py all --prompts vangogh --output_dir eval/vangogh/coerasing --unet …/unet.pth \\
        --classifier /models/artist_classifier --target vincent-van-gogh --top_k 3 --scheduler lms

Objects (ImageNet ResNet-50 top-1; church 497, garbage_truck 569, parachute 701, tench 0 by default):

    python evaluate.py all --prompts church --output_dir eval/church/coerasing --unet …/unet.pth \\
        --classifier /models/resnet-50 --scheduler lms

Usability (COCO-10k; FID needs clean-fid and real COCO images, CLIP score a local CLIP model):

    python evaluate.py generate --prompts coco_10k --output_dir eval/coco/coerasing --unet …/unet.pth
    python evaluate.py report --prompts coco_10k --output_dir eval/coco/coerasing \\
        --usability fid,clip --fid_reference /data/coco/val2014 --clip_model /models/clip-vit-large-patch14

The attack needs the base model's image of each prompt: ``--reference_dir`` (default DIR/reference,
made with the base model and the same generation flags when missing). UnlearnDiff made them with 25
LMS steps at guidance 7.5: ``evaluate.py generate --prompts nudity --output_dir eval/nudity/base
--num_inference_steps 25 --guidance_scale 7.5 --scheduler lms`` then ``--reference_dir
eval/nudity/base/images``.
"""

from __future__ import annotations

import sys
from typing import Sequence

from coerasing.cli import run_cli
from coerasing.eval.config import EvalConfig
from coerasing.flags import build_parser as build_parser_for
from coerasing.flags import parse_config
from coerasing.toy.detector import register_toy_detector

register_toy_detector()  # --detector toy: the toy world registers its classifier (docs/architecture.md)


def build_parser():
    return build_parser_for(EvalConfig, "evaluate.py", __doc__)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(EvalConfig, build_parser(), argv)
    from coerasing.eval.steps import run_evaluation

    run_evaluation(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
