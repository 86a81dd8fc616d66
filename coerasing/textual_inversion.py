"""Textual inversion: learn one new token embedding from images (docs/baselines.md §STEREO).

Textual Inversion (Gal et al. 2022) adds a placeholder word to CLIP's vocabulary and trains only
its embedding row so that the frozen diffusion model, conditioned on prompts that contain the word,
denoises images of a concept well. This project uses it twice (docs/baselines.md §STEREO):

- in STEREO's search stage (STE), where each round inverts the concept against the model erased
  in that round and the learned word becomes the next round's erase prompt;
- as the *concept inversion* attack of the evaluation (:func:`concept_inversion_attack`): a word
  learned against the erased model from reference images of the concept, then generated as
  "a photo of <word>".

One training step (STEREO's TI step, batch 1 by default): pick an image (random order, each image
once per pass), resize its shorter side to the resolution (bicubic), centre-crop, flip it with
probability 0.5, encode it with the VAE (a *sample* of the latent distribution, as STEREO; the
mean on request) × ``scaling_factor``, draw ``t`` uniformly in ``[0, T)`` and Gaussian noise,
noise the latent with the model's training schedule, predict with the frozen UNet conditioned on a
random caption template filled with the word, and take the MSE to the noise (to the velocity for
v-prediction models). AdamW updates the whole token-embedding matrix (only the new row gets a
useful gradient, but the prompt's other tokens get gradients too and weight decay shrinks every
row), so after every step all other rows are copied back from a saved copy: they stay
bit-identical.

All randomness (image order, templates, flips, timesteps, noises) comes from one CPU generator
seeded with ``settings.seed``, so a run repeats exactly on any device.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .errors import CoErasingError, NonFiniteLossError
from .files import atomic_write
from .models import TextComponents

if TYPE_CHECKING:
    from .methods.base import Runtime

#: Caption templates for objects and people (our own wording; ``{}`` is the placeholder).
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a picture of the {}",
    "a snapshot showing a {}",
    "an image with a {} in it",
    "a detailed photograph of the {}",
    "a blurry photo of a {}",
    "a {} seen from the side",
    "a candid shot of a {}",
    "a well-lit photo of the {}",
    "a {} in the centre of the frame",
)

#: Caption templates for artistic styles (our own wording).
STYLE_TEMPLATES: tuple[str, ...] = (
    "an artwork in the style of {}",
    "a landscape painted in the manner of {}",
    "a portrait done in the style of {}",
    "an illustration by {}",
    "a canvas showing the style of {}",
    "a still life painted in {} style",
    "brushwork in the style of {}",
    "a sketch after {}",
)

#: STEREO's initializer words and the templates that go with them (docs/baselines.md §STEREO).
INITIALIZERS: dict[str, tuple[str, ...]] = {"person": OBJECT_TEMPLATES, "object": OBJECT_TEMPLATES,
                                            "art": STYLE_TEMPLATES}
LATENT_MODES: tuple[str, ...] = ("sample", "mean")
#: The placeholder :func:`concept_inversion_attack` adds to its copy of the tokenizer by default.
DEFAULT_ATTACK_TOKEN = "<inverted-concept>"
#: ``format`` in the metadata of a file written by :func:`save_token`.
TOKEN_FILE_FORMAT = "coerasing.textual_inversion"


@dataclass
class TextualInversionSettings:
    """Textual-inversion knobs; defaults are STEREO's TI attack (docs/baselines.md §STEREO)."""

    steps: int = 3000
    lr: float = 5e-3
    batch_size: int = 1
    templates: tuple[str, ...] = OBJECT_TEMPLATES
    #: Word whose embedding starts the new row: STEREO uses ``person`` (nudity), ``object``, ``art``.
    initializer: str = "person"
    seed: int = 0
    #: AdamW's default decoupled weight decay, as STEREO's code (it only ever acts on the new row here).
    weight_decay: float = 0.01
    #: Image side in pixels; ``None``: the model's (UNet ``sample_size`` × VAE scale factor, 512 for SD v1.4).
    resolution: int | None = None
    flip_probability: float = 0.5
    #: ``"sample"`` (STEREO) draws from the VAE's latent distribution each step; ``"mean"`` uses its mean.
    latent: str = "sample"
    #: ``False``: one draw of ``t`` and of both noises for the whole run (a deterministic objective, for tests).
    resample_noise: bool = True

    @classmethod
    def for_initializer(cls, initializer: str, **overrides: Any) -> TextualInversionSettings:
        """Settings for ``person``/``object`` (object templates) or ``art`` (style templates)."""
        if initializer not in INITIALIZERS:
            raise CoErasingError(f"initializer must be one of {', '.join(INITIALIZERS)}, got {initializer!r}.")
        return cls(**{"initializer": initializer, "templates": INITIALIZERS[initializer], **overrides})

    def validate(self) -> TextualInversionSettings:
        """Raise :class:`CoErasingError` for a setting that cannot work; return ``self``."""
        if self.steps < 1:
            raise CoErasingError(f"textual inversion steps must be at least 1, got {self.steps}.")
        if not self.lr > 0:
            raise CoErasingError(f"textual inversion lr must be positive, got {self.lr}.")
        if self.batch_size < 1:
            raise CoErasingError(f"textual inversion batch_size must be at least 1, got {self.batch_size}.")
        if self.weight_decay < 0:
            raise CoErasingError(f"textual inversion weight_decay must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.flip_probability <= 1:
            raise CoErasingError(f"flip_probability must be in [0, 1], got {self.flip_probability}.")
        if self.latent not in LATENT_MODES:
            raise CoErasingError(f"latent must be one of {', '.join(LATENT_MODES)}, got {self.latent!r}.")
        if self.resolution is not None and self.resolution < 8:
            raise CoErasingError(f"resolution must be at least 8 pixels, got {self.resolution}.")
        if not self.templates or any(template.count("{}") != 1 for template in self.templates):
            raise CoErasingError("every textual-inversion template must contain '{}' exactly once.")
        if not self.initializer.strip():
            raise CoErasingError("the textual-inversion initializer word is empty.")
        return self


# ----------------------------------------------------------------------------------------------
# The placeholder token


def _check_new_token(tokenizer: Any, token: str) -> None:
    """Refuse a placeholder that is empty, has whitespace, or already exists (added or as a vocabulary word)."""
    if not token or token != token.strip() or any(ch.isspace() for ch in token):
        raise CoErasingError(f"placeholder token {token!r} must be one non-empty word without whitespace.")
    vocab = tokenizer.get_vocab()
    if token in vocab or token.lower() in vocab or f"{token.lower()}</w>" in vocab:
        raise CoErasingError(
            f"placeholder token {token!r} already exists in the tokenizer; choose a new word such as '<my-concept>'."
        )


def _insert_token(tokenizer: Any, text_encoder: torch.nn.Module, token: str) -> int:
    """Add ``token`` to the tokenizer and one row to the text encoder's embedding (its value is set by the caller)."""
    _check_new_token(tokenizer, token)
    trainable = text_encoder.get_input_embeddings().weight.requires_grad
    if tokenizer.add_tokens(token) != 1:
        raise CoErasingError(f"the tokenizer did not accept the placeholder token {token!r}.")
    token_id = int(tokenizer.convert_tokens_to_ids(token))
    with torch.random.fork_rng(devices=[]):  # the new row's throw-away init must not move the caller's RNG
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    text_encoder.get_input_embeddings().weight.requires_grad_(trainable)  # the resized matrix is a new parameter
    if tokenizer(token, add_special_tokens=False).input_ids != [token_id]:
        raise CoErasingError(f"placeholder token {token!r} does not tokenize to its own id; choose another word.")
    return token_id


def initializer_embedding(tokenizer: Any, text_encoder: torch.nn.Module, initializer: str) -> torch.Tensor:
    """The embedding ``[d]`` of ``initializer``: its token's row, or the mean of its tokens' rows if several."""
    ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not ids:
        raise CoErasingError(f"the initializer {initializer!r} gives no tokens.")
    table = text_encoder.get_input_embeddings().weight.detach()
    return table[torch.tensor(ids, device=table.device)].mean(dim=0)


def add_placeholder_token(tokenizer: Any, text_encoder: torch.nn.Module, placeholder: str, initializer: str) -> int:
    """Add ``placeholder`` as a new CLIP token whose embedding starts as ``initializer``'s; return its id.

    The tokenizer gets one added token and the text encoder's token embedding one more row
    (``resize_token_embeddings``; every old row is kept). An ``initializer`` that CLIP splits into
    several tokens (e.g. "van gogh") is **not** an error: the new row is the mean of those tokens'
    embeddings. Errors (:class:`CoErasingError`): ``placeholder`` already exists (as an added token
    or a vocabulary word) or contains whitespace, or ``initializer`` gives no token at all.
    Textual Inversion, Gal et al. 2022 (docs/baselines.md §STEREO).
    """
    start = initializer_embedding(tokenizer, text_encoder, initializer).clone()
    token_id = _insert_token(tokenizer, text_encoder, placeholder)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[token_id] = start
    return token_id


def restore_other_rows(weight: torch.Tensor, original: torch.Tensor, keep: int) -> None:
    """Copy every row of ``original`` except row ``keep`` back into ``weight`` (in place, exactly).

    AdamW's weight decay, and the gradients of the prompt's other tokens, move every row of the
    embedding matrix; only the placeholder's row may change (docs/baselines.md §STEREO).
    """
    with torch.no_grad():
        row = weight[keep].clone()
        weight.copy_(original)
        weight[keep] = row


# ----------------------------------------------------------------------------------------------
# The models


@dataclass
class InversionModels:
    """What textual inversion needs: tokenizer and text encoder (trained row), VAE, noise schedule, the model.

    ``noise_pred(latents, t, text_states) -> ε̂`` is the model attacked: the pipeline's UNet, or a
    runtime's :meth:`~coerasing.methods.base.Runtime.noise_pred` (erasers' add-ons included).
    ``frozen`` lists the modules whose parameters are frozen while training (flags restored after).
    """

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict[str, Any]
    noise_pred: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    #: Device and dtype of the model's inputs (the UNet's).
    model_device: torch.device
    model_dtype: torch.dtype
    latent_size: int
    frozen: tuple[torch.nn.Module, ...] = ()

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        noise_pred: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        copy_text: bool = False,
    ) -> InversionModels:
        """From a ``StableDiffusionPipeline``; ``copy_text``: train on a float32 copy of tokenizer and encoder."""
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
        if copy_text:
            tokenizer = copy.deepcopy(tokenizer)
            text_encoder = copy.deepcopy(text_encoder).to(torch.float32)
        unet = pipe.unet

        def unet_noise_pred(latents: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            return unet(latents, t, encoder_hidden_states=states).sample

        return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=pipe.vae,
                   scheduler_config=dict(pipe.scheduler.config), noise_pred=noise_pred or unet_noise_pred,
                   model_device=unet.device, model_dtype=unet.dtype, latent_size=int(unet.config.sample_size),
                   frozen=(unet, pipe.vae, text_encoder))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The model's image side in pixels (512 for SD v1.4)."""
        return self.latent_size * self.vae_scale_factor


