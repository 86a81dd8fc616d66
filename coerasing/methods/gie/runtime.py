"""GIE applied to a pipeline: the paired batch, the adapter's features, rendering and the attack's ε."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...errors import CoErasingError
from ...generation import finish_images, seeded_generators
from ..base import Artifact, Runtime
from .adapter import GIEAdapter
from .config import CFG, COND, METHOD_NAME, REPLACEABLE_PROCESSORS, GIEConfig
from .processors import GIEAttnProcessor, GIEController


def encode_target(pipe: Any, target: str) -> tuple[torch.Tensor, int]:
    """T encoded alone as the pipeline encodes prompts (``[1, 77, d]``) and its token count m (BOS/EOS excluded)."""
    ids = pipe.tokenizer(target, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    count = len(ids) - 2
    if count < 1:
        raise CoErasingError(f"--target {target!r} has no tokens; name the concept, e.g. --target nudity.")
    with torch.no_grad():
        states = pipe.encode_prompt(target, pipe.unet.device, 1, False)[0]
    return states.to(pipe.unet.dtype), count


def _first_timestep(scheduler: Any, num_inference_steps: int, device: torch.device) -> tuple[Any, torch.Tensor]:
    """A fresh copy of ``scheduler`` set to ``num_inference_steps`` (the pipeline's is left alone) and its first t."""
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(num_inference_steps, device=device)
    return fresh, fresh.timesteps[0]


class GIERuntime(Runtime):
    """A pipeline with GIE's processors and timestep hook installed (docs/baselines.md §GIE).

    ``close()`` restores the original attention processors and removes the hook.
    """

    def __init__(
        self, pipe: Any, config: GIEConfig, artifact: Artifact | None = None, adapter: GIEAdapter | None = None
    ) -> None:
        super().__init__(pipe, artifact)
        config.validate()
        if config.w is None and adapter is None:
            raise CoErasingError("GIE needs a fixed w (--w, negative) or a trained adapter (adapter.safetensors).")
        unet = pipe.unet
        self.config = config
        self.fixed_w = config.w
        self.adapter = adapter
        self._original = dict(unet.attn_processors)
        foreign = sorted({type(p).__name__ for p in self._original.values()} - set(REPLACEABLE_PROCESSORS))
        if GIEAttnProcessor.__name__ in foreign:
            raise CoErasingError("GIE is already applied to this pipeline; close() that runtime first.")
        if foreign:
            raise CoErasingError(f"GIE replaces every attention processor, but this UNet has {', '.join(foreign)} "
                                 "(e.g. an IP-Adapter); apply GIE to a plain pipeline.")
        self.cross_layers = sum(name.endswith("attn2.processor") for name in self._original)
        if adapter is not None and adapter.num_layers != self.cross_layers:
            raise CoErasingError(f"the GIE adapter takes {adapter.num_layers} cross-attention layers, this UNet has "
                                 f"{self.cross_layers}; train the adapter for this model.")
        target_states, count = encode_target(pipe, config.target)
        self.controller = GIEController(target_states, count, config.cross_fraction, config.self_fraction,
                                        config.self_max_query, int(pipe.scheduler.config.num_train_timesteps))
        self.processors = {name: GIEAttnProcessor(self.controller, name.removesuffix(".processor"))
                           for name in self._original}
        unet.set_attn_processor(dict(self.processors))
        self._hook = unet.register_forward_pre_hook(self.controller.on_unet_call, with_kwargs=True)
        self._closed = False
        self._feature_noise: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def target_count(self) -> int:
        """m: the target words' token count."""
        return self.controller.target_count

    def describe(self) -> dict[str, Any]:
        """The artifact's description plus the settings in use and where ``w`` comes from."""
        info = super().describe() if self.artifact is not None else {"method": METHOD_NAME}
        return {**info, "settings": self.config.settings(), "w": "adapter" if self.fixed_w is None else self.fixed_w}

    # -- w --------------------------------------------------------------------------------------

    def first_step_features(self, latents: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The adapter's input ``[n, m, layers]``: the ``w = 1`` UNet call at the first step, conditional rows only.

        ``latents`` are already scaled for ``timestep`` (``scheduler.scale_model_input``); the
        call's result is discarded.
        """
        n = latents.shape[0]
        ones = torch.ones(n, self.target_count, device=latents.device)
        with torch.no_grad(), self.controller.session(COND, n, ones, features=True):
            self.pipe.unet(latents.repeat_interleave(2, 0), timestep,
                           encoder_hidden_states=states.detach().repeat_interleave(2, 0))
            features = list(self.controller.features or [])
        if len(features) != self.cross_layers:
            raise CoErasingError(f"GIE's feature pass saw {len(features)} cross-attention calls, expected "
                                 f"{self.cross_layers}.")
        return torch.stack(features, dim=-1)

    def prompt_features(
        self, seeds: Sequence[int], height: int, width: int, num_inference_steps: int,
        prompts: Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`first_step_features` for generation: each seed's initial noise at the schedule's first step."""
        from diffusers.utils.torch_utils import randn_tensor


        pipe = self.pipe
        device = pipe.unet.device
        if prompt_embeds is None:
            with torch.no_grad():
                prompt_embeds = pipe.encode_prompt(list(prompts or []), device, 1, False)[0]
        scheduler, t0 = _first_timestep(pipe.scheduler, num_inference_steps, device)
        shape = (len(seeds), pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
                 width // pipe.vae_scale_factor)
        latents = randn_tensor(shape, generator=seeded_generators(seeds), device=device, dtype=prompt_embeds.dtype)
        latents = scheduler.scale_model_input(latents * scheduler.init_noise_sigma, t0)
        return self.first_step_features(latents, t0, prompt_embeds.to(device))

    def token_weights_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Per-pair, per-token ``w`` ``[n, m]``: the fixed ``w``, else the adapter's prediction."""
        if self.fixed_w is not None:
            return torch.full(features.shape[:2], float(self.fixed_w))
        with torch.no_grad():
            return self.adapter(features.cpu()).float()

    def token_weights(
        self, seeds: Sequence[int], height: int, width: int, num_inference_steps: int,
        prompts: Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``w`` ``[n, m]`` for a generation (the adapter's needs the feature pass)."""
        if self.fixed_w is not None:
            return torch.full((len(seeds), self.target_count), float(self.fixed_w))
        features = self.prompt_features(seeds, height, width, num_inference_steps, prompts, prompt_embeds)
        return self.token_weights_from_features(features)

    # -- generation -----------------------------------------------------------------------------

    def render_pairs(
        self,
        seeds: Sequence[int],
        guidance: float,
        height: int,
        width: int,
        num_inference_steps: int,
        prompts: Sequence[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
    ) -> tuple[Any, Any]:
        """Both branches' images (branch 1 on P, branch 2 GIE's) for each seed.

        ``output_type`` goes to diffusers (``"np"``: float ``[B, H, W, 3]`` in [0, 1], unlike :meth:`render`).
        """

        n = len(seeds)
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompts and prompt_embeds")
        if prompts is not None and len(prompts) != n or prompt_embeds is not None and prompt_embeds.shape[0] != n:
            raise ValueError("one prompt (or prompt_embeds row) per seed")
        weights = self.token_weights(seeds, height, width, num_inference_steps, prompts, prompt_embeds)
        if prompts is not None:
            inputs: dict[str, Any] = {"prompt": [p for p in prompts for _ in range(2)]}
        else:
            inputs = {"prompt_embeds": prompt_embeds.repeat_interleave(2, 0)}
        cfg = guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        with torch.no_grad(), self.controller.session(CFG if cfg else COND, n, weights):
            images = self.pipe(
                **inputs,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                generator=seeded_generators([s for s in seeds for _ in range(2)]),
                output_type=output_type,
            ).images
        return images[0::2], images[1::2]

    def render(
        self,
        seeds: Sequence[int],
        guidance: float,
        height: int,
        width: int,
        num_inference_steps: int,
        prompts: Sequence[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
    ) -> list[Any] | np.ndarray:
        """One GIE image (branch 2) per seed from ``prompts`` or text states ``[B, 77, d]``.

        ``output_type="np"`` gives ``[B, H, W, 3]`` uint8, as :meth:`Runtime.render`.
        """

        images = self.render_pairs(seeds, guidance, height, width, num_inference_steps, prompts, prompt_embeds,
                                   "np")[1]
        return finish_images(images, output_type)

    def noise_pred(self, latents: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """GIE's ε(z_t, t, c): the pair (branch 1 and branch 2 share ``z_t``), all rows conditional; branch 2's ε.

        Differentiable with respect to ``latents`` and ``text_states`` (``w`` is not differentiated).
        """
        n = latents.shape[0]
        t = torch.as_tensor(timestep, device=latents.device)
        if t.ndim > 0 and t.numel() == n and t.unique().numel() > 1:
            # GIE gates a whole UNet call by one timestep: one call per distinct timestep (a fine-tuning batch
            # draws t per image), the rows put back in their order
            groups = [torch.nonzero(t == value).flatten() for value in t.unique()]
            eps = torch.cat([self.noise_pred(latents[rows], t[rows], text_states[rows]) for rows in groups])
            return eps[torch.argsort(torch.cat(groups))]
        if self.fixed_w is not None:
            weights = torch.full((n, self.target_count), float(self.fixed_w))
        else:
            weights = self.token_weights_from_features(self._attack_features(tuple(latents.shape[1:]), text_states))
        if t.ndim > 0 and t.numel() == n and n > 1:
            t = t.repeat_interleave(2, 0)
        with self.controller.session(COND, n, weights):
            eps = self.pipe.unet(latents.repeat_interleave(2, 0), t,
                                 encoder_hidden_states=text_states.repeat_interleave(2, 0)).sample
        return eps[1::2]

    def _attack_features(self, latent_shape: tuple[int, ...], text_states: torch.Tensor) -> torch.Tensor:
        """Adapter features for :meth:`noise_pred`: fixed noise (``adapter_seed``) at the first step of the schedule."""
        from diffusers.utils.torch_utils import randn_tensor


        pipe = self.pipe
        n, device = text_states.shape[0], pipe.unet.device
        scheduler, t0 = _first_timestep(pipe.scheduler, self.config.num_inference_steps, device)
        shape = (1, *latent_shape)
        if shape not in self._feature_noise:
            noise = randn_tensor(shape, generator=seeded_generators([self.config.adapter_seed]), device=device,
                                 dtype=text_states.dtype)
            self._feature_noise[shape] = scheduler.scale_model_input(noise * scheduler.init_noise_sigma, t0)
        latents = self._feature_noise[shape].expand(n, -1, -1, -1)
        return self.first_step_features(latents, t0, text_states.detach())

    def close(self) -> None:
        """Give the pipeline back: the original attention processors, no hook."""
        if self._closed:
            return
        self.pipe.unet.set_attn_processor(dict(self._original))
        self._hook.remove()
        self._closed = True
