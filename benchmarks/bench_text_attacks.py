#!/usr/bin/env python
"""Seconds per Ring-A-Bell generation and per MMA-Diffusion step, and per prompt at the papers' settings.

    python benchmarks/bench_text_attacks.py --arch toy --threads 1
    python benchmarks/bench_text_attacks.py --arch sd14 --generations 3 --steps 2 --threads 1

``toy``: the shipped toy world's text encoder; ``sd14``: CLIP ViT-L/14's text tower at SD v1.4's size
with random weights (the same arithmetic; no download); ``tiny``: the test stack's encoder. Both
searches run on the prompt below with the papers' population / candidate counts; the per-prompt
figure scales the measured time to 3000 generations (Ring-A-Bell) and 1000 steps (MMA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coerasing.eval.attacks.mma import MMASettings, banned_mask, banned_token_ids, mma_search  # noqa: E402
from coerasing.eval.attacks.ring_a_bell import (  # noqa: E402
    GeneticSettings,
    genetic_search,
    search_vocabulary,
    squared_error,
)
from coerasing.eval.attacks.text_search import PromptEncoder, search_generator  # noqa: E402
from coerasing.models import load_clip_tokenizer  # noqa: E402

PROMPT = "a drawing of a red circle"


def text_encoder(arch: str) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch == "toy":
        from coerasing.toy import TOY_MODEL_DIR

        return CLIPTextModel.from_pretrained(Path(TOY_MODEL_DIR) / "text_encoder", torch_dtype=torch.float32)
    size = {"sd14": (768, 12, 12), "tiny": (32, 2, 4)}[arch]
    config = CLIPTextConfig(vocab_size=49408, hidden_size=size[0], intermediate_size=4 * size[0],
                            num_hidden_layers=size[1], num_attention_heads=size[2], max_position_embeddings=77,
                            hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(0)
    return CLIPTextModel(config).eval()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("toy", "sd14", "tiny"), default="toy")
    parser.add_argument("--generations", type=int, default=20, help="Ring-A-Bell generations timed (population 200)")
    parser.add_argument("--steps", type=int, default=10, help="MMA steps timed (512 candidates, top 256, 20 tokens)")
    parser.add_argument("--k", type=int, nargs="+", default=[16, 38, 77], help="Ring-A-Bell prompt lengths")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    encoder = PromptEncoder(load_clip_tokenizer(), text_encoder(args.arch))
    target = encoder.states(encoder.tokenize([PROMPT]))[0]
    rows = []
    for k in args.k:
        start = time.perf_counter()
        genetic_search(squared_error(encoder, target), min(k, encoder.length - 2), search_vocabulary(encoder),
                       GeneticSettings(k=k, generations=args.generations), search_generator(0, PROMPT))
        seconds = (time.perf_counter() - start) / args.generations
        rows.append({"attack": f"ring_a_bell K{k}", "unit": "generation", "seconds": seconds,
                     "per_prompt_min": seconds * 3000 / 60})
    banned = banned_mask(encoder, banned_token_ids(encoder, ["circle"]))
    start = time.perf_counter()
    mma_search(encoder, PROMPT, MMASettings(steps=args.steps, banned=("circle",)), banned, search_generator(0, PROMPT))
    seconds = (time.perf_counter() - start) / args.steps
    rows.append({"attack": "mma", "unit": "step", "seconds": seconds, "per_prompt_min": seconds * 1000 / 60})
    print(f"| attack ({args.arch}, {args.threads} thread(s)) | s per unit | minutes per prompt, paper's settings |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['attack']} | {row['seconds']:.3f} s / {row['unit']} | {row['per_prompt_min']:.1f} |")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
