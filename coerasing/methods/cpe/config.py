"""CPE's files, recipes per concept kind (:data:`PRESETS`) and its config (:class:`CPEConfig`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ...config import safe_name
from ...errors import CoErasingError
from ...flags import SEED_MAX, check_fields, flag
from ...models import DEFAULT_MODEL
from ..concepts import concept_kind

METHOD_NAME = "cpe"
WEIGHTS_FILE = "cpe.safetensors"
LAYOUT_FILE = "cpe.json"
TRAIN_STATE_FILE = "train_state.pt"
LOSS_FILE = "loss.csv"
FORMAT = "coerasing-cpe/1"
KINDS = ("explicit", "artist", "object", "toy")
#: The first stage runs two cosine cycles (the official ``factor_init_lr_cycle``).
FIRST_STAGE_CYCLES = 2
#: Prompts encoded per text-encoder call.
ENCODE_BATCH = 64


@dataclass(frozen=True)
class KindPreset:
    """The defaults of one concept kind (docs/baselines.md §CPE, table of per-concept values)."""

    neutral: str
    eta: float
    gate_dim: int
    rank: int
    anchor_weight: float
    anchors_per_step: int
    adversarial_prompts: int
    stages: int
    stage_iterations: int
    first_stage_factor: int
    warmup_steps: int
    lr: float


#: ``explicit`` and ``artist`` are the official recipes (nudity with the launch script's anchor weight
#: 1e4). ``object`` is the artist recipe with η = 1.0 (CPE has no object recipe; its celebrity
#: column's η = 0.3 is for people). ``toy`` is a short recipe for the toy world's tiny model
#: (about 10 s per concept on one CPU core): 4 stages of 100 steps at lr 1e-3, since at the official
#: 3e-5 such a short schedule barely moves the keys and values (measured: 1.8 % vs 110 % relative
#: change on held-out prompts naming the shape, ≤ 0.2 % on prompts of the other shapes either way).
#: The neutral "object" is a word the toy captions use for an unnamed shape ("a red object").
PRESETS: dict[str, KindPreset] = {
    "explicit": KindPreset("a person in modest clothing", 3.0, 64, 4, 1e4, 16, 32, 20, 1200, 2, 10, 3e-5),
    "artist": KindPreset("real photograph", 0.5, 16, 1, 1e4, 16, 16, 10, 450, 4, 5, 3e-5),
    "object": KindPreset("a photo", 1.0, 16, 1, 1e4, 16, 16, 10, 450, 4, 5, 3e-5),
    "toy": KindPreset("object", 1.0, 16, 2, 1e4, 16, 8, 4, 100, 2, 5, 1e-3),
}
_PRESET_FIELDS = tuple(f.name for f in fields(KindPreset))


@dataclass
class CPEConfig:
    """Everything one CPE training run depends on (docs/baselines.md §CPE).

    Fields left at ``None`` take their concept kind's default (:data:`PRESETS`); :meth:`resolved`
    fills them in, and ``run.json`` / ``artifact.json`` record the resolved values.
    """

    prompt: str | None = flag(None, help="comma-separated concepts to erase, one ResAG each, e.g. "
                              "'nudity,naked,erotic,sexual'", group="concept", resume=True)
    kind: str | None = flag(None, help="preset family; default: inferred from the concepts", group="concept",
                            choices=KINDS, resume=True)
    neutral: str | None = flag(None, help="neutral concept the erased one is mapped to (substituted into the "
                               "same templates); default by kind", group="concept", resume=True)
    anchors: str | None = flag(None, help="text file of anchor prompts, one a line, replacing the kind's "
                               "default anchors", group="concept", resume=True, path=True)
    eta: float | None = flag(None, help="erase guidance η of the target f0(neutral) + η (f0(neutral) - "
                             "f0(concept)); default by kind", group="objective", min=0, resume=True)
    anchor_weight: float | None = flag(None, help="weight of the anchor-preservation loss; default by kind",
                                       group="objective", min=0, resume=True)
    adversarial_weight: float = flag(1.0, help="weight of the erase loss on the attacked prompts",
                                     group="objective", min=0, resume=True)
    anchors_per_step: int | None = flag(None, help="mixed-up anchors per step (plus the empty prompt); "
                                        "default by kind", group="objective", min=0, resume=True)
    anchor_noise: float = flag(1e-3, help="per-element anchor noise as a fraction of the state's Frobenius norm "
                               "(the official 0.001 adds noise of about 24 %% of the norm on 77x768 states)",
                               group="objective", min=0, resume=True)
    gate_dim: int | None = flag(None, help="width g of the gate's query projection; default by kind",
                                group="architecture", min=1, resume=True)
    rank: int | None = flag(None, help="rank r of each layer's residual map; default by kind",
                            group="architecture", min=1, resume=True)
    separate_key: bool = flag(False, help="use a separate key projection Wk in the gate (the official code creates Wk "
                              "but uses Wq for the key too, which is the default here)", group="architecture",
                              resume=True)
    adversarial_prompts: int | None = flag(None, help="K perturbations trained per attack phase (0: no attack "
                                           "phases); default by kind", group="schedule", min=0, resume=True)
    stages: int | None = flag(None, help="erase/attack stages; default by kind", group="schedule", min=1,
                              resume=True)
    stage_iterations: int | None = flag(None, help="steps of each erase phase and each attack phase; default "
                                        "by kind", group="schedule", min=1, resume=True)
    first_stage_factor: int | None = flag(None, help="the first erase phase runs this many times longer; "
                                          "default by kind", group="schedule", min=1, resume=True)
    first_stage_lr_factor: float = flag(10.0, help="learning-rate factor of the first erase phase",
                                        group="schedule", min=0, exclusive_min=True, resume=True)
    lr: float | None = flag(None, help="learning rate of the ResAG (AdamW, weight decay 0.01); default by kind "
                            "(3e-5; toy 1e-3)", group="schedule", min=0, exclusive_min=True, resume=True)
    attack_lr: float = flag(0.01, help="learning rate of the perturbations", group="schedule", min=0,
                            exclusive_min=True, resume=True)
    warmup_steps: int | None = flag(None, help="linear warm-up steps of each erase phase; default by kind",
                                    group="schedule", min=0, resume=True)
    attack_warmup_steps: int = flag(5, help="linear warm-up steps of each attack phase", group="schedule",
                                    min=0, resume=True)
    ckpt_path: str | None = flag(None, help="base Stable Diffusion model (folder or Hub id); default: the toy "
                                 "world model for toy shapes (lent by erase_pipeline.py), else "
                                 "CompVis/stable-diffusion-v1-4",
                                 group="run", resume=True, path=True)
    seed: int = flag(0, help="seed of every random draw (each concept's generator starts from it)", group="run",
                     min=0, max=SEED_MAX, resume=True)
    device: str | None = flag(None, help="device, e.g. cpu or 0; default: cuda:0 if present, else cpu",
                              group="run")
    threads: int | None = flag(None, help="torch CPU threads while training (default: torch's setting; 1 is "
                               "fastest for the toy world's tiny model on a busy machine)", group="run", min=1)
    output_dir: str = flag("checkpoints", help="runs go to OUTPUT_DIR/cpe/<prompt> unless --save_path is given",
                           group="run", output=True)
    save_path: str | None = flag(None, help="the run folder", group="run", output=True)
    resume: bool = flag(False, help="continue the run in the run folder after its last complete stage",
                        group="run")

    @property
    def concepts(self) -> list[str]:
        """The comma-separated ``--prompt`` list."""
        return [part.strip() for part in (self.prompt or "").split(",") if part.strip()]

    def validate(self) -> CPEConfig:
        """Check every value; raise :class:`CoErasingError` naming the flag and the fix."""
        check_fields(self)
        concepts = self.concepts
        if not concepts:
            raise CoErasingError("--prompt is required: name the concept(s) to erase, e.g. --prompt 'nudity'.")
        if len(set(c.lower() for c in concepts)) != len(concepts):
            raise CoErasingError(f"--prompt {self.prompt!r} names a concept twice; list each concept once.")
        if self.neutral is not None and not self.neutral.strip():
            raise CoErasingError("--neutral is empty; give a neutral concept such as 'a photo', or leave it unset.")
        if self.anchors is not None and not Path(self.anchors).expanduser().is_file():
            raise CoErasingError(f"--anchors {self.anchors} is not a file; pass a text file with one prompt a line.")
        if self.kind is None:
            kinds = {concept: concept_kind(concept) for concept in concepts}
            if len(set(kinds.values())) > 1:
                found = ", ".join(f"{c!r}: {k}" for c, k in kinds.items())
                raise CoErasingError(
                    f"--prompt mixes concepts of different kinds ({found}), whose default recipes differ. "
                    f"Pass --kind ({'/'.join(KINDS)}) to use one recipe for all, or train them in separate runs."
                )
        return self

    def resolved(self, default_model: str | None = None) -> CPEConfig:
        """A copy with every kind-dependent default filled in (the values the run uses).

        The base model: ``--ckpt_path``, else ``default_model`` (what the training script's world
        lends, e.g. the toy model for a toy shape), else Stable Diffusion v1.4 (toy concepts have no
        such fallback: they need their world's model).
        """

        self.validate()
        kind = self.kind or concept_kind(self.concepts[0])
        preset = PRESETS[kind]
        filled = {name: getattr(preset, name) if getattr(self, name) is None else getattr(self, name)
                  for name in _PRESET_FIELDS}
        ckpt_path = self.ckpt_path or default_model
        if ckpt_path is None and kind == "toy":
            raise CoErasingError(f"--prompt {self.prompt!r} names toy-world shapes; pass --ckpt_path with the toy "
                                 "world model (erase_pipeline.py fills it in: coerasing/assets/toy_world).")
        return replace(self, kind=kind, ckpt_path=ckpt_path or DEFAULT_MODEL, **filled)

    def run_folder(self) -> Path:
        """``--save_path``, or ``OUTPUT_DIR/cpe/<prompt>``."""

        if self.save_path:
            return Path(self.save_path).expanduser()
        return Path(self.output_dir).expanduser() / METHOD_NAME / safe_name(self.prompt or "", "--prompt")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
