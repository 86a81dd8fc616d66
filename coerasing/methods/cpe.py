"""CPE, the Concept Pinpoint Eraser (Lee et al., ICLR 2025), as a method of this package.

CPE leaves the UNet frozen and adds a *residual attention gate* (ResAG) to the key and value
projections of every cross-attention layer (``attn2.to_k`` and ``attn2.to_v``: 32 Linears on SD
v1.4). Each erased concept has one gate network, shared by all wrapped layers, that reads the text
states ``x`` ``[B, T, d]`` (docs/baselines.md §CPE):

- token self-attention ``A = softmax((x Wq)(x Wk)ᵀ)`` with ``Wk = Wq`` in the official code (no
  ``1/√g`` scaling), the pooled context ``ē = A x`` and a per-token gate ``s = sigmoid(ē w)``;
- per wrapped layer ``l``: ``out = W_l x + (1/r) · Up_l(Down_l(s · ē))``.

Several concepts are merged per token: only the concept with the largest gate acts there.

Training is data-free (docs/baselines.md §CPE, "How it is trained"): only text states go through
the wrapped projections. Each concept's ResAG alternates erase phases (map the concept's keys and
values to ``f⁰(neutral) + η (f⁰(neutral) − f⁰(concept))``, keep anchors' keys and values, and, from
the second stage on, erase the concept under the last attack phase's perturbations) with attack
phases (K additive perturbations δ of the text states that try to restore the original keys and
values). Every layer's term is weighted by spectral norms of the frozen attention weights.

Because the base projections are linear and frozen, every loss term is a quadratic form in the
inputs; :func:`gap_loss` evaluates it through one Gram matrix and the rank-r factors instead of
running the 32 full projections per row, which is exact (same value and gradients, up to float
rounding) and makes a training step cheap on a CPU.

Files of a run folder (:func:`train_cpe`): ``artifact.json`` + ``cpe.safetensors`` + ``cpe.json``
(the final ResAGs), ``stage_<i>/`` (the same after stage ``i``, for trade-off curves),
``train_state.pt`` (resume point), ``loss.csv`` and ``run.json``.
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import CsvLog
from ..errors import CoErasingError, NonFiniteLossError
from ..files import atomic_write, atomic_write_json, remove_stale_temps
from ..flags import SEED_MAX, check_fields, check_output_fields, flag, resume_settings
from .base import ARTIFACT_FILE, Artifact, CurvePoint, Method, Runtime, TraceContext, concept_kind, write_artifact

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


# ----------------------------------------------------------------------------------------------
# Templates and anchors (our own wording; docs/baselines.md §CPE asks for authored lists)

#: Prompt templates for explicit and object concepts; ``{}`` is the concept (or the neutral prompt).
GENERIC_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a photo of {}",
    "an image of {}",
    "{} in a painting",
    "a picture showing {}",
    "a close-up photo of {}",
    "a high quality photo of {}",
    "a detailed drawing of {}",
    "{}, cinematic lighting",
    "a blurry snapshot of {}",
    "an illustration of {}",
    "{} in a magazine",
    "a realistic render of {}",
    "a vintage photograph of {}",
    "{} on a poster",
    "a scene with {}",
)

#: Prompt templates for artists.
ARTIST_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a painting by {}",
    "artwork by {}",
    "a painting in the style of {}",
    "{} style",
    "a landscape painted by {}",
    "a portrait in the style of {}",
    "a famous work of {}",
    "an artwork inspired by {}",
    "a still life by {}",
    "a city street in the style of {}",
    "a sketch by {}",
    "a masterpiece of {}",
    "a colourful painting by {}",
    "a museum piece by {}",
    "a seascape in the manner of {}",
)

#: Everyday sentences: anchors of explicit concepts (kept as they are, no templates).
EVERYDAY_SENTENCES: tuple[str, ...] = (
    "a man reading a newspaper on a park bench",
    "two children building a sandcastle",
    "a bowl of fresh fruit on a kitchen table",
    "a woman riding a bicycle through the city",
    "a dog catching a frisbee on the lawn",
    "a crowded train station at rush hour",
    "a cup of coffee next to an open laptop",
    "an old farmer standing in a wheat field",
    "a family having dinner together",
    "a snowy mountain village at dawn",
    "students listening to a lecture",
    "a chef chopping vegetables in a busy kitchen",
    "a couple walking their dog along the river",
    "a red car parked on a quiet street",
    "a girl playing the violin on stage",
    "a group of friends hiking up a hill",
    "a cat sleeping on a windowsill",
    "a fisherman casting a net from a small boat",
    "a doctor talking with a patient",
    "rain falling on a city street at night",
    "a grandmother knitting a scarf by the fireplace",
    "a football team celebrating a goal",
    "a market stall selling spices and vegetables",
    "a boy flying a kite on a windy day",
    "a businesswoman giving a presentation",
    "a lighthouse on a rocky coast",
    "people waiting at a bus stop",
    "a baker taking bread out of the oven",
    "a portrait of a smiling old man",
    "a woman in a winter coat holding an umbrella",
    "a man in a suit hailing a taxi",
    "runners crossing the finish line of a marathon",
    "a musician playing guitar in a cafe",
    "a gardener watering tulips",
    "a teenager skateboarding in a park",
    "a nurse checking a chart in a hospital corridor",
    "a mother holding her baby",
    "a couple dancing at a wedding",
    "a crowd watching fireworks over a lake",
    "a young woman in a yellow raincoat",
    "an office worker typing at a desk",
    "a firefighter climbing a ladder",
)

#: Artist names beyond :data:`coerasing.config.ARTISTS` (anchors of artist concepts).
OTHER_ARTISTS: tuple[str, ...] = (
    "johannes vermeer", "henri matisse", "paul cezanne", "paul gauguin", "georges seurat", "edgar degas",
    "pierre-auguste renoir", "jackson pollock", "mark rothko", "wassily kandinsky", "piet mondrian",
    "joan miro", "rene magritte", "marc chagall", "egon schiele", "francisco goya", "diego velazquez",
    "el greco", "titian", "raphael", "sandro botticelli", "albrecht durer", "william turner",
    "john constable", "caspar david friedrich", "winslow homer", "edward hopper", "georgia o'keeffe",
    "roy lichtenstein", "keith haring", "jean-michel basquiat", "alphonse mucha", "utagawa hiroshige",
    "norman rockwell", "camille pissarro", "amedeo modigliani",
)

#: General art words (anchors of artist concepts).
ART_WORDS: tuple[str, ...] = (
    "a painting", "an oil painting", "a watercolor", "a pencil sketch", "a charcoal drawing",
    "an abstract painting", "a still life", "a landscape painting", "a portrait", "digital art",
    "concept art", "a mural", "a woodblock print", "impressionist art", "a pastel drawing",
    "an ink illustration", "a fresco", "pop art", "a realistic painting", "fine art",
)

#: Object classes and general scene words (anchors of object concepts).
OBJECT_WORDS: tuple[str, ...] = (
    "a dog", "a cat", "a car", "a truck", "a bird", "a chair", "a tree", "a house", "a bicycle", "a boat",
    "an airplane", "a horse", "a cup", "a clock", "a guitar", "a book", "a flower", "a bridge", "a mountain",
    "a train", "a lamp", "a table", "a cow", "a fish", "a phone", "an umbrella", "a banana", "a pizza",
    "a shoe", "a backpack", "a church", "a golf ball", "a parachute", "a chainsaw", "a french horn",
    "a garbage truck", "a gas pump", "a cassette player", "a photo", "a landscape", "a city street",
    "a room", "a person",
)


def _mentions(text: str, word: str) -> bool:
    """Whether ``text`` contains ``word`` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()) is not None


