"""The frozen projections (:class:`ProjectionBank`) and CPE's objective (:func:`gap_loss`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CoErasingError
from .modules import ConceptEraser, cross_attention_blocks


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
