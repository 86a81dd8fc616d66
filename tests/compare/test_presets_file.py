"""``compare.py --presets``: every block typed like the flags; a bad file is one ``error:`` before any work."""

from __future__ import annotations

import copy

import pytest
import yaml

import compare
from coerasing.cli import run_cli
from coerasing.compare.config import CompareConfig
from coerasing.compare.presets import apply_quick, validate_presets

from ..conftest import REPO_ROOT

SHIPPED = yaml.safe_load((REPO_ROOT / "configs" / "compare" / "toy.yaml").read_text())


def _edit(path: str, value: object) -> dict:
    """The shipped toy presets with ``path`` (``block.key``; ``value`` ``...``: delete it) set to ``value``."""
    data = copy.deepcopy(SHIPPED)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


# (edit, value, text that must be in the error paragraph)
CASES = {
    "misspelled block in quick": ("quick.stage_1", {"iterations": 5}, "quick has an unknown block 'stage_1'"),
    "misspelled top-level block": ("stage_1", {"iterations": 5}, "unknown block 'stage_1'"),
    "misspelled key": ("stage1.iteration", 5, "stage1 has an unknown key 'iteration'"),
    "unknown key lists the allowed ones": ("stage1.iteration", 5, "iterations"),
    "negative image count": ("evaluation.explicit_images", -3, "evaluation.explicit_images must be at least 1"),
    "zero image count": ("evaluation.unrelated_images", 0, "evaluation.unrelated_images"),
    "negative attack rows": ("attack.rows", -1, "attack.rows must be at least 1"),
    "rule given in points": ("rule.max_usability_drop", 5, "5 points is 0.05"),
    "negative rule": ("rule.max_usability_drop", -0.1, "rule.max_usability_drop must be at least 0"),
    "text where a number belongs": ("stage1.lr", "fast", "stage1.lr must be a number"),
    "nan learning rate": ("stage2.lr", float("nan"), "stage2.lr must be a finite number"),
    "zero learning rate": ("stage1.lr", 0.0, "stage1.lr must be a positive number"),
    "fractional iterations": ("stage1.iterations", 1.5, "stage1.iterations must be an integer"),
    "list where one value belongs": ("stage2.iterations", [10, 20], "stage2.iterations"),
    "unknown train method": ("stage1.train_method", "everything", "stage1.train_method 'everything' is not known"),
    "word for a boolean": ("stage2.text_uncond", "maybe", "stage2.text_uncond must be true or false"),
    "infinite guidance": ("evaluation.guidance_scale", float("inf"), "evaluation.guidance_scale"),
    "guidance past its range": ("evaluation.guidance_scale", 1e6, "evaluation.guidance_scale must be at most"),
    "first timestep past the model": ("evaluation.first_timestep", 1000, "evaluation.first_timestep must be at most"),
    "first timestep as text": ("evaluation.first_timestep", "start", "evaluation.first_timestep must be an integer"),
    "scalar block": ("stage1", 5, "stage1 must be a mapping"),
    "list block": ("attack", [1, 2], "attack must be a mapping"),
    "missing block": ("evaluation", ..., "no 'evaluation' block"),
    "missing rule": ("rule", ..., "no 'rule' block"),
    "reserved key (seed)": ("stage1.seed", 3, "stage1.seed is set by compare.py itself"),
    "reserved key (ckpt_path)": ("stereo.ckpt_path", "/x", "stereo.ckpt_path is set by compare.py itself"),
    "reserved key in references": ("references.output_dir", "/tmp/x", "references.output_dir is set by compare.py"),
    "unknown cpe key": ("cpe.learning_rate", 0.1, "cpe has an unknown key 'learning_rate'"),
    "cpe wrong type": ("cpe.stages", "two", "cpe.stages must be an integer"),
    "stereo out of range": ("stereo.rounds", 0, "stereo.rounds"),
    "gie w not a list": ("gie.w", -3.0, "gie.w must be a non-empty list"),
    "gie w empty": ("gie.w", [], "gie.w must be a non-empty list"),
    "gie w not numbers": ("gie.w", ["strong"], "gie.w[0] must be a number"),
    "gie w infinite": ("gie.w", [-1e400], "gie.w[0] must be a finite number"),
    "unknown attack space": ("attack.space", "pixels", "attack.space 'pixels' is not known"),
    "attack lr zero": ("attack.lr", 0, "attack.lr must be greater than 0"),
    "inversion steps negative": ("attack.inversion_steps", -5, "attack.inversion_steps must be at least 0"),
    "references steps zero": ("references.num_inference_steps", 0, "references.num_inference_steps"),
    "references batch text": ("references.batch_size", "big", "references.batch_size must be an integer"),
    "quick block scalar": ("quick.stage1", 3, "quick.stage1 must be a mapping"),
    "quick wrong type": ("quick.evaluation", {"explicit_images": "many"}, "quick.evaluation.explicit_images"),
    "seeds a list": ("seeds", [0, 1], "seeds must be a comma-separated string"),
    "concepts a number": ("concepts", 3, "concepts must be a comma-separated string"),
    "labels not a mapping": ("labels", ["a"], "labels must map concept names"),
    "unknown test evaluation": ("test_evaluation", "some", "test_evaluation 'some' is not known"),
}


