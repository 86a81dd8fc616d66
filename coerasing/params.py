"""``--train_method``: which UNet parameters erasing trains (docs/method.md §6).

The names come from ESD and refer to the original CompVis UNet; here they are mapped onto
diffusers' parameter names (``down_blocks``/``mid_block``/``up_blocks``, ``attn1`` = self-attention,
``attn2`` = cross-attention, ``time_embedding``, ``conv_norm_out``, ``conv_out``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .errors import CoErasingError

_OUTPUT_LAYERS = ("conv_norm_out.", "conv_out.")
_TIME_EMBEDDING = ("time_embedding.",)
# CompVis output_blocks 6 and 8 / input_blocks 4 and 7 in diffusers' naming.
_XLAYER_BLOCKS = ("up_blocks.2.attentions.0.", "up_blocks.2.attentions.2.")
_SELFLAYER_BLOCKS = ("down_blocks.1.attentions.0.", "down_blocks.2.attentions.0.")


def _full(name: str) -> bool:
    return True


def _noxattn(name: str) -> bool:
    return "attn2" not in name and not name.startswith(_TIME_EMBEDDING + _OUTPUT_LAYERS)


def _xattn(name: str) -> bool:
    return "attn2" in name


def _selfattn(name: str) -> bool:
    return "attn1" in name


def _notime(name: str) -> bool:
    return not name.startswith(_TIME_EMBEDDING)


def _xlayer(name: str) -> bool:
    return "attn2" in name and name.startswith(_XLAYER_BLOCKS)


def _selflayer(name: str) -> bool:
    return "attn1" in name and name.startswith(_SELFLAYER_BLOCKS)


TRAIN_METHODS: dict[str, Callable[[str], bool]] = {
    "full": _full,
    "noxattn": _noxattn,
    "xattn": _xattn,
    "selfattn": _selfattn,
    "notime": _notime,
    "xlayer": _xlayer,
    "selflayer": _selflayer,
}


def check_train_method(train_method: str) -> None:
    """Raise a clear error for a ``--train_method`` that is not in the table of docs/method.md §6."""
    if train_method not in TRAIN_METHODS:
        raise CoErasingError(
            f"--train_method {train_method!r} is not known. Choose one of "
            f"{', '.join(TRAIN_METHODS)} (see docs/runs.md, 'Which parameters are trained')."
        )


def select_parameter_names(names: Iterable[str], train_method: str) -> list[str]:
    """The parameter names that ``train_method`` trains; an error if it selects none."""
    check_train_method(train_method)
    chosen = [name for name in names if TRAIN_METHODS[train_method](name)]
    if not chosen:
        raise CoErasingError(
            f"--train_method {train_method!r} selects no parameter of this UNet (it has no layer "
            "with the names that method trains, e.g. a UNet without SD's block structure). "
            "Pick another --train_method, such as 'full' or 'noxattn'."
        )
    return chosen


def select_parameters(model: torch.nn.Module, train_method: str) -> list[torch.nn.Parameter]:
    """Freeze ``model`` except the ``train_method`` parameters, and return those (in order)."""
    named = dict(model.named_parameters())
    chosen = set(select_parameter_names(named, train_method))
    for name, param in named.items():
        param.requires_grad_(name in chosen)
    return [param for name, param in named.items() if name in chosen]
