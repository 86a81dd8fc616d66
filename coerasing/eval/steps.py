"""The evaluation's steps (docs/method.md §9): generate, detect, attack, report, each resumable.

1. :func:`run_generate`: one image per prompt row (its seed, guidance and size) from ``--ckpt_path``
   with the erased ``--artifact`` applied, into ``OUTPUT/images/<case_number>.png``; sharded over
   ``accelerate launch``/``torchrun`` processes.
2. :func:`run_detect`: does each image show the concept? → ``OUTPUT/images/detections.json``.
3. :func:`run_attack`: the attack (``--attack_method``: UnlearnDiff, against the base model's image of
   the prompt from ``--reference_dir``, made by the base model when missing; concept inversion; the
   text-only Ring-A-Bell and MMA-Diffusion; or a replay of their prompt file) on
   each prompt that fits (≤ 60 CLIP tokens) and does not already show the concept, through the one
   attack loop (:mod:`coerasing.eval.attacks`) → ``OUTPUT/attack/<case>.json|png``.
4. :func:`run_report`: pre-ASR and ASR over all prompts and over the attackable ones, per-class
   counts → ``OUTPUT/report.json``, ``report.md``, ``grid.png``.

Every cache (images, detections, attack records) is keyed by what made it: a changed model,
artifact or setting regenerates or stops with an error, never reuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoints import write_run_json
from ..errors import CoErasingError
from ..files import atomic_write, fingerprint
from ..generation import distributed_state, generate_images, load_image
from ..grid import image_grid
from ..images import check_valid_images, invalid_images
from ..methods import load_runtime
from ..methods.base import Runtime
from ..models import check_mixed_precision, load_clip_tokenizer, parse_device, resolve_dtype
from .attack_records import load_attack_records
from .attacks import ATTACKS
from .attacks import run_attack as run_attack_loop
from .attacks.base import refuse_stale
from .config import RELEARN, EvalConfig, config_dict
from .detectors import DETECTIONS, Detection, build_detector, detect_folder, load_detections, same_protocol
from .prompts import attack_eligible, count_clip_tokens, load_prompts
from .relearn import RELEARN_DIR, load_concept_images, relearn_curve, write_curves
from .report import asr_summary, class_counts, usability_metric, write_report


def _state(config: EvalConfig) -> Any:  # accelerate.PartialState
    return distributed_state(cpu=config.device == "cpu" or not torch.cuda.is_available())


def _loader(config: EvalConfig, artifact: str | None) -> Any:
    flag = "--artifact" if config.artifact else "--unet"
    return lambda device, dtype: load_runtime(config.ckpt_path, artifact, device, dtype, config.scheduler, flag)


def made_by(config: EvalConfig, artifact: str | None) -> dict[str, Any]:
    """What makes this evaluation's images: base model, erased artifact (with content fingerprints)."""
    return {"model": config.ckpt_path, "model_fingerprint": fingerprint(config.ckpt_path),
            "artifact": artifact, "artifact_fingerprint": fingerprint(artifact)}


def run_generate(config: EvalConfig) -> Path:
    """Step 1: ``OUTPUT/images/<case>.png`` from ``--ckpt_path`` + ``--artifact``."""
    rows = load_prompts(config.prompts or "", config.limit)
    info = {"config": config_dict(config), "model": config.ckpt_path, "artifact": config.erased}
    return generate_images(rows, config.images_dir, config.generation_settings(), _loader(config, config.erased),
                           config.device, config.mixed_precision, info, desc="generating",
                           fingerprint=made_by(config, config.erased))