def test_the_table_is_large():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_bad_presets_are_one_clear_error_before_any_work(case, tmp_path, capsys):
    edit, value, expected = CASES[case]
    presets = tmp_path / "presets.yaml"
    presets.write_text(yaml.safe_dump(_edit(edit, value)))
    before = presets.read_bytes()
    out = tmp_path / "out"
    code = run_cli(compare.main, ["--presets", str(presets), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in " ".join(err.split()), err
    assert "Traceback" not in err
    assert sum("error:" in line for line in err.splitlines()) == 1
    assert not out.exists() and presets.read_bytes() == before  # nothing written, nothing changed


def test_the_shipped_presets_pass_and_keep_their_values():
    for name in ("toy.yaml", "sd.yaml"):
        data = yaml.safe_load((REPO_ROOT / "configs" / "compare" / name).read_text())
        checked = validate_presets(data, name, toy=name == "toy.yaml")
        assert checked == data  # every shipped value already has its declared type


def test_values_are_converted_by_the_flags_rules():
    data = _edit("stage1.text_uncond", "off")
    data["stage1"]["iterations"] = "30"
    data["evaluation"]["guidance_scale"] = 3
    checked = validate_presets(data, "x.yaml", toy=True)
    assert checked["stage1"]["text_uncond"] is False and checked["stage1"]["iterations"] == 30
    assert isinstance(checked["evaluation"]["guidance_scale"], float)


def test_quick_overrides_only_with_the_flag():
    checked = validate_presets(SHIPPED, "toy.yaml", toy=True)
    assert apply_quick(checked, quick=False)["stage1"]["iterations"] == SHIPPED["stage1"]["iterations"]
    quick = apply_quick(checked, quick=True)
    assert quick["stage1"]["iterations"] == SHIPPED["quick"]["stage1"]["iterations"]
    assert quick["stage1"]["train_method"] == SHIPPED["stage1"]["train_method"]  # merged, not replaced
    assert "quick" not in quick and "quick" in checked  # the input is not modified


@pytest.mark.parametrize(("flag", "expected"), [("--concepts", "names nothing"), ("--methods", "names nothing"),
                                                ("--seeds", "names nothing")])
def test_empty_lists_on_the_command_line_are_errors(flag, expected, tmp_path, capsys):
    code = run_cli(compare.main, [flag, " , ", "--output_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


def test_an_unknown_toy_concept_fails_before_training(tmp_path, capsys):
    code = run_cli(compare.main, ["--concepts", "circle,hexagon", "--output_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "hexagon is not a shape of the toy world" in err
    assert not (tmp_path / "c").exists()


def test_presets_from_config_object():
    presets = CompareConfig(quick=True).load_presets()
    assert presets["concepts"] == "circle" and presets["evaluation"]["explicit_images"] == 8


def test_the_default_comparison_has_five_training_seeds_and_a_flag_or_preset_overrides_them():
    config = CompareConfig()
    presets = config.load_presets()
    assert config.lists(presets)[2] == [0, 1, 2, 3, 4]
    assert CompareConfig(seeds="0,1,2").lists(presets)[2] == [0, 1, 2]
    assert config.lists({**presets, "seeds": "7"})[2] == [7]
