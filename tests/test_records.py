"""Every record the project reads back is checked: a truncated or garbled one is recomputed with a warning
naming it, or an error naming it; degenerate images (non-finite, one colour) are counted invalid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from coerasing.compare.cache import Cache
from coerasing.compare.runner import load_records
from coerasing.errors import CoErasingError
from coerasing.eval.attack_records import load_attack_records, save_attack_record
from coerasing.files import atomic_write_json, read_json_record, record_problem, require_json_record
from coerasing.generation import finish_images
from coerasing.images import check_valid_images, invalid_images


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_record_of_the_expected_shape_or_why_not(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert read_json_record(path, {"n": int}, warn="x") is None and capsys.readouterr().err == ""  # missing: silent
    atomic_write_json(path, {"n": 3, "name": "a", "rate": 1})
    assert read_json_record(path, {"n": int, "name": str, "rate": float}) == {"n": 3, "name": "a", "rate": 1}
    assert record_problem(path, {"name": int}) == "its 'name' field is str, not int"
    assert record_problem(path, {"other": int}) == "it has no 'other' field"
    atomic_write_json(path, {"n": True})
    assert record_problem(path, {"n": int}) == "its 'n' field is bool, not int"  # a bool is not a count
    atomic_write_json(path, [1, 2])
    assert record_problem(path) == "it holds a JSON list, not an object"
    atomic_write_json(path, {"n": 3})
    _truncate(path)
    assert read_json_record(path, {"n": int}, warn="recomputing it") is None
    assert f"{path} is not a valid record: it is not valid JSON" in capsys.readouterr().err
    with pytest.raises(CoErasingError, match=rf"{path} is not a valid record: .*; delete it and rerun"):
        require_json_record(path, {"n": int})
    path.write_bytes(b"\xff\xfe garbage")
    assert "could not be read" in record_problem(path)


def test_a_truncated_cache_entry_or_its_arrays_are_computed_again(tmp_path, capsys):
    cache = Cache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"metrics": {"x": 1}, "arrays": {"grid": np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)}}

    first = cache.json_entry("evals", {"k": 1}, compute)
    assert first["arrays"] == ["grid"] and calls == [1]
    assert cache.json_entry("evals", {"k": 1}, compute)["metrics"] == {"x": 1} and calls == [1]  # reused
    path = tmp_path / "cache" / "evals" / (first["path"].rsplit("/", 1)[1])
    _truncate(path)
    assert cache.json_entry("evals", {"k": 1}, compute)["metrics"] == {"x": 1} and calls == [1, 1]
    assert f"{path} is not a valid record" in capsys.readouterr().err
    _truncate(path.with_suffix(".npz"))
    assert cache.json_entry("evals", {"k": 1}, compute)["metrics"] == {"x": 1} and len(calls) == 3
    assert f"{path.with_suffix('.npz')} could not be read" in capsys.readouterr().err
    path.with_suffix(".npz").unlink()  # the JSON lists its arrays: a lost .npz is noticed too
    cache.json_entry("evals", {"k": 1}, compute)
    assert len(calls) == 4
    atomic_write_json(path, {"request": {"k": 1}})  # valid JSON without the fields of an evaluation
    cache.json_entry("evals", {"k": 1}, compute)
    assert len(calls) == 5 and "it has no 'metrics' field" in capsys.readouterr().err
    with np.load(path.with_suffix(".npz")) as arrays:
        assert arrays["grid"].shape == (1, 2, 2, 3)


def test_a_truncated_done_mark_or_request_is_redone(tmp_path, capsys):
    cache = Cache(tmp_path)
    folder = cache.folder("runs/x", {"a": 1})
    calls = []
    cache.once(folder, {"n": 1}, lambda: calls.append(1))
    cache.once(folder, {"n": 1}, lambda: calls.append(2))
    assert calls == [1]
    _truncate(folder / "done.json")
    cache.once(folder, {"n": 1}, lambda: calls.append(3))
    assert calls == [1, 3] and f"{folder / 'done.json'} is not a valid record" in capsys.readouterr().err
    _truncate(folder / "request.json")
    assert cache.folder("runs/x", {"a": 1}) == folder
    assert json.loads((folder / "request.json").read_text())["payload"] == {"a": 1}  # rewritten whole


def test_a_truncated_attack_record_is_attacked_again_and_a_job_record_is_an_error(tmp_path, capsys):
    save_attack_record(tmp_path, "1", {"case": "1", "success": True})
    save_attack_record(tmp_path, "2", {"case": "2", "success": False})
    save_attack_record(tmp_path, "3", {"case": "3", "success": "yes"})  # wrong-typed: not a record
    _truncate(tmp_path / "2.json")
    assert list(load_attack_records(tmp_path, ["1", "2", "3"])) == ["1"]
    err = capsys.readouterr().err
    assert f"{tmp_path / '2.json'} is not a valid record" in err and "'success' field is str" in err
    job = tmp_path / "jobs" / "circle-seed0-k.json"
    atomic_write_json(job, {"concept": "circle", "seed": 0})
    _truncate(job)
    with pytest.raises(CoErasingError, match=rf"{job} is not a valid record: .*delete it and rerun the comparison"):
        load_records([job])


def test_degenerate_images_are_invalid_and_a_mostly_invalid_model_is_an_error(capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    assert invalid_images(images).tolist() == [False] * 4  # a valid model: nothing invalid
    images[1] = 0  # all black
    images[2] = (200, 10, 10)  # one colour
    assert invalid_images(images).tolist() == [False, True, True, False]
    pil = [Image.fromarray(image) for image in images]
    assert invalid_images(pil).tolist() == [False, True, True, False]
    floats = rng.random((3, 4, 4, 3)).astype(np.float32)
    floats[0, 1, 2, 0] = np.nan
    floats[1, 0, 0, 1] = np.inf
    assert invalid_images(floats).tolist() == [True, True, False]
    out = finish_images(floats, "np")  # what generation makes of a non-finite image: black, counted invalid
    assert out.dtype == np.uint8 and (out[:2] == 0).all() and invalid_images(out).tolist() == [True, True, False]
    assert "2 of 3 generated images hold non-finite values" in capsys.readouterr().err
    assert [np.asarray(i).tolist() for i in finish_images(floats[2:], "pil")] == out[2:].tolist()
    check_valid_images(2, 4, "m")  # half is not "mostly"
    with pytest.raises(CoErasingError, match="3 of 4 images of the esd model x on the test prompts are invalid"):
        check_valid_images(3, 4, "the esd model x", "on the test prompts")


def test_a_unet_with_nan_weights_is_an_error_of_the_toy_evaluation_not_a_perfect_eraser():
    import torch

    from coerasing.generation import load_generation_pipeline
    from coerasing.methods import Runtime
    from coerasing.toy import TOY_MODEL_DIR
    from coerasing.toy import protocol as toy

    settings = toy.ToyEvalSettings(explicit_images=2, implicit_images=2, unrelated_images=2, num_inference_steps=2)
    pipe = load_generation_pipeline(str(TOY_MODEL_DIR), torch.device("cpu"), torch.float32)
    scorer = toy.ToyScorer(TOY_MODEL_DIR)
    valid = toy.evaluate(Runtime(pipe), "circle", "test", settings, scorer)
    assert valid["invalid"]["k"] == 0 and valid["invalid"]["n"] == 6
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(CoErasingError, match=r"6 of 6 images of the base model on the test prompts are invalid"):
        toy.evaluate(Runtime(pipe), "circle", "test", settings, scorer)


def test_evaluate_py_counts_invalid_images_and_stops_on_a_mostly_invalid_model(tmp_path):
    from types import SimpleNamespace

    from coerasing.eval.report import markdown_report
    from coerasing.eval.steps import check_images, invalid_cases

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "1.png")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "2.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "3.png")
    assert invalid_cases(tmp_path, ["1", "2", "3", "4"]) == ["2"]  # a missing image is the other steps' business
    config = SimpleNamespace(images_dir=tmp_path, erased="esd.pth", ckpt_path="base")
    assert check_images(config, ["1", "2", "3"]) == ["2"]
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "3.png")
    with pytest.raises(CoErasingError, match=r"2 of 3 images of --artifact esd.pth in .* are invalid"):
        check_images(config, ["1", "2", "3"])
    report = {"prompts": "p", "ckpt_path": "base", "unet": "esd.pth", "detector": {"protocol": "x"}, "asr": None,
              "invalid": {"k": 1, "n": 3, "cases": ["2"]}}
    assert "- invalid images (non-finite or one colour everywhere): 1 of 3, e.g. cases 2" in markdown_report(report)
