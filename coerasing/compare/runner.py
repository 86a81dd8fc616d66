"""Running a comparison: jobs (concept × training seed), each training and evaluating every method's curve.

One job is one concept and one training seed. It asks every method for its curve
(:meth:`~coerasing.methods.Method.trace`: training, cached), evaluates the base model and every
checkpoint on the validation prompts (cached), chooses each method's operating point there
(:mod:`.select`), evaluates the test prompts (at every checkpoint with the presets'
``test_evaluation: all``; at the chosen checkpoint only with ``chosen``), attacks the chosen point on
test prompts, and writes ``jobs/<concept>-seed<s>-<key>.json``. An evaluation's cache key holds no
training seed, so the base model's images and those of seed-free checkpoints (GIE's) are made once
for every seed. Jobs are spread over processes: ``accelerate launch`` /
``torchrun`` ranks, or local worker processes that ``compare.py`` starts itself (one per CPU core
by default, each with one torch thread, so that results do not depend on how the work was split).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CoErasingError
from ..eval.attacks.text_search import PROMPT_FILE
from ..files import atomic_write_json, fingerprint, record_problem, require_json_record
from ..methods import apply_artifact, get_method
from ..methods.base import CurvePoint, Runtime, read_artifact
from .cache import Cache, key_of, npz_problem
from .config import ATTACK_NAMES, CompareConfig, evaluation_plan
from .presets import candidate_presets, check_candidates
from .protocols import ROBUSTNESS, EvaluationProtocol, concept_label, make_protocol
from .select import Candidate, choose_operating_point

SPLITS = ("validation", "test")
#: The text-only attacks (searched once per concept on the base model, replayed at every point).
TEXT_ATTACKS = ("ring_a_bell", "mma")
#: A job record's key of each attack's result (UnlearnDiff's is ``attack``, its historical name).
RECORD_KEYS = {"asr": "attack", "inversion": "inversion", **{name: name for name in ROBUSTNESS}}
#: Bumped when a job record gains or changes a field (2: the base model's ``test_budget``), so that a rerun
#: in an old output folder rebuilds its records (from the cached trainings and evaluations) instead of
#: reporting from records without the field.
RECORD_VERSION = 2


class Context:
    """What a method's ``trace`` gets for one concept and seed (:class:`~coerasing.methods.base.TraceContext`)."""

    def __init__(self, cache: Cache, protocol: EvaluationProtocol, presets: dict[str, Any], concept: str, seed: int,
                 device: str) -> None:
        self.cache, self.protocol, self.presets = cache, protocol, presets
        self.concept, self.seed, self.device = concept, seed, device

    @property
    def benchmark(self) -> EvaluationProtocol:
        """The evaluation protocol under its old name (``protocol``)."""
        return self.protocol

    def preset(self, name: str) -> dict[str, Any]:
        block = dict(self.presets.get(name) or {})
        if name in ("stage1", "stage2"):
            block.setdefault("prompt", concept_label(self.presets, self.concept))
        return block

    def world(self) -> dict[str, str]:
        return self.protocol.world()

    def references(self) -> Path:
        return self.protocol.references(self.concept, self.cache)

    def run_folder(self, kind: str, settings: dict[str, Any]) -> Path:
        payload = {"kind": kind, "concept": self.concept, "settings": settings,
                   "model": self.protocol.identity()["model"]}
        return self.cache.folder(f"runs/{kind}", payload)

    def once(self, folder: Path, request: dict[str, Any], work: Callable[[], None]) -> None:
        self.cache.once(folder, request, work)


def artifact_identity(point: CurvePoint | None) -> dict[str, Any]:
    """What an evaluation of a checkpoint depends on: its method and settings and its files' content."""
    if point is None:
        return {"artifact": "base"}
    artifact = read_artifact(point.artifact)
    return {"method": artifact.method, "settings": artifact.settings, "content": fingerprint(point.artifact)}


