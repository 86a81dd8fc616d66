#!/usr/bin/env python
"""Seconds per erasing iteration and peak memory: a released-code-equivalent loop vs ours.

    python benchmarks/bench_erase.py --arch tiny --device cpu            # this CPU, tiny random stack
    python benchmarks/bench_erase.py --arch sd14 --device cuda:0         # SD v1.4 architecture, random weights
    python benchmarks/bench_erase.py --arch toy --compile                # the shipped toy-world model

Three loops run *interleaved* (one iteration of each per round, in rotating order) so machine
noise hits them alike, and every loop gets the same bucket ``k`` and timestep ``t`` each round, so
they do the same amount of partial denoising:

- ``reference``: the released code's per-iteration work with the correct timestep order: fp32,
  the reference image re-read and re-encoded every iteration (plus the unused noise-image
  embedding the released code computes), the prompt re-encoded every iteration in text mode,
  and ε_c and ε_u as two separate frozen calls;
- ``ours``: ``erase_pipeline.py``'s default loop (fp32; bit-identical results to before);
- ``fastest``: ours with ``--batch_reference`` (one frozen call), with ``--compile`` if the benchmark
  is given ``--compile``, and on GPU with ``--mixed_precision bf16``.

Peak memory is measured per loop in a fresh subprocess (CUDA peak allocated on GPU, peak RSS on
CPU). The table prints medians and the ratio reference/ours; ``--json`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coerasing.config import EraseConfig  # noqa: E402
from coerasing.images import encode_images, open_rgb  # noqa: E402
from coerasing.ip_adapter import unet_noise_pred  # noqa: E402
from coerasing.objectives import (  # noqa: E402
    blur_latents,
    erasing_loss,
    negative_guidance_target,
    refine_image_tokens,
)
from coerasing.sampling import denoise_to_bucket  # noqa: E402
from coerasing.testing import build_tiny_stack, make_reference_images  # noqa: E402
from coerasing.toy import TOY_MODEL_DIR  # noqa: E402
from coerasing.toy.world import heldout_scenes, render  # noqa: E402
from coerasing.train import Eraser  # noqa: E402

LOOPS = ("reference", "ours", "fastest")


# ----------------------------------------------------------------------------------------------
# Setup


def prepare_models(arch: str, model_dir: str | None, workdir: Path) -> dict[str, str]:
    """Paths of the model, IP-Adapter, image encoder and reference images for ``arch``."""
    images = workdir / "images"
    if arch in ("tiny", "sd14"):
        stack = build_tiny_stack(workdir / "stack", architecture=arch)
        make_reference_images(images, 8, size=64 if arch == "tiny" else 512)
        return {
            "ckpt_path": str(stack.sd_path),
            "ip_adapter": str(stack.ip_adapter_bin),
            "image_encoder_path": str(stack.image_encoder_path),
            "image": str(images),
        }
    folder = Path(model_dir) if model_dir else TOY_MODEL_DIR
    adapter = next(iter(sorted(folder.glob("ip-adapter*.bin"))), None)
    if not (folder / "model_index.json").is_file() or adapter is None:
        raise SystemExit(f"--model_dir {folder} is not a toy-world folder (model_index.json, ip-adapter*.bin)")
    images.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(heldout_scenes(8, seed=0, shape="circle")):  # renders of the erased concept
        render(scene).save(images / f"{i:02d}.png")
    return {
        "ckpt_path": str(folder),
        "ip_adapter": str(adapter),
        "image_encoder_path": str(folder / "image_encoder"),
        "image": str(images),
    }


def make_config(paths: dict[str, str], stage: str, loop: str, device: str, args, save: Path) -> EraseConfig:
    config = EraseConfig(
        modality=stage,
        train_method=args.train_method,
        prompt="nudity",
        iterations=10**6,
        devices=device,
        save_path=str(save),
        num_inference_steps=args.num_inference_steps,
        ckpt_path=paths["ckpt_path"],
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if stage == "image":
        config.image = paths["image"]
        config.image_number = 8
        config.ip_adapter = paths["ip_adapter"]
        config.image_encoder_path = paths["image_encoder_path"]
        config.text_guide = "nudity"
        config.text_uncond = True
    if loop == "fastest":
        config.batch_reference = True
        config.compile = args.compile
        if torch.device(device).type == "cuda":
            config.mixed_precision = "bf16"
    return config.validate()


class ReferenceLoop:
    """The released code's per-iteration work (see module docstring), on our models."""

    def __init__(self, eraser: Eraser, config: EraseConfig) -> None:
        self.eraser, self.config = eraser, config
        self.files = sorted(Path(config.image).glob("*.png")) if config.image else []
        self.encoder = None
        if config.image_stage:
            from coerasing.models import load_image_encoder

            self.encoder = load_image_encoder(config.image_encoder_path, eraser.models.frozen_device, torch.float32)

    def step(self, bucket: tuple[int, int]) -> torch.Tensor:
        eraser, config, models = self.eraser, self.config, self.eraser.models
        device = models.train_device
        k, t = bucket
        text_states = models.text.encode(config.prompt).to(device)  # released: re-encoded per iteration
        uncond_states = models.text.encode("").to(device)
        image_tokens = None
        if config.image_stage:
            image = open_rgb(random.choice(self.files))  # re-read and re-encoded every iteration
            embeds = encode_images(self.encoder, [image])
            noise = torch.rand(1, 3, self.encoder.config.image_size, self.encoder.config.image_size)
            self.encoder(pixel_values=noise.to(self.encoder.device))  # the released code's unused noise embeds
            tokens = models.frozen_handle.project(embeds)
            image_tokens = refine_image_tokens(tokens, text_states.to(tokens.device))
        latents = torch.randn(eraser.latent_shape, generator=eraser.generator).to(device)
        latents = denoise_to_bucket(eraser._sampling_fn(text_states), latents, eraser.scheduler, k, eraser.generator)
        latents = latents.clone()
        if config.image_stage:
            latents = blur_latents(latents, config.blur_factor)
        with torch.no_grad():
            z, tt = latents.to(models.frozen_device), torch.tensor([t], device=models.frozen_device)
            eps_u = unet_noise_pred(models.frozen, z, tt, uncond_states.to(z.device))  # separate frozen calls
            eps_c = unet_noise_pred(models.frozen, z, tt, text_states.to(z.device), image_tokens, models.frozen_handle)
        target = negative_guidance_target(eps_u.float(), eps_c.float(), config.negative_guidance)
        pred = unet_noise_pred(models.trainable, latents, torch.tensor([t], device=device), text_states,
                               image_tokens, models.train_handle)
        return erasing_loss(pred, target.to(device))


