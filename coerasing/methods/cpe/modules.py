"""The ResAG modules and their attachment to a UNet's cross-attention keys and values."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import CoErasingError
from .config import FORMAT


def uniform_tensor(shape: Sequence[int], bound: float, generator: torch.Generator) -> torch.Tensor:
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
            self.to_q.copy_(uniform_tensor(self.to_q.shape, bound, generator))
            if self.to_k is not None:
                self.to_k.copy_(uniform_tensor(self.to_k.shape, bound, generator))
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
            self.down.copy_(uniform_tensor(self.down.shape, 1.0 / math.sqrt(text_dim * rank), generator))
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
