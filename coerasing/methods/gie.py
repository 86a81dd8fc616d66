"""GIE: Growth Inhibitors for Erasure (Chen et al., ICLR 2025, arXiv 2408.01014), at inference time.

docs/baselines.md §GIE. GIE changes no weight: every image is generated as a *pair* from the same
initial noise, branch 1 on the prompt P and branch 2 on "P + T" (T: the target words); only branch
2's image is kept. In the conditional half of classifier-free guidance, branch 2's attention maps
are rewritten from branch 1's while the image takes shape:

- **Cross-attention injection** (first ``cross_fraction`` = 80 % of the schedule): branch 2's map
  over P's tokens is branch 1's post-softmax map (same layer, same head), and over the m target
  tokens it is the *growth inhibitor* ``w · softmax(scale · Q₂ · K_Tᵀ)`` (Q₂: branch 2's own queries;
  the softmax runs over the 77 states of T encoded alone, BOS/EOS/padding included, and the
  columns of T's m tokens are kept, as in the official code). No renormalisation; the output is
  ``A₂ @ [V(P states); V(T states)]``. After the window branch 2 attends with its own plain softmax
  over all 77 + m tokens (the official code does the same: the target words come back unweighted).
- **Self-attention copying** (first ``self_fraction`` = 40 %, maps of at most ``self_max_query`` =
  256 queries, i.e. ≤ 16×16 at 512 px): branch 2's self-attention probabilities are branch 1's,
  with branch 2's own values.
- ``w`` is one fixed value per concept (negative erases, more negative erases more: ``w > 0`` would
  *add* the target words, ``w = 0`` gives back branch 1) or is predicted per target token by an
  adapter MLP 16 → 64 → 32 → 1 (ReLU, no output activation) from the mean cross-attention
  probability of that token in each of the 16 cross-attention layers at the first denoising step
  (an extra first-step UNet call with ``w = 1``, discarded; the real run restarts from the same noise).

Everything else (the unconditional rows of both branches, branch 1, larger self-attention maps, all
layers outside the windows) is diffusers' plain scaled-dot-product attention.

Design: branch 2's text states
------------------------------
Branch 2's text states are branch 1's 77 states of P (the CLIP text encoder is causal, so P's
tokens have the same states inside "P + T") with the m target tokens' states (T encoded alone,
positions 1..m, BOS and EOS excluded) appended as m extra key/value tokens: branch 2 cross-attends
over 77 + m tokens. Cross-attention has no positional encoding, so where the target tokens sit does
not matter. So GIE works from text states alone: prompts, ready ``prompt_embeds`` and the white-box
attack's edited states all take the same path, and no token count of P is needed.

Gating by noise level
---------------------
A processor acts while the timestep of the current UNet call (recorded by a UNet forward
pre-hook) satisfies ``t > (1 − fraction) · num_train_timesteps`` (``fraction = 1``: the whole
schedule; ``0``: never). The official code counts UNet calls instead: cross-injection on calls
``< int(0.8 · (steps + 1))``, self-copying on calls ``< int(0.4 · steps)``. For its sampler, PNDM
with 40 steps (41 UNet calls at t = 976, 951, 951, 926, …, 1), that is calls 0–31 (t ≥ 226) and
0–15 (t ≥ 626); our rule gives calls 0–32 (t > 200) and 0–16 (t > 600): the same up to one step at
each cutoff. For DDIM with 40 steps (t = 976, 951, …, 1) it gives exactly the official 32 and 16.

Batch layout
------------
:meth:`GIERuntime.render` calls the pipeline with every prompt (or ``prompt_embeds`` row) and every
generator duplicated, ``[P1, P1, P2, P2, …]`` (both rows of a pair share their seed, hence their
initial noise) and keeps ``images[1::2]``. diffusers orders a classifier-free-guidance batch as
``[uncond rows…, cond rows…]``: only the conditional half is edited, pairs ``(2i, 2i + 1)`` inside
it; branch 2's unconditional rows attend to their own 77 tokens, like branch 1's. Without guidance
(``guidance ≤ 1``) the whole batch is conditional. :meth:`GIERuntime.noise_pred` (the attack's ε)
duplicates its batch the same way (branch 1 and branch 2 share ``z_t``), treats all rows as
conditional and returns branch 2's ε. While GIE is applied, a UNet call that does not come through
the runtime raises an error instead of silently giving the base model's output.

The adapter's training (ours; the authors' weights and procedure are unpublished)
--------------------------------------------------------------------------------
:func:`train_gie_adapter` takes training prompts of the concept (never evaluation prompts) and a
detector (for the toy world: the toy classifier, positive when its predicted shape is the concept;
prompts: the toy world's *training* captions of that shape, :func:`toy_training_prompts`):

1. features: for prompt ``i`` (seed ``adapter_seed + i``) and each target token, the 16-vector of
   first-step mean target probabilities (the ``w = 1`` feature pass);
2. labels: sweep the grid ``adapter_grid`` from the least to the most negative ``w``, generating
   branch 2's image with that fixed ``w`` (``adapter_steps`` steps, ``adapter_guidance``); a prompt's
   label is the least negative ``w`` whose image the detector calls concept-free, else the most
   negative grid value. All target tokens of a prompt share its label (the detector judges images);
3. fit: the MLP by full-batch MSE regression of the label on the features (Adam, ``adapter_lr``,
   ``adapter_epochs``, seeded), with the features standardised by their training mean and standard
   deviation (kept as buffers of the adapter: the layers stay 16 → 64 → 32 → 1);
4. ``adapter.safetensors`` and ``artifact.json`` (settings, labels, losses) go into ``output_dir``.

Deliberate deviations from the official code (CD22104/Growth-Inhibitors-for-Erasure)
------------------------------------------------------------------------------------
- Branch 2's EOS and padding positions carry P's states (the "prompt" variant of our notes); the
  official code puts the in-context state of T's first token at branch 2's EOS and "P + T"'s own
  padding states after it (an indexing slip). In the injection window our map over P's tokens is
  branch 1's full 77-token map (the official one drops branch 1's first m padding columns); after
  the window branch 2 attends over P's 77 states plus the m target states. No prompt overflows
  (the official code fails when "P + T" exceeds 77 tokens).
- Timestep gating instead of call counting (above: equal up to one step at each cutoff).
- diffusers' batch order ``[uncond, cond]`` instead of ``[cond, uncond]`` (same computation).
- Plain paths use scaled-dot-product attention (diffusers' default processor); explicit
  probabilities only for the rows an edit needs (the official code re-implements the classic
  processor everywhere). Softmax in float32.
- The adapter's feature pass runs only the conditional rows (the unconditional rows cannot affect
  them); the adapter and its training are ours (above). In :meth:`GIERuntime.noise_pred` the
  adapter's features come from fixed noise (seed ``adapter_seed``) at the first timestep of a
  ``num_inference_steps`` schedule, since the attack gives ``z_t`` at arbitrary ``t``; ``w`` is not
  differentiated through.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import write_run_json
from ..errors import CoErasingError
from ..files import atomic_write
from ..flags import SEED_MAX, check_fields, flag
from .base import ARTIFACT_FILE, Artifact, CurvePoint, Method, Runtime, TraceContext, write_artifact

METHOD_NAME = "gie"
ADAPTER_FILE = "adapter.safetensors"
#: The adapter's hidden widths (16 → 64 → 32 → 1, official ``use_adapter.py``).
ADAPTER_HIDDEN: tuple[int, int] = (64, 32)
#: Cross-attention layers of SD v1.x (the adapter's input size).
SD1_CROSS_LAYERS = 16
DEFAULT_W_GRID = "-0.5,-1,-2,-4,-8,-16"
#: Edit kinds (as recorded in :attr:`GIEController.trace`).
CROSS_INJECT, CROSS_EXTEND, SELF_COPY = "cross-inject", "cross-extend", "self-copy"
#: Batch layouts: classifier-free guidance ``[uncond…, cond…]``, or every row conditional.
CFG, COND = "cfg", "cond"
#: Processors GIE may replace (anything else, e.g. IP-Adapter's, would be lost silently).
_REPLACEABLE = ("AttnProcessor", "AttnProcessor2_0")


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class GIEConfig:
    """GIE's settings (docs/baselines.md §GIE): the artifact's ``settings`` and the adapter's training."""

    target: str | None = flag(None, group="GIE", help="the target words T appended to every prompt, e.g. 'nudity' "
                              "(required)")
    w: float | None = flag(None, group="GIE", help="fixed growth-inhibitor weight (negative erases, more negative "
                           "erases more); none: predict it with the artifact's adapter")
    cross_fraction: float = flag(0.8, group="GIE", min=0.0, max=1.0,
                                 help="cross-attention maps are injected while t > (1 - this) * T_train")
    self_fraction: float = flag(0.4, group="GIE", min=0.0, max=1.0,
                                help="self-attention maps are copied while t > (1 - this) * T_train")
    self_max_query: int = flag(256, group="GIE", min=0,
                               help="self-attention maps are copied only with at most this many queries (16x16)")
    num_inference_steps: int = flag(40, group="GIE", min=1,
                                    help="GIE's reference number of steps (recorded; generation uses the caller's); "
                                    "also the schedule whose first timestep the attack's adapter features use")
    adapter_grid: str = flag(DEFAULT_W_GRID, group="adapter",
                             help="comma-separated w values swept to label the adapter's training prompts")
    adapter_prompts: int = flag(60, group="adapter", min=1, help="training prompts for the adapter (at most)")
    adapter_seed: int = flag(0, group="adapter", min=0, max=SEED_MAX,
                             help="seed of the training prompts' images and of the adapter's initialisation")
    adapter_epochs: int = flag(2000, group="adapter", min=1, help="full-batch Adam steps fitting the adapter")
    adapter_lr: float = flag(1e-3, group="adapter", min=0.0, exclusive_min=True, help="the adapter's learning rate")
    adapter_guidance: float = flag(7.5, group="adapter", min=0.0,
                                   help="guidance of the images that label the training prompts")
    adapter_steps: int | None = flag(None, group="adapter", min=1,
                                     help="steps of the labelling images (none: --num_inference_steps)")
    adapter_batch_size: int = flag(8, group="adapter", min=1, help="images per pipeline call while labelling")
    model: str | None = flag(None, group="adapter", help="Stable Diffusion folder the adapter is trained on")
    device: str | None = flag(None, group="adapter", help="device for the adapter's training (default: cpu)")
    output_dir: str = flag("gie_artifact", group="output", output=True, help="the artifact folder")
    overwrite: bool = flag(False, group="output", help="replace the artifact a folder already holds")

    def validate(self) -> GIEConfig:
        """Check every value; raise :class:`CoErasingError` naming the flag and the fix."""
        check_fields(self)
        if not (self.target and self.target.strip()):
            raise CoErasingError("--target is required: the words GIE appends to every prompt, e.g. --target nudity.")
        self.w_grid()
        return self

    def w_grid(self) -> list[float]:
        """``adapter_grid`` as numbers, from the least to the most negative (the labelling order)."""
        try:
            values = [float(v) for v in self.adapter_grid.split(",") if v.strip()]
        except ValueError:
            raise CoErasingError(f"--adapter_grid {self.adapter_grid!r} must be comma-separated numbers, "
                                 f"e.g. '{DEFAULT_W_GRID}'.") from None
        if not values or not all(math.isfinite(v) for v in values):
            raise CoErasingError(f"--adapter_grid {self.adapter_grid!r} needs finite numbers, e.g. '{DEFAULT_W_GRID}'.")
        return sorted(set(values), reverse=True)

    def settings(self) -> dict[str, Any]:
        """What ``artifact.json`` records (every setting but the output folder, device and --overwrite)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("output_dir", "device", "overwrite")}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> GIEConfig:
        """The config of an artifact's ``settings`` (unknown keys are ignored), validated."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in settings.items() if k in names}).validate()