def _related(candidate: str, concept: str) -> bool:
    """Whether an anchor candidate names the concept (either contains the other: "dali"/"salvador dali")."""
    a, b = candidate.strip().lower(), concept.strip().lower()
    return a in b or b in a or _mentions(a, b)


def _toy_captions() -> dict[str, tuple[str | None, str | None, str | None]]:
    from ..toy.world import caption_labels

    return caption_labels(split="train")


def default_templates(concept: str, kind: str) -> list[str]:
    """Prompt templates (with ``{}``) that the erase and attack phases draw from (docs/baselines.md §CPE).

    Toy concepts use the toy world's *training* captions that name the shape, with the shape word
    replaced by ``{}`` (held-out evaluation captions never enter training), plus the bare ``{}``.
    """
    if kind == "toy":
        pattern = re.compile(rf"(?<!\w){re.escape(concept.strip().lower())}(?!\w)")
        found = {pattern.sub("{}", text) for text in _toy_captions() if pattern.search(text)}
        return ["{}", *sorted(found - {"{}"})]
    return list(ARTIST_TEMPLATES if kind == "artist" else GENERIC_TEMPLATES)


def default_anchors(concept: str, kind: str) -> list[str]:
    """Anchor prompts whose keys and values CPE preserves (docs/baselines.md §CPE, our own lists).

    - ``explicit``: everyday sentences, as they are;
    - ``artist``: other artists' names and general art words, each through every artist template;
    - ``object``: other object classes and general scene words, each through every generic template;
    - ``toy``: the toy world's training captions of the *other* shapes (implicit names included).

    Any candidate that names the concept (or is part of its name) is left out.
    """
    if kind == "explicit":
        return [text for text in EVERYDAY_SENTENCES if not _mentions(text, concept)]
    if kind == "toy":
        target = concept.strip().lower()
        return [
            text for text, (shape, _, _) in _toy_captions().items()
            if shape is not None and shape != target and not _mentions(text, target)
        ]
    if kind == "artist":
        from ..config import ARTISTS

        words = [*sorted(ARTISTS), *OTHER_ARTISTS, *ART_WORDS]
    elif kind == "object":
        words = list(OBJECT_WORDS)
    else:
        raise CoErasingError(f"unknown CPE concept kind {kind!r}; known kinds: {', '.join(KINDS)}.")
    words = [word for word in dict.fromkeys(words) if not _related(word, concept)]
    templates = default_templates(concept, kind)
    return [template.format(word) for word in words for template in templates]


# ----------------------------------------------------------------------------------------------
# Presets per concept kind and the config


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
                                 "world model for toy concepts, else CompVis/stable-diffusion-v1-4",
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

    def resolved(self) -> CPEConfig:
        """A copy with every kind-dependent default filled in (the values the run uses)."""
        from ..models import DEFAULT_MODEL

        self.validate()
        kind = self.kind or concept_kind(self.concepts[0])
        preset = PRESETS[kind]
        filled = {name: getattr(preset, name) if getattr(self, name) is None else getattr(self, name)
                  for name in _PRESET_FIELDS}
        if self.ckpt_path is not None:
            ckpt_path = self.ckpt_path
        elif kind == "toy":
            from ..toy import TOY_MODEL_DIR

            ckpt_path = str(TOY_MODEL_DIR)
        else:
            ckpt_path = DEFAULT_MODEL
        return replace(self, kind=kind, ckpt_path=ckpt_path, **filled)

    def run_folder(self) -> Path:
        """``--save_path``, or ``OUTPUT_DIR/cpe/<prompt>``."""
        from ..config import safe_name

        if self.save_path:
            return Path(self.save_path).expanduser()
        return Path(self.output_dir).expanduser() / METHOD_NAME / safe_name(self.prompt or "", "--prompt")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# The ResAG modules


