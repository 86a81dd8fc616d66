"""The toy world: a procedurally rendered shapes world and a trained SD-v1.x-layout stack for it.

The trained stack ships in :data:`TOY_MODEL_DIR` (``coerasing/assets/toy_world``); rebuild it with
``python -m coerasing.toy.build DIR``.
"""

from pathlib import Path

#: The shipped toy-world model folder (diffusers layout + IP-Adapter + classifier).
TOY_MODEL_DIR: Path = Path(__file__).resolve().parents[1] / "assets" / "toy_world"

#: Classifier-free guidance the toy model is generated and evaluated at (quality.json, the demo,
#: the toy prompt sets). Chosen by measurement: on the held-out prompts prompted-colour accuracy is
#: 99.5 % at 2, 97.0 % at 3, 87.5 % at 4, 83.5 % at 5 and 73.0 % at 7.5 (higher guidance pushes
#: red and purple towards yellow and blue); 3 is the largest of these that meets every quality target.
TOY_GUIDANCE: float = 3.0