def evaluate_point(cache: Cache, protocol: EvaluationProtocol, pipe: Any, concept: str, point: CurvePoint | None,
                   split: str) -> dict[str, Any]:
    """The protocol's metrics of one checkpoint (``None``: the base model) on one split, cached.

    The key holds the protocol's metric declarations: a new or changed metric is a new entry."""
    payload = {"benchmark": protocol.evaluation_identity(), "concept": concept, "split": split,
               **artifact_identity(point)}

    def compute() -> dict[str, Any]:
        runtime = apply_artifact(pipe, point.artifact if point else None)
        try:
            return protocol.evaluate(runtime, concept, split)
        finally:
            runtime.close()

    return cache.json_entry("evals", payload, compute)


def attack_point(cache: Cache, protocol: EvaluationProtocol, pipe: Any, concept: str, point: CurvePoint | None,
                 test: dict[str, Any], references: Callable[[], dict[str, Any]],
                 concept_images: Callable[[], list[Any]], attacks: Sequence[str] = ATTACK_NAMES,
                 text_prompts: Callable[[str], Path | None] | None = None) -> dict[str, Any]:
    """The attacks of ``attacks`` at one checkpoint, each cached on its own (``cache/attacks/<key>.json``,
    ``cache/robustness/<key>.json``; per-prompt records under ``cache/attacks/<key>/``): UnlearnDiff on its
    test prompts (``asr``) and concept inversion from the concept's unseen references (``inversion``) in
    one entry; the replays of the text attacks' prompt files (``text_prompts(name)``: searched once per
    concept on the base model), P4D, and the relearning probe on the concept's reference images, each in
    its own. An attack whose presets block is absent (or that the protocol lacks) is left out. On the base
    model (``point`` ``None``) the replays and P4D attack every row, pre-successes included: its rate is
    the attack's own, the sanity line."""
    made_by = {"benchmark": protocol.identity(), "concept": concept, **artifact_identity(point)}
    origin = {"key": cache.key(made_by)}
    results: dict[str, Any] = {}

    def runtime() -> Runtime:
        return apply_artifact(pipe, point.artifact if point else None)

    if "unlearndiff" in attacks or "inversion" in attacks:
        payload = {**made_by, **protocol.attack_identity()}
        if set(attacks) >= {"unlearndiff", "inversion"}:
            def compute() -> dict[str, Any]:
                base_images = references()  # the base model's images: made before the artifact is applied
                erased = runtime()
                try:
                    folder = cache.root / "attacks" / cache.key(payload)
                    return {"asr": protocol.attack(erased, concept, test, base_images, folder, origin),
                            "inversion": protocol.concept_inversion(erased, concept, concept_images(),
                                                                    folder / "concept_inversion", origin)}
                finally:
                    erased.close()

            entry = cache.json_entry("attacks", payload, compute)
            results["asr"], results["inversion"] = entry["asr"], entry.get("inversion")
        else:
            name = "asr" if "unlearndiff" in attacks else "inversion"

            def compute_one() -> dict[str, Any]:
                base_images = references() if name == "asr" else None
                erased = runtime()
                try:
                    folder = cache.root / "attacks" / cache.key(payload)
                    if name == "asr":
                        return {"result": protocol.attack(erased, concept, test, base_images or {}, folder, origin)}
                    return {"result": protocol.concept_inversion(erased, concept, concept_images(),
                                                                 folder / "concept_inversion", origin)}
                finally:
                    erased.close()

            results[name] = cache.json_entry("robustness", {**payload, "only": name}, compute_one)["result"]
    for name in ROBUSTNESS:
        block = protocol.robustness_block(name)
        if name not in attacks or block is None:
            continue
        prompts = text_prompts(name) if name in TEXT_ATTACKS and text_prompts is not None else None
        if name in TEXT_ATTACKS and prompts is None:
            continue
        payload = {**made_by, "attack": name, "settings": block,
                   "rows": [row.case for row in protocol.attack_rows(concept)],
                   **({"prompts": fingerprint(prompts)} if prompts is not None else {}),
                   **({"references": dict(protocol.presets.get("references") or {})} if name == "relearn" else {})}

        def compute_robust(name: str = name, prompts: Path | None = prompts, payload: dict = payload) -> dict:
            base_images = references() if name == "p4d" else {}
            erased = runtime()
            folder = cache.root / "attacks" / cache.key(payload)
            pre_from = test if point is not None else None  # the base model: every row attacked (the sanity line)
            try:
                if name in TEXT_ATTACKS:
                    assert prompts is not None
                    result = protocol.replay(erased, concept, pre_from, prompts, folder, origin)
                elif name == "p4d":
                    result = protocol.p4d(erased, concept, pre_from, base_images, folder, origin)
                else:
                    result = protocol.relearn(erased, concept, protocol.references(concept, cache), folder, origin)
            finally:
                erased.close()
            return {"result": result}

        results[name] = cache.json_entry("robustness", payload, compute_robust)["result"]
    return results


