"""Step 3 of the evaluation: the UnlearnDiff attack (Zhang et al. 2023; docs/method.md §9).

For a prompt whose generation by the erased model does not show the concept, UnlearnDiff looks for
``k`` prefix tokens that make the *erased* UNet denoise the *base* model's image of that prompt
well, i.e. that bring the erased concept back, and then checks whether the attacked prompt's
generation (same seed and guidance) shows the concept.

The objective (UnlearnDiff ``ClassifierTask.get_loss``): the base model's image, resized (shorter
side, bicubic) and centre-cropped to the generation size, is encoded by the VAE to
``z0 = mean(E(x))·scaling_factor``; a step draws noise ``ε`` and forms
``z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε``; the loss is ``MSE(ε_erased(z_t, t, c(prefix ⊕ prompt)), ε)``, where
the text states ``c`` are CLIP's output for ``[BOS, p_1…p_k, prompt tokens, EOS, …]`` (77 tokens;
the prompt's tokens are shifted right by ``k``, as UnlearnDiff's ``prefix_k`` insertion).

What is optimised (``space``):

``vocab`` (UnlearnDiff, default)
    ``k`` rows of weights over the vocabulary, kept on the simplex ``{p ∈ [0,1]^V, Σp = 1}`` by
    projection (bisection on the shift μ of ``clip(a − μ, 0, 1)``), started uniform. Each step
    samples a one-hot token per row from the weights, embeds it, and passes the gradient back
    straight-through (``hardtanh`` of the one-hot's gradient), then takes an Adam step (lr 0.01,
    weight decay 0.1: UnlearnDiff's ``configs/*/text_grad_*.json`` and ``attack.py`` defaults)
    and projects. The attacked prompt is the argmax token of each row: real text.
``embedding``
    ``k`` free embedding vectors (started at the embeddings of random tokens), Adam on them
    directly; the attacked generation uses these embeddings (a stronger, non-textual attack).

When the attacked prompt is checked (``schedule``):

``unlearndiff`` (default)
    UnlearnDiff's ``sequential`` mode: for each of ``timesteps`` evenly spaced timesteps
    ``T/n/2, T/n/2 + T/n, …`` (10, 30, …, 990 for n = 50) in turn, ``iterations`` steps at that
    ``t`` (fresh noise each step), then the attacked prompt is generated and detected; the attack
    stops at the first success.
``random``
    ``iterations`` steps in all, each with a random ``t``, one check at the end.

All randomness (token samples, noise, timesteps, initial embeddings) comes from one CPU generator
seeded by ``(seed, row seed)``, so a run repeats exactly and does not depend on sharding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CoErasingError
from ..generation import GenerationSettings, ImageRow, default_size, row_call_settings, save_png
from ..methods.base import Runtime
from .attack_records import attack_record_path, load_attack_records, save_attack_record  # noqa: F401 (re-exported)
from .detectors import Detector

SPACES: tuple[str, ...] = ("vocab", "embedding")
SCHEDULES: tuple[str, ...] = ("unlearndiff", "random")


@dataclass
class AttackSettings:
    """The attack's knobs (defaults: UnlearnDiff's nudity/object/style configs)."""

    k: int = 5
    iterations: int = 40
    lr: float = 0.01
    weight_decay: float = 0.1
    space: str = "vocab"
    schedule: str = "unlearndiff"
    timesteps: int = 50
    seed: int = 0
    #: UnlearnDiff draws fresh noise every step; ``False`` fixes it (a deterministic objective, for tests).
    resample_noise: bool = True

    def validate(self) -> AttackSettings:
        if self.k < 1:
            raise CoErasingError(f"--attack_k must be at least 1, got {self.k}.")
        if self.iterations < 1:
            raise CoErasingError(f"--attack_iterations must be at least 1, got {self.iterations}.")
        if not self.lr > 0:
            raise CoErasingError(f"--attack_lr must be positive, got {self.lr}.")
        if self.weight_decay < 0:
            raise CoErasingError(f"--attack_weight_decay must be >= 0, got {self.weight_decay}.")
        if self.space not in SPACES:
            raise CoErasingError(f"--attack_space must be one of {', '.join(SPACES)}, got {self.space!r}.")
        if self.schedule not in SCHEDULES:
            raise CoErasingError(f"--attack_schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if self.timesteps < 1:
            raise CoErasingError(f"--attack_timesteps must be at least 1, got {self.timesteps}.")
        return self


# ----------------------------------------------------------------------------------------------
# Text states from token embeddings


@contextlib.contextmanager
def token_embeddings_replaced(text_encoder: torch.nn.Module, embeds: torch.Tensor) -> Iterator[None]:
    """Make the text encoder's token-embedding lookup return ``embeds`` ``[B, L, d]`` instead.

    The rest of CLIP's forward runs unchanged (position embeddings, causal mask, final layer norm),
    so ``text_encoder(ids)`` with the embeddings of ``ids`` gives exactly ``text_encoder(ids)``.
    """
    module = text_encoder.get_input_embeddings()
    handle = module.register_forward_hook(lambda _module, _args, _output: embeds)
    try:
        yield
    finally:
        handle.remove()


def encode_token_embeddings(
    text_encoder: torch.nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor
) -> torch.Tensor:
    """CLIP text states ``[B, 77, d]`` for token embeddings ``embeds`` (``input_ids`` give only the length)."""
    with token_embeddings_replaced(text_encoder, embeds.to(text_encoder.dtype)):
        return text_encoder(input_ids.to(text_encoder.device))[0]


@dataclass
class PrefixLayout:
    """Token ids ``[BOS, p_1…p_k, prompt…, EOS, EOS…]`` (77) and where the prefix and prompt sit."""

    ids: torch.Tensor
    k: int
    prompt_ids: list[int]
    truncated: bool

    def with_prefix(self, prefix_ids: Sequence[int]) -> torch.Tensor:
        ids = self.ids.clone()
        ids[0, 1 : 1 + self.k] = torch.tensor(list(prefix_ids), dtype=ids.dtype)
        return ids


def prefix_layout(tokenizer: Any, prompt: str, k: int) -> PrefixLayout:
    """UnlearnDiff's ``prefix_k`` layout: the prompt's tokens shifted right by ``k``, EOS-padded to 77.

    A prompt too long to fit after the prefix is cut (UnlearnDiff drops prompts over 60 tokens, see
    :func:`coerasing.eval.prompts.attack_eligible`, so this happens only when asked for).
    """
    length = int(tokenizer.model_max_length)
    bos, eos = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)
    content = tokenizer(prompt, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]
    room = length - 2 - k
    if room < 0:
        raise CoErasingError(f"--attack_k {k} leaves no room for the prompt in {length} tokens.")
    kept = list(content[:room])
    ids = [bos] + [eos] * k + kept + [eos] * (length - 1 - k - len(kept))
    return PrefixLayout(torch.tensor([ids], dtype=torch.long), k, kept, truncated=len(content) > room)


# ----------------------------------------------------------------------------------------------
# The two search spaces


class _StraightThroughSample(torch.autograd.Function):
    """Forward: a one-hot sample per row of ``weights`` (given); backward: ``hardtanh`` of the gradient."""

    @staticmethod
    def forward(ctx: Any, weights: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return one_hot

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.hardtanh(grad), None


def project_simplex(weights: torch.Tensor, tolerance: float = 1e-5) -> torch.Tensor:
    """Rows onto ``{p ∈ [0,1]^V : Σp = 1}``: ``clip(a − μ, 0, 1)`` with μ found by bisection (UnlearnDiff).

    Rows already there (``|Σ clip(a, 0, 1) − 1| ≤ tolerance``) are only clipped.
    """
    a = weights.detach().double()
    clipped = a.clamp(0, 1)
    done = (clipped.sum(-1) - 1).abs() <= tolerance
    low, high = a.min(-1).values - 1, a.max(-1).values
    for _ in range(200):
        if float((high - low).max()) <= tolerance:
            break
        mid = (low + high) / 2
        above = (a - mid[:, None]).clamp(0, 1).sum(-1) > 1
        low, high = torch.where(above, mid, low), torch.where(above, high, mid)
    projected = (a - ((low + high) / 2)[:, None]).clamp(0, 1)
    return torch.where(done[:, None], clipped, projected).to(weights.dtype)


class VocabPrefix:
    """UnlearnDiff's variable: ``k`` distributions over the vocabulary (see the module docstring)."""

    def __init__(self, token_embedding: torch.Tensor, k: int):
        self.table = token_embedding.float()
        vocab = token_embedding.shape[0]
        self.weights = torch.full((k, vocab), 1.0 / vocab, device=token_embedding.device, requires_grad=True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.weights]

    def embeds(self, generator: torch.Generator) -> torch.Tensor:
        probs = self.weights.detach().float().cpu().clamp_min(0)
        picks = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        one_hot = F.one_hot(picks, probs.shape[1]).to(self.weights.device, self.weights.dtype)
        return _StraightThroughSample.apply(self.weights, one_hot) @ self.table

    def after_step(self) -> None:
        with torch.no_grad():
            self.weights.copy_(project_simplex(self.weights))

    def token_ids(self) -> list[int]:
        return [int(i) for i in self.weights.detach().argmax(dim=-1)]

    def final_embeds(self) -> torch.Tensor:
        return self.table[torch.tensor(self.token_ids(), device=self.table.device)]


