#!/usr/bin/env python
"""Evaluate an erased Stable Diffusion model by the field's protocol (UnlearnDiff; METHOD.md §8–9).

    python evaluate.py {generate,detect,attack,report,all} --prompts SET --output_dir DIR [flags]

One command per erased checkpoint. ``generate`` makes DIR/images/<case_number>.png (one image per
prompt row, with the row's seed and guidance; sharded under ``accelerate launch`` or ``torchrun``),
``detect`` writes DIR/images/detections.json, ``attack`` runs the UnlearnDiff attack into DIR/attack/,
``report`` writes DIR/report.json, report.md and grid.png; ``all`` runs the four. Every step resumes.

Nudity (the paper's main table; NudeNet 3.0.x weights: pip install nudenet==3.0.8 onnxruntime;
UnlearnDiff sampled with LMS: pip install scipy):

    python evaluate.py all --prompts nudity --output_dir eval/nudity/coerasing \\
        --unet checkpoints/image/nudity/unet_noxattn_im100_ng1.0_it1000/unet.pth --scheduler lms
    # 8 GPUs: accelerate launch --num_processes 8 evaluate.py all … (same flags)
    # report.md gives pre-ASR and ASR over all 142 prompts (the published figure) and over the 118
    # prompts of at most 60 CLIP tokens that UnlearnDiff's attack keeps.

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

import argparse
import sys
from typing import Sequence

from coerasing.cli import parse_with_config, run_cli, str2bool
from coerasing.eval import COMMANDS, EvalConfig

D = EvalConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate an erased model: generate, detect, attack (UnlearnDiff), report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("command", choices=COMMANDS, help="which step; 'all' runs generate, detect, attack, report")
    p.add_argument("--config", help="YAML file of flag values (command line wins)")
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--prompts", default=D.prompts,
                   help="(required) prompt set: nudity, i2p, vangogh, church, garbage_truck, parachute, tench, "
                        "coco_10k, or a CSV path")
    g.add_argument("--output_dir", default=D.output_dir, help="(required) this checkpoint's evaluation folder")
    g.add_argument("--ckpt_path", default=D.ckpt_path, help="base SD model: Hub id or local diffusers folder")
    g.add_argument("--unet", default=D.unet, help="erased UNet (any format; default: evaluate the base model)")
    g.add_argument("--reference_dir", default=D.reference_dir,
                   help="base-model images <case>.png for the attack (default OUTPUT/reference, made if missing)")
    g.add_argument("--limit", type=int, default=D.limit, help="only the first N prompts")
    g = p.add_argument_group("generation")
    g.add_argument("--num_inference_steps", type=int, default=D.num_inference_steps)
    g.add_argument("--guidance_scale", type=float, default=D.guidance_scale, help="override each row's guidance")
    g.add_argument("--height", type=int, default=D.height, help="override the rows' size / the model's")
    g.add_argument("--width", type=int, default=D.width, help="override the rows' size / the model's")
    g.add_argument("--batch_size", type=int, default=D.batch_size)
    g.add_argument("--scheduler", default=D.scheduler,
                   help="default (the model's: PNDM for SD v1.4), pndm, lms (UnlearnDiff's), ddim, euler, dpm")
    g.add_argument("--device", default=D.device, help="e.g. 0, cuda:1, cpu (default: cuda:0 if present)")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=D.mixed_precision)
    g = p.add_argument_group("detection")
    g.add_argument("--detector", default=D.detector,
                   help="nudenet (UnlearnDiff's rule), nudenet-3.4, classifier, none (default: by prompt set)")
    g.add_argument("--nudenet_weights", default=D.nudenet_weights,
                   help="NudeNet 3.0.x best.onnx (default: the installed nudenet package's)")
    g.add_argument("--threshold", type=float, default=D.threshold, help="nudity: a class counts above this score")
    g.add_argument("--classifier", default=D.classifier,
                   help="image classifier: Hub id or local folder (objects default: microsoft/resnet-50)")
    g.add_argument("--target", default=D.target, help="classifier class ids or labels of the concept, comma-separated")
    g.add_argument("--top_k", type=int, default=D.top_k, help="classifier: positive if a target is in the top k")
    g = p.add_argument_group("attack (UnlearnDiff)")
    g.add_argument("--attack_k", type=int, default=D.attack_k, help="prefix tokens")
    g.add_argument("--attack_iterations", type=int, default=D.attack_iterations,
                   help="Adam steps per round (per timestep with --attack_schedule unlearndiff)")
    g.add_argument("--attack_lr", type=float, default=D.attack_lr)
    g.add_argument("--attack_weight_decay", type=float, default=D.attack_weight_decay)
    g.add_argument("--attack_space", choices=("vocab", "embedding"), default=D.attack_space,
                   help="vocab: UnlearnDiff's token distributions (a text prompt); embedding: free embeddings")
    g.add_argument("--attack_schedule", choices=("unlearndiff", "random"), default=D.attack_schedule,
                   help="unlearndiff: one round per timestep 10, 30, …, checked after each; random: one round")
    g.add_argument("--attack_timesteps", type=int, default=D.attack_timesteps,
                   help="rounds of the unlearndiff schedule")
    g.add_argument("--attack_seed", type=int, default=D.attack_seed)
    g.add_argument("--attack_max_tokens", type=int, default=D.attack_max_tokens,
                   help="attack only prompts of at most this many CLIP tokens, BOS/EOS counted (UnlearnDiff: 60)")
    g.add_argument("--skip_attack", type=str2bool, nargs="?", const=True, default=D.skip_attack,
                   help="with 'all': no attack step")
    g = p.add_argument_group("usability (report)")
    g.add_argument("--usability", default=D.usability, help="comma-separated: fid, clip")
    g.add_argument("--fid_reference", default=D.fid_reference, help="folder of real COCO images for FID")
    g.add_argument("--clip_model", default=D.clip_model, help="CLIP model folder or Hub id for the CLIP score")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_with_config(build_parser(), argv, EvalConfig)
    from coerasing.eval import run_evaluation

    run_evaluation(config)


if __name__ == "__main__":
    sys.exit(run_cli(main))
