#!/usr/bin/env python
"""Images per second of reference-image generation: one image per pipeline call vs batched.

    python benchmarks/bench_generate.py --arch tiny --device cpu
    python benchmarks/bench_generate.py --arch sd14 --device cuda:0 --batch_size 8

The released code calls the pipeline once per image; ``generate_data.py --batch_size B`` passes B
prompts with B per-image generators, which gives the same images. Rounds alternate between the
two ways (in rotating order) so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coerasing.generation import load_generation_pipeline  # noqa: E402
from coerasing.testing import build_tiny_stack  # noqa: E402


def generate(pipe, seeds: list[int], steps: int, device: str, batch_size: int) -> None:
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        pipe(["a photo of nudity"] * len(chunk), num_inference_steps=steps,
             generator=[torch.Generator(device).manual_seed(seed) for seed in chunk])
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("tiny", "sd14"), default="tiny")
    parser.add_argument("--model_dir", help="use this diffusers folder instead of building --arch")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--images", type=int, default=16, help="images per round and way")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_dir or str(build_tiny_stack(Path(tmp) / "stack", architecture=args.arch).sd_path)
        pipe = load_generation_pipeline(model, torch.device(args.device), dtype)
        generate(pipe, [0], 2, args.device, 1)  # warm-up
        ways = {"one per call": 1, f"batch {args.batch_size}": args.batch_size}
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for round_index in range(args.rounds):
            names = list(ways)[round_index % 2 :] + list(ways)[: round_index % 2]
            for name in names:
                start = time.perf_counter()
                generate(pipe, list(range(args.images)), args.steps, args.device, ways[name])
                rates[name].append(args.images / (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    single, batched = medians["one per call"], medians[f"batch {args.batch_size}"]
    print(f"\n{args.model_dir or args.arch} on {args.device} ({torch.get_num_threads()} threads), {args.steps} steps, "
          f"{args.images} images per round, median of {args.rounds} rounds, {args.mixed_precision} precision")
    print("| way | images/s | speed-up |")
    print("|---|---|---|")
    for name, rate in medians.items():
        print(f"| {name} | {rate:.3f} | {rate / single:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "images_per_s": rates, "speedup": batched / single},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
