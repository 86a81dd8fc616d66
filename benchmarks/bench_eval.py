#!/usr/bin/env python
"""Seconds per checkpoint evaluation of the toy comparison: 25-step PNDM (the old protocol) against a fast sampler.

    python benchmarks/bench_eval.py                                  # trains a short stage 1 itself
    python benchmarks/bench_eval.py --erased s1=/tmp/s1/unet.pth --erased strong=/tmp/strong/unet.pth \\
        --new dpm:8@961 --new dpm:10 --compile --json /tmp/bench_eval.json

One checkpoint evaluation is what ``compare.py`` does per checkpoint: the validation and the test
split of the toy protocol (generation, VAE decode, the toy classifier, the Fréchet distance and the
CLIP similarity), with the image counts of ``configs/compare/toy.yaml``'s ``evaluation`` block.
Every model (the base model and each ``--erased`` checkpoint) is evaluated each way on the same
prompts and seeds, so the concept rates can be compared image by image: per group (explicit,
implicit, unrelated), pooled over both splits, the rate each way with its 95 % Wilson interval, the
paired difference (new − old) with its 95 % interval, and the share of images whose classifier
label (the shape it sees) is the same both ways. ``rates_agree`` holds when every group's
|difference| is within ``--tolerance`` for every model.

Each process runs ``--threads`` torch threads (default 1, as ``compare.py``'s workers). Time is this
process's CPU time (with one thread, the wall time of an idle machine; other jobs on a shared machine
barely change it), and each way's estimate is the fastest of its evaluations (one per model: they all
cost the same). The order of the ways alternates between models. On a shared machine the absolute
speeds are still noisy and the ratio of one run is what counts. ``torch.compile`` compiles partly in
worker processes, so its first evaluation is timed on the wall clock.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from coerasing.compare.protocols import ToyProtocol, check_sampler_start  # noqa: E402
from coerasing.methods import apply_artifact  # noqa: E402
from coerasing.stats import Z95, rate  # noqa: E402
from coerasing.toy import protocol as toy  # noqa: E402

GROUPS = ("explicit", "implicit", "unrelated")
SPLITS = ("validation", "test")


def train_stage1(concept: str, iterations: int, folder: Path) -> Path:
    """A stage-1 (ESD) checkpoint of ``concept`` on the toy world, as ``make demo`` trains one."""
    command = [sys.executable, "erase_pipeline.py", "--config", "configs/toy/circle_text.yaml", "--prompt", concept,
               "--iterations", str(iterations), "--save_iter", str(iterations), "--save_path", str(folder),
               "--devices", "cpu"]
    print("training:", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return folder / "unet.pth"


def parse_way(text: str) -> tuple[str, int, int | None]:
    """``SCHEDULER:STEPS`` or ``SCHEDULER:STEPS@FIRST_TIMESTEP`` (e.g. ``dpm:8@961``)."""
    scheduler, _, rest = text.partition(":")
    steps, _, first = rest.partition("@")
    if not steps.isdigit() or (first and not first.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SCHEDULER:STEPS[@FIRST_TIMESTEP], e.g. dpm:8@961")
    return scheduler, int(steps), int(first) if first else None


def way_name(scheduler: str, steps: int, first: int | None) -> str:
    return f"{scheduler}:{steps}" + (f"@{first}" if first is not None else "")


#: ``cuda:N`` while timing on a GPU (``--device``): wall seconds after a synchronize, not CPU time.
GPU: str | None = None


def clock() -> float:
    """CPU seconds of this process (all its threads): what other jobs on a shared machine barely change.

    On a GPU (``--device cuda``) the wall clock after the device has finished its queued work."""
    if GPU is not None:
        torch.cuda.synchronize(GPU)
        return time.perf_counter()
    return time.process_time()


class Timer:
    """Seconds spent in the protocol's ``generate`` (UNet + VAE decode) while it is installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = toy.generate

    def __enter__(self) -> Timer:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += clock() - start

        toy.generate = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        toy.generate = self.original


