"""``compare.py``'s flags (each declared once) and the presets file they point to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import CoErasingError
from ..flags import check_fields, check_output_fields, flag
from ..methods import method_names
from ..toy import TOY_MODEL_DIR
from ..toy.world import SHAPES
from .presets import TEST_EVALUATIONS, apply_quick, check_candidates, validate_presets

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Methods compared by default (every method with a trace).
DEFAULT_METHODS = "esd,coerasing,no-refinement,image-only,esd-equal-compute"
#: Five training seeds: the seed moves the paired differences more than counting noise does
#: (scripts/seed_spread.py on docs/results/results.csv, docs/comparison.md §6), so 3 seeds do not give
#: intervals as narrow.
DEFAULT_SEEDS = "0,1,2,3,4"
#: Every attack ``--attacks`` may name (each runs only where the presets have its block; unlearndiff and
#: inversion are set by the ``attack`` block).
ATTACK_NAMES = ("unlearndiff", "inversion", "ring_a_bell", "mma", "p4d", "relearn")
WHAT, MODEL, RUN, REAL = "what to compare", "model", "running", "real Stable Diffusion (--ckpt_path)"


def evaluation_plan(presets: dict[str, Any]) -> str:
    """The presets' ``test_evaluation`` (default ``all``, how docs/results/ were made), checked."""
    value = str(presets.get("test_evaluation", "all"))
    if value not in TEST_EVALUATIONS:
        raise CoErasingError(f"the presets' test_evaluation is {value!r}; use one of: {', '.join(TEST_EVALUATIONS)} "
                             "(all: test images at every checkpoint, for test-split curves; chosen: only at "
                             "each method's chosen checkpoint, the curves are drawn on validation prompts).")
    return value


