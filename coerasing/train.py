"""One erasing loop for both stages (docs/method.md §4 text erasing, §5 Co-Erasing).

A stage is only *which conditioning* the concept gets: stage 1 uses the text states ``c`` of an
erase prompt; stage 2 adds the image tokens ``c_img`` of a reference image (through the frozen
IP-Adapter), optionally refined by text (Eq. 5), perturbed (Eq. 6), and a blurred latent (Eq. 7).
Everything else—partial denoising (Eq. 1–2), the negative-guidance target (Eq. 3), the loss (Eq. 4)
and the Adam step on the ``--train_method`` parameters—is shared. One iteration is
:meth:`Eraser.step`, split into :meth:`~Eraser.sample_conditioning`, :meth:`~Eraser.partial_latents`,
:meth:`~Eraser.target` and :meth:`~Eraser.trained_prediction`, so that an eraser with another
target (STEREO's compositional one) subclasses :class:`Eraser` instead of copying the loop.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import checkpoints as ckpt
from .acceleration import compile_for_inference
from .config import EraseConfig
from .errors import CoErasingError, NonFiniteLossError
from .files import remove_stale_temps
from .flags import resume_settings
from .formats import load_unet_checkpoint_into, save_formats, save_unet, unet_skeleton
from .images import (
    choose_subset,
    contrastive_embedding,
    encode_images,
    list_contrastive_pairs,
    list_image_files,
    load_images,
    open_rgb,
)
from .ip_adapter import (
    IPAdapterHandle,
    attach_ip_adapter,
    load_ip_adapter_state_dict,
    resolve_ip_adapter_file,
    unet_noise_pred,
)
from .models import (
    TextComponents,
    check_mixed_precision,
    load_image_encoder,
    load_scheduler_config,
    load_text_components,
    load_unet,
    load_unet_config,
    parse_devices,
    quiet_dtype_cast,
    resolve_dtype,
)
from .objectives import (
    blur_latents,
    erasing_loss,
    negative_guidance_target,
    perturb_image_tokens,
    preservation_loss,
    refine_image_tokens,
)
from .params import select_parameter_names, select_parameters
from .sampling import denoise_to_bucket, make_sampling_scheduler, sample_bucket

logger = logging.getLogger(__name__)

#: The anchor stream's seed is ``--seed`` plus this (a stream apart from the erasing draws).
ANCHOR_SEED_OFFSET = 1_000_003
#: Files of a run folder; a folder holding any of them holds a run (see :func:`check_run_folder`).
RUN_FILES = ("run.json", ckpt.TRAIN_STATE, "unet.pth", "loss.csv")


def random_index(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


# ----------------------------------------------------------------------------------------------
# Stage 2 conditioning: image tokens of the concept


class ConceptImageTokens:
    """Draws ``c_img`` for one iteration (§5 steps 1-3) from precomputed image embeddings."""

    def __init__(
        self,
        handle: IPAdapterHandle,
        embeds: torch.Tensor,
        negatives: torch.Tensor | None,
        config: EraseConfig,
        guide_states: torch.Tensor | None,
    ) -> None:
        self.handle = handle
        self.config = config
        self.guide_states = guide_states
        self.negatives = negatives
        if negatives is None:  # direct images: project and refine every image once, up front
            self.embeds = None
            self.tokens = self._refine(handle.project(embeds))
        else:  # contrastive pairs: the concept direction is drawn per iteration
            self.embeds = embeds
            self.tokens = None
            if config.use_average:
                mean = contrastive_embedding(embeds, negatives, config.diff_method).mean(0, keepdim=True)
                self.tokens = self._refine(handle.project(mean))

    def _refine(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.guide_states is None:
            return tokens
        return refine_image_tokens(tokens, self.guide_states.to(tokens.device, tokens.dtype))

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """``c_img`` of one reference image (or pair), ``[1, N, d]``."""
        if self.tokens is not None:  # one projected image (or the averaged pair direction)
            tokens = self.tokens[random_index(len(self.tokens), generator)][None]
        else:
            size = min(self.config.contrastive_size, len(self.embeds))
            order = torch.randperm(len(self.embeds), generator=generator)[:size]
            direction = contrastive_embedding(
                self.embeds[order].mean(0, keepdim=True),
                self.negatives[order].mean(0, keepdim=True),
                self.config.diff_method,
            )
            tokens = self._refine(self.handle.project(direction))
        return perturb_image_tokens(tokens, self.config.noise_factor, generator)


def load_reference_images(config: EraseConfig) -> tuple[list[Image.Image], list[Image.Image] | None]:
    """Open the seeded subset of ``--image`` (or the ``--contrastive_image`` pairs); no model needed.

    Returns ``(images, None)`` or ``(positives, negatives)``; corrupt files are skipped with a warning.
    """
    if config.image is not None:
        files = choose_subset(list_image_files(config.image), config.image_number, config.seed)
        return load_images(files)[1], None
    pairs = list_contrastive_pairs(config.contrastive_image)
    if config.image_number < len(pairs):
        pairs = sorted(random.Random(config.seed).sample(pairs, config.image_number))
    opened = [(open_rgb(positive), open_rgb(negative)) for positive, negative in pairs]
    readable = [(positive, negative) for positive, negative in opened if positive and negative]
    if not readable:
        raise CoErasingError(f"--contrastive_image {config.contrastive_image}: no pair has two readable images.")
    return [positive for positive, _ in readable], [negative for _, negative in readable]


def _build_image_tokens(
    config: EraseConfig,
    references: tuple[list[Image.Image], list[Image.Image] | None],
    text: TextComponents,
    handle: IPAdapterHandle,
    device: torch.device,
    dtype: torch.dtype,
) -> ConceptImageTokens:
    images, negative_images = references
    encoder = load_image_encoder(config.image_encoder_path, device, dtype)
    embeds = encode_images(encoder, images)
    negatives = encode_images(encoder, negative_images) if negative_images is not None else None
    logger.info("encoded %d reference images", len(images))
    del encoder
    guide = text.encode(config.text_guide) if config.text_guide else None
    return ConceptImageTokens(handle, embeds.to(device), negatives, config, guide)


# ----------------------------------------------------------------------------------------------
# The trainer


@dataclass
class Models:
    """The trainable UNet ε_θ, its frozen reference ε*, and what conditions them."""

    trainable: torch.nn.Module
    frozen: torch.nn.Module
    text: TextComponents
    plain_keys: list[str]
    train_device: torch.device
    frozen_device: torch.device
    frozen_dtype: torch.dtype
    train_handle: IPAdapterHandle | None = None
    frozen_handle: IPAdapterHandle | None = None


def check_against_model(config: EraseConfig) -> None:
    """Checks that need the model's configs but no weights (§6 and the schedule), before any loading.

    ``--train_method`` must select parameters of this UNet, ``--num_inference_steps`` must fit the
    noise schedule, and the ``--blur_factor`` kernel must fit the latent (reflect padding).
    """
    unet_config = load_unet_config(config.ckpt_path)
    skeleton = unet_skeleton(unet_config)
    select_parameter_names((name for name, _ in skeleton.named_parameters()), config.train_method)
    train_steps = int(load_scheduler_config(config.ckpt_path).get("num_train_timesteps", 1000))
    if config.num_inference_steps > train_steps:
        raise CoErasingError(
            f"--num_inference_steps {config.num_inference_steps} is more than the model's {train_steps} training "
            f"timesteps; use at most {train_steps} (50 is the usual value)."
        )
    size = unet_config.get("sample_size", 64)
    smallest = min(size) if isinstance(size, (list, tuple)) else int(size)
    if config.image_stage and config.blur_factor // 2 >= smallest:
        raise CoErasingError(
            f"--blur_factor {config.blur_factor} is wider than this model's {smallest}×{smallest} latent allows "
            f"(reflect padding needs a kernel under {2 * smallest}); use 3 or 5, or 0 to turn the blur off."
        )


#: What an erasing run writes into its folder: ``--overwrite`` removes these and nothing else.
ERASE_FILES = ("unet*.pth", *RUN_FILES, "unet.safetensors", "unet_diffusers")


def check_run_folder(config: EraseConfig, folder: Path) -> None:
    """Refuse to start a new run over an existing one: nothing is lost without ``--overwrite``.

    Another method's run is never written into, and ``--overwrite`` removes only what an erasing
    run writes, never the command's own inputs.
    """
    inputs = {"--image": config.image, "--unet_ckpt_path": config.unet_ckpt_path,
              "--contrastive_image": config.contrastive_image}
    if config.resume or not folder.is_dir():
        ckpt.claim_run_folder(folder, "coerasing")
        return
    found = [name for name in RUN_FILES if (folder / name).exists()]
    found += sorted(p.name for p in folder.glob("unet_*.pth"))[:3]
    ckpt.claim_run_folder(folder, "coerasing", overwrite=bool(found) and config.overwrite, owned=ERASE_FILES,
                     inputs=inputs)
    if found and not config.overwrite:
        raise CoErasingError(
            f"{folder} already holds a run ({', '.join(found)}). Pass --resume to continue it, --overwrite to "
            "replace it, or another --save_path/--output_dir for a new run."
        )


def load_models(config: EraseConfig) -> Models:
    """Load ε_θ (fp32, train device) and ε* (frozen device, frozen dtype), both from the same weights."""
    frozen_device, train_device = parse_devices(config.devices)
    check_mixed_precision(config.mixed_precision, (frozen_device, train_device))
    frozen_dtype = resolve_dtype(config.mixed_precision, frozen_device)
    check_against_model(config)
    trainable = load_unet(config.ckpt_path, torch.device("cpu"))
    if config.unet_ckpt_path:
        found = load_unet_checkpoint_into(trainable, config.unet_ckpt_path)
        print(f"loaded --unet_ckpt_path {config.unet_ckpt_path} ({found})")
    frozen = copy.deepcopy(trainable).to(frozen_device).requires_grad_(False).eval()
    if frozen_dtype != torch.float32:
        with quiet_dtype_cast():
            frozen.to(dtype=frozen_dtype)
    trainable.to(train_device).train()
    if config.gradient_checkpointing:
        trainable.enable_gradient_checkpointing()
    text = load_text_components(config.ckpt_path, frozen_device, frozen_dtype)
    return Models(
        trainable=trainable,
        frozen=frozen,
        text=text,
        plain_keys=list(trainable.state_dict()),
        train_device=train_device,
        frozen_device=frozen_device,
        frozen_dtype=frozen_dtype,
    )


class Eraser:
    """Runs ``config.iterations`` erasing steps with checkpoints, logging and resume.

    ``text`` replaces the model's tokenizer and text encoder (e.g. with learned tokens added, as
    STEREO's rounds erase a learned word); it must live on the frozen models' device and dtype.
    """

    def __init__(self, config: EraseConfig, text: TextComponents | None = None) -> None:
        self.config = config.validate()
        self.folder = config.run_folder()
        # Inputs that need no model are checked first, so mistakes fail in seconds.
        check_run_folder(config, self.folder)
        references = load_reference_images(config) if config.image_stage else None
        ip_adapter_file = resolve_ip_adapter_file(config.ip_adapter) if config.image_stage else None
        if config.unet_ckpt_path and not Path(config.unet_ckpt_path).expanduser().exists():
            raise CoErasingError(
                f"--unet_ckpt_path {config.unet_ckpt_path} does not exist. Pass stage 1's unet.pth, e.g. "
                "checkpoints/text/nudity/unet/unet.pth (run stage 1 first)."
            )
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.models = load_models(config)
        models = self.models
        self.parameters = select_parameters(models.trainable, config.train_method)
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.lr)
        self.scheduler = make_sampling_scheduler(
            load_scheduler_config(config.ckpt_path), config.sampler, config.num_inference_steps
        )
        unet_config = models.trainable.config
        size = unet_config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (1, unet_config.in_channels, *size)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps

        if text is not None:
            models.text = text
        text = models.text
        self.prompt_states = [text.encode(prompt) for prompt in config.prompts]
        self.uncond_states = text.encode("")
        # The anchor-preservation term (Eq. 9, off by default): its prompts and its own random stream, so
        # that the erasing draws are the same with and without it.
        self.preserve_states = [text.encode(prompt) for prompt in config.preserve_list]
        self.anchor_generator = torch.Generator().manual_seed(config.seed + ANCHOR_SEED_OFFSET) \
            if self.preserve_states else None
        self.image_tokens: ConceptImageTokens | None = None
        if config.image_stage:
            ip_state = load_ip_adapter_state_dict(str(ip_adapter_file))
            models.train_handle = attach_ip_adapter(models.trainable, ip_state)
            models.frozen_handle = attach_ip_adapter(models.frozen, ip_state)
            self.image_tokens = _build_image_tokens(
                config, references, text, models.frozen_handle, models.frozen_device, models.frozen_dtype
            )
        # --compile: the no-gradient calls (partial denoising, frozen ε_u/ε_c) go through compiled
        # wrappers that share the eager modules' parameters; the trained forward stays eager.
        self.sampling_unet = models.trainable
        self.frozen_unet = models.frozen
        if config.compile:
            self.sampling_unet = compile_for_inference(models.trainable, models.train_device)
            self.frozen_unet = compile_for_inference(models.frozen, models.frozen_device)
        #: Tensors of the latest iteration, kept to diagnose a non-finite loss.
        self.last: dict[str, torch.Tensor | None] = {}
        #: Iterations whose periodic checkpoint holds finite weights (the resumed one included).
        self.saved: list[int] = []

    # -- one iteration ----------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = resolve_dtype(self.config.mixed_precision, self.models.train_device)
        return torch.autocast(self.models.train_device.type, dtype=dtype)

    def _sampling_fn(self, text_states: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """ε_θ for the partial trajectory: text only, optional classifier-free guidance (Eq. 2)."""
        unet, guidance = self.sampling_unet, self.config.sampling_guidance
        uncond = self.uncond_states.to(text_states.device, text_states.dtype)

        def noise_pred(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            with self._autocast():
                if guidance == 1.0:
                    return unet(latents, timestep, encoder_hidden_states=text_states).sample.float()
                both = unet(
                    latents.repeat(2, 1, 1, 1), timestep, encoder_hidden_states=torch.cat([uncond, text_states])
                ).sample.float()
            eps_u, eps_c = both.chunk(2)
            return eps_u + guidance * (eps_c - eps_u)

        return noise_pred

    @torch.inference_mode()
    def reference_noise_preds(
        self, latents: torch.Tensor, timestep: int, prompt_states: torch.Tensor, image_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen model's ``ε_u`` and ``ε_c`` (docs/method.md §4 step 4, §5 step 6), in fp32.

        With ``--batch_reference`` both come from one batched call. A text-only ``ε_u`` then rides
        along as an image-branch call with all-zero image tokens, which is exact: ``to_k_ip`` and
        ``to_v_ip`` have no bias, so the image branch adds exactly zero. Batching changes fp32
        results in the last bits, so it is opt-in.
        """
        models, config = self.models, self.config
        device, dtype = models.frozen_device, models.frozen_dtype
        z = latents.to(device, dtype)
        t = torch.tensor([timestep], device=device)
        cond, uncond = prompt_states.to(device, dtype), self.uncond_states.to(device, dtype)
        uncond_tokens = None if config.text_uncond else image_tokens
        frozen, handle = self.frozen_unet, models.frozen_handle
        if not config.batch_reference:
            eps_c = unet_noise_pred(frozen, z, t, cond, image_tokens, handle)
            eps_u = unet_noise_pred(frozen, z, t, uncond, uncond_tokens, handle)
            return eps_u.float(), eps_c.float()
        tokens = None
        if image_tokens is not None:
            uncond_tokens = torch.zeros_like(image_tokens) if uncond_tokens is None else uncond_tokens
            tokens = torch.cat([uncond_tokens, image_tokens])
        both = unet_noise_pred(frozen, z.repeat(2, 1, 1, 1), t, torch.cat([uncond, cond]), tokens, handle)
        eps_u, eps_c = both.float().chunk(2)
        return eps_u, eps_c

    def sample_conditioning(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The concept's conditioning of this iteration: one erase prompt's states ``c`` and, in
        stage 2, one reference image's tokens ``c_img`` (§4 step 1, §5 steps 1–3)."""
        prompt_states = self.prompt_states[random_index(len(self.prompt_states), self.generator)]
        image_tokens = self.image_tokens.sample(self.generator) if self.image_tokens is not None else None
        return prompt_states, image_tokens

    def partial_latents(
        self, prompt_states: torch.Tensor, bucket: tuple[int, int] | None = None
    ) -> tuple[int, int, torch.Tensor]:
        """Bucket ``k``, timestep ``t`` and the latent denoised by ε_θ to ``k``'s noise level (Eq. 1–2),
        blurred in stage 2 (Eq. 7)."""
        config, generator = self.config, self.generator
        drawn = sample_bucket(config.num_inference_steps, self.num_train_timesteps, generator)
        k, t = bucket or drawn
        latents = torch.randn(self.latent_shape, generator=generator).to(self.models.train_device)
        text_states = prompt_states.to(self.models.train_device, torch.float32)
        latents = denoise_to_bucket(self._sampling_fn(text_states), latents, self.scheduler, k, generator)
        latents = latents.clone()  # leave inference mode: the trained forward below needs autograd
        if config.image_stage:
            latents = blur_latents(latents, config.blur_factor)
        return k, t, latents

    def target(
        self, latents: torch.Tensor, t: int, prompt_states: torch.Tensor, image_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """The regression target ``ε_u − η(ε_c − ε_u)`` of the frozen model (Eq. 3)."""
        eps_u, eps_c = self.reference_noise_preds(latents, t, prompt_states, image_tokens)
        self.last.update(eps_u=eps_u, eps_c=eps_c)
        return negative_guidance_target(eps_u, eps_c, self.config.negative_guidance)

    def trained_prediction(
        self, latents: torch.Tensor, t: int, prompt_states: torch.Tensor, image_tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """ε_θ(z, t, c ⊕ c_img) of the trained UNet, with gradients."""
        models = self.models
        with self._autocast():
            return unet_noise_pred(
                models.trainable, latents, torch.tensor([t], device=models.train_device),
                prompt_states.to(models.train_device, torch.float32), image_tokens, models.train_handle,
            )

    @torch.inference_mode()
    def anchor_reference(self, latents: torch.Tensor, t: int, anchor_states: torch.Tensor) -> torch.Tensor:
        """The frozen model's text-only ``ε_ref(z, t, c_a)`` for an anchor prompt (Eq. 9), in fp32."""
        models = self.models
        z = latents.to(models.frozen_device, models.frozen_dtype)
        states = anchor_states.to(models.frozen_device, models.frozen_dtype)
        return unet_noise_pred(self.frozen_unet, z, torch.tensor([t], device=models.frozen_device), states).float()

    def preservation(self, latents: torch.Tensor, t: int) -> torch.Tensor:
        """``‖ε_θ(z, t, c_a) − ε_ref(z, t, c_a)‖²`` for one anchor drawn from its own stream, on the
        iteration's partial latent, both text-only (no image tokens) (docs/method.md Eq. 9)."""
        anchor = self.preserve_states[random_index(len(self.preserve_states), self.anchor_generator)]
        reference = self.anchor_reference(latents, t, anchor)
        noise_pred = self.trained_prediction(latents, t, anchor, None)
        self.last.update(anchor_pred=noise_pred.detach(), anchor_reference=reference)
        return preservation_loss(noise_pred, reference.clone().to(self.models.train_device))

    def step(self, bucket: tuple[int, int] | None = None) -> tuple[torch.Tensor, int, int]:
        """One erasing iteration; returns (loss, bucket k, timestep t) before the optimizer step.

        ``bucket`` forces (k, t) instead of drawing them (benchmarks use it to give every loop the
        same work); training never passes it. With ``--preserve_weight`` λ > 0 the loss adds λ times
        the anchor-preservation term (Eq. 9).
        """
        prompt_states, image_tokens = self.sample_conditioning()
        k, t, latents = self.partial_latents(prompt_states, bucket)
        target = self.target(latents, t, prompt_states, image_tokens)
        noise_pred = self.trained_prediction(latents, t, prompt_states, image_tokens)
        self.last.update(prompt_states=prompt_states, image_tokens=image_tokens, latents=latents,
                         noise_pred=noise_pred.detach(), target=target)
        loss = erasing_loss(noise_pred, target.clone().to(self.models.train_device))
        if self.preserve_states:
            loss = loss + self.config.preserve_weight * self.preservation(latents, t)
        return loss, k, t

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; with gradient checkpointing, inside the image branch.

        Checkpointed blocks recompute their forward during backward, so the trained UNet must
        carry the same attention processors then as in its (image-branch) forward.
        """
        handle = self.models.train_handle
        if self.config.gradient_checkpointing and handle is not None:
            with handle.image_branch():
                loss.backward()
        else:
            loss.backward()

    # -- checkpoints ------------------------------------------------------------------------

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.parameters)

    def _save_periodic(self, iteration: int) -> None:
        save_unet(self.models.trainable, self.folder / f"unet_{iteration}.pth", self.models.plain_keys)
        state = {
            "iteration": iteration,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            **({"anchor_generator": self.anchor_generator.get_state()} if self.anchor_generator else {}),
            "torch_rng": torch.get_rng_state(),
            "config": resume_settings(self.config),
        }
        ckpt.save_training_state(self.folder / ckpt.TRAIN_STATE, state)
        if self._weights_finite():
            self.saved.append(iteration)

    def _resume(self) -> int | None:
        """Load the newest resume state; ``None`` when the run already finished at ``--iterations``."""
        state_path = self.folder / ckpt.TRAIN_STATE
        if not state_path.exists():
            warnings.warn(
                f"--resume: no {ckpt.TRAIN_STATE} in {self.folder}, so the run starts at iteration 0. (The default "
                "stage-2 folder name contains --iterations: to extend a run, pass its folder as --save_path.)",
                stacklevel=2,
            )
            return 0
        state = ckpt.load_training_state(state_path)
        now = resume_settings(self.config)
        changed = [
            f"{key} ({state['config'].get(key)!r} → {now[key]!r})"
            for key in now
            if key in state["config"] and state["config"].get(key) != now[key]
        ]
        if changed:
            raise CoErasingError(
                f"--resume: the run in {self.folder} was started with other settings: {', '.join(changed)}. "
                "Resume with the original settings, or pass another --save_path to start a new run."
            )
        iteration = int(state["iteration"])
        if iteration > self.config.iterations:
            raise CoErasingError(
                f"--resume: the run in {self.folder} already reached iteration {iteration}, more than --iterations "
                f"{self.config.iterations}; resuming would overwrite its checkpoints with other weights. Pass "
                f"--iterations {iteration} or more to extend it, or another --save_path for a new run."
            )
        run_json = self.folder / "run.json"
        finished = run_json.exists() and '"status": "finished"' in run_json.read_text(encoding="utf-8")
        if iteration == self.config.iterations and finished and (self.folder / "unet.pth").exists():
            print(f"{self.folder} already finished {iteration} iterations; nothing to do")
            return None
        load_unet_checkpoint_into(self.models.trainable, self.folder / f"unet_{iteration}.pth", "--resume checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if self.anchor_generator is not None and "anchor_generator" in state:
            self.anchor_generator.set_state(state["anchor_generator"])
        torch.set_rng_state(state["torch_rng"])
        if self._weights_finite():
            self.saved.append(iteration)
        print(f"resuming {self.folder} from iteration {iteration}")
        return iteration

    def diagnose_non_finite(self, iteration: int, loss_value: float) -> NonFiniteLossError:
        """Say which input of the failed iteration was not finite first, and name a checkpoint known good.

        A periodic checkpoint is known good when its weights were finite and the iteration after it
        still gave a finite loss (the checkpoint saved just before the failure is the state that
        produced it, so it is not named).
        """
        def bad(name: str) -> bool:
            value = self.last.get(name)
            return value is not None and not bool(torch.isfinite(value).all())

        if bad("prompt_states"):
            cause = "the text states of --prompt are not finite (a broken text encoder in --ckpt_path?)"
        elif bad("image_tokens"):
            cause = ("the image tokens are not finite (check --noise_factor, the reference images and the IP-Adapter "
                     "weights)")
        elif bad("latents"):
            cause = ("the partially denoised latent is not finite: the trained UNet already diverged; lower --lr "
                     f"(now {self.config.lr:g})")
        elif bad("eps_u") or bad("eps_c"):
            cause = ("the frozen reference model's predictions are not finite: the starting weights (--ckpt_path or "
                     "--unet_ckpt_path) hold non-finite values or overflow in --mixed_precision")
        elif not self._weights_finite():
            cause = f"the trained weights became non-finite: lower --lr (now {self.config.lr:g})"
        else:
            cause = (f"the trained UNet's prediction overflowed: lower --lr (now {self.config.lr:g})"
                     + (" or use --mixed_precision no" if self.config.mixed_precision != "no" else ""))
        good = [it for it in self.saved if it + 1 < iteration]
        last_good = self.folder / f"unet_{max(good)}.pth" if good else None
        return NonFiniteLossError(
            f"the loss became {loss_value} at iteration {iteration}; training stopped before that step was applied. "
            f"Likely cause: {cause}. Last good checkpoint: {last_good or 'none yet'}. Start a new run (another "
            "--save_path, or --overwrite) with the fix."
        )

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Path:
        """Train, writing ``unet_<iter>.pth`` every ``--save_iter`` and at the end, and ``unet.pth``."""
        config = self.config
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)
        start = self._resume() if config.resume else 0
        if start is None:
            return self.folder / "unet.pth"
        ckpt.write_run_json(self.folder, config.to_dict(), "coerasing", status="running", started_at_iteration=start)
        log = ckpt.LossLog(self.folder, config.logging_dir, resume_from=start)
        progress = tqdm(range(start, config.iterations), initial=start, total=config.iterations,
                        desc=f"erasing ({config.modality})", dynamic_ncols=True)
        try:
            for index in progress:
                iteration = index + 1
                loss, k, t = self.step()
                loss_value = loss.item()
                if not torch.isfinite(loss):
                    raise self.diagnose_non_finite(iteration, loss_value)
                self.optimizer.zero_grad(set_to_none=True)
                self.backward(loss)
                self.optimizer.step()
                log.log(iteration, loss_value, k, t)
                progress.set_postfix(loss=f"{loss_value:.4g}")
                if iteration % config.save_iter == 0 and iteration < config.iterations:
                    log.flush()
                    self._save_periodic(iteration)
            log.flush()
            if start < config.iterations or not (self.folder / f"unet_{config.iterations}.pth").exists():
                self._save_periodic(config.iterations)
            final, *extra = save_formats(
                self.models.trainable, self.folder, config.save_formats, keys=self.models.plain_keys
            )
        except BaseException as exc:
            ckpt.write_run_json(self.folder, config.to_dict(), "coerasing",
                                status=f"stopped: {type(exc).__name__}: {exc}", started_at_iteration=start)
            raise
        finally:
            log.close()
        ckpt.write_run_json(self.folder, config.to_dict(), "coerasing", status="finished", started_at_iteration=start,
                            final_checkpoint=str(final), exports=[str(path) for path in extra])
        print(f"saved {final}" + "".join(f"\nsaved {path}" for path in extra))
        return final


def erase(config: EraseConfig) -> Path:
    """Run one erasing stage end to end; returns the path of the final ``unet.pth``."""
    return Eraser(config).run()