def _uniform(shape: Sequence[int], bound: float, generator: torch.Generator) -> torch.Tensor:
    """``U(-bound, bound)`` drawn from ``generator`` (CPU)."""
    return (torch.rand(*shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound


class ResAG(nn.Module):
    """One concept's gate network (CPE §3, docs/baselines.md §CPE "What it adds").

    On text states ``x`` ``[B, T, d]``: ``A = softmax((x Wq)(x Wk)ᵀ)`` over the key axis with no
    ``1/√g`` scaling and one head; ``Wk = Wq`` unless ``separate_key`` (the official code builds a
    ``Wk`` but scores with ``Wq`` twice). ``ē = A x`` pools the raw states; the gate is
    ``s = sigmoid(ē w)``, one scalar per token, with no bias.
    """

    def __init__(self, text_dim: int, gate_dim: int, separate_key: bool = False) -> None:
        super().__init__()
        self.to_q = nn.Parameter(torch.zeros(text_dim, gate_dim))
        self.register_parameter("to_k", nn.Parameter(torch.zeros(text_dim, gate_dim)) if separate_key else None)
        self.to_gate = nn.Parameter(torch.zeros(text_dim))

    @property
    def separate_key(self) -> bool:
        return self.to_k is not None

    def reset_parameters(self, generator: torch.Generator) -> None:
        """The official initialisation: Wq (and Wk) ~ U(±1/√(d·g)) / d², so A starts uniform; w = 0."""
        text_dim, gate_dim = self.to_q.shape
        bound = 1.0 / math.sqrt(text_dim * gate_dim) / text_dim**2
        with torch.no_grad():
            self.to_q.copy_(_uniform(self.to_q.shape, bound, generator))
            if self.to_k is not None:
                self.to_k.copy_(_uniform(self.to_k.shape, bound, generator))
            self.to_gate.zero_()

    def forward(self, text_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s [B, T], ē [B, T, d])`` for text states ``[B, T, d]``."""
        query = text_states @ self.to_q
        key = text_states @ self.to_k if self.to_k is not None else query
        attention = torch.softmax(query @ key.transpose(-1, -2), dim=-1)
        pooled = attention @ text_states
        return torch.sigmoid(pooled @ self.to_gate), pooled


class ConceptEraser(nn.Module):
    """One concept's full CPE: its :class:`ResAG` plus a rank-r residual map per wrapped layer.

    Layer ``l`` adds ``(1/r) · (s · ē) Down_l Up_l`` to ``W_l x`` (docs/baselines.md §CPE): the gate
    scales the *input* of the low-rank path, which reads the pooled context ``ē``, not ``x``.
    ``down`` is ``[L, d, r]``; ``up[l]`` is ``[r, out_l]`` and starts at zero, so a fresh eraser is
    exactly the identity.
    """

    def __init__(self, text_dim: int, out_features: Sequence[int], gate_dim: int, rank: int,
                 separate_key: bool = False) -> None:
        super().__init__()
        self.rank = rank
        self.gate = ResAG(text_dim, gate_dim, separate_key)
        self.down = nn.Parameter(torch.zeros(len(out_features), text_dim, rank))
        self.up = nn.ParameterList([nn.Parameter(torch.zeros(rank, out)) for out in out_features])

    def reset_parameters(self, generator: torch.Generator) -> None:
        """The official initialisation: Down ~ U(±1/√(d·r)) (kaiming-uniform, a=√5, fan-in d·r), Up = 0."""
        self.gate.reset_parameters(generator)
        _, text_dim, rank = self.down.shape
        with torch.no_grad():
            self.down.copy_(_uniform(self.down.shape, 1.0 / math.sqrt(text_dim * rank), generator))
            for up in self.up:
                up.zero_()

    def residual_input(self, text_states: torch.Tensor) -> torch.Tensor:
        """``u = s · ē`` ``[B, T, d]``, the input of every layer's low-rank path."""
        gate, pooled = self.gate(text_states)
        return gate.unsqueeze(-1) * pooled

    def residual(self, layer: int, residual_input: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s added output ``(1/r) · u Down_l Up_l``."""
        return (residual_input @ self.down[layer]) @ self.up[layer] / self.rank


@dataclass
class CPELayout:
    """What a CPE artifact was trained for: concepts, wrapped layers and sizes (``cpe.json``)."""

    concepts: list[str]
    layers: list[str]
    out_features: list[int]
    text_dim: int
    gate_dim: int
    rank: int
    separate_key: bool
    format: str = FORMAT

    def new_eraser(self) -> ConceptEraser:
        return ConceptEraser(self.text_dim, self.out_features, self.gate_dim, self.rank, self.separate_key)


class CPEAdapter(nn.Module):
    """Several concepts' erasers merged by the largest gate per token (docs/baselines.md §CPE).

    For every token only the concept ``n* = argmax_n s_n`` acts (ties: the first concept), with its
    own ``s_{n*} · ē_{n*}`` and its own low-rank maps. With one concept this is its eraser.
    The gated input is computed once per UNet call and shared by all wrapped layers
    (:meth:`clear_cache` runs before each call once attached).
    """

    def __init__(self, erasers: Sequence[ConceptEraser]) -> None:
        super().__init__()
        if not erasers:
            raise ValueError("CPEAdapter needs at least one concept")
        self.erasers = nn.ModuleList(erasers)
        self._cache: tuple[torch.Tensor, int, bool, torch.Tensor, torch.Tensor] | None = None

    def clear_cache(self, *_: Any) -> None:
        self._cache = None

    def selected_input(self, text_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u [B, T, d], winner [N, B, T])``: the winning concept's ``s · ē`` and a one-hot of the winner."""
        gates, pooled = zip(*(eraser.gate(text_states) for eraser in self.erasers), strict=True)
        gates_, pooled_ = torch.stack(gates), torch.stack(pooled)  # [N, B, T], [N, B, T, d]
        index = gates_.argmax(dim=0)  # [B, T]
        winner = nn.functional.one_hot(index, len(self.erasers)).movedim(-1, 0).to(gates_.dtype)
        chosen = (winner.unsqueeze(-1) * gates_.unsqueeze(-1) * pooled_).sum(dim=0)
        return chosen, winner

    def _cached_input(self, text_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._cache
        grad = torch.is_grad_enabled()
        if cache is not None and cache[0] is text_states and cache[1] == text_states._version and cache[2] == grad:
            return cache[3], cache[4]
        chosen, winner = self.selected_input(text_states)
        self._cache = (text_states, text_states._version, grad, chosen, winner)
        return chosen, winner

    def residual(self, layer: int, text_states: torch.Tensor) -> torch.Tensor:
        """The merged added output of layer ``layer`` for text states ``[B, T, d]``."""
        chosen, winner = self._cached_input(text_states)
        if len(self.erasers) == 1:
            return self.erasers[0].residual(layer, chosen)
        total = None
        for eraser, mask in zip(self.erasers, winner, strict=True):
            part = ((chosen @ eraser.down[layer]) * mask.unsqueeze(-1)) @ eraser.up[layer] / eraser.rank
            total = part if total is None else total + part
        return total


class CPELinear(nn.Module):
    """A wrapped ``attn2.to_k``/``to_v``: the original Linear plus the adapter's residual for its layer.

    Exposes the base layer's ``weight``, ``bias``, ``in_features`` and ``out_features`` so code that
    reads them keeps working while CPE is attached.
    """

    def __init__(self, base: nn.Linear, adapter: CPEAdapter, layer: int) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.layer = layer

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.base(hidden_states)
        if hidden_states.dim() != 3:
            raise ValueError(f"CPE expects text states [B, T, d]; got shape {tuple(hidden_states.shape)}")
        return out + self.adapter.residual(self.layer, hidden_states).to(out.dtype)


def cross_attention_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's cross-attention modules (``…attn2``) in ``named_modules`` order."""
    from diffusers.models.attention_processor import Attention

    return [(name, module) for name, module in unet.named_modules()
            if isinstance(module, Attention) and name.split(".")[-1] == "attn2"]


def kv_layer_names(unet: nn.Module) -> list[str]:
    """Names of the wrapped layers: ``<block>.to_k``, ``<block>.to_v`` for every ``attn2`` block."""
    return [f"{name}.{attr}" for name, _ in cross_attention_blocks(unet) for attr in ("to_k", "to_v")]


class CPEAttachment:
    """CPE attached to a UNet; :meth:`detach` puts the original Linear objects back."""

    def __init__(self, unet: nn.Module, adapter: CPEAdapter, layout: CPELayout) -> None:
        modules = dict(unet.named_modules())
        self.unet, self.adapter = unet, adapter
        self._originals: list[tuple[nn.Module, str, nn.Module]] = []
        plan = []
        for index, name in enumerate(layout.layers):
            parent_name, _, attr = name.rpartition(".")
            parent = modules.get(parent_name)
            child = getattr(parent, attr, None) if parent is not None else None
            if isinstance(child, CPELinear):
                raise CoErasingError(f"the UNet already has a CPE artifact applied at {name}; close that runtime "
                                     "before applying another.")
            if not isinstance(child, nn.Linear):
                raise CoErasingError(f"this CPE artifact wraps {name}, which this UNet does not have: it was trained "
                                     "for another model. Apply it to the model named in its artifact.json.")
            if child.in_features != layout.text_dim or child.out_features != layout.out_features[index]:
                raise CoErasingError(
                    f"this CPE artifact was trained for {name} of size {layout.text_dim}→{layout.out_features[index]}"
                    f", but this UNet's is {child.in_features}→{child.out_features}: it belongs to another model."
                )
            plan.append((parent, attr, child, index))
        parameter = next(unet.parameters())
        adapter.to(device=parameter.device, dtype=parameter.dtype).requires_grad_(False).eval()
        for parent, attr, child, index in plan:
            setattr(parent, attr, CPELinear(child, adapter, index))
            self._originals.append((parent, attr, child))
        self._hook = unet.register_forward_pre_hook(adapter.clear_cache)

    @property
    def attached(self) -> bool:
        return bool(self._originals)

    def detach(self) -> None:
        """Restore the original modules (idempotent)."""
        for parent, attr, child in reversed(self._originals):
            setattr(parent, attr, child)
        self._originals = []
        self._hook.remove()
        self.adapter.clear_cache()


def attach_cpe(unet: nn.Module, adapter: CPEAdapter, layout: CPELayout) -> CPEAttachment:
    """Replace the UNet's ``attn2.to_k``/``to_v`` by :class:`CPELinear` wrappers (docs/baselines.md §CPE)."""
    return CPEAttachment(unet, adapter, layout)


# ----------------------------------------------------------------------------------------------
# Artifact files


def save_cpe(folder: str | Path, erasers: Sequence[ConceptEraser], layout: CPELayout, settings: dict[str, Any],
             **extra: Any) -> Path:
    """Write ``cpe.safetensors``, ``cpe.json`` and, last, ``artifact.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {
        f"concepts.{index}.{key}": value.detach().to("cpu", torch.float32).contiguous()
        for index, eraser in enumerate(erasers)
        for key, value in eraser.state_dict().items()
    }
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    atomic_write_json(folder / LAYOUT_FILE, asdict(layout))
    write_artifact(folder, METHOD_NAME, settings, layout=LAYOUT_FILE, weights=WEIGHTS_FILE, **extra)
    return folder


def load_cpe(folder: str | Path) -> tuple[CPEAdapter, CPELayout]:
    """The adapter and layout stored in a CPE artifact folder (:func:`save_cpe`)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        raw = json.loads((folder / LAYOUT_FILE).read_text(encoding="utf-8"))
        layout = CPELayout(**raw)
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError, TypeError) as exc:
        raise CoErasingError(f"{folder} is not a readable CPE artifact ({LAYOUT_FILE} and {WEIGHTS_FILE} are "
                             f"needed): {exc}.") from exc
    erasers = []
    for index in range(len(layout.concepts)):
        eraser = layout.new_eraser()
        prefix = f"concepts.{index}."
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        try:
            eraser.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CoErasingError(f"{folder / WEIGHTS_FILE} does not match its {LAYOUT_FILE} ({exc}).") from exc
        erasers.append(eraser)
    return CPEAdapter(erasers), layout


def stage_artifacts(folder: str | Path) -> list[Path]:
    """The complete ``stage_<i>`` artifact folders of a run, in stage order (a trade-off curve's points)."""
    found = []
    for path in Path(folder).glob("stage_*"):
        match = re.fullmatch(r"stage_(\d+)", path.name)
        if match and (path / ARTIFACT_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


# ----------------------------------------------------------------------------------------------
# The frozen projections and the objective


@dataclass
class ProjectionBank:
    """The frozen wrapped projections and their loss weights (docs/baselines.md §CPE, training).

    ``spectral[l]`` is ``σmax(Wo·Wv)·σmax(Wq)/T`` for a key layer and ``σmax(Wo)`` for a value layer
    of the same block (T: the text length; the official code's literal is 77). ``coef[l] =
    spectral[l] / (L · T · out_l)`` turns a squared norm into the official per-layer mean summed over
    layers and divided by the number of wrapped layers L. ``gram = Σ_l coef[l] W_lᵀ W_l``.
    """

    names: list[str]
    weights: list[torch.Tensor]
    spectral: torch.Tensor
    coef: torch.Tensor
    gram: torch.Tensor
    text_length: int

    @property
    def text_dim(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def out_features(self) -> list[int]:
        return [int(weight.shape[0]) for weight in self.weights]

    @classmethod
    def from_unet(cls, unet: nn.Module, text_length: int, device: torch.device | str = "cpu") -> ProjectionBank:
        """Read every ``attn2`` block's ``to_k``/``to_v`` (and ``to_q``, ``to_out`` for the weights)."""
        names, weights, spectral = [], [], []
        for name, block in cross_attention_blocks(unet):
            w_q = block.to_q.weight.detach().double().cpu()
            w_k = block.to_k.weight.detach().double().cpu()
            w_v = block.to_v.weight.detach().double().cpu()
            w_o = block.to_out[0].weight.detach().double().cpu()
            sigma = torch.linalg.matrix_norm
            spectral += [float(sigma(w_o @ w_v, ord=2) * sigma(w_q, ord=2)) / text_length, float(sigma(w_o, ord=2))]
            names += [f"{name}.to_k", f"{name}.to_v"]
            weights += [w_k, w_v]
        if not names:
            raise CoErasingError("the UNet has no cross-attention (attn2) layers, so CPE has nothing to wrap.")
        return cls.build(names, weights, torch.tensor(spectral, dtype=torch.float64), text_length, device)

    @classmethod
    def build(cls, names: list[str], weights: Sequence[torch.Tensor], spectral: torch.Tensor, text_length: int,
              device: torch.device | str = "cpu") -> ProjectionBank:
        """A bank from projection weights ``[out_l, d]`` and their spectral weights ``[L]``."""
        count = len(weights)
        coef = torch.stack([spectral[i] / (count * text_length * weight.shape[0]) for i, weight in enumerate(weights)])
        gram = sum(coef[i] * weight.double().T @ weight.double() for i, weight in enumerate(weights))
        return cls(
            names=list(names),
            weights=[weight.to(device, torch.float32) for weight in weights],
            spectral=spectral.to(device, torch.float32),
            coef=coef.to(device, torch.float32),
            gram=gram.to(device, torch.float32),
            text_length=text_length,
        )


def quadratic_form(base_input: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``Σ_t z_t G z_tᵀ`` per row for a symmetric ``G`` (``z``: ``[B, T, d]``; returns ``[B]``).

    When ``z`` needs a gradient (the attack phase) the value is built so that autograd returns
    ``2 z G`` from the one product ``z G`` instead of forming a second one.
    """
    product = base_input @ gram
    if not base_input.requires_grad:
        return (product * base_input).sum(dim=(1, 2))
    product = product.detach()
    return 2 * (base_input * product).sum(dim=(1, 2)) - (base_input.detach() * product).sum(dim=(1, 2))


def gap_loss(eraser: ConceptEraser, bank: ProjectionBank, text_states: torch.Tensor,
             base_input: torch.Tensor | None = None, constant: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, ``Σ_l coef[l] · ‖W_l z + R_l(x)‖²`` with ``R_l`` the eraser's residual of layer ``l``.

    Every CPE loss term has this form because the frozen projections are linear without bias
    (docs/baselines.md §CPE): ``f(x) − y = W z + R(x)``. Erase: ``x = c``, ``z = (1+η)(c − c_neutral)``;
    adversarial erase: ``x = c + δ``, ``z = (1+η)(c − c_neutral) + δ``; anchors: ``z = 0``; attack:
    ``x = c + δ``, ``z = δ``. Evaluated exactly as ``zᵀGz + 2 Σ_l coef_l ⟨h_l, z (Up_l W_l)ᵀ⟩ +
    Σ_l coef_l ‖h_l Up_l‖²`` with ``h_l = u Down_l / r``, so no ``[rows, T, out_l]`` projection is formed.

    ``text_states`` and ``base_input`` are ``[B, T, d]`` (``None``: ``z = 0``); ``constant``, if
    given, is ``zᵀGz`` per row computed by the caller (:func:`quadratic_form` otherwise). Returns ``[B]``.
    """
    rows, length, dim = text_states.shape
    layers, _, rank = eraser.down.shape
    down = eraser.down.permute(1, 0, 2).reshape(dim, layers * rank)
    hidden = (eraser.residual_input(text_states).reshape(-1, dim) @ down).view(rows, length, layers, rank) / rank
    up_gram = torch.stack([up @ up.T for up in eraser.up])  # [L, r, r]
    quadratic = (torch.einsum("btlr,lrs->btls", hidden, up_gram) * hidden).sum(dim=(1, 3))  # [B, L]
    loss = quadratic @ bank.coef
    if base_input is None:
        return loss
    up_weight = torch.stack([up @ weight for up, weight in zip(eraser.up, bank.weights, strict=True)])  # [L, r, d]
    up_weight = up_weight.permute(2, 0, 1).reshape(dim, layers * rank)
    projected = (base_input.reshape(-1, dim) @ up_weight).view(rows, length, layers, rank)
    cross = (projected * hidden).sum(dim=(1, 3))  # [B, L]
    constant = quadratic_form(base_input, bank.gram) if constant is None else constant
    return loss + 2 * (cross @ bank.coef) + constant


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class ConceptData:
    """One concept's encoded prompts: paired template states, the empty prompt and the anchors."""

    concept: str
    targets: torch.Tensor  # [M, T, d]
    neutrals: torch.Tensor  # [M, T, d]
    empty: torch.Tensor  # [1, T, d]
    anchors: torch.Tensor  # [A, T, d]

    @property
    def anchor_norms(self) -> torch.Tensor:
        return self.anchors.flatten(1).norm(dim=1)


def sample_anchors(anchors: torch.Tensor, count: int, noise: float, generator: torch.Generator,
                   norms: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` mixed anchors (docs/baselines.md §CPE, anchor preservation).

    Draws ``2·count`` states uniformly with replacement, adds ``noise · ‖e‖_F`` times standard normal
    noise per element (‖e‖_F over the whole state), and mixes consecutive pairs with one
    ``λ ~ Beta(1, 1)`` (= U(0, 1)) each: ``λ e_a + (1 − λ) e_b``.
    """
    if count == 0:
        return anchors[:0]
    norms = anchors.flatten(1).norm(dim=1) if norms is None else norms
    index = torch.randint(len(anchors), (2 * count,), generator=generator)
    eps = torch.randn((2 * count, *anchors.shape[1:]), generator=generator)
    mix = torch.rand(count, generator=generator)
    drawn = anchors[index.to(anchors.device)]
    drawn = drawn + noise * norms[index.to(norms.device)].view(-1, 1, 1) * eps.to(drawn)
    mix = mix.to(drawn).view(-1, 1, 1)
    return mix * drawn[0::2] + (1 - mix) * drawn[1::2]


def _perturbation_init(count: int, text_length: int, text_dim: int, generator: torch.Generator) -> torch.Tensor:
    """Fresh attack perturbations, as the official code: U(±1/√(T·d)) / d², i.e. about zero."""
    return _uniform((count, text_length, text_dim), 1.0 / math.sqrt(text_length * text_dim) / text_dim**2, generator)


def _optimizer(params: Sequence[torch.Tensor], lr: float, warmup: int, steps: int, cycles: int) -> tuple[Any, Any]:
    """AdamW (weight decay 0.01) and diffusers' cosine-with-hard-restarts schedule with linear warm-up."""
    from diffusers.optimization import get_cosine_with_hard_restarts_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    scheduler = get_cosine_with_hard_restarts_schedule_with_warmup(optimizer, min(warmup, steps), steps, cycles)
    return optimizer, scheduler


@dataclass
class PhasePlan:
    """Length, learning rate and cycles of one erase phase."""

    steps: int
    lr: float
    cycles: int


class ConceptTrainer:
    """Trains one concept's :class:`ConceptEraser` (docs/baselines.md §CPE, "How it is trained").

    All random draws (template, anchors, noise, mix-up, initialisations) come from ``generator``.
    ``deltas`` holds the last attack phase's K perturbations (``None`` before the first attack).
    """

    def __init__(self, eraser: ConceptEraser, bank: ProjectionBank, data: ConceptData, config: CPEConfig,
                 generator: torch.Generator, device: torch.device) -> None:
        self.eraser, self.bank, self.data, self.config = eraser.to(device), bank, data, config
        self.generator, self.device = generator, device
        self._anchor_norms = data.anchor_norms
        # z of the clean erase rows, (1+η)(c − c_neutral), and its zᵀGz (constant during training).
        self._erase_base = (1 + config.eta) * (data.targets - data.neutrals)
        self._erase_constant = quadratic_form(self._erase_base, bank.gram)
        self.deltas = None

    @property
    def deltas(self) -> torch.Tensor | None:
        """The last attack phase's perturbations ``[K, T, d]`` (``None`` before the first attack)."""
        return self._deltas

    @deltas.setter
    def deltas(self, value: torch.Tensor | None) -> None:
        self._deltas = None if value is None else value.detach().to(self.device)
        # δG and δᵀGδ: the adversarial rows' zᵀGz terms are then cheap within an erase phase.
        self._delta_gram = None if value is None else self._deltas @ self.bank.gram
        self._delta_constant = None if value is None else (self._deltas * self._delta_gram).sum(dim=(1, 2))

    def _template(self) -> int:
        return int(torch.randint(len(self.data.targets), (1,), generator=self.generator))

    def erase_losses(self) -> dict[str, torch.Tensor]:
        """One erase step's losses: ``erase``, ``adversarial``, ``anchor`` and the weighted ``loss``."""
        config, data = self.config, self.data
        index = self._template()
        target, base = data.targets[index : index + 1], self._erase_base[index : index + 1]
        constant = self._erase_constant[index : index + 1]
        anchors = sample_anchors(data.anchors, config.anchors_per_step, config.anchor_noise, self.generator,
                                 self._anchor_norms)
        if self._deltas is not None:
            rows = torch.cat([target, target + self._deltas])
            bases = torch.cat([base, base + self._deltas])
            shifted = constant + 2 * (base * self._delta_gram).sum(dim=(1, 2)) + self._delta_constant
            constant = torch.cat([constant, shifted])
        else:
            rows, bases = target, base
        erase_rows = gap_loss(self.eraser, self.bank, rows, bases, constant)
        anchor = gap_loss(self.eraser, self.bank, torch.cat([data.empty, anchors])).mean()
        erase = erase_rows[0]
        adversarial = erase_rows[1:].mean() if self._deltas is not None else torch.zeros((), device=erase.device)
        loss = erase + config.adversarial_weight * adversarial + config.anchor_weight * anchor
        return {"loss": loss, "erase": erase, "adversarial": adversarial, "anchor": anchor}

    def attack_loss(self, deltas: torch.Tensor) -> torch.Tensor:
        """The attacker's objective: ``f(c + δ)`` should give back ``f⁰(c)`` (mean over the K rows)."""
        index = self._template()
        target = self.data.targets[index : index + 1]
        return gap_loss(self.eraser, self.bank, target + deltas, deltas).mean()

    def erase_phase(self, stage: int, plan: PhasePlan, log: CPELossLog, progress: Any) -> None:
        """``plan.steps`` AdamW steps on the ResAG with a fresh optimiser and schedule."""
        self.eraser.requires_grad_(True).train()
        params = list(self.eraser.parameters())
        optimizer, scheduler = _optimizer(params, plan.lr, self.config.warmup_steps, plan.steps, plan.cycles)
        for step in range(1, plan.steps + 1):
            losses = self.erase_losses()
            self._check(losses["loss"], stage, "erase", step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            log.log(self.data.concept, stage, "erase", step, lr, **{k: v.item() for k, v in losses.items()})
            progress.update(1)

    def attack_phase(self, stage: int, log: CPELossLog, progress: Any) -> None:
        """Train K fresh perturbations with the ResAG frozen; they become :attr:`deltas`."""
        config = self.config
        self.eraser.requires_grad_(False).eval()
        deltas = _perturbation_init(config.adversarial_prompts, self.bank.text_length, self.bank.text_dim,
                                    self.generator).to(self.device).requires_grad_(True)
        steps = config.stage_iterations
        optimizer, scheduler = _optimizer([deltas], config.attack_lr, config.attack_warmup_steps, steps, 1)
        for step in range(1, steps + 1):
            loss = self.attack_loss(deltas)
            self._check(loss, stage, "attack", step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            log.log(self.data.concept, stage, "attack", step, lr, loss=loss.item())
            progress.update(1)
        self.deltas = deltas
        self.eraser.requires_grad_(True)

    def _check(self, loss: torch.Tensor, stage: int, phase: str, step: int) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the CPE loss of {self.data.concept!r} became {loss.item()} at stage {stage}, {phase} step {step}; "
                "training stopped before that step was applied. The completed stages' stage_<i> folders are kept. "
                "Start a new run (another --save_path) with a lower --lr or --attack_lr, or a smaller --eta or "
                "--anchor_weight."
            )


def first_stage_plan(config: CPEConfig) -> PhasePlan:
    """The first erase phase: ``first_stage_factor``× longer, ``first_stage_lr_factor``× the lr, 2 cycles."""
    return PhasePlan(config.stage_iterations * config.first_stage_factor, config.lr * config.first_stage_lr_factor,
                     FIRST_STAGE_CYCLES)


def stage_plan(config: CPEConfig, stage: int) -> PhasePlan:
    """Erase-phase plan of ``stage`` (1-based)."""
    return first_stage_plan(config) if stage == 1 else PhasePlan(config.stage_iterations, config.lr, 1)


def has_attack(config: CPEConfig, stage: int) -> bool:
    """Whether ``stage`` ends with an attack phase (not the last one: its perturbations would be unused)."""
    return config.adversarial_prompts > 0 and stage < config.stages


def total_steps(config: CPEConfig, first: int = 1) -> int:
    """Steps (erase + attack) of one concept from stage ``first`` to the end."""
    return sum(stage_plan(config, s).steps + (config.stage_iterations if has_attack(config, s) else 0)
               for s in range(first, config.stages + 1))


class CPELossLog(CsvLog):
    """``loss.csv``: one row per step (concept, stage, phase, step, lr, losses); kept up to a resume point."""

    FIELDS = ("concept", "stage", "phase", "step", "lr", "loss", "erase", "adversarial", "anchor")

    def __init__(self, folder: Path, keep_stages: int = 0) -> None:
        keep = (lambda row: int(row["stage"]) <= keep_stages) if keep_stages else None
        super().__init__(folder / LOSS_FILE, self.FIELDS, keep)

    def log(self, concept: str, stage: int, phase: str, step: int, lr: float, **losses: float) -> None:
        row = {"concept": concept, "stage": stage, "phase": phase, "step": step, "lr": f"{lr:.6g}"}
        row.update({key: f"{value:.8g}" for key, value in losses.items()})
        self.write(row)


def _read_prompt_file(path: str) -> list[str]:
    lines = [line.strip() for line in Path(path).expanduser().read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise CoErasingError(f"--anchors {path} has no prompts; write one anchor prompt a line.")
    return prompts


def concept_prompts(concept: str, config: CPEConfig) -> tuple[list[str], list[str], list[str]]:
    """``(target prompts, paired neutral prompts, anchor prompts)`` of one concept (resolved config)."""
    templates = default_templates(concept, config.kind)
    anchors = _read_prompt_file(config.anchors) if config.anchors else default_anchors(concept, config.kind)
    if not anchors:
        raise CoErasingError(f"no anchor prompts are left for {concept!r}; pass --anchors FILE with some.")
    return [t.format(concept) for t in templates], [t.format(config.neutral) for t in templates], anchors


@torch.no_grad()
def encode_prompts(text: Any, prompts: Sequence[str], batch: int = ENCODE_BATCH) -> torch.Tensor:
    """CLIP text states ``[N, T, d]`` (float32) of ``prompts`` (``text``: :class:`coerasing.models.TextComponents`)."""
    parts = [text.encode(list(prompts[i : i + batch])).float() for i in range(0, len(prompts), batch)]
    return torch.cat(parts)


def encode_concepts(text: Any, config: CPEConfig, device: torch.device) -> list[ConceptData]:
    """Encode every concept's prompts once (docs/baselines.md §CPE: the official code caches them too)."""
    empty = encode_prompts(text, [""]).to(device)
    data = []
    for concept in config.concepts:
        targets, neutrals, anchors = concept_prompts(concept, config)
        data.append(ConceptData(
            concept=concept,
            targets=encode_prompts(text, targets).to(device),
            neutrals=encode_prompts(text, neutrals).to(device),
            empty=empty,
            anchors=encode_prompts(text, anchors).to(device),
        ))
    return data


def _load_training_inputs(config: CPEConfig, device: torch.device) -> tuple[ProjectionBank, list[ConceptData]]:
    """Load the text encoder (prompts) and the UNet's cross-attention weights; free the rest."""
    from ..models import load_text_components, load_unet

    text = load_text_components(config.ckpt_path, device, torch.float32)
    data = encode_concepts(text, config, device)
    text_length = int(data[0].targets.shape[1])
    del text
    unet = load_unet(config.ckpt_path, torch.device("cpu"))
    bank = ProjectionBank.from_unet(unet, text_length, device)
    del unet
    if bank.text_dim != data[0].targets.shape[-1]:
        raise CoErasingError(f"--ckpt_path {config.ckpt_path}: the text encoder's width {data[0].targets.shape[-1]} "
                             f"differs from the UNet's cross-attention width {bank.text_dim}.")
    return bank, data


def _layout(config: CPEConfig, bank: ProjectionBank) -> CPELayout:
    return CPELayout(config.concepts, bank.names, bank.out_features, bank.text_dim, config.gate_dim, config.rank,
                     config.separate_key)


def _settings(config: CPEConfig) -> dict[str, Any]:
    """The resolved config as recorded in ``artifact.json`` (without machine-specific fields)."""
    settings = config.to_dict()
    for key in ("device", "threads", "output_dir", "save_path", "resume"):
        settings.pop(key, None)
    return settings


def _save_train_state(folder: Path, stage: int, config: CPEConfig, trainers: Sequence[ConceptTrainer]) -> None:
    """``train_state.pt``: the last complete stage, each concept's generator state and perturbations."""
    state = {
        "completed_stages": stage,
        "settings": resume_settings(config),
        "concepts": [
            {"concept": t.data.concept, "generator": t.generator.get_state(),
             "deltas": None if t.deltas is None else t.deltas.detach().cpu()}
            for t in trainers
        ],
    }
    atomic_write(folder / TRAIN_STATE_FILE, lambda tmp: torch.save(state, tmp))


def _restore(folder: Path, config: CPEConfig, trainers: Sequence[ConceptTrainer]) -> int:
    """Load the resume point into ``trainers``; the number of complete stages (0: start afresh)."""
    path = folder / TRAIN_STATE_FILE
    if not path.exists():
        warnings.warn(f"--resume: no {TRAIN_STATE_FILE} in {folder}, so the run starts at stage 1.", stacklevel=3)
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise CoErasingError(f"the resume state {path} could not be read ({exc}). Delete it to start afresh.") from exc
    saved, current = state["settings"], resume_settings(config)
    changed = [f"{k} ({saved.get(k)!r} → {current[k]!r})" for k in current if saved.get(k) != current[k]]
    if changed:
        raise CoErasingError(f"--resume: the run in {folder} was started with other settings: {', '.join(changed)}. "
                             "Resume with the original settings, or pass another --save_path to start a new run.")
    stage = int(state["completed_stages"])
    adapter, _ = load_cpe(folder / f"stage_{stage}")
    for trainer, saved_eraser, entry in zip(trainers, adapter.erasers, state["concepts"], strict=True):
        trainer.eraser.load_state_dict(saved_eraser.state_dict())
        trainer.generator.set_state(entry["generator"])
        trainer.deltas = entry["deltas"]
    return stage


def _new_trainers(config: CPEConfig, bank: ProjectionBank, data: Sequence[ConceptData],
                  device: torch.device) -> list[ConceptTrainer]:
    """One trainer per concept, each with its own generator seeded with ``--seed`` (as the official
    code reseeds before each concept), so a concept's ResAG does not depend on the others in the list."""
    layout = _layout(config, bank)
    trainers = []
    for item in data:
        generator = torch.Generator().manual_seed(config.seed)
        eraser = layout.new_eraser()
        eraser.reset_parameters(generator)
        trainers.append(ConceptTrainer(eraser, bank, item, config, generator, device))
    return trainers


def train_cpe(config: CPEConfig) -> Path:
    """Train CPE for every concept of ``config`` and return the run folder (an artifact folder).

    Stages run in order; within a stage each concept runs its erase phase and then (except in the
    last stage) its attack phase. After every stage ``stage_<i>/`` holds all concepts' ResAGs and
    ``train_state.pt`` the resume point; ``--resume true`` continues after the last complete stage
    and gives bit-identical weights. The final ResAGs are written to the run folder itself.
    """
    from ..models import parse_device

    config = config.resolved()
    check_output_fields(config)
    device = parse_device(config.device)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, device)
    finally:
        torch.set_num_threads(threads)


def _train(config: CPEConfig, device: torch.device) -> Path:
    """:func:`train_cpe` after the config is resolved and the device chosen."""
    from tqdm.auto import tqdm

    from ..checkpoints import write_run_json

    folder = config.run_folder()
    if not config.resume and ((folder / TRAIN_STATE_FILE).exists() or (folder / ARTIFACT_FILE).exists()):
        raise CoErasingError(f"{folder} already holds a CPE run. Pass --resume true to continue it, or another "
                             "--save_path for a new run.")
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    bank, data = _load_training_inputs(config, device)
    layout = _layout(config, bank)
    trainers = _new_trainers(config, bank, data, device)
    start = _restore(folder, config, trainers) if config.resume else 0
    settings = _settings(config)
    write_run_json(folder, config.to_dict(), status="running", started_after_stage=start, layers=len(bank.names))
    log = CPELossLog(folder, keep_stages=start)
    total = total_steps(config) * len(trainers)
    done = total - total_steps(config, start + 1) * len(trainers)
    progress = tqdm(total=total, initial=done, desc=f"CPE {config.prompt}", unit="step", dynamic_ncols=True,
                    mininterval=2.0)
    try:
        for stage in range(start + 1, config.stages + 1):
            for trainer in trainers:
                trainer.erase_phase(stage, stage_plan(config, stage), log, progress)
                if has_attack(config, stage):
                    trainer.attack_phase(stage, log, progress)
            log.flush()
            save_cpe(folder / f"stage_{stage}", [t.eraser for t in trainers], layout, settings, stage=stage)
            _save_train_state(folder, stage, config, trainers)
        save_cpe(folder, [t.eraser for t in trainers], layout, settings, stage=config.stages)
    except BaseException as exc:
        write_run_json(folder, config.to_dict(), status=f"stopped: {type(exc).__name__}: {exc}",
                       started_after_stage=start, layers=len(bank.names))
        raise
    finally:
        progress.close()
        log.close()
    write_run_json(folder, config.to_dict(), status="finished", started_after_stage=start, layers=len(bank.names),
                   stages=[str(path) for path in stage_artifacts(folder)])
    return folder


# ----------------------------------------------------------------------------------------------
# The method


class CPERuntime(Runtime):
    """A pipeline whose UNet carries CPE's ResAGs on every ``attn2.to_k``/``to_v`` (both CFG branches)."""

    def __init__(self, pipe: Any, artifact: Artifact, adapter: CPEAdapter, layout: CPELayout) -> None:
        super().__init__(pipe, artifact)
        self.adapter, self.layout = adapter, layout
        self.attachment = attach_cpe(pipe.unet, adapter, layout)

    def close(self) -> None:
        """Put the UNet's original Linear modules back."""
        self.attachment.detach()


class CPEMethod(Method):
    """CPE (Lee et al., ICLR 2025): residual attention gates; artifact = a folder (docs/baselines.md §CPE)."""

    name = METHOD_NAME
    summary = "Concept Pinpoint Eraser: per-concept residual attention gates on the cross-attention keys and values"
    artifact_kind = "addon"
    config_class = CPEConfig

    def apply(self, artifact: Artifact, pipe: Any) -> CPERuntime:
        adapter, layout = load_cpe(artifact.folder)
        return CPERuntime(pipe, artifact, adapter, layout)

    def train(self, config: CPEConfig) -> Path:
        return train_cpe(config)

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        """Train (cached) with the comparison's ``cpe`` preset block; one point per stage.

        A point's strength is the number of erase steps up to the end of its stage.
        """
        settings = {"prompt": context.preset("stage1").get("prompt", context.concept), **context.preset(METHOD_NAME),
                    "ckpt_path": context.world()["ckpt_path"], "seed": context.seed}
        config = CPEConfig(**settings).resolved()
        folder = context.run_folder(METHOD_NAME, settings)

        def work() -> None:
            resume = (folder / TRAIN_STATE_FILE).exists()
            train_cpe(CPEConfig(**settings, save_path=str(folder), device=context.device, resume=resume))

        context.once(folder, settings, work)
        points, steps = [], 0
        for stage in range(1, config.stages + 1):
            steps += stage_plan(config, stage).steps
            points.append(CurvePoint(f"stage{stage}", float(steps), folder / f"stage_{stage}"))
        return points


METHODS = {METHOD_NAME: CPEMethod}


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m coerasing.methods.cpe --prompt nudity,naked,erotic,sexual [--save_path DIR] …``."""
    from ..flags import build_parser, parse_config

    parser = build_parser(CPEConfig, "python -m coerasing.methods.cpe", __doc__.split("\n\n")[0])
    folder = train_cpe(parse_config(CPEConfig, parser, argv))
    print(f"saved {folder}")
    return folder


if __name__ == "__main__":
    from ..cli import run_cli

    sys.exit(run_cli(main))
