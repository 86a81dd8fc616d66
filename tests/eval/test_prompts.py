"""Prompt sets: the shipped CSVs parse, rows carry their own seed/guidance/size, UnlearnDiff's 60-token rule."""

from __future__ import annotations

import pytest

from coerasing.errors import CoErasingError
from coerasing.eval.prompts import (
    PROMPT_SETS,
    attack_eligible,
    count_clip_tokens,
    load_prompts,
    parse_rows,
    resolve_prompt_file,
)
from coerasing.testing import load_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.mark.parametrize(("name", "count"), [("nudity", 142), ("i2p", 4703), ("vangogh", 50), ("church", 50),
                                             ("garbage_truck", 50), ("parachute", 50), ("tench", 50),
                                             ("coco_10k", 10000)])
def test_shipped_sets_parse(name, count):
    rows = load_prompts(name)
    assert len(rows) == count and name in PROMPT_SETS
    assert len({row.case for row in rows}) == count
    assert all(0 <= row.seed < 2**32 for row in rows)  # I2P seeds reach 4.29e9: above 2**31, below 2**32


def test_row_fields():
    nudity = load_prompts("nudity")
    assert nudity[0].case == "21" and nudity[0].seed == 932309623 and nudity[0].guidance == 7.0
    assert (nudity[0].width, nudity[0].height) == (512, 512) and nudity[0].extra["categories"] == "self-harm"
    coco = load_prompts("coco_10k", limit=3)
    assert coco[0].case == "000000203564" and coco[0].guidance is None and coco[0].width is None
    sizes = {(row.width, row.height) for row in load_prompts("i2p")}
    assert (512, 128) in sizes and (256, 512) in sizes
    assert any(row.prompt == "NuLL" for row in load_prompts("i2p"))
    assert load_prompts("vangogh")[0].extra["artist"] == "Vincent van Gogh"


def test_unlearndiff_keeps_118_of_the_142_nudity_prompts(tokenizer):
    """``len(tokenizer(prompt).input_ids) <= 60`` with BOS and EOS counted: 118; without them it would be 121."""
    rows = load_prompts("nudity")
    assert len(attack_eligible(rows, tokenizer, 60)) == 118
    assert sum(count_clip_tokens(tokenizer, row.prompt) - 2 <= 60 for row in rows) == 121
    assert count_clip_tokens(tokenizer, "a cat") == 4  # BOS, a, cat, EOS


def test_set_name_or_path(rows_csv):
    assert resolve_prompt_file("nudity").name == "nudity.csv"
    assert resolve_prompt_file("Garbage-Truck").name == "garbage_truck.csv"
    assert resolve_prompt_file(str(rows_csv)) == rows_csv
    with pytest.raises(CoErasingError, match="neither a CSV file nor a shipped prompt set"):
        resolve_prompt_file("no_such_set")


def _record(**fields: str) -> dict[str, str]:
    return {"case_number": "0", "prompt": "p", "evaluation_seed": "1", **fields}


@pytest.mark.parametrize(("records", "message"), [
    ([{"text": "x", "evaluation_seed": "1"}], "no 'prompt' column"),
    ([{"prompt": "x"}], "no seed column"),
    ([_record(), _record()], "repeats row 1"),
    ([_record(evaluation_seed="1.5")], "not an integer"),
    ([_record(evaluation_seed="-3")], "outside"),
    ([_record(sd_image_width="500")], "multiple of 8"),
    ([_record(evaluation_guidance="abc")], "not a number"),
    ([_record(case_number="../x")], "cannot be a file name"),
])
def test_bad_rows_are_clear_errors(records, message):
    with pytest.raises(CoErasingError, match=message):
        parse_rows(records, "test.csv")


def test_missing_case_numbers_use_the_row_index():
    rows = parse_rows([{"prompt": "a", "seed": "5"}, {"prompt": "b", "seed": "6"}], "x.csv")
    assert [row.case for row in rows] == ["0", "1"] and rows[1].file == "1.png"
