"""CPE's training: encoded prompts, erase and attack phases, stages, resume (:func:`train_cpe`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ...checkpoints import CsvLog, claim_run_folder, write_run_json
from ...errors import CoErasingError, NonFiniteLossError
from ...files import atomic_write, remove_stale_temps
from ...flags import check_output_fields, resume_settings
from ...models import load_text_components, load_unet, parse_device
from ..base import ARTIFACT_FILE
from .config import ENCODE_BATCH, FIRST_STAGE_CYCLES, LOSS_FILE, TRAIN_STATE_FILE, CPEConfig
from .io import load_cpe, save_cpe, stage_artifacts
from .loss import ProjectionBank, gap_loss, quadratic_form
from .modules import ConceptEraser, CPELayout, uniform_tensor
from .prompts import default_anchors, default_templates, read_prompt_list


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
    bound = 1.0 / math.sqrt(text_length * text_dim) / text_dim**2
    return uniform_tensor((count, text_length, text_dim), bound, generator)


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


def concept_prompts(concept: str, config: CPEConfig) -> tuple[list[str], list[str], list[str]]:
    """``(target prompts, paired neutral prompts, anchor prompts)`` of one concept (resolved config)."""
    templates = default_templates(concept, config.kind)
    anchors = read_prompt_list(config.anchors) if config.anchors else default_anchors(concept, config.kind)
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


    folder = config.run_folder()
    claim_run_folder(folder, "cpe")
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
    write_run_json(folder, config.to_dict(), "cpe", status="running", started_after_stage=start, layers=len(bank.names))
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
        write_run_json(folder, config.to_dict(), "cpe", status=f"stopped: {type(exc).__name__}: {exc}",
                       started_after_stage=start, layers=len(bank.names))
        raise
    finally:
        progress.close()
        log.close()
    write_run_json(folder, config.to_dict(), "cpe", status="finished", started_after_stage=start,
                   layers=len(bank.names), stages=[str(path) for path in stage_artifacts(folder)])
    return folder
