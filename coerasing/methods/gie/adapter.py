"""The adapter that predicts GIE's ``w`` from first-step attention features."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CoErasingError
from ...files import atomic_write
from ...formats import read_safetensors
from .config import ADAPTER_HIDDEN, SD1_CROSS_LAYERS


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
        """An adapter written by :meth:`save` (a :class:`CoErasingError` if unreadable; never unpickled)."""
        state, metadata = read_safetensors(path, "the GIE adapter")
        try:
            adapter = cls(int(metadata.get("num_layers", SD1_CROSS_LAYERS)),
                          tuple(int(h) for h in json.loads(metadata.get("hidden", json.dumps(list(ADAPTER_HIDDEN))))))
            adapter.load_state_dict(state)
        except (ValueError, TypeError, RuntimeError, KeyError) as exc:
            raise CoErasingError(f"the GIE adapter {path} does not fit its own metadata ({exc}); train it again.") \
                from exc
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