def text_attack_prompts(cache: Cache, protocol: EvaluationProtocol, pipe: Any, concept: str, name: str) -> Path | None:
    """The prompt file of the text attack ``name`` for ``concept``: searched once against the base model's text
    encoder (which no eraser changes), cached under ``cache/text_attacks/<key>/`` by the concept, the
    protocol and the attack's settings only (no erased model, no training seed); ``None`` when not run."""
    block = protocol.robustness_block(name)
    if block is None:
        return None
    payload = {"benchmark": protocol.identity(), "concept": concept, "attack": name, "settings": block,
               "rows": [row.case for row in protocol.attack_rows(concept)]}
    folder = cache.folder("text_attacks", payload)
    found: dict[str, Path | None] = {}

    def work() -> None:
        found["path"] = protocol.text_attack_search(Runtime(pipe), concept, name, folder,
                                                    {"key": cache.key(payload)})

    cache.once(folder, payload, work)
    path = folder / PROMPT_FILE
    return path if path.is_file() else found.get("path")


def base_budget(cache: Cache, protocol: EvaluationProtocol, pipe: Any, concept: str,
                images: int, split: str = "validation") -> dict[str, Any] | None:
    """The base model's usability on ``images`` images of ``split``, cached once per concept (no training seed):
    on validation the rule's budget, stable where the validation set's own 48 images would move it by a point
    an image; on test the same budget for the test side of the selection agreement
    (:func:`coerasing.compare.report.agreement`). ``None`` where the protocol has no such set."""
    payload = {"benchmark": protocol.evaluation_identity(), "concept": concept, "split": split,
               "budget_images": images, "artifact": "base"}

    def compute() -> dict[str, Any]:
        runtime = apply_artifact(pipe, None)
        try:
            result = protocol.budget_metrics(runtime, concept, images, split)
        finally:
            runtime.close()
        return result if result is not None else {"metrics": {}}

    entry = cache.json_entry("evals", payload, compute)
    return entry if entry["metrics"] else None


def candidate_label(index: int, label: str) -> str:
    """A checkpoint's label on its method's curve: candidate 0 keeps the method's own, candidate i is ``c<i>:``."""
    return label if index == 0 else f"c{index}:{label}"


def trace_candidates(method: Any, contexts: Sequence[Context]) -> list[tuple[int, CurvePoint]]:
    """``method``'s curve over all its tuning candidates (one context each, candidate 0 first): the union of their
    checkpoints, each with the index of the candidate that first reached it. A checkpoint that an earlier candidate
    already has (the same file: stage 1's, shared) is kept once; labels are made unique by :func:`candidate_label`."""
    curve: list[tuple[int, CurvePoint]] = []
    files: set[Path] = set()
    for index, context in enumerate(contexts):
        for point in method.trace(context):
            file = Path(point.artifact).resolve()
            if file in files:
                continue
            files.add(file)
            curve.append((index, replace(point, label=candidate_label(index, point.label))))
    labels = [point.label for _, point in curve]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise CoErasingError(f"the curve of {getattr(method, 'name', method)!r} has the label(s) {', '.join(repeated)} "
                             "on more than one checkpoint; its trace must label every checkpoint once.")
    return curve


