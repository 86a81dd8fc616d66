"""The toy world: a procedurally rendered shapes world and a trained SD-v1.x-layout stack for it.

The trained stack ships in :data:`TOY_MODEL_DIR` (``coerasing/assets/toy_world``); rebuild it with
``python -m coerasing.toy.build DIR``.
"""

from pathlib import Path

#: The shipped toy-world model folder (diffusers layout + IP-Adapter + classifier).
TOY_MODEL_DIR: Path = Path(__file__).resolve().parents[1] / "assets" / "toy_world"
