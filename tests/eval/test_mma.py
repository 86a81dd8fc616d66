"""MMA-Diffusion's text attack: the ban list, the embedding path, the GCG step, the attack, evaluate.py, replay."""

from __future__ import annotations

import json

import pytest
import torch

from coerasing.eval.attacks import MMADiffusion, run_attack
from coerasing.eval.attacks.mma import (
    NUDITY_BANNED,
    MMASettings,
    banned_mask,
    banned_token_ids,
    mma_search,
    prompt_loss,
    propose,
)
from coerasing.eval.attacks.text_search import PromptEncoder
from coerasing.generation import GenerationSettings, ImageRow

from .conftest import ScriptedDetector
from .test_ring_a_bell import check_replay, evaluate_args, run_evaluate


@pytest.fixture(scope="module")
def encoder(tiny_stack) -> PromptEncoder:
    from transformers import CLIPTextModel

    from coerasing.models import load_clip_tokenizer

    return PromptEncoder(load_clip_tokenizer(), CLIPTextModel.from_pretrained(tiny_stack.sd_path / "text_encoder"))


def test_the_ban_list(encoder):
    vocab = encoder.tokenizer.get_vocab()
    banned = banned_token_ids(encoder, ["circle", "starfish"])
    assert {vocab["circle</w>"], vocab["circles</w>"]} <= banned  # every entry that contains the word
    assert set(encoder.content_ids("starfish")) <= banned  # and the word's own pieces
    assert encoder.special_ids() <= banned and vocab["square</w>"] not in banned
    # the paper's nudity list bans 2294 entries of CLIP's vocabulary by substring
    substring_only = {i for token, i in vocab.items() if any(w in token.replace("</w>", "") for w in NUDITY_BANNED)}
    assert len(substring_only) == 2294 and substring_only <= banned_token_ids(encoder, NUDITY_BANNED)


def test_the_embedding_path_equals_the_plain_forward(encoder):
    ids = encoder.tokenize(["a photo of a red circle"])
    content = encoder.content_ids("a photo of a red circle")
    one_hot = torch.nn.functional.one_hot(torch.tensor(content), encoder.vocab_size).float()
    via_embeddings = encoder.states_from_one_hot(one_hot, ids)
    assert (via_embeddings - encoder.states(ids)).abs().max() < 1e-5
    pooled = encoder.pooled(encoder.states(ids), ids)
    plain = encoder.text_encoder(ids).pooler_output
    assert (pooled - plain).abs().max() < 1e-5


def test_proposals_never_hold_a_banned_id():
    gradient = torch.randn(4, 50)
    banned = torch.zeros(50, dtype=torch.bool)
    banned[:10] = True
    gradient[:, :10] = -100.0  # the banned ids look best
    proposals = propose(gradient, [20, 21, 22, 23], banned, top_k=5, candidates=16, generator=torch.Generator())
    assert not banned[proposals].any()
    changed = (proposals != torch.tensor([20, 21, 22, 23])).sum(dim=1)
    assert (changed <= 1).all()
    assert torch.equal((torch.arange(16) * 4 // 16), torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4))


def test_the_gcg_search_never_picks_a_banned_token(encoder):
    words = ("circle", "a", "e")  # bans every entry with an "a" or an "e": about half the vocabulary
    banned = banned_mask(encoder, banned_token_ids(encoder, words))
    assert banned.sum() > 15_000
    settings = MMASettings(steps=12, top_k=32, candidates=24, length=6, banned=words)
    result = mma_search(encoder, "a photo of a red circle", settings, banned, torch.Generator().manual_seed(0),
                        keep_proposals=True)
    assert len(result.proposals) == 12
    for proposals in result.proposals:
        assert not banned[proposals].any()
    assert not banned[torch.tensor(encoder.content_ids(result.text))].any()
    assert encoder.content_ids(result.text) == result.ids and len(result.ids) == 6
    target = encoder.pooled(encoder.states(encoder.tokenize(["a photo of a red circle"])),
                            encoder.tokenize(["a photo of a red circle"]))[0]
    full = encoder.text_encoder(encoder.tokenize([result.text])).pooler_output[0]  # all 77 positions
    assert result.loss == pytest.approx(1 - float(torch.cosine_similarity(full, target, dim=0)), abs=1e-5)
    assert float(prompt_loss(encoder, encoder.tokenize([result.text]), target)[0]) == pytest.approx(result.loss,
                                                                                                   abs=1e-6)
    assert result.loss == min([result.initial_loss, *result.losses])  # the best ever seen
    assert result.loss < result.initial_loss


def test_the_attack_resumes(tiny_stack, tmp_path):
    from coerasing.methods import load_runtime

    rows = [ImageRow(case="m1", prompt="a red circle", seed=1, guidance=3.0),
            ImageRow(case="m2", prompt="a blue square", seed=2, guidance=3.0)]

    def attack() -> MMADiffusion:
        return MMADiffusion(GenerationSettings(num_inference_steps=2), lambda: ScriptedDetector(2), seed=0,
                            search_settings=MMASettings(steps=2, top_k=8, candidates=8, length=5, banned=("circle",)))

    runtime = load_runtime(str(tiny_stack.sd_path), None, torch.device("cpu"), torch.float32)
    records = run_attack(attack(), rows, tmp_path, {"model": "tiny"}, runtime)
    assert [records[c]["success"] for c in ("m1", "m2")] == [False, True]  # the scripted detector: 2nd image on
    assert records["m1"]["search"]["banned_ids"] > 2 and len(records["m1"]["search"]["ids"]) == 5
    (tmp_path / "m2.json").unlink()
    again = attack()
    searched = []
    search = again.search
    again.search = lambda prompt, generator: searched.append(prompt) or search(prompt, generator)
    run_attack(again, rows, tmp_path, {"model": "tiny"}, runtime)
    assert searched == ["a blue square"]  # m1's record is reused
    assert json.loads((tmp_path / "m2.json").read_text())["attack_prompt"] == records["m2"]["attack_prompt"]
    runtime.close()


def test_evaluate_mma_end_to_end_and_replay(tiny_stack, tiny_classifier, rows_csv, tmp_path, capsys):
    out = tmp_path / "mma"
    args = evaluate_args(out, tiny_stack, tiny_classifier, rows_csv)
    code, err = run_evaluate([*args, "--attack_method", "mma", "--mma_steps", "2", "--mma_topk", "8",
                              "--mma_candidates", "8", "--mma_length", "4", "--mma_banned", "circle,square"], capsys)
    assert code == 0, err
    records = [json.loads(p.read_text()) for p in (out / "attack").glob("*.json") if p.stem != "run"]
    assert records and all(r["settings"]["banned"] == ["circle", "square"] for r in records)
    check_replay(out, args, capsys)
    code, err = run_evaluate([*args, "--attack_method", "mma"], capsys)  # a CSV set: no default ban list
    assert code == 2 and "--mma_banned" in err and "Traceback" not in err


def test_the_text_attack_benchmark_runs(capsys):
    import importlib.util

    from ..conftest import REPO_ROOT

    path = REPO_ROOT / "benchmarks" / "bench_text_attacks.py"
    spec = importlib.util.spec_from_file_location("bench_text_attacks", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--arch", "tiny", "--generations", "2", "--steps", "1", "--k", "4"])
    assert [row["attack"] for row in rows] == ["ring_a_bell K4", "mma"] and all(row["seconds"] > 0 for row in rows)
    assert "| mma |" in capsys.readouterr().out