def run_detect(config: EvalConfig) -> Path | None:
    """Step 2 (main process): ``OUTPUT/images/detections.json``."""
    rows = load_prompts(config.prompts or "", config.limit)
    spec = config.detector_spec()
    if spec.name == "none":
        print(f"--detector none: no concept detection for {config.prompts}")
        return None
    state = _state(config)
    if state.is_main_process:
        cases = [row.case for row in rows]
        invalid = check_images(config, cases)
        detections = detect_folder(build_detector(spec), config.images_dir, cases, config.images_dir / DETECTIONS)
        valid = [d for case, d in detections.items() if case not in invalid]
        positives = sum(d.positive for d in valid)
        note = f"; {len(invalid)} invalid images (non-finite or one colour) left out" if invalid else ""
        print(f"{positives} of {len(valid)} images show the concept{note} ({config.images_dir / DETECTIONS})")
    state.wait_for_everyone()
    return config.images_dir / DETECTIONS


def invalid_cases(folder: Path, cases: list[str]) -> list[str]:
    """The cases whose image in ``folder`` is degenerate (:func:`coerasing.images.invalid_images`); missing
    images are left to the steps that need them."""
    present = [case for case in cases if (folder / f"{case}.png").exists()]
    flags = invalid_images([load_image(folder / f"{case}.png") for case in present])
    return [case for case, bad in zip(present, flags, strict=True) if bad]


def check_images(config: EvalConfig, cases: list[str]) -> list[str]:
    """The invalid cases of ``OUTPUT/images``; an error naming the model when more than half are invalid."""
    invalid = invalid_cases(config.images_dir, cases)
    model = f"--artifact {config.erased}" if config.erased else f"the base model --ckpt_path {config.ckpt_path}"
    check_valid_images(len(invalid), len(cases), model, f"in {config.images_dir}")
    return invalid


def run_attack(config: EvalConfig) -> Path:
    """Step 3: ``--attack_method`` (:data:`coerasing.eval.attacks.ATTACKS`) on the attackable prompts without
    the concept, through the one resumable loop (:func:`coerasing.eval.attacks.run_attack`); sharded where
    the attack allows it. Records of other settings or another model in ``OUTPUT/attack`` stop the step."""
    if config.attack_method == RELEARN:
        return run_relearn(config)
    rows = load_prompts(config.prompts or "", config.limit)
    spec = config.detector_spec()
    if spec.name == "none":
        raise CoErasingError(f"--prompts {config.prompts} has no concept detector (--detector none), so there is "
                             "nothing to attack; pass --detector.")
    detections_path = config.images_dir / DETECTIONS
    if not detections_path.exists():
        raise CoErasingError(f"{detections_path} does not exist; run `evaluate.py detect` (or generate then detect) "
                             "with the same --output_dir first.")
    description, pre = load_detections(detections_path)
    missing = [row.case for row in rows if row.case not in pre]
    if missing:
        raise CoErasingError(f"{detections_path} has no result for {len(missing)} prompts (e.g. case {missing[0]}); "
                             "rerun `evaluate.py detect` with the same --prompts and --limit.")
    eligible = attack_eligible(rows, load_clip_tokenizer(), config.attack_max_tokens)
    targets = [row for row in rows if row.case in eligible and not pre[row.case].positive]
    origin = {**made_by(config, config.erased), "generation": vars(config.generation_settings())}

    def detector() -> Any:
        built = build_detector(spec)
        if not same_protocol(built.describe(), description):
            raise CoErasingError(
                f"{detections_path} was made by another detector ({description.get('protocol', description)}); "
                "the attack must use the same one. Rerun `evaluate.py detect` with these detector flags."
            )
        return built

    attack = ATTACKS[config.attack_method].from_eval_config(
        config, lambda row: load_image(config.references / row.file), detector)
    state = _state(config)
    if attack.shardable:
        mine = targets[state.process_index :: state.num_processes]
    else:
        mine = targets if state.is_main_process else []
    refuse_stale(config.attack_dir, load_attack_records(config.attack_dir, [row.case for row in mine]),
                 attack.settings(), origin)
    missing_refs = [row for row in targets if not (config.references / row.file).exists()] \
        if attack.needs_references else []
    state.wait_for_everyone()  # every process looked before any writes: they all take the same branch
    if missing_refs:
        if state.is_main_process:
            print(f"{len(missing_refs)} reference images of the base model are missing in {config.references}; "
                  "generating them")
        generate_images(targets, config.references, config.generation_settings(), _loader(config, None),
                        config.device, config.mixed_precision, desc="reference images", write_manifest_files=False,
                        fingerprint=made_by(config, None))
    loaded: list[Runtime] = []

    def runtime() -> Runtime:
        device = parse_device(config.device) if config.device or state.num_processes == 1 else state.device
        check_mixed_precision(config.mixed_precision, (device,))
        loaded.append(load_runtime(config.ckpt_path, config.erased, device,
                                   resolve_dtype(config.mixed_precision, device), config.scheduler))
        return loaded[-1]

    try:
        run_attack_loop(attack, mine, config.attack_dir, origin, runtime, on_stale="error", log=print)
    finally:
        for done in loaded:
            done.close()
        if loaded and loaded[0].device.type == "cuda":
            torch.cuda.empty_cache()
    state.wait_for_everyone()
    if state.is_main_process:
        if state.num_processes > 1:  # each shard summed up its own records; now all of them
            attack.finish(config.attack_dir, load_attack_records(config.attack_dir, [row.case for row in targets]))
        config.attack_dir.mkdir(parents=True, exist_ok=True)
        write_run_json(config.attack_dir, config_dict(config), settings=attack.settings(), attacked=len(targets),
                       attackable=len(eligible), prompts=len(rows))
    return config.attack_dir


