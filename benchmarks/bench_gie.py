#!/usr/bin/env python
"""Images per second of GIE (docs/baselines.md §GIE) against the plain pipeline, on the shipped toy world.

    python benchmarks/bench_gie.py                      # toy world, 25 steps, guidance 3, 64 prompts, 1 thread
    python benchmarks/bench_gie.py --adapter            # w from a (random) adapter: one extra first-step call

GIE runs every image as a pair (branch 1 on P, branch 2 on P + T), so it doubles the UNet batch and
adds explicit attention for the edited rows; the adapter adds one first-step UNet call per batch.
Rounds alternate the order of the two ways so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coerasing.generation import render  # noqa: E402
from coerasing.methods.gie import GIEAdapter, GIEConfig, GIERuntime  # noqa: E402
from coerasing.toy import TOY_GUIDANCE, TOY_MODEL_DIR  # noqa: E402
from coerasing.toy.quality import load_pipeline  # noqa: E402
from coerasing.toy.world import all_captions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default=str(TOY_MODEL_DIR), help="diffusers folder (default: the toy world)")
    parser.add_argument("--target", default="circle", help="GIE's target words")
    parser.add_argument("--w", type=float, default=-2.0, help="fixed growth-inhibitor weight")
    parser.add_argument("--adapter", action="store_true", help="predict w with a randomly initialised adapter")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per pipeline call")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=TOY_GUIDANCE)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model_dir)
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    prompts = all_captions("train")[: args.batch_size]
    seeds = list(range(len(prompts)))
    adapter = None
    if args.adapter:
        torch.manual_seed(0)
        adapter = GIEAdapter(sum(name.endswith("attn2.processor") for name in pipe.unet.attn_processors))
    config = GIEConfig(target=args.target, w=None if args.adapter else args.w)

    def plain() -> None:
        render(pipe, seeds, args.guidance, size, size, args.steps, prompts=prompts)

    def gie() -> None:
        runtime = GIERuntime(pipe, config, adapter=adapter)
        try:
            runtime.render(seeds, args.guidance, size, size, args.steps, prompts=prompts)
        finally:
            runtime.close()

    ways = {"plain": plain, "gie": gie}
    render(pipe, seeds[:2], args.guidance, size, size, 2, prompts=prompts[:2])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for round_index in range(args.rounds):
        names = list(ways)[round_index % 2 :] + list(ways)[: round_index % 2]
        for name in names:
            start = time.perf_counter()
            ways[name]()
            rates[name].append(len(prompts) / (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["plain"] / medians["gie"]
    print(f"\n{Path(args.model_dir).name}: {len(prompts)} prompts per call, {size} px, {args.steps} steps, guidance "
          f"{args.guidance}, {torch.get_num_threads()} thread(s), w {'adapter' if args.adapter else args.w}, "
          f"median of {args.rounds} rounds")
    print("| way | images/s |")
    print("|---|---|")
    for name, rate in medians.items():
        print(f"| {name} | {rate:.2f} |")
    print(f"GIE slowdown: {ratio:.2f}x (plain images/s ÷ GIE images/s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "images_per_s": rates, "slowdown": ratio},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