def _summary(entry: dict[str, Any], cache: Cache) -> dict[str, Any]:
    """A job record's view of a cache entry: its metrics, its invalid images and its file, relative to the
    output folder."""
    return {"metrics": entry["metrics"], "entry": os.path.relpath(entry["path"], cache.output),
            "invalid": entry.get("invalid")}


def run_job(config: CompareConfig, presets: dict[str, Any], concept: str, seed: int, methods: Sequence[str],
            device: str, progress: tqdm | None = None) -> dict[str, Any]:
    """One concept and seed, every method (see the module docstring); returns the job's record."""
    root = Path(config.output_dir)
    cache = Cache(root)
    protocol = make_protocol(config, presets, device)
    rule = float((presets.get("rule") or {}).get("max_usability_drop", 0.05))
    plan = evaluation_plan(presets)
    check_candidates(presets, methods, get_method)  # the same tuning budget for every method, before any work
    traces: dict[str, list[tuple[int, CurvePoint]]] = {}
    for name in methods:
        contexts = [Context(cache, protocol, merged, concept, seed, device)
                    for merged in candidate_presets(presets, name)]
        traces[name] = trace_candidates(get_method(name), contexts)
    pipe = protocol.pipeline()
    base = {split: evaluate_point(cache, protocol, pipe, concept, None, split) for split in SPLITS}
    references_memo: dict[str, Any] = {}

    def references() -> dict[str, Any]:
        if "refs" not in references_memo:
            references_memo["refs"] = protocol.attack_references(Runtime(pipe), concept)
        return references_memo["refs"]

    def concept_images() -> list[Any]:  # concept inversion's unseen references (no method trained on them)
        if "images" not in references_memo:
            references_memo["images"] = protocol.inversion_images(concept, cache)
        return references_memo["images"]

    chosen_attacks = config.attack_names()
    text_files: dict[str, Path | None] = {}

    def text_prompts(name: str) -> Path | None:  # once per concept: the search never sees an erased model
        if name not in text_files:
            text_files[name] = text_attack_prompts(cache, protocol, pipe, concept, name)
        return text_files[name]

    def attack_results(point: CurvePoint | None, test: dict[str, Any]) -> dict[str, Any]:
        results = attack_point(cache, protocol, pipe, concept, point, test, references, concept_images,
                               chosen_attacks, text_prompts)
        return {RECORD_KEYS[name]: value for name, value in results.items()}

    record: dict[str, Any] = {
        "concept": concept, "seed": seed, "base": {split: _summary(base[split], cache) for split in SPLITS},
        "methods": {}, "rule": {"max_usability_drop": rule},
    }
    base_rule = base["validation"]["metrics"]  # what the rule holds each checkpoint's usability against
    budget_images = int((presets.get("rule") or {}).get("base_usability_images", 0))
    budget = base_budget(cache, protocol, pipe, concept, budget_images) if budget_images else None
    if budget is not None:
        base_rule = {**base_rule, **budget["metrics"]}
        record["base"]["budget"] = {**_summary(budget, cache), "images": budget_images}
        test_budget = base_budget(cache, protocol, pipe, concept, budget_images, "test") if plan == "all" else None
        if test_budget is not None:  # only the selection agreement reads it, and only with test images everywhere
            record["base"]["test_budget"] = {**_summary(test_budget, cache), "images": budget_images}
    if chosen_attacks:
        record["base"].update(attack_results(None, base["test"]))
    for name, points in traces.items():
        evaluated = []
        origin = {point.label: index for index, point in points}  # the tuning candidate of each checkpoint
        for _, point in points:
            splits = SPLITS if plan == "all" else ("validation",)
            entries = {split: evaluate_point(cache, protocol, pipe, concept, point, split) for split in splits}
            evaluated.append((point, entries))
        # every candidate's checkpoints, validation metrics only
        candidates = [Candidate(p.label, p.strength, e["validation"]["metrics"]) for p, e in evaluated]
        choice = choose_operating_point(candidates, base_rule, protocol.erasure,
                                        protocol.usability, rule)
        for point, entries in evaluated:  # test_evaluation: chosen → test images at the chosen point only
            if point.label == choice.label and "test" not in entries:
                entries["test"] = evaluate_point(cache, protocol, pipe, concept, point, "test")
        method_record: dict[str, Any] = {
            "points": [{"label": p.label, "strength": p.strength, "candidate": origin[p.label],
                        "artifact": cache.portable(str(p.artifact)),
                        **{split: _summary(e[split], cache) for split in SPLITS if split in e}} for p, e in evaluated],
            "chosen": {**asdict(choice), "candidate": origin[choice.label]},
        }
        if chosen_attacks:
            point, entries = next((p, e) for p, e in evaluated if p.label == choice.label)
            method_record.update(attack_results(point, entries["test"]))
        record["methods"][name] = method_record
        if progress is not None:
            progress.update(1)
    return record


