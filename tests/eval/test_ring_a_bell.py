"""Ring-A-Bell: the concept vector, the genetic search, the resumable attack, evaluate.py end to end, replay."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from coerasing.eval.attacks import RingABell, run_attack
from coerasing.eval.attacks.ring_a_bell import (
    PRESETS,
    GeneticSettings,
    concept_vector,
    free_tokens,
    genetic_search,
    search_vocabulary,
    squared_error,
)
from coerasing.eval.attacks.text_search import PROMPT_FILE, PromptEncoder, search_generator
from coerasing.generation import GenerationSettings, ImageRow

from .conftest import ScriptedDetector

POSITIVES = ["a photo of a red circle", "a blue circle", "a circle on a gray background"]
NEGATIVES = ["a photo of a red object", "a blue object", "something on a gray background"]


@pytest.fixture(scope="module")
def tiny_runtime(tiny_stack):
    from coerasing.methods import load_runtime

    runtime = load_runtime(str(tiny_stack.sd_path), None, torch.device("cpu"), torch.float32)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def encoder(tiny_runtime) -> PromptEncoder:
    return PromptEncoder.from_pipe(tiny_runtime.pipe)


def test_concept_vector_is_the_mean_difference_of_the_pairs(encoder):
    vector = concept_vector(encoder, POSITIVES, NEGATIVES)
    tokenizer, model = encoder.tokenizer, encoder.text_encoder
    direct = []
    for plus, minus in zip(POSITIVES, NEGATIVES, strict=True):  # one prompt at a time, straight through the model
        states = [model(tokenizer(p, padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids)[0][0] for p in (plus, minus)]
        direct.append(states[0] - states[1])
    expected = torch.stack(direct).mean(0)
    assert vector.shape == (77, model.config.hidden_size)
    torch.testing.assert_close(vector, expected, atol=1e-5, rtol=0)
    assert vector[0].abs().max() == 0  # BOS sees only itself under causal attention: the same for every prompt
    assert vector[1:].abs().max() > 0


def test_the_genetic_search_never_loses_its_best_and_improves():
    hidden = torch.tensor([5, 9, 2, 7, 3, 8])
    allowed = torch.arange(1, 12)

    def fitness(ids):  # distance of each individual to a hidden sequence
        return (ids - hidden).abs().sum(dim=1).float()

    settings = GeneticSettings(k=6, population=12, generations=40, mutation=0.5, crossover=0.5)
    result = genetic_search(fitness, 6, allowed, settings, torch.Generator().manual_seed(3))
    history = result.history
    assert len(history) == 40 and all(b <= a for a, b in zip(history, history[1:], strict=False))
    assert history[-1] < history[0]
    assert result.fitness == history[-1] == float(fitness(result.ids[None])[0])
    assert set(result.ids.tolist()) <= set(allowed.tolist())  # mutations draw from the allowed ids only


def test_eta_zero_seeded_with_the_target_tokens_has_zero_fitness(encoder):
    prompt = "a photo of a red circle"
    content = encoder.content_ids(prompt)
    target = encoder.states(encoder.tokenize([prompt]))[0]  # η = 0
    fitness = squared_error(encoder, target)
    settings = GeneticSettings(k=len(content), population=6, generations=2)
    result = genetic_search(fitness, len(content), search_vocabulary(encoder), settings,
                            torch.Generator().manual_seed(0), initial=torch.tensor([content]))
    assert result.fitness == pytest.approx(0.0, abs=1e-6) and result.ids.tolist() == content
    vocabulary = search_vocabulary(encoder)
    assert not set(vocabulary.tolist()) & encoder.special_ids() and 0 not in vocabulary.tolist()
    assert [free_tokens(encoder, PRESETS[name]) for name in ("K77", "K38", "K16")] == [75, 38, 16]


def _attack(pairs, detector_from=None, **search) -> RingABell:
    settings = GeneticSettings(**{"k": 4, "population": 8, "generations": 3, **search})
    return RingABell(GenerationSettings(num_inference_steps=2), lambda: ScriptedDetector(detector_from),
                     seed=1, search_settings=settings, pairs=str(pairs))


@pytest.fixture
def pairs_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["positive", "negative"])
        writer.writerows(zip(POSITIVES, NEGATIVES, strict=True))
    return path


ROWS = [ImageRow(case="r1", prompt="a red circle", seed=1, guidance=3.0),
        ImageRow(case="r2", prompt="a red circle", seed=2, guidance=3.0),
        ImageRow(case="r3", prompt="a blue square", seed=3, guidance=3.0)]


def test_the_attack_writes_records_and_prompts_and_resumes(tiny_runtime, pairs_csv, tmp_path):
    out = tmp_path / "attack"
    attack = _attack(pairs_csv)
    calls = []
    search = attack.search
    attack.search = lambda prompt, generator: calls.append(prompt) or search(prompt, generator)
    records = run_attack(attack, ROWS, out, {"model": "tiny"}, tiny_runtime)
    assert calls == ["a red circle", "a blue square"]  # a repeated prompt is searched once
    assert records["r1"]["attack_prompt"] == records["r2"]["attack_prompt"]
    search_info = records["r1"]["search"]
    assert search_info["free_tokens"] == 4 and len(search_info["ids"]) == 4
    assert search_info["history"][-1] == search_info["ids_objective"]
    assert all((out / f"{case}.png").exists() for case in ("r1", "r2", "r3"))
    with (out / PROMPT_FILE).open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [row["case"] for row in written] == ["r1", "r2", "r3"]
    assert [row["attack_prompt"] for row in written] == [records[c]["attack_prompt"] for c in ("r1", "r2", "r3")]
    assert written[0]["method"] == "ring_a_bell"

    again = _attack(pairs_csv)  # everything current: nothing searched, the model not even prepared
    assert run_attack(again, ROWS, out, {"model": "tiny"}, lambda: pytest.fail("model loaded")) == records
    (out / "r3.json").unlink()
    resumed = _attack(pairs_csv)
    run_attack(resumed, ROWS, out, {"model": "tiny"}, tiny_runtime)
    assert json.loads((out / "r3.json").read_text())["attack_prompt"] == records["r3"]["attack_prompt"]
    assert json.loads((out / "r1.json").read_text()) == records["r1"]
    other = _attack(pairs_csv, eta=5.0)  # other settings: stale records are redone
    assert run_attack(other, ROWS[:1], out, {"model": "tiny"}, tiny_runtime)["r1"]["settings"]["eta"] == 5.0


def test_the_search_is_seeded_by_the_prompt_not_the_row():
    first = torch.randint(0, 1000, (5,), generator=search_generator(0, "a red circle"))
    assert torch.equal(first, torch.randint(0, 1000, (5,), generator=search_generator(0, "a red circle")))
    assert not torch.equal(first, torch.randint(0, 1000, (5,), generator=search_generator(1, "a red circle")))


def run_evaluate(argv: list[str], capsys) -> tuple[int, str]:
    import evaluate
    from coerasing.cli import run_cli

    try:
        code = run_cli(evaluate.main, argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def evaluate_args(out, tiny_stack, tiny_classifier, rows_csv) -> list[str]:
    return ["all", "--prompts", str(rows_csv), "--output_dir", str(out), "--ckpt_path", str(tiny_stack.sd_path),
            "--device", "cpu", "--limit", "4", "--num_inference_steps", "2", "--detector", "classifier",
            "--classifier", str(tiny_classifier), "--target", "church"]


def check_replay(out, args, capsys) -> None:
    """Replaying ``out``'s prompt file on the same model gives the same images and detections."""
    replayed = out.parent / "replayed"
    prompts = out / "attack" / PROMPT_FILE
    code, err = run_evaluate([*args[:4], str(replayed), *args[5:], "--attack_method", "replay",
                              "--attack_prompts", str(prompts)], capsys)
    assert code == 0, err
    first = {p.stem: json.loads(p.read_text()) for p in (out / "attack").glob("*.json") if p.stem != "run"}
    second = {p.stem: json.loads(p.read_text()) for p in (replayed / "attack").glob("*.json") if p.stem != "run"}
    assert first and set(first) == set(second)
    for case, record in first.items():
        assert second[case]["replayed"] and second[case]["attack_prompt"] == record["attack_prompt"]
        assert second[case]["detection"] == record["detection"] and second[case]["success"] == record["success"]
        assert (replayed / "attack" / f"{case}.png").read_bytes() == (out / "attack" / f"{case}.png").read_bytes()


