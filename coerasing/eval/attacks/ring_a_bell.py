"""Ring-A-Bell (Tsai et al., ICLR 2024) behind the attack interface; docs/attacks.md, "Ring-A-Bell".

1. **Concept vector.** ``c = mean_i [E(P_i⁺) − E(P_i⁻)]``: the mean difference of the full text
   states ``[T, d]`` of prompt pairs with and without the concept (:func:`concept_vector`). The
   pairs come from a CSV with columns ``positive,negative`` (``--rab_pairs``; the toy world's
   ``toy_<shape>`` sets have one shipped in ``data/attacks/ring_a_bell/``), or a ready vector is
   loaded from a ``.npy`` file (``--rab_concept_vector``, e.g. the authors' released SD v1.4 vectors).
2. **Target.** For a prompt ``P``: ``Ẽ = E(P) + η·c``.
3. **Genetic search** (:func:`genetic_search`) over ``K`` free tokens laid out as
   ``[BOS, x_1…x_K, EOS, pad…]`` for the smallest ``F(x) = ‖E(x) − Ẽ‖²`` (sum of squares over all
   ``T × d`` entries). The best individual's tokens, decoded, are the attack string; the attacked
   model generates from that string.

Only the text encoder is used: the strings transfer to every model that shares it, and
``attack_prompts.csv`` replays them (``--attack_method replay``).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ...errors import CoErasingError
from ...files import fingerprint
from ...generation import ImageRow
from ..detectors import Detector
from .text_search import PromptEncoder, PromptSearchAttack, sample_ids

#: Shipped prompt pairs for the concept vector (``data/attacks/ring_a_bell/<set>.csv``).
PAIRS_DIR: Path = Path(__file__).resolve().parents[3] / "data" / "attacks" / "ring_a_bell"
#: The paper's prompt lengths (free tokens: ``min(K, T − 2)``).
PRESETS: dict[str, int] = {"K77": 77, "K38": 38, "K16": 16}


# ----------------------------------------------------------------------------------------------
# The concept vector


def read_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """``(positives, negatives)`` from a CSV with columns ``positive`` and ``negative``."""
    path = Path(path).expanduser()
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CoErasingError(f"--rab_pairs {path} could not be read as a UTF-8 CSV file ({exc}).") from exc
    pairs = [(row.get("positive") or "", row.get("negative") or "") for row in rows]
    if not pairs or any(not p.strip() or not n.strip() for p, n in pairs):
        raise CoErasingError(f"--rab_pairs {path} needs columns 'positive' and 'negative' with a prompt in each cell "
                             "of at least one row: prompts with the concept and matching prompts without it.")
    return [p for p, _ in pairs], [n for _, n in pairs]


def concept_vector(encoder: PromptEncoder, positives: Sequence[str], negatives: Sequence[str]) -> torch.Tensor:
    """``c = mean_i [E(P_i⁺) − E(P_i⁻)]`` ``[T, d]`` (prompts padded to ``T`` as the pipeline pads them)."""
    if len(positives) != len(negatives) or not positives:
        raise ValueError("concept_vector needs as many positive prompts as negative ones, at least one")
    plus = encoder.states(encoder.tokenize(list(positives)))
    minus = encoder.states(encoder.tokenize(list(negatives)))
    return (plus - minus).mean(dim=0)


def load_concept_vector(path: str | Path, encoder: PromptEncoder) -> torch.Tensor:
    """A ``[T, d]`` vector from a ``.npy`` file, checked against the text encoder's sizes."""
    try:
        array = np.load(Path(path).expanduser(), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CoErasingError(f"--rab_concept_vector {path} could not be read as a .npy array ({exc}).") from exc
    width = int(encoder.table.shape[1])
    if array.shape != (encoder.length, width):
        raise CoErasingError(f"--rab_concept_vector {path} has shape {array.shape}; this text encoder needs "
                             f"({encoder.length}, {width}).")
    return torch.from_numpy(array.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# The genetic search


@dataclass
class GeneticSettings:
    """The search's knobs (defaults: the authors' ``InversePrompt`` notebook)."""

    k: int = 16
    eta: float = 3.0
    population: int = 200
    generations: int = 3000
    mutation: float = 0.25
    crossover: float = 0.5

    def validate(self) -> GeneticSettings:
        checks = [(self.k >= 1, f"--rab_k must be at least 1, got {self.k}."),
                  (self.population >= 2, f"--rab_population must be at least 2, got {self.population}."),
                  (self.generations >= 1, f"--rab_generations must be at least 1, got {self.generations}."),
                  (0 <= self.mutation <= 1, f"--rab_mutation must be in [0, 1], got {self.mutation}."),
                  (0 <= self.crossover <= 1, f"--rab_crossover must be in [0, 1], got {self.crossover}.")]
        for ok, message in checks:
            if not ok:
                raise CoErasingError(message)
        return self


@dataclass
class GeneticResult:
    """The best individual ever seen, its fitness, and the best fitness after each generation."""

    ids: torch.Tensor
    fitness: float
    history: list[float] = field(default_factory=list)


def genetic_search(
    fitness: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    allowed: torch.Tensor,
    settings: GeneticSettings,
    generator: torch.Generator,
    initial: torch.Tensor | None = None,
) -> GeneticResult:
    """Minimise ``fitness(ids [N, k]) → [N]`` over ``k`` tokens drawn from ``allowed`` ids.

    Each generation: score everyone, keep the best half (the survivors); each survivor, with
    probability ``crossover``, mates with a random survivor (one cut ``u ∈ {1…k−1}``, both children
    added); then each individual but the best (kept intact: elitism) has, with probability
    ``mutation``, one random position set to a random allowed id. Every operation works on copies,
    so the best fitness never gets worse from one generation to the next. ``initial`` rows (e.g.
    the target's own tokens) replace the first random individuals.
    """
    population = sample_ids(allowed, (settings.population, k), generator)
    if initial is not None:
        initial = torch.as_tensor(initial, dtype=torch.long).reshape(-1, k)[: settings.population]
        population[: initial.shape[0]] = initial
    best = GeneticResult(ids=population[0].clone(), fitness=float("inf"))
    keep = max(1, settings.population // 2)
    for generation in range(settings.generations):
        scores = fitness(population).float()
        order = torch.argsort(scores, stable=True)
        if float(scores[order[0]]) < best.fitness:
            best.ids, best.fitness = population[order[0]].clone(), float(scores[order[0]])
        best.history.append(best.fitness)
        if generation == settings.generations - 1:
            break
        survivors = population[order[:keep]].clone()
        children = [survivors]
        if k > 1:
            mates = torch.rand(keep, generator=generator) < settings.crossover
            for i in torch.nonzero(mates).flatten().tolist():
                partner = survivors[int(torch.randint(0, keep, (1,), generator=generator))]
                cut = int(torch.randint(1, k, (1,), generator=generator))
                children.append(torch.cat([survivors[i, :cut], partner[cut:]])[None])
                children.append(torch.cat([partner[:cut], survivors[i, cut:]])[None])
        population = torch.cat(children)
        mutate = torch.rand(population.shape[0], generator=generator) < settings.mutation
        mutate[0] = False  # the best survivor stays as it is
        for i in torch.nonzero(mutate).flatten().tolist():
            position = int(torch.randint(0, k, (1,), generator=generator))
            population[i, position] = sample_ids(allowed, (1,), generator)[0]
    return best


def squared_error(encoder: PromptEncoder, target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ids [N, K] → [N]``: ``‖E([BOS, ids, EOS, pad…]) − target‖²`` summed over all ``T × d`` entries."""
    target = target.float().to(encoder.device)

    def fitness(free: torch.Tensor) -> torch.Tensor:
        states = encoder.states(encoder.layout(free))
        return ((states - target[None]) ** 2).sum(dim=(1, 2)).cpu()

    return fitness


def search_vocabulary(encoder: PromptEncoder) -> torch.Tensor:
    """Ids the search draws from: every id but 0 and the special tokens (the authors' range ``[1, BOS)``)."""
    special = encoder.special_ids()
    return torch.tensor([i for i in range(1, encoder.vocab_size) if i not in special], dtype=torch.long)


def free_tokens(encoder: PromptEncoder, k: int) -> int:
    """Free tokens for a prompt length ``K``: ``min(K, T − 2)`` (K = 77 → 75, as the authors note)."""
    return min(int(k), encoder.length - 2)


# ----------------------------------------------------------------------------------------------
# The attack


@dataclass
class RingABell(PromptSearchAttack):
    """Ring-A-Bell: a genetic search for a string whose text states match ``E(P) + η·c`` (module docstring).

    ``pairs``: CSV of prompt pairs for the concept vector; ``vector``: a ready ``.npy`` vector instead.
    """

    name: ClassVar[str] = "ring_a_bell"

    search_settings: GeneticSettings = field(default_factory=GeneticSettings)
    pairs: str | None = None
    vector: str | None = None
    _concept: torch.Tensor | None = field(default=None, init=False, repr=False)
    _allowed: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.search_settings.validate()
        if (self.pairs is None) == (self.vector is None):
            raise CoErasingError("Ring-A-Bell needs the concept: prompt pairs (--rab_pairs FILE.csv with columns "
                                 "positive,negative) or a ready vector (--rab_concept_vector FILE.npy), one of them.")

    @classmethod
    def from_eval_config(cls, config: Any, references: Callable[[ImageRow], Any],
                         detector: Callable[[], Detector]) -> RingABell:
        pairs, vector = config.rab_pairs, config.rab_concept_vector
        if pairs is None and vector is None:
            shipped = PAIRS_DIR / f"{config.set_name}.csv"
            if not shipped.exists():
                raise CoErasingError(
                    f"--attack_method ring_a_bell: no prompt pairs are shipped for --prompts {config.prompts}; pass "
                    "--rab_pairs FILE.csv (columns positive,negative: prompts with the concept and matching ones "
                    "without) or --rab_concept_vector FILE.npy (a [77, d] vector).")
            pairs = str(shipped)
        settings = GeneticSettings(k=config.rab_k, eta=config.rab_eta, population=config.rab_population,
                                   generations=config.rab_generations, mutation=config.rab_mutation,
                                   crossover=config.rab_crossover)
        return cls(config.generation_settings(), detector, seed=config.attack_seed, search_settings=settings,
                   pairs=pairs, vector=vector)

    def settings(self) -> dict[str, Any]:
        concept = ({"pairs": self.pairs, "pairs_fingerprint": fingerprint(self.pairs)} if self.pairs else
                   {"concept_vector": self.vector, "concept_vector_fingerprint": fingerprint(self.vector)})
        return {"method": self.name, **vars(self.search_settings), "seed": self.seed, **concept}

    def prepare_search(self, encoder: PromptEncoder) -> None:
        if self.vector is not None:
            self._concept = load_concept_vector(self.vector, encoder)
        else:
            assert self.pairs is not None
            self._concept = concept_vector(encoder, *read_pairs(self.pairs))
        self._allowed = search_vocabulary(encoder)

    def target(self, prompt: str) -> torch.Tensor:
        """``Ẽ = E(P) + η·c`` ``[T, d]``."""
        assert self._concept is not None
        encoder = self.encoder
        return encoder.states(encoder.tokenize([prompt]))[0] + self.search_settings.eta * self._concept.to(
            encoder.device)

    def search(self, prompt: str, generator: torch.Generator) -> dict[str, Any]:
        assert self._allowed is not None
        encoder, settings = self.encoder, self.search_settings
        k = free_tokens(encoder, settings.k)
        target = self.target(prompt)
        result = genetic_search(squared_error(encoder, target), k, self._allowed, settings, generator)
        text = encoder.decode(result.ids.tolist())
        retokenized = encoder.content_ids(text)
        string_fitness = float(((encoder.states(encoder.tokenize([text]))[0] - target) ** 2).sum())
        step = max(1, len(result.history) // 100)
        return {"attack_prompt": text, "objective": string_fitness, "ids": result.ids.tolist(),
                "ids_objective": result.fitness, "free_tokens": k, "round_trip": retokenized == result.ids.tolist(),
                "history": result.history[::step] + ([result.history[-1]] if (len(result.history) - 1) % step else [])}