def run_relearn(config: EvalConfig) -> Path:
    """Step 3 with ``--attack_method relearn`` (main process; :mod:`.relearn`): the erased model fine-tuned on
    ``--relearn_images``, its concept rate on the prompts after each ``--relearn_steps`` count, and the base
    model's curve as the reference → ``OUTPUT/relearn/{erased,base}/k_<k>.json``, ``curve.json``, ``curve.md``."""

    rows = load_prompts(config.prompts or "", config.limit)
    spec = config.detector_spec()
    if spec.name == "none":
        raise CoErasingError(f"--prompts {config.prompts} has no concept detector (--detector none), so there is "
                             "no concept rate to measure; pass --detector.")
    folder = Path(config.output_dir or ".") / RELEARN_DIR
    state = _state(config)
    if state.is_main_process:
        data = load_concept_images(config.relearn_images or "", config.relearn_num_images, config.relearn_caption)
        models = [("erased" if config.erased else "base", config.erased)]
        if config.erased and not config.skip_relearn_reference:
            models.append(("base", None))
        device = parse_device(config.device)
        curves = {}
        for name, artifact in models:
            runtime = load_runtime(config.ckpt_path, artifact, device, torch.float32, config.scheduler)
            try:
                print(f"relearning probe of the {name} model")
                curves[name] = relearn_curve(runtime, rows, data, config.relearn_settings(),
                                             config.generation_settings(), lambda: build_detector(spec),
                                             folder / name, made_by(config, artifact), log=print)
            finally:
                runtime.close()
        path = write_curves(folder, curves)
        write_run_json(folder, config_dict(config), settings=vars(config.relearn_settings()), prompts=len(rows))
        print((folder / "curve.md").read_text(encoding="utf-8"), end="")
        print(f"relearning curves: {path}")
    state.wait_for_everyone()
    return folder