class EmbeddingPrefix:
    """``k`` free prefix embeddings, started at the embeddings of random tokens."""

    def __init__(self, token_embedding: torch.Tensor, k: int, generator: torch.Generator):
        self.table = token_embedding
        start = torch.randint(0, token_embedding.shape[0], (k,), generator=generator)
        self.vectors = token_embedding[start.to(token_embedding.device)].detach().float().clone().requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.vectors]

    def embeds(self, generator: torch.Generator) -> torch.Tensor:  # noqa: ARG002 - same interface
        return self.vectors

    def after_step(self) -> None:
        return None

    def token_ids(self) -> list[int]:
        """The nearest tokens (cosine), for a readable approximation of the prefix."""
        table = F.normalize(self.table.float(), dim=-1)
        return [int(i) for i in (F.normalize(self.vectors.detach(), dim=-1) @ table.T).argmax(dim=-1)]

    def final_embeds(self) -> torch.Tensor:
        return self.vectors.detach()


# ----------------------------------------------------------------------------------------------
# The objective


def reference_latent(vae: torch.nn.Module, image: Image.Image, height: int, width: int) -> torch.Tensor:
    """``z0``: the image resized (shorter side, bicubic), centre-cropped to ``height×width``, VAE mean × scale."""
    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    param = next(vae.parameters())
    with torch.no_grad():
        latent = vae.encode(x.to(param.device, param.dtype)).latent_dist.mean
    return latent * float(vae.config.scaling_factor)