def train_step(loop, eraser: Eraser, bucket: tuple[int, int]) -> None:
    loss = loop.step(bucket) if isinstance(loop, ReferenceLoop) else eraser.step(bucket)[0]
    eraser.optimizer.zero_grad(set_to_none=True)
    eraser.backward(loss)
    eraser.optimizer.step()


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Timing (interleaved) and memory (one subprocess per loop)


def time_stage(paths, stage: str, args, workdir: Path) -> dict[str, list[float]]:
    loops = {}
    for name in LOOPS:
        eraser = Eraser(make_config(paths, stage, name, args.device, args, workdir / f"run_{stage}_{name}"))
        loops[name] = (ReferenceLoop(eraser, eraser.config) if name == "reference" else None, eraser)
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in LOOPS}
    for round_index in range(args.warmup + args.iterations):
        k = rng.randrange(args.num_inference_steps)
        bucket = (k, k * 1000 // args.num_inference_steps)
        order = list(LOOPS[round_index % 3 :] + LOOPS[: round_index % 3])
        for name in order:
            loop, eraser = loops[name]
            synchronize(args.device)
            start = time.perf_counter()
            train_step(loop, eraser, bucket)
            synchronize(args.device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def measure_memory(paths, stage: str, loop: str, args, workdir: Path) -> float:
    """Peak memory in GiB of 3 iterations of one loop (run in a fresh subprocess)."""
    command = [
        sys.executable, __file__, "--_memory", json.dumps({"paths": paths, "stage": stage, "loop": loop}),
        "--device", args.device, "--train_method", args.train_method,
        "--num_inference_steps", str(args.num_inference_steps), "--workdir", str(workdir),
    ] + (["--gradient_checkpointing"] if args.gradient_checkpointing else []) + (["--compile"] if args.compile else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _memory_child(spec: str, args) -> None:
    spec = json.loads(spec)
    workdir = Path(args.workdir)
    eraser = Eraser(make_config(spec["paths"], spec["stage"], spec["loop"], args.device, args, workdir / "mem"))
    loop = ReferenceLoop(eraser, eraser.config) if spec["loop"] == "reference" else None
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    for k in (args.num_inference_steps - 1, args.num_inference_steps // 2, 0):
        train_step(loop, eraser, (k, k * 1000 // args.num_inference_steps))
    if cuda:
        print(torch.cuda.max_memory_allocated(args.device) / 2**30)
    else:  # ru_maxrss is KiB on Linux
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sd14", "toy"), default="tiny")
    parser.add_argument("--model_dir", help="toy-world model folder for --arch toy (default: the shipped one)")
    parser.add_argument("--compile", action="store_true", help="the fastest loop also uses --compile")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stage", choices=("text", "image", "both"), default="both")
    parser.add_argument("--train_method", default="noxattn")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=10, help="timed rounds per loop (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--no_memory", action="store_true", help="skip the per-loop memory subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--_memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        _memory_child(args._memory, args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        paths = prepare_models(args.arch, args.model_dir, workdir)
        stages = ("text", "image") if args.stage == "both" else (args.stage,)
        cuda = args.device.startswith("cuda")
        device_name = torch.cuda.get_device_name(args.device) if cuda else platform.processor()
        results = {
            "arch": args.arch, "device": args.device, "device_name": device_name or platform.machine(),
            "threads": torch.get_num_threads(), "num_inference_steps": args.num_inference_steps,
            "train_method": args.train_method, "iterations": args.iterations, "warmup": args.warmup,
            "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile,
            "torch": torch.__version__, "stages": {},
        }
        for stage in stages:
            times = time_stage(paths, stage, args, workdir)
            entry = {name: {"median_s": statistics.median(values), "all_s": values} for name, values in times.items()}
            if not args.no_memory:
                for name in LOOPS:
                    entry[name]["peak_memory_gib"] = measure_memory(paths, stage, name, args, workdir / f"m_{stage}")
            entry["ratio_reference_over_ours"] = entry["reference"]["median_s"] / entry["ours"]["median_s"]
            entry["ratio_reference_over_fastest"] = entry["reference"]["median_s"] / entry["fastest"]["median_s"]
            results["stages"][stage] = entry

    memory_kind = "CUDA peak allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"\n{args.arch} on {results['device_name']} ({args.device}, {results['threads']} threads), "
          f"S={args.num_inference_steps}, --train_method {args.train_method}, fastest compiled: {args.compile}, "
          f"median of {args.iterations} after {args.warmup} warm-up")
    print(f"| stage | loop | s/iteration | {memory_kind} GiB | reference / loop |")
    print("|---|---|---|---|---|")
    for stage, entry in results["stages"].items():
        for name in LOOPS:
            median = entry[name]["median_s"]
            memory = entry[name].get("peak_memory_gib")
            ratio = entry["reference"]["median_s"] / median
            print(f"| {stage} | {name} | {median:.4f} | {'' if memory is None else f'{memory:.2f}'} | {ratio:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