@contextlib.contextmanager
def frozen(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter of ``modules``; restore each flag afterwards."""
    params = {id(p): p for module in modules for p in module.parameters()}
    flags = {key: p.requires_grad for key, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield
    finally:
        for key, p in params.items():
            p.requires_grad_(flags[key])


# ----------------------------------------------------------------------------------------------
# Images and latents


def image_tensor(image: Image.Image, size: int, flip: bool) -> torch.Tensor:
    """``[3, size, size]`` in ``[-1, 1]``: shorter side resized to ``size`` (bicubic), centre crop, optional flip.

    STEREO resizes straight to a square (no crop); for square images, as the reference galleries,
    both are the same.
    """
    image = image.convert("RGB")
    scale = size / min(image.width, image.height)
    resized = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


class LatentCache:
    """The VAE's latent distribution (mean, std) of each (image, flipped?) pair, encoded once when first needed."""

    def __init__(self, vae: torch.nn.Module, images: Sequence[Image.Image], size: int) -> None:
        self.vae, self.images, self.size = vae, list(images), size
        self._moments: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def moments(self, index: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` ``[4, h, w]`` (float32, on the VAE's device) of image ``index``."""
        key = (index, flip)
        if key not in self._moments:
            param = next(self.vae.parameters())
            x = image_tensor(self.images[index], self.size, flip)[None].to(param.device, param.dtype)
            dist = self.vae.encode(x).latent_dist
            self._moments[key] = (dist.mean[0].float(), dist.std[0].float())
        return self._moments[key]


def denoising_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model predicts: the noise (ε), the velocity (``get_velocity``) or the clean latents (sample)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise CoErasingError(f"textual inversion does not support prediction_type {kind!r}.")


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TokenResult:
    """A learned token: its string and id, its embedding (CPU, ``[d]``), the loss of every step."""

    token: str
    token_id: int
    embedding: torch.Tensor = field(repr=False)
    losses: list[float] = field(default_factory=list, repr=False)
    settings: dict[str, Any] = field(default_factory=dict, repr=False)

    def save(self, path: str | Path) -> Path:
        """Write the token with :func:`save_token`."""
        return save_token(path, self.token, self.embedding)


class _Draws:
    """The per-step random choices, all from one CPU generator, in a fixed order."""

    def __init__(self, generator: torch.Generator, n_images: int, settings: TextualInversionSettings,
                 num_train_timesteps: int, latent_shape: tuple[int, ...]) -> None:
        self.generator, self.n_images, self.settings = generator, n_images, settings
        self.T, self.latent_shape = num_train_timesteps, latent_shape
        self._order: list[int] = []
        self._fixed = None if settings.resample_noise else self._noise()

    def _next_image(self) -> int:
        """Images in random order, each once per pass over the set (STEREO's shuffled data loader)."""
        if not self._order:
            self._order = torch.randperm(self.n_images, generator=self.generator).tolist()
        return self._order.pop(0)

    def _noise(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = self.settings.batch_size
        t = torch.randint(0, self.T, (b,), generator=self.generator)
        noise = torch.randn((b, *self.latent_shape), generator=self.generator)
        latent_noise = torch.randn((b, *self.latent_shape), generator=self.generator)
        return t, noise, latent_noise

    def step(self) -> tuple[list[int], list[int], list[bool], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image indices, template indices, flips, t, noise, VAE-sample noise) for one batch."""
        b, templates = self.settings.batch_size, len(self.settings.templates)
        images = [self._next_image() for _ in range(b)]
        chosen = torch.randint(0, templates, (b,), generator=self.generator).tolist()
        flips = (torch.rand(b, generator=self.generator) < self.settings.flip_probability).tolist()
        t, noise, latent_noise = self._fixed if self._fixed is not None else self._noise()
        return images, chosen, flips, t, noise, latent_noise


def encode_prompts(tokenizer: Any, text_encoder: torch.nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP text states ``[B, 77, d]``, with gradients (for the trained embedding row)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def learn_token(
    pipe_or_models: Any,
    images: Sequence[Image.Image],
    settings: TextualInversionSettings,
    placeholder: str,
    progress: bool = True,
) -> TokenResult:
    """Learn the embedding of a new token ``placeholder`` from ``images`` (see the module docstring).

    ``pipe_or_models``: a ``StableDiffusionPipeline`` (its own UNet is the model) or
    :class:`InversionModels`. The token is **added to that tokenizer and text encoder** and keeps
    its learned row afterwards (STEREO's search stage accumulates tokens this way); every other
    row is bit-identical to before. The text encoder must be float32 (AdamW on a half-precision
    matrix loses the updates). The UNet, VAE and the rest of the text encoder are frozen during the
    run (``requires_grad`` restored after it) and accumulate no gradients: the backward pass is
    taken with respect to the embedding matrix only. Textual Inversion, Gal et al. 2022
    (docs/baselines.md §STEREO).
    """
    settings.validate()
    models = pipe_or_models if isinstance(pipe_or_models, InversionModels) else InversionModels.from_pipeline(
        pipe_or_models)
    if not images:
        raise CoErasingError("textual inversion needs at least one image of the concept.")
    if models.text_encoder.get_input_embeddings().weight.dtype != torch.float32:
        raise CoErasingError(
            "textual inversion trains the token embedding in float32; load the text encoder in float32 "
            "(concept_inversion_attack trains on a float32 copy)."
        )
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler.from_config(models.scheduler_config)
    token_id = add_placeholder_token(models.tokenizer, models.text_encoder, placeholder, settings.initializer)
    weight = models.text_encoder.get_input_embeddings().weight
    original = weight.detach().clone()
    size = settings.resolution or models.resolution
    latent_side = size // models.vae_scale_factor
    latent_channels = int(models.vae.config.latent_channels)
    cache = LatentCache(models.vae, images, size)
    draws = _Draws(torch.Generator("cpu").manual_seed(int(settings.seed)), len(images), settings,
                   int(schedule.config.num_train_timesteps), (latent_channels, latent_side, latent_side))
    scaling = float(models.vae.config.scaling_factor)
    device, dtype = models.model_device, models.model_dtype
    losses: list[float] = []
    with frozen((*models.frozen, models.text_encoder)):
        weight.requires_grad_(True)
        optimizer = torch.optim.AdamW([weight], lr=settings.lr, weight_decay=settings.weight_decay)
        bar = tqdm(range(settings.steps), desc=f"textual inversion {placeholder}", disable=not progress,
                   mininterval=5.0)
        for step in bar:
            image_ids, template_ids, flips, t, noise, latent_noise = draws.step()
            moments = [cache.moments(i, flip) for i, flip in zip(image_ids, flips, strict=True)]
            mean = torch.stack([m for m, _ in moments])
            std = torch.stack([s for _, s in moments])
            z0 = mean + std * latent_noise.to(mean.device) if settings.latent == "sample" else mean
            z0, noise, t = (z0 * scaling).to(device), noise.to(device), t.to(device)
            noisy = schedule.add_noise(z0, noise, t)
            prompts = [settings.templates[k].format(placeholder) for k in template_ids]
            states = encode_prompts(models.tokenizer, models.text_encoder, prompts)
            prediction = models.noise_pred(noisy.to(dtype), t, states.to(device, dtype))
            loss = F.mse_loss(prediction.float(), denoising_target(schedule, z0, noise, t).float())
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"textual inversion loss became {float(loss)} at step {step}.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=[weight])
            optimizer.step()
            restore_other_rows(weight, original, token_id)
            losses.append(float(loss.detach()))
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
        weight.grad = None
    embedding = weight.detach()[token_id].to("cpu", torch.float32).clone()
    return TokenResult(token=placeholder, token_id=token_id, embedding=embedding, losses=losses,
                       settings=asdict(settings))


# ----------------------------------------------------------------------------------------------
# Files


def save_token(path: str | Path, token: str, embedding: torch.Tensor) -> Path:
    """Write ``{token: embedding [d]}`` as safetensors (atomically), the token string also in the metadata."""
    from safetensors.torch import save_file

    vector = embedding.detach().to("cpu").reshape(-1).contiguous()
    metadata = {"format": TOKEN_FILE_FORMAT, "token": token, "dim": str(vector.numel())}
    return atomic_write(path, lambda tmp: save_file({token: vector}, str(tmp), metadata=metadata))


def read_token(path: str | Path) -> tuple[str, torch.Tensor]:
    """``(token, embedding [d])`` of a file written by :func:`save_token` (or any one-tensor safetensors file)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            token = (handle.metadata() or {}).get("token") or (keys[0] if len(keys) == 1 else None)
            if token is None or token not in keys:
                raise CoErasingError(f"{path} holds no single learned token (keys: {keys}).")
            vector = handle.get_tensor(token)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CoErasingError(f"{path} is not a readable learned-token file ({exc}).") from exc
    if vector.dim() == 2 and vector.shape[0] == 1:
        vector = vector[0]  # diffusers' learned_embeds layout [1, d]
    if vector.dim() != 1:
        raise CoErasingError(f"{path}: the token's embedding has shape {list(vector.shape)}, expected [d].")
    return token, vector


def load_token(path: str | Path, tokenizer: Any, text_encoder: torch.nn.Module) -> int:
    """Add the token saved at ``path`` to ``tokenizer`` / ``text_encoder`` with its exact embedding; return its id."""
    token, vector = read_token(path)
    dim = int(text_encoder.get_input_embeddings().weight.shape[1])
    if vector.numel() != dim:
        raise CoErasingError(
            f"{path}: the token's embedding has {vector.numel()} values; this text encoder needs {dim}."
        )
    token_id = _insert_token(tokenizer, text_encoder, token)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = vector.to(weight.device, weight.dtype)
    return token_id


# ----------------------------------------------------------------------------------------------
# The concept inversion attack


@dataclass
class ConceptInversionResult:
    """The token learned against the erased model and the text states of ``prompt`` with it (``[1, 77, d]``)."""

    token: TokenResult
    prompt: str
    prompt_embeds: torch.Tensor = field(repr=False)


def concept_inversion_attack(
    runtime: Runtime,
    images: Sequence[Image.Image],
    settings: TextualInversionSettings,
    placeholder: str = DEFAULT_ATTACK_TOKEN,
    prompt: str = "a photo of {}",
    progress: bool = True,
) -> ConceptInversionResult:
    """Concept inversion: learn a token for the erased concept against ``runtime``'s model, from ``images``.

    The model is ``runtime.noise_pred`` (so add-on erasers and attention processors are active);
    the VAE and noise schedule are the pipeline's. Training runs on a float32 copy of the
    pipeline's tokenizer and text encoder, so those are unchanged when this returns. The result
    holds the learned token and the text states of ``prompt.format(token)`` (encoder's dtype, on
    its device), ready for ``runtime.render(..., prompt_embeds=...)`` (repeat them for several
    seeds). Textual Inversion, Gal et al. 2022, as STEREO's attack (docs/baselines.md §STEREO).
    """
    if prompt.count("{}") != 1:
        raise CoErasingError(f"the attack prompt must contain '{{}}' exactly once, got {prompt!r}.")
    pipe = runtime.pipe
    models = InversionModels.from_pipeline(pipe, noise_pred=runtime.noise_pred, copy_text=True)
    result = learn_token(models, images, settings, placeholder, progress=progress)
    text = TextComponents(models.tokenizer, models.text_encoder)
    attack_prompt = prompt.format(result.token)
    states = text.encode(attack_prompt).to(pipe.text_encoder.device, pipe.text_encoder.dtype)
    del models, text
    return ConceptInversionResult(token=result, prompt=attack_prompt, prompt_embeds=states)