@dataclass
class AttackModels:
    """The erased model's ε (through its runtime), the frozen text encoder, tokenizer and VAE, and ᾱ_t."""

    runtime: Runtime
    text_encoder: torch.nn.Module
    tokenizer: Any
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor

    @classmethod
    def from_runtime(cls, runtime: Runtime) -> AttackModels:
        """The attack's view of an erased model: ε goes through :meth:`Runtime.noise_pred`, so add-on
        modules and attention processors of the eraser are part of the attacked forward."""
        from diffusers import DDPMScheduler

        pipe = runtime.pipe
        schedule = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
        for module in (pipe.unet, pipe.text_encoder, pipe.vae):
            module.requires_grad_(False).eval()
        return cls(runtime, pipe.text_encoder, pipe.tokenizer, pipe.vae, schedule)

    @classmethod
    def from_pipeline(cls, pipe: Any) -> AttackModels:
        """A plain pipeline (its UNet is the erased model)."""
        return cls.from_runtime(Runtime(pipe))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.runtime.device


def denoising_loss(
    models: AttackModels, z0: torch.Tensor, states: torch.Tensor, t: int, noise: torch.Tensor
) -> torch.Tensor:
    """``MSE(ε_erased(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, states), ε)``."""
    alpha = models.alphas_cumprod[t].to(z0.device, torch.float32)
    noisy = (alpha.sqrt() * z0.float() + (1 - alpha).sqrt() * noise).to(z0.dtype)
    timestep = torch.tensor([t], device=z0.device)
    prediction = models.runtime.noise_pred(noisy, timestep, states.to(z0.dtype))
    return F.mse_loss(prediction.float(), noise.float())