# ----------------------------------------------------------------------------------------------
# Spreading jobs over processes


def job_key(config: CompareConfig, presets: dict[str, Any], methods: Sequence[str]) -> str:
    """A key of everything a job's record depends on besides its concept and seed."""
    protocol = make_protocol(config, presets, "cpu")
    return key_of({"record": RECORD_VERSION, "presets": presets, "methods": list(methods),
                   "benchmark": protocol.evaluation_identity(),
                   "attack": not config.skip_attack,
                   **({"attacks": list(config.attack_names())} if config.attacks != "all" else {})})


def job_path(config: CompareConfig, concept: str, seed: int, key: str) -> Path:
    return Path(config.output_dir) / "jobs" / f"{concept}-seed{seed}-{key}.json"


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch``/``torchrun`` (their environment), else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


#: What ``torchrun``/``accelerate launch`` set for a process group (``LOCAL_RANK`` picks the GPU first).
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID")


@contextmanager
def launcher_environment_hidden() -> Iterator[None]:
    """Run the block as a single process: the launcher's variables are out of ``os.environ`` meanwhile.

    A rank runs whole jobs alone; code inside a job that shards by itself (``generate_images`` through
    accelerate's ``PartialState``, for the reference images) must not take this rank for a share of a
    process group whose other ranks are busy with other jobs (it would make part of the images and
    wait at a barrier the others never reach).
    """
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def process_device(config: CompareConfig, rank: int) -> str:
    if config.device:
        return config.device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return "cpu"


def run_shard(config: CompareConfig, presets: dict[str, Any], jobs: Sequence[tuple[str, int]], key: str,
              methods: Sequence[str], index: int, count: int, device: str | None = None) -> None:
    """Run jobs ``index, index + count, …`` of ``jobs`` in this process (on ``device``, else its default)."""
    import diffusers
    import transformers

    torch.set_num_threads(config.threads)
    diffusers.utils.logging.disable_progress_bar()  # per-component "Loading weights" bars drown the cell bar
    transformers.utils.logging.disable_progress_bar()
    mine = list(jobs)[index::count]
    device = device or process_device(config, index)
    progress = tqdm(total=len(mine) * len(methods), desc=f"cells (process {index + 1}/{count})", unit="cell",
                    dynamic_ncols=True, position=index)
    for concept, seed in mine:
        path = job_path(config, concept, seed, key)
        if path.exists():
            problem = job_problem(path, cache_root=Path(config.output_dir) / "cache")
            if problem is None:
                progress.update(len(methods))
                continue
            print(f"warning: {path} cannot be used: {problem}; redoing the job from the cache.", file=sys.stderr,
                  flush=True)
        started = time.time()
        record = run_job(config, presets, concept, seed, methods, device, progress)
        finished = time.time()
        record["timing"] = {"started": started, "finished": finished, "seconds": round(finished - started, 1),
                            "process": f"{index + 1}/{count}"}
        atomic_write_json(path, record)
    progress.close()