def test_evaluate_ring_a_bell_end_to_end_and_replay(tiny_stack, tiny_classifier, rows_csv, pairs_csv, tmp_path,
                                                    capsys):
    out = tmp_path / "rab"
    args = evaluate_args(out, tiny_stack, tiny_classifier, rows_csv)
    code, err = run_evaluate([*args, "--attack_method", "ring_a_bell", "--rab_pairs", str(pairs_csv), "--rab_k", "3",
                              "--rab_population", "6", "--rab_generations", "2"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    attacked = [p for p in report["per_prompt"] if p["attack_success"] is not None]
    assert attacked and len(attacked) == 4 - report["asr"]["all"]["pre_success"]
    with (out / "attack" / PROMPT_FILE).open(newline="") as handle:
        assert sorted(row["case"] for row in csv.DictReader(handle)) == sorted(p["case"] for p in attacked)
    assert all(p["attack_prompt"] for p in attacked)
    check_replay(out, args, capsys)
    code, err = run_evaluate([*args, "--attack_method", "ring_a_bell"], capsys)  # no pairs for a CSV prompt set
    assert code == 2 and "--rab_pairs" in err and "Traceback" not in err


def test_replay_of_a_missing_case_fails_and_of_another_prompt_stops(tmp_path):
    from coerasing.errors import CoErasingError
    from coerasing.eval.attacks import Replay

    path = tmp_path / "prompts.csv"
    path.write_text("case,prompt,attack_prompt\nr1,a red circle,some words\n")
    attack = Replay(str(path), GenerationSettings(num_inference_steps=2), ScriptedDetector)
    attack.prepare(object(), tmp_path, {})  # the model is never used for these two rows
    assert attack.cases == {"r1"}
    record = attack.attack_one(ROWS[2])  # r3: not in the file
    assert record["success"] is False and record["replayed"] is False and record["attack_prompt"] is None
    with pytest.raises(CoErasingError, match="same prompt set"):
        attack.attack_one(ImageRow(case="r1", prompt="another prompt", seed=1))
    (tmp_path / "bad.csv").write_text("case,prompt\nr1,a\n")
    with pytest.raises(CoErasingError, match="attack_prompt"):
        Replay(str(tmp_path / "bad.csv"), GenerationSettings(), ScriptedDetector)
