"""GIE's controller and attention processors (the two branches' edits)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CoErasingError
from .config import CFG, COND, CROSS_EXTEND, CROSS_INJECT, SELF_COPY, window_active


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