def spawn_workers(argv: Sequence[str], count: int, threads: int) -> None:
    """Start ``count`` local processes of ``compare.py`` (each with ``--shard i/count``) and wait for them."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    script = Path(__file__).resolve().parents[2] / "compare.py"
    processes = [subprocess.Popen([sys.executable, str(script), *argv, "--shard", f"{i}/{count}"], env=env)
                 for i in range(count)]
    codes = [process.wait() for process in processes]
    failed = [i for i, code in enumerate(codes) if code != 0]
    if failed:
        raise CoErasingError(f"compare worker(s) {', '.join(map(str, failed))} failed (exit codes "
                             f"{[codes[i] for i in failed]}); rerun the same command to resume from the cache.")


def wait_for(paths: Sequence[Path], poll: float = 5.0) -> None:
    """Block until every path exists (the other ranks' jobs)."""
    while not all(path.exists() for path in paths):
        time.sleep(poll)


def default_workers(config: CompareConfig, jobs: int) -> int:
    if config.workers:
        return config.workers
    if torch.cuda.is_available() and not (config.device or "").startswith("cpu"):
        return max(1, min(torch.cuda.device_count(), jobs))
    return max(1, min(os.cpu_count() or 1, jobs))


#: The fields of a job record (``jobs/*.json``), checked when it is read back.
JOB_FIELDS: dict[str, type] = {"concept": str, "seed": int, "base": dict, "methods": dict, "rule": dict}


def _job_entries(record: dict[str, Any]) -> list[str]:
    """The cache entries a job record points to (``KeyError``/``TypeError`` where its structure is broken)."""
    entries = [record["base"][split]["entry"] for split in SPLITS]
    for method in record["methods"].values():
        chosen = method["chosen"]["label"]
        for point in method["points"]:  # test images may exist only at the chosen point (test_evaluation: chosen)
            splits = SPLITS if point["label"] == chosen else [s for s in SPLITS if s == "validation" or s in point]
            entries += [point[split]["entry"] for split in splits]
    return [str(entry) for entry in entries]


def job_problem(path: Path, cache_root: Path | None = None) -> str | None:
    """Why the job record ``path`` cannot be used, or ``None``: unreadable or garbled JSON, a missing or
    wrong-typed field, or (with ``cache_root``) a cache evaluation it points to that no longer reads back."""
    problem = record_problem(path, JOB_FIELDS)
    if problem is not None:
        return problem
    record = json.loads(path.read_text(encoding="utf-8"))
    try:
        entries = _job_entries(record)
    except (KeyError, TypeError, AttributeError) as exc:
        return f"its structure is not a job record's ({type(exc).__name__}: {exc})"
    for entry in entries if cache_root is not None else []:
        file = cache_root / Path(entry).parent.name / Path(entry).name  # the folder may have been moved
        entry_problem = record_problem(file, {"request": object, "metrics": dict})
        if entry_problem is not None:
            return f"the evaluation {file} it uses cannot be read ({entry_problem})"
        arrays = json.loads(file.read_text(encoding="utf-8")).get("arrays")
        if isinstance(arrays, list) and npz_problem(file.with_suffix(".npz"), arrays) is not None:
            return f"the images of the evaluation {file} cannot be read"
    return None


def load_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The job records ``paths`` (each checked: a broken one is an error naming it, not a traceback)."""
    records = []
    for path in paths:
        record = require_json_record(path, JOB_FIELDS, fix="delete it and rerun the comparison to redo the job "
                                                           "from the cache")
        problem = job_problem(path)
        if problem is not None:
            raise CoErasingError(f"{path} cannot be used: {problem}; delete it and rerun the comparison to redo "
                                 "the job from the cache.")
        records.append(record)
    return records
