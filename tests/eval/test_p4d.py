"""P4D: layouts, projection to real tokens, the objective, the loss falling, resuming, evaluate.py end to end."""

from __future__ import annotations

import json

import pytest
import torch

import evaluate
from coerasing.cli import run_cli
from coerasing.eval.attack import AttackModels
from coerasing.eval.attacks import ATTACKS, run_attack
from coerasing.eval.attacks.p4d import (
    P4D,
    PROMPTS_FILE,
    P4DModels,
    P4DSettings,
    allowed_tokens,
    k_combined_length,
    layout_k,
    layout_n,
    p4d_loss,
    p4d_search,
    project_to_vocab,
)
from coerasing.eval.prompts import load_prompts
from coerasing.generation import GenerationSettings
from coerasing.methods import load_runtime
from coerasing.models import load_clip_tokenizer, load_unet

from .conftest import ScriptedDetector

PROMPT = "a photo of a red circle on grass"


@pytest.fixture(scope="module")
def p4d_models(tiny_stack):
    """The tiny stack's base UNet as ε and a perturbed copy of it as the 'erased' ε*."""
    runtime = load_runtime(str(tiny_stack.sd_path), None, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in runtime.pipe.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    base = load_unet(str(tiny_stack.sd_path), torch.device("cpu")).requires_grad_(False)
    return P4DModels(AttackModels.from_runtime(runtime), base)


def test_layouts():
    tokenizer = load_clip_tokenizer()
    n = layout_n(tokenizer, 16)
    assert n.ids.shape == (1, 77) and int(n.ids[0, 0]) == tokenizer.bos_token_id
    assert n.free == list(range(1, 17)) and int(n.ids[0, 17]) == tokenizer.eos_token_id and n.eos == 17
    tokens = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    k = layout_k(tokenizer, PROMPT, 3)
    assert k.eos == 1 + k_combined_length(len(tokens), 3) and len(k.free) == len(tokens) // 3 + 1
    assert all((position - 1) % 4 == 0 for position in k.free)
    kept = [int(i) for position, i in enumerate(k.ids[0, 1 : k.eos].tolist(), start=1) if position not in k.free]
    assert kept == tokens and not k.truncated  # the prompt's tokens in order between the free slots
    long = layout_k(tokenizer, " ".join(["red"] * 80), 3)
    assert long.truncated and long.eos <= 76 and k_combined_length(len(long.prompt_ids), 3) <= 75


def test_projection_returns_real_vocabulary_ids(p4d_models):
    tokenizer = p4d_models.erased.tokenizer
    table = p4d_models.erased.text_encoder.get_input_embeddings().weight.detach()
    allowed = allowed_tokens(tokenizer, table.shape[0])
    ids = torch.tensor([320, 1125, 539, 4481, 49000])
    assert project_to_vocab(table[ids], table, allowed).tolist() == ids.tolist()
    eos = table[[tokenizer.eos_token_id, tokenizer.bos_token_id]]
    assert all(allowed[i] for i in project_to_vocab(eos, table, allowed).tolist())  # specials are never chosen


def test_the_objective_is_zero_when_the_models_and_prompts_agree(tiny_stack, p4d_models):
    runtime = load_runtime(str(tiny_stack.sd_path), None, torch.device("cpu"), torch.float32)
    same = P4DModels(AttackModels.from_runtime(runtime), p4d_models.base_unet)
    tokenizer = runtime.pipe.tokenizer
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = runtime.pipe.text_encoder(ids)[0]
        z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        assert float(p4d_loss(same, z0, states, states, 500, torch.randn_like(z0))) == 0.0
        assert float(p4d_loss(p4d_models, z0, states, states, 500, torch.randn_like(z0))) > 0


@pytest.mark.parametrize("variant", ["n", "k"])
def test_the_loss_falls_and_the_tokens_are_real_text(p4d_models, variant):
    settings = P4DSettings(variant=variant, tokens=4, iterations=30, eval_every=0, resample_noise=False)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = p4d_search(p4d_models, PROMPT, z0, settings, variant, torch.Generator().manual_seed(0))
    assert len(result.losses) == 30 and sum(result.losses[-10:]) / 10 < result.losses[0]
    tokenizer = p4d_models.erased.tokenizer
    vocab = len(tokenizer.get_vocab())
    assert all(0 <= i < vocab and i not in (tokenizer.bos_token_id, tokenizer.eos_token_id) for i in result.token_ids)
    if variant == "k":  # the prompt's own tokens are frozen: they come back unchanged
        tokens = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        layout = layout_k(tokenizer, PROMPT, 3)
        content = layout.content(result.token_ids)
        assert [i for pos, i in enumerate(content, start=1) if pos not in layout.free] == tokens
    else:
        assert len(result.token_ids) == 4


def _attack(tiny_stack, detector, **overrides):
    settings = P4DSettings(**{"tokens": 3, "iterations": 4, "eval_every": 2, **overrides})
    from PIL import Image

    return P4D(settings, str(tiny_stack.sd_path), GenerationSettings(num_inference_steps=2),
               lambda row: Image.new("RGB", (64, 64), (200, 30, 30)), lambda: detector)


def test_the_loop_resumes_and_writes_replayable_prompts(tiny_stack, rows_csv, tmp_path):
    rows = load_prompts(str(rows_csv), 3)
    made_by = {"model": "tiny"}
    loads = []

    def runtime():
        loads.append(1)
        return load_runtime(str(tiny_stack.sd_path), None, torch.device("cpu"), torch.float32)

    detector = ScriptedDetector(positive_from=2)  # the first check fails, the rest succeed
    records = run_attack(_attack(tiny_stack, detector, variant="union"), rows, tmp_path, made_by, runtime)
    first = records[rows[0].case]
    assert not first["variants"][0]["success"] or len(first["rounds"]) == 2
    assert all(r["success"] for r in records.values()) and len(loads) == 1
    replay = load_prompts(str(tmp_path / PROMPTS_FILE))
    assert [r.prompt for r in replay] == [records[r.case]["attack_prompt"] for r in rows]
    assert [r.seed for r in replay] == [r.seed for r in rows]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    run_attack(_attack(tiny_stack, ScriptedDetector(1), variant="union"), rows, tmp_path, made_by, runtime)
    assert len(loads) == 1 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing redone
    (tmp_path / f"{rows[1].case}.json").unlink()
    again = run_attack(_attack(tiny_stack, ScriptedDetector(1), variant="union"), rows, tmp_path, made_by, runtime)
    assert len(loads) == 2 and set(again) == {r.case for r in rows}
    assert (tmp_path / f"{rows[0].case}.json").stat().st_mtime_ns == stamps[tmp_path / f"{rows[0].case}.json"]
    redo = run_attack(_attack(tiny_stack, ScriptedDetector(1), iterations=2), rows, tmp_path, made_by, runtime)
    assert len(loads) == 3 and all(r["settings"]["iterations"] == 2 for r in redo.values())  # stale: redone


def test_registered():
    assert ATTACKS["p4d"] is P4D


def test_evaluate_attack_method_p4d(tiny_stack, tiny_classifier, rows_csv, tmp_path, capsys):
    out = tmp_path / "p4d"
    args = ["all", "--prompts", str(rows_csv), "--output_dir", str(out), "--ckpt_path", str(tiny_stack.sd_path),
            "--device", "cpu", "--limit", "2", "--num_inference_steps", "2", "--detector", "classifier",
            "--classifier", str(tiny_classifier), "--target", "church", "--attack_method", "p4d",
            "--p4d_tokens", "3", "--p4d_iterations", "3", "--p4d_eval_every", "0"]
    code = run_cli(evaluate.main, args)
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    attacked = [p for p in report["per_prompt"] if p["attack_success"] is not None]
    assert len(attacked) == 2 - report["asr"]["all"]["pre_success"] and report["asr"]["complete"]
    for prompt in attacked:
        record = json.loads((out / "attack" / f"{prompt['case']}.json").read_text())
        assert record["variant"] == "n" and len(record["losses"]) == 3 and len(record["token_ids"]) == 3
    if attacked:
        assert len(load_prompts(str(out / "attack" / PROMPTS_FILE))) == len(attacked)


@pytest.mark.slow
def test_the_loss_falls_on_a_stage1_toy_model(tmp_path):
    """The real objective (a fresh t and noise every step) on the shipped toy world erased for 40 iterations."""
    import os
    import subprocess
    import sys

    import numpy as np

    from coerasing.eval.attack import reference_latent
    from coerasing.toy import TOY_MODEL_DIR

    from ..conftest import REPO_ROOT

    result = subprocess.run([sys.executable, "erase_pipeline.py", "--config", "configs/toy/circle_text.yaml",
                             "--iterations", "40", "--save_iter", "40", "--save_path", str(tmp_path / "stage1"),
                             "--devices", "cpu"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    cpu, toy, prompt = torch.device("cpu"), str(TOY_MODEL_DIR), "a drawing of a red circle"
    base = load_runtime(toy, None, cpu, torch.float32)
    z0 = reference_latent(base.pipe.vae, base.render([0], 3.0, 32, 32, 25, prompts=[prompt])[0], 32, 32)
    erased = load_runtime(toy, str(tmp_path / "stage1" / "unet.pth"), cpu, torch.float32)
    models = P4DModels(AttackModels.from_runtime(erased), load_unet(toy, cpu).requires_grad_(False))
    found = p4d_search(models, prompt, z0, P4DSettings(iterations=100, eval_every=0), "n",
                       torch.Generator().manual_seed(0))
    losses = np.array(found.losses)
    assert losses[50:].mean() < losses[:25].mean()
    assert len(found.token_ids) == 16 and found.attack_prompt.strip()
