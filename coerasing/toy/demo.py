"""``make demo``: Co-Erasing end to end on the shipped toy-world model, on a CPU, with no download.

``python -m coerasing.toy.demo --out outputs/demo`` runs the project's own command lines, printing
each before it runs (copy them to run a step alone):

1. ``generate_data.py``: reference images of the concept ("circle") from the base model;
2. ``erase_pipeline.py --config configs/toy/circle_text.yaml``: stage 1, text erasing (ESD);
3. ``erase_pipeline.py --config configs/toy/circle_image.yaml``: stage 2, Co-Erasing (the
   reference images through the IP-Adapter, refined by the text "circle");
4. ``python -m coerasing.toy.erasure``: base / stage 1 / stage 2 scored by the toy classifier →
   ``report.json``, ``grid.png`` and a table.

Every step runs with one CPU thread (``OMP_NUM_THREADS=1``), so a rerun on the same CPU model gives
bit-identical numbers. Other CPU models use other float kernels and move the rates by a few points
(the README shows a measured example).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..cli import run_cli
from ..errors import CoErasingError
from . import TOY_GUIDANCE, TOY_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
CONCEPT = "circle"


def demo_commands(out: str | Path, model: str | Path = TOY_MODEL_DIR, python: str = sys.executable) -> list[list[str]]:
    """The four command lines of the demo, writing everything under ``out``."""
    out, model = Path(out), Path(model)
    refs = out / "generation_dataset"
    text_unet = out / "checkpoints" / "text" / "unet.pth"
    image_unet = out / "checkpoints" / "image" / "unet.pth"
    return [
        [python, "generate_data.py", "--label", CONCEPT, "--prompt_template", "a photo of a {label}",
         "--ckpt_path", str(model), "--output_dir", str(refs), "--num_images", "16", "--batch_size", "16",
         "--num_inference_steps", "25", "--guidance_scale", str(TOY_GUIDANCE), "--device", "cpu"],
        [python, "erase_pipeline.py", "--config", "configs/toy/circle_text.yaml", "--ckpt_path", str(model),
         "--save_path", str(text_unet.parent), "--devices", "cpu"],
        [python, "erase_pipeline.py", "--config", "configs/toy/circle_image.yaml", "--ckpt_path", str(model),
         "--unet_ckpt_path", str(text_unet), "--image", str(refs / CONCEPT),
         "--ip_adapter", str(model / "ip-adapter_toy.bin"), "--image_encoder_path", str(model / "image_encoder"),
         "--save_path", str(image_unet.parent), "--devices", "cpu"],
        [python, "-m", "coerasing.toy.erasure", "--model", str(model), "--concept", CONCEPT,
         "--unet", f"text={text_unet}", "--unet", f"image={image_unet}", "--out", str(out)],
    ]


def run_demo(out: str | Path, model: str | Path = TOY_MODEL_DIR) -> Path:
    """Run the demo's commands in the repository root; returns ``out/report.json``."""
    model = Path(model).resolve()
    if not (model / "model_index.json").is_file():
        raise CoErasingError(
            f"the toy-world model is missing at {model}. It ships with the repository (coerasing/assets/"
            "toy_world); restore it with git checkout, or rebuild it with python -m coerasing.toy.build DIR."
        )
    for script in ("generate_data.py", "erase_pipeline.py", "configs/toy/circle_text.yaml"):
        if not (REPO_ROOT / script).exists():
            raise CoErasingError(f"{script} is not in {REPO_ROOT}: run the demo from a checkout of the repository.")
    out = Path(out).resolve()
    # One CPU thread: float results depend on the thread count, so this makes the demo's numbers
    # repeatable on a given CPU model (other CPU models' kernels still move them by a few points),
    # and is barely slower for models this small.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    for i, command in enumerate(demo_commands(out, model), start=1):
        shown = shlex.join(["python", *command[1:]])
        print(f"\n[demo {i}/4] {shown}", flush=True)
        step = time.perf_counter()
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, check=False)
        if result.returncode != 0:
            raise CoErasingError(f"demo step {i} failed with exit code {result.returncode}: {shown}")
        print(f"[demo {i}/4] done in {time.perf_counter() - step:.0f} s", flush=True)
    print(f"\n[demo] finished in {time.perf_counter() - t0:.0f} s; report: {out / 'report.json'}")
    return out / "report.json"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coerasing.toy.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="folder for everything the demo writes")
    parser.add_argument("--model", default=str(TOY_MODEL_DIR), help="toy-world model folder")
    args = parser.parse_args(argv)
    run_demo(args.out, args.model)


if __name__ == "__main__":
    sys.exit(run_cli(main))
