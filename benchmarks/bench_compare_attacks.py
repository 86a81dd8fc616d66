#!/usr/bin/env python
"""Seconds and rates of compare.py's attacks with the default presets, at the base model and one checkpoint.

    python benchmarks/bench_compare_attacks.py --artifact CKPT --output_dir OUT [--concept circle]

``CKPT``: an erased checkpoint of the toy world (e.g. a stage-1 ``unet_40.pth`` of ``compare.py
--quick``). At the checkpoint every row is attacked (no pre-success: the worst case for cost); at
the base model the replays and P4D attack every row too (as compare.py's sanity line does). The text
searches and the unseen references are made once (cached in ``OUT``); concept inversion on the base
model is also run from the methods' own references for comparison. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coerasing.compare.cache import Cache  # noqa: E402
from coerasing.compare.config import CompareConfig  # noqa: E402
from coerasing.compare.protocols import ToyProtocol  # noqa: E402
from coerasing.compare.runner import text_attack_prompts  # noqa: E402
from coerasing.images import list_image_files, load_images  # noqa: E402
from coerasing.methods import apply_artifact  # noqa: E402
from coerasing.methods.base import Runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--concept", default="circle")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out, concept = Path(args.output_dir), args.concept
    protocol = ToyProtocol(CompareConfig().load_presets())
    cache, pipe = Cache(out), protocol.pipeline()
    report: dict[str, Any] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = work()
        seconds = round(time.perf_counter() - start, 1)
        count = result.get("asr_interval", result) if isinstance(result, dict) else {}
        report[name] = {"seconds": seconds, **({"k": count["k"], "n": count["n"]} if "k" in count else {})}
        print(name, json.dumps(report[name]), flush=True)
        return result

    files = {name: timed(f"{name} search (once per concept)",
                         lambda name=name: text_attack_prompts(cache, protocol, pipe, concept, name))
             for name in ("ring_a_bell", "mma")}
    unseen = timed("inversion references (once per concept)", lambda: protocol.inversion_images(concept, cache))
    references = protocol.attack_references(Runtime(pipe), concept)
    every_row = {"images": [{"case": row.case, "hit": False} for row in protocol.attack_rows(concept)]}
    for label, artifact, test in (("base", None, None), ("checkpoint", args.artifact, every_row)):
        folder, made_by = out / label, {"model": label}
        work: dict[str, Callable[[Runtime], Any]] = {
            **{name: (lambda rt, file=file, name=name, test=test, folder=folder, made_by=made_by:
                      protocol.replay(rt, concept, test, file, folder / name, made_by))
               for name, file in files.items()},
            "p4d": lambda rt, test=test, folder=folder, made_by=made_by: protocol.p4d(
                rt, concept, test, references, folder / "p4d", made_by),
            "relearn": lambda rt, folder=folder, made_by=made_by: protocol.relearn(
                rt, concept, protocol.references(concept, cache), folder / "relearn", made_by),
            "inversion": lambda rt, folder=folder, made_by=made_by: protocol.concept_inversion(
                rt, concept, unseen, folder / "inversion", made_by),
        }
        for name, attack in work.items():
            runtime = apply_artifact(pipe, artifact)
            try:
                timed(f"{label} {name}", lambda attack=attack, runtime=runtime: attack(runtime))
            finally:
                runtime.close()
    own = load_images(list_image_files(protocol.references(concept, cache)))[1][:len(unseen)]
    timed("base inversion from the methods' references", lambda: protocol.concept_inversion(
        Runtime(pipe), concept, own, out / "base" / "inversion_own", {"model": "base"}))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
