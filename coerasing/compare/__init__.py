"""Erasers side by side: trade-off curves, operating points chosen on validation prompts, test results.

``python compare.py`` (docs/comparison.md): for every concept × method × training seed, train once
with checkpoints along the way (:mod:`coerasing.methods`, each method's ``trace``), evaluate every
checkpoint on validation prompts and, as the presets' ``test_evaluation`` says, every checkpoint or
only the chosen ones on test prompts (:mod:`.protocols`; each metric declared once, :mod:`.metrics`),
choose each method's operating point by one rule fixed in advance on validation prompts only
(:mod:`.select`), attack it on test prompts,
and write the results, plots and grids (:mod:`.report`). Everything is cached by its full settings
(:mod:`.cache`), so an interrupted comparison resumes, and jobs are spread over processes or GPUs
(:mod:`.runner`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoints import git_commit, machine, write_run_json
from .config import CompareConfig
from .presets import declared_candidates
from .protocols import make_protocol
from .report import write_results
from .runner import (
    default_workers,
    distributed_rank,
    job_key,
    job_path,
    launcher_environment_hidden,
    load_records,
    process_device,
    run_shard,
    spawn_workers,
    wait_for,
)


def run_comparison(config: CompareConfig, argv: Sequence[str] | None = None) -> dict[str, Path] | None:
    """Run (or resume) the comparison and write its outputs; returns their paths (main process only)."""
    config.validate()
    start = time.perf_counter()
    presets = config.load_presets()
    concepts, methods, seeds = config.lists(presets)
    jobs = [(concept, seed) for seed in seeds for concept in concepts]
    key = job_key(config, presets, methods)
    paths = [job_path(config, concept, seed, key) for concept, seed in jobs]
    rank, world = distributed_rank()
    if config.shard is not None:  # a worker started by the main process
        index, count = (int(part) for part in config.shard.split("/"))
        run_shard(config, presets, jobs, key, methods, index, count)
        return None
    if world > 1:  # accelerate launch / torchrun: every rank takes its share, rank 0 writes the results
        device = process_device(config, rank)  # LOCAL_RANK's GPU, read before the variables are hidden
        with launcher_environment_hidden():  # a job runs in one process (see the function)
            run_shard(config, presets, jobs, key, methods, rank, world, device)
        if rank != 0:
            return None
        wait_for(paths)
    else:
        workers = default_workers(config, sum(not p.exists() for p in paths) or 1)
        if workers > 1:
            spawn_workers(list(argv or []), workers, config.threads)
        else:
            run_shard(config, presets, jobs, key, methods, 0, 1)
    records = load_records(paths)
    seconds = time.perf_counter() - start
    header = (f"# Comparison: {', '.join(methods)} on {', '.join(concepts)}, training seeds "
              f"{', '.join(map(str, seeds))}{' (--quick)' if config.quick else ''}")
    info: dict[str, Any] = {"header": header, "concepts": concepts, "methods": methods, "seeds": seeds,
                            "presets": presets, "seconds_this_run": round(seconds, 1),
                            "machine": machine(), "git_commit": git_commit(),
                            "candidates": {method: declared_candidates(presets, method) for method in methods}}
    outputs = write_results(config.output_dir, records, methods, info, make_protocol(config, presets, "cpu").metrics)
    write_run_json(config.output_dir, vars(config), seconds_this_run=round(seconds, 1), jobs=len(jobs))
    print(f"results: {outputs['md']} (this run: {seconds:.0f} s)")
    return outputs


__all__ = ["CompareConfig", "run_comparison"]