def evaluate_once(protocol: ToyProtocol, pipe: Any, artifact: str | None, concept: str,
                  settings: Any) -> dict[str, Any]:
    """One checkpoint evaluation (both splits) with ``settings``: records, metrics and seconds."""
    protocol.settings = settings
    runtime = apply_artifact(pipe, artifact)
    try:
        with Timer() as timer:
            start, wall = clock(), time.perf_counter()
            results = {split: protocol.evaluate(runtime, concept, split) for split in SPLITS}
            seconds, wall = clock() - start, time.perf_counter() - wall
    finally:
        runtime.close()
    images = sum(len(r["images"]) for r in results.values())
    return {"seconds": seconds, "wall_seconds": wall, "generate_seconds": timer.seconds, "images": images,
            "records": [rec for split in SPLITS for rec in results[split]["images"]],
            "metrics": {split: results[split]["metrics"] for split in SPLITS}}


def paired(old: list[dict[str, Any]], new: list[dict[str, Any]], group: str) -> dict[str, Any]:
    """Rates both ways over the same images of ``group``, their paired difference and label agreement."""
    a = [r for r in old if r["group"] == group]
    b = [r for r in new if r["group"] == group]
    assert [r["case"] for r in a] == [r["case"] for r in b], "the two ways must score the same images"
    n = len(a)
    only_new = sum(y["hit"] and not x["hit"] for x, y in zip(a, b, strict=True))
    only_old = sum(x["hit"] and not y["hit"] for x, y in zip(a, b, strict=True))
    diff = (only_new - only_old) / n
    half = Z95 * math.sqrt(max(only_new + only_old - n * diff * diff, 0.0)) / n
    return {"old": rate(sum(r["hit"] for r in a), n), "new": rate(sum(r["hit"] for r in b), n),
            "difference": diff, "difference_low": diff - half, "difference_high": diff + half,
            "label_agreement": sum(x["shape"] == y["shape"] for x, y in zip(a, b, strict=True)) / n}