def window_active(timestep: float, fraction: float, num_train_timesteps: int) -> bool:
    """Whether an edit of the first ``fraction`` of the schedule acts at ``timestep`` (see the module doc)."""
    return fraction >= 1.0 or timestep > (1.0 - fraction) * num_train_timesteps


# ----------------------------------------------------------------------------------------------
# Controller and attention processors


@dataclass(frozen=True)
class EditEvent:
    """One edit made by a processor (recorded when :attr:`GIEController.trace` is a list)."""

    call: int
    timestep: float
    layer: str
    kind: str
    rows: tuple[int, ...]
    query_len: int


@dataclass(frozen=True)
class EditPlan:
    """What one processor call edits: ``kind``, and the branch-1/branch-2 conditional rows (pairs)."""

    kind: str
    rows1: torch.Tensor
    rows2: torch.Tensor


class GIEController:
    """The state the GIE processors share (docs/baselines.md §GIE; Chen et al., ICLR 2025).

    The runtime opens a :meth:`session` per generation (batch layout, pairs, per-pair token
    weights ``[pairs, m]``); the UNet pre-hook :meth:`on_unet_call` records each call's timestep;
    the processors ask :meth:`plan` what to edit. ``target_states`` is T encoded alone, all 77
    positions ``[1, 77, d]``; its tokens are positions ``1..target_count``.
    """

    def __init__(
        self,
        target_states: torch.Tensor,
        target_count: int,
        cross_fraction: float,
        self_fraction: float,
        self_max_query: int,
        num_train_timesteps: int,
    ) -> None:
        self.target_states = target_states
        self.target_count = target_count
        self.cross_fraction = cross_fraction
        self.self_fraction = self_fraction
        self.self_max_query = self_max_query
        self.num_train_timesteps = num_train_timesteps
        self.layout: str | None = None
        self.pairs = 0
        self.weights: torch.Tensor | None = None
        self.timestep: float | None = None
        #: Index of the current UNet call in the session (0 for the first).
        self.calls = -1
        #: Per cross-attention layer call ``[pairs, m]`` mean target probabilities (feature pass only).
        self.features: list[torch.Tensor] | None = None
        #: A list to record every :class:`EditEvent` in (tests, debugging); ``None``: no recording.
        self.trace: list[EditEvent] | None = None

    @contextmanager
    def session(
        self, layout: str, pairs: int, weights: torch.Tensor, features: bool = False
    ) -> Iterator[GIEController]:
        """UNet calls inside act as GIE pairs: ``layout`` (``"cfg"``/``"cond"``), ``weights`` ``[pairs, m]``."""
        if layout not in (CFG, COND):
            raise ValueError(f"unknown batch layout {layout!r}")
        if self.layout is not None:
            raise RuntimeError("a GIE session is already open (sessions do not nest)")
        if tuple(weights.shape) != (pairs, self.target_count):
            raise ValueError(f"weights must be [pairs, m] = [{pairs}, {self.target_count}], got {tuple(weights.shape)}")
        self.layout, self.pairs, self.weights, self.calls = layout, pairs, weights, -1
        self.features = [] if features else None
        try:
            yield self
        finally:
            self.layout, self.pairs, self.weights, self.timestep, self.features = None, 0, None, None, None

    def on_unet_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """UNet forward pre-hook: record the call's timestep and check its batch against the session."""
        if self.layout is None:
            raise CoErasingError(
                "GIE is applied to this pipeline: generate with GIERuntime.render and predict noise with "
                "GIERuntime.noise_pred (a direct pipeline or UNet call would give the base model's output). "
                "Call close() to get the plain pipeline back."
            )
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        values = torch.as_tensor(timestep).detach().flatten().float().unique()
        if values.numel() != 1:
            raise CoErasingError(f"GIE gates by one timestep per UNet call, got several: {values.tolist()}.")
        expected = self.pairs * 2 * (2 if self.layout == CFG else 1)
        if sample.shape[0] != expected:
            raise CoErasingError(f"GIE expected a UNet batch of {expected} rows ({self.pairs} pairs, layout "
                                 f"{self.layout}), got {sample.shape[0]}.")
        self.calls += 1
        self.timestep = float(values.item())

    def pair_rows(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(branch-1 rows, branch-2 rows) of the conditional half: pairs ``(2i, 2i + 1)`` after the uncond half."""
        offset = batch // 2 if self.layout == CFG else 0
        rows1 = torch.arange(offset, batch, 2, device=device)
        return rows1, rows1 + 1

    def plan(self, is_cross: bool, batch: int, query_len: int, device: torch.device) -> EditPlan | None:
        """What a processor call edits now, or ``None`` (plain attention for every row)."""
        if self.layout is None or self.timestep is None:
            return None
        if is_cross:
            if window_active(self.timestep, self.cross_fraction, self.num_train_timesteps):
                kind = CROSS_INJECT
            elif self.target_count > 0 or self.features is not None:
                kind = CROSS_EXTEND
            else:
                return None
        elif query_len <= self.self_max_query and window_active(
            self.timestep, self.self_fraction, self.num_train_timesteps
        ):
            kind = SELF_COPY
        else:
            return None
        rows1, rows2 = self.pair_rows(batch, device)
        return EditPlan(kind, rows1, rows2)

    def record(self, layer: str, plan: EditPlan, query_len: int) -> None:
        """Append an :class:`EditEvent` to :attr:`trace` when it is a list."""
        if self.trace is not None:
            self.trace.append(EditEvent(self.calls, float(self.timestep or 0.0), layer, plan.kind,
                                        tuple(plan.rows2.tolist()), query_len))


def attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """Post-softmax attention probabilities ``softmax(scale · Q Kᵀ)`` (softmax in float32), ``[..., Lq, Lk]``."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    return scores.float().softmax(dim=-1).to(query.dtype)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, heads·d]`` → ``[B, heads, L, d]``."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


class GIEAttnProcessor:
    """Diffusers' scaled-dot-product attention plus GIE's edits of branch 2's conditional rows.

    docs/baselines.md §GIE (Chen et al., ICLR 2025). Every row the controller's plan does not name
    gets exactly diffusers' ``AttnProcessor2_0`` computation.
    """

    def __init__(self, controller: GIEController, layer: str) -> None:
        self.controller = controller
        self.layer = layer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch, sequence_length, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = _heads(query, attn.heads)
        key = _heads(attn.to_k(encoder_hidden_states), attn.heads)
        value = _heads(attn.to_v(encoder_hidden_states), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        plan = self.controller.plan(is_cross, batch, query.shape[2], query.device)
        if plan is not None:
            if attention_mask is not None:
                raise CoErasingError("GIE's attention edits do not support attention masks (SD v1.x uses none).")
            out = out.index_copy(0, plan.rows2, self._edited_rows(attn, query, key, value, plan).to(out.dtype))
            self.controller.record(self.layer, plan, query.shape[2])

        hidden_states = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _target_keys_values(self, attn: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of T encoded alone (all 77 positions) and values of its m tokens, ``[1, heads, ·, d]``."""
        controller = self.controller
        states = controller.target_states.to(device=attn.to_k.weight.device, dtype=dtype)
        if attn.norm_cross:
            states = attn.norm_encoder_hidden_states(states)
        keys = _heads(attn.to_k(states), attn.heads)
        if attn.norm_k is not None:
            keys = attn.norm_k(keys)
        values = _heads(attn.to_v(states[:, 1 : 1 + controller.target_count]), attn.heads)
        return keys, values

    def _edited_rows(
        self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: EditPlan
    ) -> torch.Tensor:
        """Branch 2's attention output ``[pairs, heads, Lq, d]`` under ``plan`` (docs/baselines.md §GIE)."""
        controller = self.controller
        q1, k1 = query[plan.rows1], key[plan.rows1]
        q2, k2, v2 = query[plan.rows2], key[plan.rows2], value[plan.rows2]
        scale = attn.scale
        if plan.kind == SELF_COPY:
            return attention_probs(q1, k1, scale) @ v2
        m = controller.target_count
        pairs = q2.shape[0]
        target_keys, target_values = self._target_keys_values(attn, query.dtype)
        target_maps = None
        if m > 0 and (plan.kind == CROSS_INJECT or controller.features is not None):
            target_maps = attention_probs(q2, target_keys, scale)[..., 1 : 1 + m]  # [pairs, heads, Lq, m]
            if controller.features is not None:
                controller.features.append(target_maps.detach().float().mean(dim=(1, 2)))
        if plan.kind == CROSS_EXTEND:
            keys = torch.cat([k2, target_keys[:, :, 1 : 1 + m].expand(pairs, -1, -1, -1)], dim=2)
            values = torch.cat([v2, target_values.expand(pairs, -1, -1, -1)], dim=2)
            return F.scaled_dot_product_attention(q2, keys, values, dropout_p=0.0, is_causal=False)
        out = attention_probs(q1, k1, scale) @ v2
        if target_maps is not None:
            weights = controller.weights.to(device=query.device, dtype=query.dtype)[:, None, None, :]
            out = out + (weights * target_maps) @ target_values
        return out


# ----------------------------------------------------------------------------------------------
# Adapter


class GIEAdapter(nn.Module):
    """Per-token ``w`` from first-step mean target cross-attention per layer: MLP 16 → 64 → 32 → 1 (ReLU).

    docs/baselines.md §GIE; Chen et al., ICLR 2025 (official ``use_adapter.py``'s layers). The input
    is standardised by the training features' mean and standard deviation (buffers; ours).
    """

    def __init__(self, num_layers: int = SD1_CROSS_LAYERS, hidden: tuple[int, int] = ADAPTER_HIDDEN) -> None:
        super().__init__()
        self.hidden = (int(hidden[0]), int(hidden[1]))
        self.register_buffer("feature_mean", torch.zeros(num_layers))
        self.register_buffer("feature_std", torch.ones(num_layers))
        self.net = nn.Sequential(
            nn.Linear(num_layers, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
            nn.Linear(hidden[1], 1),
        )

    @property
    def num_layers(self) -> int:
        """The input size: cross-attention layers of the UNet it was trained for."""
        return int(self.feature_mean.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., num_layers]`` features → ``[...]`` weights ``w``."""
        x = (features.to(self.feature_mean) - self.feature_mean) / self.feature_std
        return self.net(x).squeeze(-1)

    def save(self, path: str | Path) -> Path:
        """Write the weights as safetensors (atomically), with the layer count in the metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = {"num_layers": str(self.num_layers), "hidden": json.dumps(list(self.hidden))}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path) -> GIEAdapter:
        """An adapter written by :meth:`save` (a :class:`CoErasingError` if unreadable)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            state = load_file(str(path))
            adapter = cls(int(metadata.get("num_layers", SD1_CROSS_LAYERS)),
                          tuple(json.loads(metadata.get("hidden", json.dumps(list(ADAPTER_HIDDEN))))))
            adapter.load_state_dict(state)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CoErasingError(f"the GIE adapter {path} cannot be read ({exc}); train it again.") from exc
        return adapter.eval()


def fit_adapter(
    features: torch.Tensor, labels: torch.Tensor, epochs: int = 2000, lr: float = 1e-3, seed: int = 0
) -> tuple[GIEAdapter, list[float]]:
    """Fit a :class:`GIEAdapter` to ``labels`` ``[N]`` from ``features`` ``[N, L]`` by full-batch MSE (Adam).

    Our procedure (docs/baselines.md §GIE; the authors' is unpublished). Returns the adapter and the
    loss of every step.
    """
    features = features.detach().float().cpu()
    labels = labels.detach().float().cpu()
    if features.ndim != 2 or labels.shape != features.shape[:1] or features.shape[0] == 0:
        raise ValueError(f"need features [N, L] and labels [N], got {tuple(features.shape)} and {tuple(labels.shape)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = GIEAdapter(features.shape[1])
    adapter.feature_mean.copy_(features.mean(0))
    std = features.std(0, unbiased=False) if features.shape[0] > 1 else torch.ones(features.shape[1])
    adapter.feature_std.copy_(torch.where(std > 1e-12, std, torch.ones_like(std)))
    optimizer = torch.optim.Adam(adapter.net.parameters(), lr=lr)
    losses = []
    adapter.train()
    for _ in range(epochs):
        loss = F.mse_loss(adapter(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return adapter.eval(), losses


# ----------------------------------------------------------------------------------------------
# Runtime


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
        foreign = sorted({type(p).__name__ for p in self._original.values()} - set(_REPLACEABLE))
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

        from ..generation import seeded_generators

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
        from ..generation import seeded_generators

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
                                   "np" if output_type == "np" else "pil")[1]
        if output_type == "np":
            return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
        return list(images)

    def noise_pred(self, latents: torch.Tensor, timestep: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """GIE's ε(z_t, t, c): the pair (branch 1 and branch 2 share ``z_t``), all rows conditional; branch 2's ε.

        Differentiable with respect to ``latents`` and ``text_states`` (``w`` is not differentiated).
        """
        n = latents.shape[0]
        if self.fixed_w is not None:
            weights = torch.full((n, self.target_count), float(self.fixed_w))
        else:
            weights = self.token_weights_from_features(self._attack_features(tuple(latents.shape[1:]), text_states))
        t = torch.as_tensor(timestep, device=latents.device)
        if t.ndim > 0 and t.numel() == n and n > 1:
            t = t.repeat_interleave(2, 0)
        with self.controller.session(COND, n, weights):
            eps = self.pipe.unet(latents.repeat_interleave(2, 0), t,
                                 encoder_hidden_states=text_states.repeat_interleave(2, 0)).sample
        return eps[1::2]

    def _attack_features(self, latent_shape: tuple[int, ...], text_states: torch.Tensor) -> torch.Tensor:
        """Adapter features for :meth:`noise_pred`: fixed noise (``adapter_seed``) at the first step of the schedule."""
        from diffusers.utils.torch_utils import randn_tensor

        from ..generation import seeded_generators

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


# ----------------------------------------------------------------------------------------------
# Artifact, adapter training, method


def write_gie_artifact(
    folder: str | Path, config: GIEConfig, adapter: GIEAdapter | None = None, **extra: Any
) -> Path:
    """Write GIE's artifact folder (``artifact.json``, ``run.json``, and ``adapter.safetensors`` if given).

    Returns the folder. ``run.json`` records the resolved settings with the library versions, as every
    other method's training does.
    """
    config.validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if adapter is not None:
        adapter.save(folder / ADAPTER_FILE)
        extra = {"adapter": ADAPTER_FILE, **extra}
    write_artifact(folder, METHOD_NAME, config.settings(), **extra)
    write_run_json(folder, {"method": METHOD_NAME, **config.settings()}, status="finished",
                   adapter=adapter is not None)
    return folder


class Detector(Protocol):
    """What labels the adapter's training images: ``detect(images)[i].positive`` (the concept is shown)."""

    def detect(self, images: Sequence[Any]) -> list[Any]: ...


def toy_training_prompts(concept: str, count: int | None = None, seed: int = 0) -> list[str]:
    """Training captions of the toy world whose shape is ``concept`` (never held-out ones), ``count`` at most."""
    from ..toy.world import caption_labels

    prompts = [text for text, (shape, _, _) in caption_labels(split="train").items() if shape == concept]
    if not prompts:
        raise CoErasingError(f"the toy world has no training captions of the shape {concept!r}.")
    if count is not None and count < len(prompts):
        chosen = np.random.default_rng(seed).choice(len(prompts), size=count, replace=False)
        prompts = [prompts[i] for i in sorted(chosen)]
    return prompts


def label_prompts(
    runtime: GIERuntime, detector: Detector, prompts: Sequence[str], seeds: Sequence[int], grid: Sequence[float],
    guidance: float, height: int, width: int, num_inference_steps: int, batch_size: int = 8,
) -> list[float]:
    """Each prompt's label: the least negative ``w`` of ``grid`` whose image is concept-free, else the most negative.

    ``grid`` is swept from its largest value down; a prompt leaves the sweep once labelled.
    """
    order = sorted(grid, reverse=True)
    labels: list[float | None] = [None] * len(prompts)
    for w in order:
        todo = [i for i, label in enumerate(labels) if label is None]
        if not todo:
            break
        runtime.fixed_w = w
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = runtime.render([seeds[i] for i in chunk], guidance, height, width, num_inference_steps,
                                    prompts=[prompts[i] for i in chunk])
            for i, detection in zip(chunk, detector.detect(images), strict=True):
                if not detection.positive:
                    labels[i] = w
    return [order[-1] if label is None else label for label in labels]


def train_gie_adapter(config: GIEConfig, detector: Detector, prompts: Sequence[str], pipe: Any = None) -> Path:
    """Train the ``w`` adapter by our procedure (module doc) and write the artifact; returns its folder.

    ``prompts``: training prompts of the concept (at most ``adapter_prompts`` are used; never
    evaluation prompts). ``pipe``: the pipeline to train on (default: load ``config.model``).
    """
    config.validate()
    prompts = list(prompts)[: config.adapter_prompts]
    if not prompts:
        raise CoErasingError("the GIE adapter needs training prompts of the concept.")
    if pipe is None:
        if not config.model:
            raise CoErasingError("--model is required to train the GIE adapter (a Stable Diffusion folder).")
        from ..generation import load_generation_pipeline
        from ..models import parse_device

        pipe = load_generation_pipeline(config.model, parse_device(config.device or "cpu"), torch.float32)
    grid = config.w_grid()
    steps = config.adapter_steps or config.num_inference_steps
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    seeds = [config.adapter_seed + i for i in range(len(prompts))]
    runtime = GIERuntime(pipe, replace(config, w=grid[0]))
    try:
        features = torch.cat([runtime.prompt_features(seeds[s : s + config.adapter_batch_size], size, size, steps,
                                                      prompts=prompts[s : s + config.adapter_batch_size])
                              for s in range(0, len(prompts), config.adapter_batch_size)]).cpu()
        labels = label_prompts(runtime, detector, prompts, seeds, grid, config.adapter_guidance, size, size, steps,
                               config.adapter_batch_size)
    finally:
        runtime.close()
    m = features.shape[1]
    x = features.reshape(len(prompts) * m, -1)
    y = torch.tensor(labels, dtype=torch.float32).repeat_interleave(m)
    adapter, losses = fit_adapter(x, y, config.adapter_epochs, config.adapter_lr, config.adapter_seed)
    training = {"prompts": prompts, "seeds": seeds, "labels": labels, "grid": grid, "steps": steps,
                "guidance": config.adapter_guidance, "size": size, "first_loss": losses[0], "final_loss": losses[-1],
                "detector": getattr(detector, "describe", lambda: type(detector).__name__)()}
    return write_gie_artifact(config.output_dir, config, adapter, adapter_training=training)


class GIEMethod(Method):
    """GIE behind the method interface: an ``addon`` artifact (settings, optional adapter) applied as processors."""

    name = METHOD_NAME
    summary = "GIE: growth inhibitors injected into the attention maps at inference (Chen et al., ICLR 2025)."
    artifact_kind = "addon"
    config_class = GIEConfig

    def train(self, config: GIEConfig) -> Path:
        """A fixed ``w``: just the artifact. No ``w``: train the adapter (toy-world models: toy detector, captions)."""
        config.validate()
        if (Path(config.output_dir) / ARTIFACT_FILE).exists() and not config.overwrite:
            raise CoErasingError(f"{config.output_dir} already holds a GIE artifact; pass --overwrite true to "
                                 "replace it, or another --output_dir.")
        if config.w is not None:
            return write_gie_artifact(config.output_dir, config)
        classifier = Path(config.model or "") / "classifier"
        if config.model and (classifier / "config.json").is_file():
            from ..toy.detector import ToyShapeDetector

            detector = ToyShapeDetector(classifier, [config.target], config.device)
            prompts = toy_training_prompts(config.target, config.adapter_prompts, config.adapter_seed)
            return train_gie_adapter(config, detector, prompts)
        raise CoErasingError(
            "GIE without --w needs an adapter: for a toy-world model pass --model <toy folder>; otherwise call "
            "coerasing.methods.gie.train_gie_adapter(config, detector, training_prompts), or set a fixed --w."
        )

    def trace(self, context: TraceContext) -> list[CurvePoint]:
        """GIE's curve in a comparison: one fixed-``w`` artifact per value of the presets' ``gie.w`` list.

        Nothing is trained, so the curve is the same for every training seed (its spread is 0).
        """
        preset = dict(context.preset("gie"))
        values = preset.pop("w", [-1.0, -2.0, -4.0, -8.0])
        target = preset.pop("target", None) or context.preset("stage1").get("prompt", context.concept)
        points = []
        for w in sorted((float(v) for v in values), key=abs):
            config = GIEConfig(target=target, w=w, **preset)
            folder = context.run_folder("gie", config.settings())
            context.once(folder, config.settings(), lambda folder=folder, config=config: write_gie_artifact(
                folder, replace(config, output_dir=str(folder))))
            points.append(CurvePoint(f"w{w:g}", abs(w), folder))
        return points

    def apply(self, artifact: Artifact, pipe: Any) -> GIERuntime:
        config = GIEConfig.from_settings(artifact.settings)
        adapter = None
        if config.w is None:
            path = artifact.folder / ADAPTER_FILE
            if not path.is_file():
                raise CoErasingError(f"the GIE artifact {artifact.path} has no fixed w and no {ADAPTER_FILE}; "
                                     "write it with a --w or train its adapter.")
            adapter = GIEAdapter.load(path)
        return GIERuntime(pipe, config, artifact, adapter)


METHODS: dict[str, type[Method]] = {METHOD_NAME: GIEMethod}
