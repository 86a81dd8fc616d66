"""``--compile``: ``torch.compile`` for the no-gradient UNet calls of an erasing iteration.

Most of an iteration is the partial denoising (on average S/2 UNet forwards of batch 1), and on
small models each forward costs more in Python dispatch than in arithmetic. Compiling the UNet for
those calls (and for the frozen model's ε_u / ε_c) removes most of that overhead. The trained
forward and its backward stay eager, so gradients and the optimizer are untouched.

The compiled module shares its parameters with the eager one: the optimizer's in-place updates are
seen by the next compiled call, without recompiling. Compiled kernels round differently from eager
ones, so fp32 results change in the last bits (like ``--batch_reference``); the flag is opt-in.
"""

from __future__ import annotations

import shutil

import torch

from .errors import CoErasingError


def check_compile_support(device: torch.device) -> None:
    """Fail early, with the fix, where TorchInductor cannot build kernels for ``device``."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise CoErasingError(
            "--compile on CPU needs a C++ compiler (TorchInductor builds its CPU kernels with one), and "
            "none of g++, c++ or clang++ is on PATH. Install one (e.g. apt-get install g++) or drop --compile."
        )


def compile_for_inference(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile(module)`` for no-gradient calls; the eager ``module`` stays usable as it is."""
    check_compile_support(device)
    return torch.compile(module, dynamic=False)