def pct(value: float) -> str:
    return f"{100 * value:5.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--erased", action="append", default=[], metavar="LABEL=PATH",
                        help="an erased checkpoint to evaluate (repeatable); none: train a short stage 1")
    parser.add_argument("--stage1_iterations", type=int, default=200, help="without --erased: stage 1's length")
    parser.add_argument("--new", action="append", type=parse_way, default=None, metavar="SCHEDULER:STEPS[@T]",
                        help="a fast way (repeatable; the first is the one 'speedup' and 'rates_agree' judge); @T: "
                        "its steps start at timestep T; default: the --presets file's evaluation sampler")
    parser.add_argument("--old", type=parse_way, default=("pndm", 25, None), metavar="SCHEDULER:STEPS[@T]")
    parser.add_argument("--compile", action="store_true",
                        help="also the first fast way with torch.compile of the UNet (compile time reported)")
    parser.add_argument("--presets", default=str(REPO_ROOT / "configs" / "compare" / "toy.yaml"),
                        help="image counts per group and split: this file's 'evaluation' block")
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="largest |new − old| concept or usability rate (pooled over both splits) that agrees")
    parser.add_argument("--job_checkpoints", type=int, default=38,
                        help="checkpoints of one comparison job (with the base model), for the job estimate")
    parser.add_argument("--job_methods", type=int, default=5, help="methods of one job (chosen points)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (then times are wall seconds)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global GPU
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit(f"--device {args.device}: no CUDA device is visible to torch here; use --device cpu.")
        GPU = args.device
    presets = yaml.safe_load(Path(args.presets).read_text(encoding="utf-8"))
    evaluation = presets.get("evaluation") or {}
    counts = {k: v for k, v in evaluation.items() if k.endswith("_images")}
    news = args.new or [(str(evaluation.get("scheduler", "dpm")), int(evaluation.get("num_inference_steps", 20)),
                         evaluation.get("first_timestep"))]
    protocol = ToyProtocol({"evaluation": counts}, device=args.device)
    base_settings = protocol.settings
    ways = {}
    for scheduler, steps, first in [args.old, *news]:
        settings = replace(base_settings, scheduler=scheduler, num_inference_steps=steps, first_timestep=first)
        if first is not None:
            check_sampler_start(protocol.model, settings)
        ways[way_name(scheduler, steps, first)] = settings
    old_name, new_name = list(ways)[0], list(ways)[1]

    with tempfile.TemporaryDirectory() as tmp:
        models: dict[str, str | None] = {"base": None}
        for item in args.erased:
            label, _, path = item.partition("=")
            models[label if path else Path(label).stem] = path or label
        if not args.erased:
            models[f"stage1-{args.stage1_iterations}"] = str(train_stage1(args.concept, args.stage1_iterations,
                                                                         Path(tmp) / "stage1"))
        pipe = protocol.pipeline()
        protocol.scorer  # noqa: B018  (loaded before timing)
        runs: dict[str, dict[str, Any]] = {}
        for index, (label, artifact) in enumerate(models.items()):
            order = list(ways) if index % 2 == 0 else list(reversed(ways))
            runs[label] = {}
            for way in order:
                runs[label][way] = evaluate_once(protocol, pipe, artifact, args.concept, ways[way])
                r = runs[label][way]
                kind = "timed" if GPU else "CPU"
                print(f"{label:>14} {way:>9}: {r['seconds']:6.1f} {kind} s, {r['wall_seconds']:6.1f} wall s "
                      f"({r['images'] / r['generate_seconds']:.1f} images per {kind} second generating)", flush=True)
        compiled: dict[str, Any] | None = None
        if args.compile:
            forward = pipe.unet.forward
            pipe.unet.forward = torch.compile(forward, dynamic=False)
            try:
                label, artifact = next(iter(models.items()))
                first = evaluate_once(protocol, pipe, artifact, args.concept, ways[new_name])
                second = min((evaluate_once(protocol, pipe, artifact, args.concept, ways[new_name])
                              for _ in range(2)), key=lambda r: r["seconds"])  # the faster of two, as above
            finally:
                pipe.unet.forward = forward
            eager = min(runs[m][new_name]["seconds"] for m in models)  # as the table's estimate
            # compiling runs partly in worker processes: the first evaluation is timed on the wall clock
            compile_seconds = first["wall_seconds"] - second["wall_seconds"]
            compiled = {"way": f"{new_name}+compile", "model": label, "first_wall_seconds": first["wall_seconds"],
                        "seconds": second["seconds"], "eager_seconds": eager, "compile_wall_seconds": compile_seconds,
                        "break_even_evaluations": compile_seconds / (eager - second["seconds"])
                        if eager > second["seconds"] else None,
                        "same_labels": [r["shape"] for r in second["records"]] ==
                        [r["shape"] for r in runs[label][new_name]["records"]]}

    # ---------------------------------------------------------------- the tables
    # Every model costs the same (same images, same calls), so each way is timed len(models) times in CPU
    # seconds (with one thread, the wall time of an idle machine); what noise remains only adds time, so
    # the fastest of those is the estimate (the mean is kept beside it).
    timing = {}
    for way in ways:
        seconds = [runs[m][way]["seconds"] for m in models]
        fastest = min(models, key=lambda m: runs[m][way]["seconds"])
        images = runs["base"][way]["images"]
        gen = runs[fastest][way]["generate_seconds"]
        timing[way] = {"seconds_per_evaluation": runs[fastest][way]["seconds"],
                       "mean_seconds_per_evaluation": sum(seconds) / len(seconds),
                       "all_seconds": {m: runs[m][way]["seconds"] for m in models},
                       "all_wall_seconds": {m: runs[m][way]["wall_seconds"] for m in models},
                       "generate_seconds_per_evaluation": gen,
                       "images_per_evaluation": images,
                       "images_per_second": images / gen,
                       "unet_calls_per_image": ways[way].num_inference_steps * 2}
    print(f"\ncheckpoint evaluation (validation + test, {timing[old_name]['images_per_evaluation']} images), "
          f"{args.device if GPU else f'{args.threads} thread(s)'}, fastest of {len(models)} models (mean in brackets):")
    unit = "wall s" if GPU else "CPU s"
    print(f"| way | UNet calls/image | {unit}/evaluation (mean) | of which generating | images/{unit} generating "
          "| speedup |")
    print("|---|---|---|---|---|---|")
    for way, t in timing.items():
        speed = timing[old_name]["seconds_per_evaluation"] / t["seconds_per_evaluation"]
        print(f"| {way} | {t['unet_calls_per_image']} | {t['seconds_per_evaluation']:.1f} "
              f"({t['mean_seconds_per_evaluation']:.1f}) | "
              f"{t['generate_seconds_per_evaluation']:.1f} | {t['images_per_second']:.1f} | {speed:.2f}× |")
    if compiled:
        print(f"| {compiled['way']} | {ways[new_name].num_inference_steps * 2} | {compiled['seconds']:.1f} "
              f"(first: {compiled['first_wall_seconds']:.1f} wall) | | | "
              f"{timing[old_name]['seconds_per_evaluation'] / compiled['seconds']:.2f}× after compiling |")

    comparisons: dict[str, Any] = {}
    agree = True
    for way in list(ways)[1:]:
        comparisons[way] = {}
        print(f"\nrates, {old_name} vs {way} (same prompts and seeds, both splits pooled; 95 % Wilson intervals; "
              "Δ = new − old, paired 95 % interval):")
        print(f"| model | group | {old_name} | {way} | Δ | same label |")
        print("|---|---|---|---|---|---|")
        for label in models:
            comparisons[way][label] = {}
            for group in GROUPS:
                p = paired(runs[label][old_name]["records"], runs[label][way]["records"], group)
                comparisons[way][label][group] = p
                if way == new_name and abs(p["difference"]) > args.tolerance:
                    agree = False
                o, nw = p["old"], p["new"]
                print(f"| {label} | {group} | {pct(o['rate'])} ({o['k']}/{o['n']}, {pct(o['low'])}–{pct(o['high'])}) "
                      f"| {pct(nw['rate'])} ({nw['k']}/{nw['n']}, {pct(nw['low'])}–{pct(nw['high'])}) "
                      f"| {100 * p['difference']:+.1f} ({100 * p['difference_low']:+.1f}…"
                      f"{100 * p['difference_high']:+.1f}) | {pct(p['label_agreement'])} % |")
    speedup = timing[old_name]["seconds_per_evaluation"] / timing[new_name]["seconds_per_evaluation"]
    print(f"\nspeedup ({old_name} → {new_name}, per checkpoint evaluation): {speedup:.2f}×; rates agree "
          f"(|Δ| ≤ {args.tolerance:g} on every group and model): {agree}")
    if compiled:
        even = compiled["break_even_evaluations"]
        print(f"torch.compile: first evaluation {compiled['first_wall_seconds']:.1f} wall s (compiling: "
              f"{compiled['compile_wall_seconds']:.0f} s), then {compiled['seconds']:.1f} s (eager "
              f"{compiled['eager_seconds']:.1f}); pays after {'never' if even is None else f'{even:.0f}'} "
              f"evaluations; labels identical to eager: {compiled['same_labels']}")
    # one job: every checkpoint on validation and test (old), against validation everywhere and test only
    # at the base model and each method's chosen point (test_evaluation: chosen) with the new sampler
    split_old = timing[old_name]["seconds_per_evaluation"] / 2
    split_new = timing[new_name]["seconds_per_evaluation"] / 2
    job_old = 2 * args.job_checkpoints * split_old
    job_new = (args.job_checkpoints + args.job_methods + 1) * split_new
    job = {"checkpoints": args.job_checkpoints, "methods": args.job_methods, "old_seconds": job_old,
           "new_seconds": job_new, "speedup": job_old / job_new,
           "evaluations_old": 2 * args.job_checkpoints, "evaluations_new": args.job_checkpoints + args.job_methods + 1}
    print(f"one job's evaluations ({args.job_checkpoints} checkpoints, {args.job_methods} methods): "
          f"{job['evaluations_old']} split evaluations with {old_name} = {job_old:.0f} s, against "
          f"{job['evaluations_new']} with {new_name} and test_evaluation: chosen = {job_new:.0f} s "
          f"({job['speedup']:.2f}×)")
    if args.json:
        table = {"command": " ".join(sys.argv), "threads": args.threads, "device": args.device,
                 "clock": "wall seconds" if GPU else "CPU seconds", "concept": args.concept,
                 "models": {k: v for k, v in models.items()}, "old": old_name, "new": new_name,
                 "speedup": speedup, "rates_agree": agree, "tolerance": args.tolerance, "timing": timing,
                 "rates": comparisons, "compile": compiled, "job": job,
                 "metrics": {m: {w: runs[m][w]["metrics"] for w in ways} for m in models}}
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
