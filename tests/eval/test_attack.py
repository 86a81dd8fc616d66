"""UnlearnDiff attack mechanics on the tiny stack: text states, the objective, determinism, the check loop."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from coerasing.eval import attack as A
from coerasing.eval.prompts import PromptRow
from coerasing.generation import GenerationSettings, load_generation_pipeline

from .conftest import ScriptedDetector

CPU = torch.device("cpu")
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def pipe(tiny_stack):
    return load_generation_pipeline(str(tiny_stack.sd_path), CPU, torch.float32)


@pytest.fixture(scope="module")
def models(pipe):
    return A.AttackModels.from_pipeline(pipe)


@pytest.fixture(scope="module")
def z0(models):
    image = Image.new("RGB", (80, 64), (200, 40, 40))
    return A.reference_latent(models.vae, image, 64, 64)


def _settings(**overrides) -> A.AttackSettings:
    values = {"k": 3, "iterations": 12, "schedule": "unlearndiff", "timesteps": 1, "resample_noise": False}
    return A.AttackSettings(**{**values, **overrides})


def test_token_embeddings_give_exactly_the_encoders_states(pipe):
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(A.encode_token_embeddings(pipe.text_encoder, ids, table[ids]), pipe.text_encoder(ids)[0])
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks  # the hook is removed


def test_prefix_layout_and_the_prefix_changes_the_states(pipe):
    layout = A.prefix_layout(pipe.tokenizer, PROMPT, 5)
    plain = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert layout.ids.shape == (1, 77) and layout.ids[0, 0] == pipe.tokenizer.bos_token_id
    assert layout.ids[0, 6:11].tolist() == plain[0, 1:6].tolist()  # the prompt shifted right by k = 5
    assert (layout.ids[0, 11:] == pipe.tokenizer.eos_token_id).all() and not layout.truncated
    table = pipe.text_encoder.get_input_embeddings().weight
    ids_a, ids_b = layout.with_prefix([320, 321, 322, 323, 324]), layout.with_prefix([1000] * 5)
    with torch.no_grad():
        states_a = A.encode_token_embeddings(pipe.text_encoder, ids_a, table[ids_a])
        states_b = A.encode_token_embeddings(pipe.text_encoder, ids_b, table[ids_b])
        unprefixed = pipe.text_encoder(plain)[0]
    assert not torch.allclose(states_a, states_b) and not torch.allclose(states_a, unprefixed)
    assert torch.equal(states_a[:, :1], states_b[:, :1])  # causal: the BOS state does not see the prefix
    assert A.prefix_layout(pipe.tokenizer, "word " * 80, 5).truncated


def test_simplex_projection():
    weights = torch.tensor([[0.2, 0.9, -0.3, 0.5], [0.25, 0.25, 0.25, 0.25], [3.0, 0.0, 0.0, 0.0]])
    projected = A.project_simplex(weights)
    assert torch.allclose(projected.sum(-1), torch.ones(3), atol=1e-4)
    assert (projected >= 0).all() and (projected <= 1).all()
    assert torch.equal(projected[1], weights[1]) and projected[2, 0] == pytest.approx(1.0, abs=1e-4)
    assert projected[0].argmax() == 1 and projected[0, 2] == 0


def test_unlearndiff_timesteps():
    assert A.unlearndiff_timesteps(1000, 50) == list(range(10, 1000, 20))
    assert A.unlearndiff_timesteps(1000, 1) == [500]


@pytest.mark.parametrize("space", ["embedding", "vocab"])
def test_attack_loss_decreases(models, z0, space):
    """One timestep, fixed noise: the objective is deterministic and the optimiser lowers it."""
    result = A.attack_prompt(models, PROMPT, z0, _settings(space=space), A.attack_generator(0, 1))
    losses = result.losses
    assert len(losses) == 12 and result.rounds[0]["t"] == 500
    assert min(losses[-4:]) < losses[0] and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert len(result.prefix_ids) == 3 and result.attack_prompt.endswith(PROMPT)


@pytest.mark.parametrize("space", ["embedding", "vocab"])
def test_seeded_attacks_repeat_exactly(models, z0, space):
    settings = _settings(space=space, iterations=4, schedule="random", resample_noise=True)
    first = A.attack_prompt(models, PROMPT, z0, settings, A.attack_generator(3, 42))
    again = A.attack_prompt(models, PROMPT, z0, settings, A.attack_generator(3, 42))
    other = A.attack_prompt(models, PROMPT, z0, settings, A.attack_generator(4, 42))
    assert first.losses == again.losses and first.prefix_ids == again.prefix_ids
    assert torch.equal(first.final_states, again.final_states)
    assert first.losses != other.losses


def test_vocab_attack_states_are_those_of_a_real_prompt(models, z0, pipe):
    result = A.attack_prompt(models, PROMPT, z0, _settings(iterations=2), A.attack_generator(0, 0))
    layout = A.prefix_layout(pipe.tokenizer, PROMPT, 3)
    with torch.no_grad():
        assert torch.equal(result.final_states, pipe.text_encoder(layout.with_prefix(result.prefix_ids))[0])


def test_rounds_stop_at_the_first_success(models, z0):
    calls = []

    def check(states):
        calls.append(states.shape)
        return len(calls) == 2, f"round {len(calls)}"

    settings = _settings(iterations=2, timesteps=4, resample_noise=True)
    result = A.attack_prompt(models, PROMPT, z0, settings, A.attack_generator(0, 0), check)
    assert result.success and result.evidence == "round 2" and len(result.rounds) == 2
    assert [r["t"] for r in result.rounds] == [125, 375] and len(result.losses) == 4
    assert calls == [(1, 77, 32), (1, 77, 32)]


def test_attack_row_writes_its_record_and_image(models, pipe, tmp_path):
    row = PromptRow(case="17", prompt=PROMPT, seed=5, guidance=6.0)
    settings = _settings(iterations=1, timesteps=3)
    record = A.attack_row(models, pipe, ScriptedDetector(positive_from=2), row, settings,
                          GenerationSettings(num_inference_steps=2), Image.new("RGB", (64, 64), "white"), tmp_path)
    assert record["success"] and len(record["rounds"]) == 2 and record["guidance"] == 6.0
    assert json.loads((tmp_path / "17.json").read_text())["detection"]["labels"] == ["X"]
    with Image.open(tmp_path / "17.png") as image:
        assert image.size == (64, 64)
    assert A.load_attack_records(tmp_path, ["17", "18"]).keys() == {"17"}


def test_bad_settings():
    from coerasing.errors import CoErasingError

    for bad in ({"k": 0}, {"iterations": 0}, {"lr": 0.0}, {"space": "pixels"}, {"schedule": "never"}):
        with pytest.raises(CoErasingError):
            A.AttackSettings(**bad).validate()