def unlearndiff_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """UnlearnDiff's ``sampled_t``: ``range(T//n//2, T, T//n)[:n]`` (10, 30, …, 990 for T=1000, n=50)."""
    step = max(num_train_timesteps // n, 1)
    return list(range(step // 2, num_train_timesteps, step))[:n]


def attack_generator(seed: int, row_seed: int) -> torch.Generator:
    """The attack's CPU generator for one prompt, from ``(seed, row seed)``."""
    state = np.random.SeedSequence([int(seed), int(row_seed)]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class AttackResult:
    """Outcome of one prompt's attack: losses per step, checks per round, the prefix found."""

    success: bool | None
    prefix_ids: list[int]
    attack_prompt: str
    losses: list[float] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    evidence: Any = field(default=None, repr=False)
    final_states: torch.Tensor | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"success": self.success, "prefix_ids": self.prefix_ids, "attack_prompt": self.attack_prompt,
                "losses": self.losses, "rounds": self.rounds}


#: ``check(text_states) -> (shows the concept?, evidence)``: generates the attacked prompt and detects.
Check = Callable[[torch.Tensor], tuple[bool, Any]]


def attack_prompt(
    models: AttackModels,
    prompt: str,
    z0: torch.Tensor,
    settings: AttackSettings,
    generator: torch.Generator,
    check: Check | None = None,
) -> AttackResult:
    """Run the attack on one prompt (see the module docstring); ``check`` decides success after each round."""
    settings.validate()
    device = models.device
    layout = prefix_layout(models.tokenizer, prompt, settings.k)
    ids = layout.ids.to(device)
    table = models.text_encoder.get_input_embeddings().weight.detach()
    base = table[ids[0]]  # 77 × d
    prefix = (VocabPrefix(table, settings.k) if settings.space == "vocab"
              else EmbeddingPrefix(table, settings.k, generator))
    optimizer = torch.optim.Adam(prefix.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    T = models.num_train_timesteps
    if settings.schedule == "unlearndiff":
        rounds = [[t] * settings.iterations for t in unlearndiff_timesteps(T, settings.timesteps)]
    else:
        rounds = [[int(t) for t in torch.randint(0, T, (settings.iterations,), generator=generator)]]
    fixed_noise = None if settings.resample_noise else torch.randn(z0.shape, generator=generator)

    def states_for(prefix_embeds: torch.Tensor) -> torch.Tensor:
        embeds = torch.cat([base[:1], prefix_embeds.to(base.dtype), base[1 + settings.k :]])[None]
        return encode_token_embeddings(models.text_encoder, ids, embeds)

    def final_states() -> torch.Tensor:
        with torch.no_grad():
            if settings.space == "vocab":
                return models.text_encoder(layout.with_prefix(prefix.token_ids()).to(device))[0]
            return states_for(prefix.final_embeds())

    result = AttackResult(success=None, prefix_ids=[], attack_prompt="")
    for steps in rounds:
        round_losses = []
        for t in steps:
            optimizer.zero_grad(set_to_none=True)
            noise = fixed_noise if fixed_noise is not None else torch.randn(z0.shape, generator=generator)
            loss = denoising_loss(models, z0, states_for(prefix.embeds(generator)), t, noise.to(device))
            loss.backward()
            optimizer.step()
            prefix.after_step()
            round_losses.append(float(loss.detach()))
        result.losses.extend(round_losses)
        entry: dict[str, Any] = {"t": steps[0] if len(set(steps)) == 1 else None,
                                 "mean_loss": float(np.mean(round_losses)), "prefix_ids": prefix.token_ids()}
        if check is not None:
            positive, evidence = check(final_states())
            entry["positive"] = bool(positive)
            result.success, result.evidence = bool(positive), evidence
        result.rounds.append(entry)
        if result.success:
            break
    result.prefix_ids = prefix.token_ids()
    tokens = result.prefix_ids + layout.prompt_ids
    result.attack_prompt = models.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
    result.final_states = final_states()
    return result


# ----------------------------------------------------------------------------------------------
# Attacking one prompt row (the loop over rows: coerasing.eval.attacks.run_attack)

ATTACK_DIR = "attack"


def attack_row(
    models: AttackModels,
    runtime: Runtime | Any,
    detector: Detector,
    row: ImageRow,
    settings: AttackSettings,
    generation: GenerationSettings,
    reference: Image.Image,
    out_dir: Path,
    made_by: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Attack one prompt row and write ``out_dir/<case>.png`` (the last attacked image) and ``<case>.json``.

    The attacked prompt is generated exactly as the no-attack image (row seed, guidance, size,
    steps and sampler) and judged by ``detector``. ``made_by`` (model, artifact, generation settings)
    is stored in the record so that a later run with other settings never reuses it.
    """
    record = {**attack_row_record(models, runtime, detector, row, settings, generation, reference, out_dir),
              "settings": vars(settings), "made_by": made_by or {}}
    save_attack_record(out_dir, row.case, record)
    return record


def attack_row_record(
    models: AttackModels,
    runtime: Runtime | Any,
    detector: Detector,
    row: ImageRow,
    settings: AttackSettings,
    generation: GenerationSettings,
    reference: Image.Image,
    out_dir: Path,
) -> dict[str, Any]:
    """:func:`attack_row` without its JSON record written (the image is): the record's fields."""
    runtime = runtime if isinstance(runtime, Runtime) else Runtime(runtime)
    guidance, height, width = row_call_settings(row, generation, default_size(runtime.pipe))

    def check(states: torch.Tensor) -> tuple[bool, Any]:
        image = runtime.render([row.seed], guidance, height, width, generation.num_inference_steps,
                               prompt_embeds=states)[0]
        detection = detector.detect([image])[0]
        return detection.positive, (image, detection)

    z0 = reference_latent(models.vae, reference, height, width)
    result = attack_prompt(models, row.prompt, z0, settings, attack_generator(settings.seed, row.seed), check)
    image, detection = result.evidence
    save_png(image, Path(out_dir) / row.file)
    return {"case": row.case, "prompt": row.prompt, "seed": row.seed, "guidance": guidance, "attacked": True,
            **result.to_json(), "detection": detection.to_json()}
