"""The toy world as the comparison's protocol: held-out splits, the CLIP pair, metrics and the attack's counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coerasing.toy import TOY_MODEL_DIR
from coerasing.toy import protocol as B
from coerasing.toy.world import COLOURS, SHAPES, caption_labels, heldout_scenes, render_array


@pytest.mark.parametrize("concept", SHAPES)
def test_prompt_groups_and_the_validation_test_split(concept):
    groups = B.comparison_prompts(concept)
    training = set(caption_labels("train"))
    assert all(p.prompt not in training for g in groups.values() for p in g)  # held-out captions only
    assert all(concept in p.prompt.split() or f"{concept}," in p.prompt for p in groups["explicit"])
    assert all(p.shape == concept and concept not in p.prompt.split() for p in groups["implicit"])
    unrelated = groups["unrelated"]
    assert {p.shape for p in unrelated} == set(SHAPES) - {concept} and len(unrelated) >= 60
    assert len({p.colour for p in unrelated if p.colour}) == len(COLOURS)
    assert len({p.background for p in unrelated if p.background}) == 3
    for group, prompts in groups.items():
        validation, test = (B.split_prompts(prompts, split) for split in B.SPLITS)
        if len(prompts) > 1:
            assert not {p.prompt for p in validation} & {p.prompt for p in test}, group
        assert validation and test
    settings = B.ToyEvalSettings()
    rows = {split: B.evaluation_rows(concept, split, settings) for split in B.SPLITS}
    assert not {r.seed for r in rows["validation"]} & {r.seed for r in rows["test"]}
    assert sum(r.prompt.group == "unrelated" for r in rows["test"]) == settings.unrelated_images


def test_the_shipped_clip_pair_scores_matching_captions_higher():
    """The toy CLIP pair's text projection (recovered by re-running the build's seeded CLIP step)."""
    scorer = B.ToyScorer(TOY_MODEL_DIR)
    scenes = heldout_scenes(60, seed=3)
    images = np.stack([render_array(s, 32) for s in scenes])
    similarity = np.stack([scorer.clip_similarity(images, [f"a photo of a {shape}"] * len(images))
                           for shape in SHAPES], 1)
    assert np.mean([SHAPES[i] == s.shape for i, s in zip(similarity.argmax(1), scenes, strict=True)]) > 0.9
    right = scorer.clip_similarity(images, [f"a {s.colour} {s.shape}" for s in scenes]).mean()
    wrong = scorer.clip_similarity(images, [f"a {s.colour} {SHAPES[SHAPES.index(s.shape) - 1]}" for s in scenes]).mean()
    assert right > wrong + 0.2


def test_metrics_of_the_base_model_and_the_attack_counts_match_the_evaluation_module(tmp_path):
    from coerasing.eval.attack import AttackSettings, load_attack_records
    from coerasing.eval.report import asr_summary
    from coerasing.generation import load_generation_pipeline
    from coerasing.methods import Runtime

    settings = B.ToyEvalSettings(explicit_images=4, implicit_images=4, unrelated_images=8)
    runtime = Runtime(load_generation_pipeline(str(TOY_MODEL_DIR), torch.device("cpu"), torch.float32))
    scorer = B.ToyScorer(TOY_MODEL_DIR)
    result = B.evaluate(runtime, "circle", "test", settings, scorer)
    metrics = result["metrics"]
    assert metrics["explicit"]["n"] == 4 and metrics["unrelated"]["n"] == 8
    assert metrics["explicit"]["rate"] >= 0.75 and metrics["unrelated"]["rate"] >= 0.75  # the base model draws them
    assert metrics["fd"] > 0 and 0.2 < metrics["clip"] < 1
    rows = B.attack_rows("circle", settings, 2)
    pre = {rows[0].case: True, rows[1].case: False}  # one row "already shows", one is attacked
    references = {row.case: runtime.render([row.seed], 3.0, 32, 32, 5, prompts=[row.prompt.prompt])[0]
                  for row in rows}
    attack = AttackSettings(iterations=2, timesteps=1)
    summary = B.attack(runtime, scorer, "circle", rows, pre, references, attack, settings, tmp_path, {"m": 1})
    records = load_attack_records(tmp_path, [r.case for r in rows])
    assert list(records) == [rows[1].case]  # only the row without the concept was attacked
    expected = asr_summary([r.case for r in rows], pre, {c: r["success"] for c, r in records.items()})["all"]
    assert {k: summary[k] for k in expected} == expected
    assert summary["n"] == 2 and summary["pre_success"] == 1
