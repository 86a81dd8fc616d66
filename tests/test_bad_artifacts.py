"""Artifacts on disk are checked at load, and a run never lands in (or clears) what is not its own.

Each damaged artifact goes through ``evaluate.py generate --artifact``: exit 2, one ``error:``
paragraph, no traceback, and nothing on disk changed. Pickles where safetensors belong are refused
without being unpickled (a pickle that would leave a marker file proves it).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import erase_pipeline
import evaluate
from coerasing.checkpoints import claim_run_folder, run_owner
from coerasing.cli import run_cli
from coerasing.compare.cache import Cache
from coerasing.errors import CoErasingError
from coerasing.methods import cpe
from coerasing.methods.gie import GIEConfig
from coerasing.methods.gie.adapter import GIEAdapter
from coerasing.methods.gie.training import write_gie_artifact


class Planted:
    """Unpickling this object creates a file: the proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def originals(tiny_stack, tmp_path_factory):
    """A CPE artifact, a GIE artifact with a fixed w, one with an adapter, and a UNet checkpoint."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("artifacts")
    cpe_folder = cpe.train_cpe(cpe.CPEConfig(prompt="cat", ckpt_path=str(tiny_stack.sd_path), device="cpu",
                                             save_path=str(root / "cpe"), stages=1, stage_iterations=2,
                                             first_stage_factor=1, adversarial_prompts=2, anchors_per_step=2,
                                             lr=1e-3, seed=0))
    write_gie_artifact(root / "gie", GIEConfig(target="cat", w=-2.0))
    write_gie_artifact(root / "gie_adapter", GIEConfig(target="cat"), GIEAdapter(16, (4, 4)))
    unet = UNet2DConditionModel.from_pretrained(str(tiny_stack.sd_path), subfolder="unet")
    torch.save(unet.state_dict(), root / "unet.pth")
    return {"cpe": cpe_folder, "gie": root / "gie", "gie_adapter": root / "gie_adapter", "unet": root / "unet.pth"}


def _json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _nan(path, value=float("nan")):
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key].clone().fill_(value)
    save_file(tensors, str(path))


def _pickle(path):
    torch.save({"x": Planted(str(path.parent / "UNPICKLED"))}, path)


def _unet_nan(path):
    state = torch.load(path, weights_only=True)
    key = next(iter(state))
    state[key] = state[key].clone().fill_(float("nan"))
    torch.save(state, path)


# (artifact, file to damage, damage, text in the error)
CASES = {
    "truncated artifact.json": ("cpe", "artifact.json", lambda p: p.write_text(p.read_text()[:20]),
                                "not readable JSON"),
    "artifact.json a list": ("cpe", "artifact.json", lambda p: p.write_text("[1, 2]"), "must be a JSON object"),
    "no method": ("cpe", "artifact.json", lambda p: _json(p, lambda d: d.pop("method")), "names no method"),
    "method a number": ("gie", "artifact.json", lambda p: _json(p, lambda d: d.update(method=3)), "names no method"),
    "unknown method": ("gie", "artifact.json", lambda p: _json(p, lambda d: d.update(method="magic")),
                       "unknown method 'magic'"),
    "settings a string": ("cpe", "artifact.json", lambda p: _json(p, lambda d: d.update(settings="x")),
                          "'settings' must be a mapping"),
    "weights outside (..)": ("cpe", "artifact.json",
                             lambda p: _json(p, lambda d: d.update(weights="../../cpe.safetensors")),
                             "points outside the artifact's folder"),
    "weights outside (absolute)": ("cpe", "artifact.json", lambda p: _json(p, lambda d: d.update(weights="/etc/hosts")),
                                   "points outside the artifact's folder"),
    "weights named but missing": ("cpe", "artifact.json", lambda p: _json(p, lambda d: d.update(weights="w.st")),
                                  "'w.st' ('weights'), which is missing"),
    "weights not text": ("cpe", "artifact.json", lambda p: _json(p, lambda d: d.update(weights=[1])),
                         "must be a file name inside the artifact's folder"),
    "truncated cpe weights": ("cpe", "cpe.safetensors", lambda p: p.write_bytes(p.read_bytes()[:300]),
                              "no complete safetensors header"),
    "cpe weights cut inside the data": ("cpe", "cpe.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-64]),
                                        "cpe.safetensors"),
    "garbage cpe weights": ("cpe", "cpe.safetensors", lambda p: p.write_bytes(b"not weights at all" * 10),
                            "no complete safetensors header"),
    "pickle as cpe weights": ("cpe", "cpe.safetensors", _pickle, "holds a PyTorch pickle or zip"),
    "nan in cpe weights": ("cpe", "cpe.safetensors", _nan, "NaN or infinite values"),
    "inf in cpe weights": ("cpe", "cpe.safetensors", lambda p: _nan(p, float("inf")), "NaN or infinite values"),
    "truncated cpe layout": ("cpe", "cpe.json", lambda p: p.write_text("{"), "not readable JSON"),
    "cpe layout wrong type": ("cpe", "cpe.json", lambda p: _json(p, lambda d: d.update(rank="two")),
                              "'rank' has the wrong type"),
    "cpe layout negative size": ("cpe", "cpe.json", lambda p: _json(p, lambda d: d.update(gate_dim=-4)),
                                 "'gate_dim' has the wrong type or value"),
    "cpe layout missing key": ("cpe", "cpe.json", lambda p: _json(p, lambda d: d.pop("layers")),
                               "must be an object with the keys"),
    "cpe layout extra key": ("cpe", "cpe.json", lambda p: _json(p, lambda d: d.update(evil=1)),
                             "must be an object with the keys"),
    "cpe layout sizes differ": ("cpe", "cpe.json", lambda p: _json(p, lambda d: d.update(out_features=[8])),
                                "differ in number"),
    "gie w text": ("gie", "artifact.json", lambda p: _json(p, lambda d: d["settings"].update(w="strong")),
                   "settings.w must be a number"),
    "gie w huge": ("gie", "artifact.json", lambda p: _json(p, lambda d: d["settings"].update(w=-1e30)),
                   "settings.w must be at least -100"),
    "gie fraction past 1": ("gie", "artifact.json",
                            lambda p: _json(p, lambda d: d["settings"].update(cross_fraction=2)),
                            "settings.cross_fraction must be at most 1"),
    "gie steps a list": ("gie", "artifact.json",
                         lambda p: _json(p, lambda d: d["settings"].update(num_inference_steps=[1])),
                         "settings.num_inference_steps"),
    "gie adapter missing": ("gie_adapter", "adapter.safetensors", lambda p: p.unlink(), "missing from the folder"),
    "gie adapter pickle": ("gie_adapter", "adapter.safetensors", _pickle, "holds a PyTorch pickle or zip"),
    "gie adapter nan": ("gie_adapter", "adapter.safetensors", _nan, "NaN or infinite values"),
    "gie adapter truncated": ("gie_adapter", "adapter.safetensors", lambda p: p.write_bytes(p.read_bytes()[:40]),
                              "no complete safetensors header"),
    "unet with nan": ("unet", None, _unet_nan, "NaN or infinite values"),
}


def _digest(folder):
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_a_damaged_artifact_is_one_clear_error(case, originals, tiny_stack, tmp_path, capsys):
    kind, name, damage, expected = CASES[case]
    target = tmp_path / originals[kind].name
    (shutil.copytree if originals[kind].is_dir() else shutil.copy)(originals[kind], target)
    damage(target / name if name else target)
    before = _digest(target)
    code = run_cli(evaluate.main, ["generate", "--prompts", "nudity", "--limit", "1", "--ckpt_path",
                                   str(tiny_stack.sd_path), "--device", "cpu", "--artifact", str(target),
                                   "--output_dir", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in " ".join(err.split()), err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1
    assert _digest(target) == before  # nothing on disk changed
    assert not (target.parent / "UNPICKLED").exists() and not (target / "UNPICKLED").exists()


def test_the_intact_artifacts_load(originals, tiny_stack):
    from coerasing.generation import load_generation_pipeline
    from coerasing.methods import apply_artifact

    pipe = load_generation_pipeline(str(tiny_stack.sd_path), torch.device("cpu"), torch.float32)
    for kind in ("cpe", "gie", "gie_adapter", "unet"):
        apply_artifact(pipe, originals[kind]).close()


# ----------------------------------------------------------------------------------------------
# Whose folder: a run never writes into another method's, --overwrite clears only its own files


def test_run_owner_reads_run_json_and_files(originals, tmp_path):
    assert run_owner(originals["cpe"]) == "cpe" and run_owner(originals["gie"]) == "gie"
    assert run_owner(tmp_path) is None
    (tmp_path / "unet_5.pth").write_bytes(b"x")
    assert run_owner(tmp_path) == "coerasing"


def test_gie_never_writes_into_an_erasing_run(originals, tmp_path, capsys):
    run = tmp_path / "esd"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"method": "coerasing", "config": {"modality": "text"}}))
    (run / "unet.pth").write_bytes(b"weights")
    before = _digest(run)
    for extra in ([], ["--overwrite", "true"]):
        code = run_cli(erase_pipeline.main, ["--method", "gie", "--target", "cat", "--w", "-2", "--output_dir",
                                             str(run), *extra])
        err = " ".join(capsys.readouterr().err.split())
        assert code == 2 and "holds a coerasing run" in err and "Traceback" not in err
        assert _digest(run) == before


def test_erasing_never_overwrites_a_cpe_run(originals, tiny_stack, tmp_path, capsys):
    run = tmp_path / "cpe"
    shutil.copytree(originals["cpe"], run)
    before = _digest(run)
    code = run_cli(erase_pipeline.main, ["--ckpt_path", str(tiny_stack.sd_path), "--devices", "cpu", "--prompt", "x",
                                         "--train_method", "noxattn", "--iterations", "2", "--save_path", str(run),
                                         "--overwrite", "true"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "holds a cpe run" in err
    assert _digest(run) == before


def test_overwrite_keeps_other_files_and_refuses_to_remove_an_input(tmp_path):
    run = tmp_path / "run"
    (run / "round_1").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"method": "stereo"}))
    (run / "round_1" / "reference.png").write_bytes(b"an input")
    (run / "notes.txt").write_text("mine")
    owned = ("run.json", "stereo.json", "tokens", "round_*", "reo")
    with pytest.raises(CoErasingError, match="--image .* lies among the files that --overwrite would remove"):
        claim_run_folder(run, "stereo", overwrite=True, owned=owned, inputs={"--image": str(run / "round_1")})
    assert (run / "round_1" / "reference.png").exists() and (run / "run.json").exists()
    claim_run_folder(run, "stereo", overwrite=True, owned=owned, inputs={"--image": str(tmp_path / "elsewhere")})
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # only what STEREO writes was removed


def test_erase_overwrite_refuses_to_delete_its_own_starting_checkpoint(tiny_stack, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"method": "coerasing"}))
    (run / "unet_2.pth").write_bytes(b"start here")
    code = run_cli(erase_pipeline.main, ["--ckpt_path", str(tiny_stack.sd_path), "--devices", "cpu", "--prompt", "x",
                                         "--train_method", "noxattn", "--iterations", "2", "--save_path", str(run),
                                         "--overwrite", "true", "--unet_ckpt_path", str(run / "unet_2.pth")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "--unet_ckpt_path" in err and "would remove" in err
    assert (run / "unet_2.pth").read_bytes() == b"start here"


# ----------------------------------------------------------------------------------------------
# Cache keys: paths resolved, the output folder's own location not part of any key


def test_cache_keys_survive_a_moved_output_folder_and_resolve_paths(tmp_path, monkeypatch):
    a, b = Cache(tmp_path / "a"), Cache(tmp_path / "b")
    payload = lambda root: {"image": str(root / "cache" / "references" / "k1" / "circle"), "lr": 1e-4}  # noqa: E731
    assert a.key(payload(tmp_path / "a")) == b.key(payload(tmp_path / "b"))
    assert a.portable(payload(tmp_path / "a"))["image"] == "<output>/cache/references/k1/circle"
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert a.key({"model": "./models"}) == a.key({"model": "models"}) == a.key({"model": str(tmp_path / "models")})
    assert a.key({"model": "CompVis/stable-diffusion-v1-4"}) != a.key({"model": "models"})


def test_attack_keys_hold_the_reference_images_settings():
    from coerasing.compare.config import CompareConfig
    from coerasing.compare.protocols import make_protocol

    presets = CompareConfig(quick=True).load_presets()
    changed = {**presets, "references": {**presets["references"], "num_inference_steps": 2}}
    one = make_protocol(CompareConfig(quick=True), presets, "cpu").attack_identity()
    two = make_protocol(CompareConfig(quick=True), changed, "cpu").attack_identity()
    assert one != two and two["references"]["num_inference_steps"] == 2