@dataclass
class CompareConfig:
    """Everything one ``compare.py`` run depends on."""

    concepts: str | None = flag(None, group=WHAT, help="comma-separated concepts (default: the five toy shapes; "
                                "with --ckpt_path: nudity,vangogh,church,…)")
    methods: str | None = flag(None, group=WHAT, help=f"comma-separated methods (default: {DEFAULT_METHODS})")
    seeds: str | None = flag(None, group=WHAT, help=f"comma-separated training seeds (default: {DEFAULT_SEEDS})")
    output_dir: str = flag("outputs/compare", group=WHAT, output=True,
                           help="results, plots, grids and the cache of every trained and evaluated cell")
    quick: bool = flag(False, group=WHAT, help="a small run of the whole path: one concept, two methods, two "
                       "checkpoints each, a short attack (the presets' 'quick' block)")
    presets: str | None = flag(None, group=WHAT, help="YAML of method and evaluation settings (default: "
                               "configs/compare/toy.yaml; with --ckpt_path configs/compare/sd.yaml)")
    candidates: bool = flag(True, group=WHAT, help="train every tuning candidate of the presets' 'candidates' "
                            "block; false: each method its base presets only (one setting each: an equal budget too)")
    skip_attack: bool = flag(False, group=WHAT, help="no attack at the chosen operating points")
    attacks: str = flag("all", group=WHAT, help="comma-separated attacks to run at the chosen points and the base "
                        f"model: all, or some of {', '.join(ATTACK_NAMES)} (each also needs its presets block)")
    ckpt_path: str | None = flag(None, group=MODEL, help="base model (default: the shipped toy world); a Stable "
                                 "Diffusion folder or Hub id switches to the real protocol (evaluate.py's prompt "
                                 "sets, detectors and attack)")
    ip_adapter: str | None = flag(None, group=MODEL, help="IP-Adapter weights (default: the toy world's, or h94's)")
    image_encoder_path: str | None = flag(None, group=MODEL, help="IP-Adapter image encoder (default: as above)")
    device: str | None = flag(None, group=RUN, help="device of every process (default: cuda:<local rank> if "
                              "present, else cpu)")
    threads: int = flag(1, group=RUN, min=1, max=256, help="torch threads per process (CPU)")
    workers: int | None = flag(None, group=RUN, min=1, max=256, help="local worker processes (default: one per "
                               "CPU core on CPU, one per GPU); accelerate launch / torchrun set their own")
    shard: str | None = flag(None, group=RUN, help="internal: 'i/n' = this process runs jobs i, i+n, …")
    classifier: str | None = flag(None, group=REAL, help="image classifier for object/style concepts (evaluate.py's)")
    nudenet_weights: str | None = flag(None, group=REAL, help="NudeNet 3.0.x best.onnx for nudity (evaluate.py's)")
    limit: int | None = flag(None, group=REAL, min=1, max=1_000_000,
                             help="at most N prompts of the concept's set per split (validation, test)")
    clip_model: str | None = flag(None, group=REAL, help="a CLIP model for the usability score on COCO prompts")

    @property
    def toy(self) -> bool:
        """The shipped toy world (no --ckpt_path, or its folder)."""
        return self.ckpt_path is None or Path(self.ckpt_path).expanduser().resolve() == TOY_MODEL_DIR.resolve()

    def presets_path(self) -> Path:
        if self.presets:
            return Path(self.presets).expanduser()
        return REPO_ROOT / "configs" / "compare" / ("toy.yaml" if self.toy else "sd.yaml")

    def load_presets(self) -> dict[str, Any]:
        """The presets file, checked and typed (:mod:`.presets`), with the ``quick`` block applied when ``--quick``."""
        path = self.presets_path()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise CoErasingError(f"--presets {path} cannot be read as YAML ({exc}).") from exc
        presets = apply_quick(validate_presets(data, str(path), self.toy), self.quick)
        if not self.candidates:
            presets.pop("candidates", None)
        return presets

    def lists(self, presets: dict[str, Any]) -> tuple[list[str], list[str], list[int]]:
        """Concepts, methods and seeds: the flags', else the presets' (``--quick``), else the defaults."""

        def items(value: str | None) -> list[str]:
            return [item.strip() for item in str(value or "").split(",") if item.strip()]

        for name in ("concepts", "methods", "seeds"):
            given = getattr(self, name)
            if given is not None and not items(given):
                raise CoErasingError(f"--{name} {given!r} names nothing; give comma-separated values, or leave the "
                                     "flag out for the presets' (or the default) list.")
        default_concepts = "circle,square,triangle,star,cross" if self.toy else "nudity,vangogh,church"
        concepts = items(self.concepts or presets.get("concepts") or default_concepts)
        methods = items(self.methods or presets.get("methods") or DEFAULT_METHODS)
        unknown = [m for m in methods if m not in method_names()]
        if unknown:
            raise CoErasingError(f"--methods: unknown method(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(method_names())}.")
        if self.toy:
            strange = [c for c in concepts if c not in SHAPES]
            if strange:
                raise CoErasingError(f"--concepts: {', '.join(strange)} is not a shape of the toy world; use some "
                                     f"of {', '.join(SHAPES)} (or pass --ckpt_path for a Stable Diffusion model).")
        try:
            seeds = [int(s) for s in items(self.seeds or presets.get("seeds") or DEFAULT_SEEDS)]
        except ValueError:
            raise CoErasingError(f"--seeds {self.seeds!r} must be comma-separated integers, e.g. 0,1,2.") from None
        if not concepts or not methods or not seeds or any(s < 0 for s in seeds):
            raise CoErasingError("--concepts, --methods and --seeds each need at least one value (seeds ≥ 0).")
        if len(set(seeds)) != len(seeds) or len(set(methods)) != len(methods) or len(set(concepts)) != len(concepts):
            raise CoErasingError("--concepts, --methods and --seeds must not repeat a value.")
        return concepts, methods, seeds

    def attack_names(self) -> tuple[str, ...]:
        """The attacks to run: none with --skip_attack, else --attacks (``all``: :data:`ATTACK_NAMES`)."""
        if self.skip_attack:
            return ()
        names = [name.strip() for name in self.attacks.split(",") if name.strip()]
        if names == ["all"]:
            return ATTACK_NAMES
        unknown = [name for name in names if name not in ATTACK_NAMES]
        if unknown or not names:
            raise CoErasingError(f"--attacks {self.attacks!r}: unknown attack(s) {', '.join(unknown) or '(none given)'}"
                                 f"; use all, or comma-separated names of: {', '.join(ATTACK_NAMES)}.")
        return tuple(name for name in ATTACK_NAMES if name in names)

    def validate(self) -> CompareConfig:
        check_fields(self)
        self.attack_names()
        if self.shard is not None:
            index, _, count = self.shard.partition("/")
            if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
                raise CoErasingError(f"--shard {self.shard!r} must be 'i/n' with 0 ≤ i < n.")
        if self.toy:
            real = [f"--{name}" for name in ("limit", "classifier", "nudenet_weights", "clip_model")
                    if getattr(self, name) is not None]
            if real:
                raise CoErasingError(f"{', '.join(real)} belong to the real protocol (--ckpt_path with a Stable "
                                     "Diffusion model) and would be ignored on the toy world, whose image counts are "
                                     "the presets' evaluation block and whose judge is the toy classifier; drop them "
                                     "or pass --ckpt_path.")
        presets = self.load_presets()
        check_candidates(presets, self.lists(presets)[1])
        evaluation_plan(presets)
        check_output_fields(self)
        return self
