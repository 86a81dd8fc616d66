"""Scoring of erasure on the toy world (:mod:`coerasing.toy.erasure`): prompt sets, arithmetic, grid, CLI."""

from __future__ import annotations

import numpy as np
import pytest

from coerasing.cli import run_cli
from coerasing.errors import CoErasingError
from coerasing.grid import image_grid
from coerasing.toy import erasure
from coerasing.toy.world import SHAPES, EvalPrompt


@pytest.mark.parametrize("concept", SHAPES)
def test_concept_prompts_split_by_shape(concept):
    prompts = erasure.concept_prompts(concept)
    assert prompts["explicit"] and prompts["implicit"] and prompts["unrelated"]
    assert all(p.shape == concept and concept in p.prompt.split() for p in prompts["explicit"])
    assert all(p.shape == concept and concept not in p.prompt.split() for p in prompts["implicit"])
    assert all(p.shape != concept and concept not in p.prompt.split() for p in prompts["unrelated"])
    texts = [p.prompt for group in prompts.values() for p in group]
    assert len(texts) == len(set(texts))


def test_unknown_concept_is_a_user_error():
    with pytest.raises(CoErasingError, match="not a shape"):
        erasure.concept_prompts("dog")


def _pred(shape, colour="red"):
    return {"shape": shape, "colour": colour, "background": "white"}


def test_score_group_counts_concept_for_target_groups_and_asked_labels_for_unrelated():
    prompts = [EvalPrompt("a red circle", "circle", "red", "full"), EvalPrompt("a ball", "circle", None, "implicit")]
    predictions = [_pred("circle"), _pred("square"), _pred("circle", "blue"), _pred("none")]
    score = erasure.score_group("explicit", "circle", prompts, predictions, per_prompt=2)
    assert score["rate"] == pytest.approx(0.5)
    assert score["per_prompt"] == {"a red circle": 0.5, "a ball": 0.5}
    assert score["n_images"] == 4 and score["n_prompts"] == 2

    unrelated = [EvalPrompt("a red square", "square", "red", "full"), EvalPrompt("a tile", "square", None, "implicit")]
    predictions = [_pred("square", "red"), _pred("square", "blue"), _pred("square", "green"), _pred("circle")]
    score = erasure.score_group("unrelated", "circle", unrelated, predictions, per_prompt=2)
    # the wrong colour fails a prompt that fixes the colour; any colour passes one that does not
    assert score["per_prompt"] == {"a red square": 0.5, "a tile": 0.5}
    assert score["rate"] == pytest.approx(0.5)


def test_score_group_rejects_mismatched_counts():
    with pytest.raises(ValueError):
        erasure.score_group("explicit", "circle", [EvalPrompt("a circle", "circle", None, "shape")], [], 2)


def test_grid_prompts_cover_every_group_and_labelled_grid_has_one_cell_per_image():
    prompts = erasure.concept_prompts("circle")
    columns = erasure.grid_prompts(prompts)
    groups = {g for g, items in prompts.items() for p in columns if p in items}
    assert groups == set(erasure.GROUPS)
    rows = {name: np.full((len(columns), 32, 32, 3), 40 * i, np.uint8) for i, name in enumerate(("base", "text"))}
    grid = image_grid(list(rows.values()), cell=48, row_labels=list(rows), column_labels=[p.prompt for p in columns],
                      column_groups=["explicit"] * len(columns))
    assert grid.width > len(columns) * 48 and grid.height > 2 * 48
    # the second row's first cell is filled with that row's images
    assert grid.getpixel((70 + 10, 62 + 48 + 4 + 10)) == (40, 40, 40)


def test_parse_unet_specs(tmp_path):
    path = tmp_path / "unet.pth"
    path.write_bytes(b"")
    assert erasure.parse_unet_specs([f"text={path}"]) == {"base": None, "text": str(path)}
    with pytest.raises(CoErasingError, match="NAME=PATH"):
        erasure.parse_unet_specs([str(path)])
    with pytest.raises(CoErasingError, match="does not exist"):
        erasure.parse_unet_specs([f"text={tmp_path / 'missing.pth'}"])


def test_cli_rejects_a_folder_that_is_not_a_toy_model(tmp_path, capsys):
    code = run_cli(erasure.main, ["--model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "is not a toy-world model" in " ".join(capsys.readouterr().err.split())  # wrapped by path length


def test_format_table_lists_every_model():
    report = {"concept": "circle", "models": {
        "base": {"target_rate_explicit": 0.9, "target_rate_implicit": 0.8, "unrelated_accuracy": 0.95},
        "image": {"target_rate_explicit": 0.1, "target_rate_implicit": 0.2, "unrelated_accuracy": 0.85}}}
    table = erasure.format_table(report)
    assert "| base | 90.0 % | 80.0 % | 95.0 % |" in table and "| image | 10.0 % | 20.0 % | 85.0 % |" in table