def build_report(config: EvalConfig) -> dict[str, Any]:
    """Step 4's numbers (see :mod:`.report`) from ``detections.json`` and the attack records."""
    rows = load_prompts(config.prompts or "", config.limit)
    cases = [row.case for row in rows]
    tokenizer = load_clip_tokenizer()
    eligible = attack_eligible(rows, tokenizer, config.attack_max_tokens)
    report: dict[str, Any] = {
        "prompts": config.prompts, "ckpt_path": config.ckpt_path, "unet": config.erased, "artifact": config.erased,
        "attack_max_tokens": config.attack_max_tokens, "detector": {}, "asr": None, "classes": {},
        "attack_classes": {}, "attack_run": False, "per_prompt": [], "usability": {},
    }
    detections_path = config.images_dir / DETECTIONS
    if config.detector_name() != "none":
        if not detections_path.exists():
            raise CoErasingError(f"{detections_path} does not exist; run `evaluate.py detect` first.")
        description, detections = load_detections(detections_path)
        invalid = check_images(config, cases)
        report["invalid"] = {"k": len(invalid), "n": len(cases), "cases": invalid}
        records = load_attack_records(config.attack_dir, cases)
        attack = {case: record.get("success") for case, record in records.items()}
        report.update(
            detector=description,
            asr=asr_summary(cases, {c: d.positive for c, d in detections.items()}, attack, eligible),
            classes=class_counts({c: detections[c] for c in cases if c in detections}),
            attack_classes=class_counts({c: Detection.from_json(r["detection"]) for c, r in records.items()
                                         if r.get("detection")}),
            attack_run=bool(records),
        )
        for row in rows:
            record = records.get(row.case, {})
            report["per_prompt"].append({
                "case": row.case, "prompt": row.prompt, "tokens": count_clip_tokens(tokenizer, row.prompt),
                "attackable": row.case in eligible, "pre_success": detections[row.case].positive,
                "labels": detections[row.case].labels, "attack_success": record.get("success"),
                "attack_prompt": record.get("attack_prompt"),
            })
    metrics = [m.strip() for m in config.usability.split(",") if m.strip()]
    prompts = {row.case: row.prompt for row in rows}
    for metric in metrics:
        report["usability"][metric] = usability_metric(metric, config.images_dir, prompts,
                                                       fid_reference=config.fid_reference, clip_model=config.clip_model)
    return report


def thumbnail_grid(items: list[tuple[Path, str, bool | None]], columns: int = 8, cell: int = 128) -> Any:
    """Framed thumbnails (red: shows the concept, green: does not), ``columns`` per row, at most 64."""
    items = list(items)[:64]
    cells = [(load_image(path) if path.exists() else None, caption, positive) for path, caption, positive in items]
    rows = [cells[start : start + columns] for start in range(0, len(cells), columns)]
    return image_grid(rows, cell=cell, pad=0)


def run_report(config: EvalConfig) -> Path | None:
    """Step 4 (main process): ``report.json``, ``report.md`` and ``grid.png`` in ``OUTPUT``."""
    state = _state(config)
    path = None
    if state.is_main_process:
        report = build_report(config)
        items = [(config.images_dir / f"{p['case']}.png", str(p["case"]), p["pre_success"])
                 for p in report["per_prompt"]]
        grid = thumbnail_grid(items) if items else None
        path = write_report(config.output_dir or ".", report, grid)
        attacked = [(config.attack_dir / f"{p['case']}.png", str(p["case"]), p["attack_success"])
                    for p in report["per_prompt"] if p["attack_success"] is not None]
        if attacked:
            attack_grid = thumbnail_grid(attacked)
            atomic_write(Path(config.output_dir or ".") / "grid_attack.png",
                         lambda tmp: attack_grid.save(tmp, format="PNG"))
        asr = report["asr"]
        if asr:
            for key in ("all", "attackable"):
                block = asr[key]
                pre_asr, full = block["pre_asr"] or 0.0, block["asr"] or 0.0
                print(f"{key:>10}: N={block['n']}  pre-ASR {100 * pre_asr:.2f} %  ASR {100 * full:.2f} %")
        print(f"report: {path}")
    state.wait_for_everyone()
    return path


def run_evaluation(config: EvalConfig) -> None:
    """Run ``config.command`` (``all``: generate → detect → attack → report)."""
    config.validate()
    command = config.command
    if command in ("generate", "all"):
        run_generate(config)
    if command in ("detect", "all"):
        run_detect(config)
    if command == "attack" or (command == "all" and not config.skip_attack and config.detector_name() != "none"):
        run_attack(config)
    if command in ("report", "all"):
        run_report(config)
