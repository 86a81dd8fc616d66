"""The relearning probe: starts from the artifact's exact weights, never writes into its folder, resumes."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import evaluate
from coerasing.cli import run_cli
from coerasing.errors import CoErasingError
from coerasing.eval.relearn import RelearnSettings, load_concept_images, parse_steps, relearn_checkpoints
from coerasing.formats import save_unet
from coerasing.methods import load_runtime


@pytest.fixture(scope="module")
def artifact(tiny_stack, tmp_path_factory):
    """An 'erased' UNet: the tiny stack's, perturbed, saved as unet.pth in its own folder."""
    from coerasing.models import load_unet

    unet = load_unet(str(tiny_stack.sd_path), torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    folder = tmp_path_factory.mktemp("artifact")
    save_unet(unet, folder / "unet.pth")
    return folder / "unet.pth"


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))} | {"": sorted(p.name for p in folder.iterdir())}


def test_parse_steps():
    assert parse_steps("50,0, 10,10") == (0, 10, 50)
    for bad in ("", "a,1", "-1,3"):
        with pytest.raises(CoErasingError):
            parse_steps(bad)


def test_starts_from_the_artifact_and_restores_it(tiny_stack, artifact, reference_images):
    before = _snapshot(artifact.parent)
    runtime = load_runtime(str(tiny_stack.sd_path), str(artifact), torch.device("cpu"), torch.float32)
    flags = [p.requires_grad for p in runtime.pipe.unet.parameters()]
    saved = torch.load(artifact, weights_only=True)
    data = load_concept_images(reference_images, 2, "a photo of a circle")
    seen = {}
    for k, losses in relearn_checkpoints(runtime, data, RelearnSettings(steps=(0, 2, 3), lr=1e-3, batch_size=1)):
        state = runtime.pipe.unet.state_dict()
        seen[k] = (len(losses), any(not torch.equal(state[key], saved[key]) for key in saved))
        if k == 0:
            assert all(torch.equal(state[key], saved[key]) for key in saved)  # bit-identical
    assert seen == {0: (0, False), 2: (2, True), 3: (3, True)}
    after = runtime.pipe.unet.state_dict()
    assert all(torch.equal(after[key], saved[key]) for key in saved)  # the starting weights are back
    assert [p.requires_grad for p in runtime.pipe.unet.parameters()] == flags
    assert _snapshot(artifact.parent) == before


def test_captions_come_from_metadata_or_the_flag(tmp_path, reference_images):
    with pytest.raises(CoErasingError, match="relearn_caption"):
        load_concept_images(reference_images, 2, None)
    (tmp_path / "a.png").write_bytes((reference_images / "img_0000.png").read_bytes())
    (tmp_path / "metadata.csv").write_text("file,prompt,seed\na.png,a photo of a circle,0\n")
    assert load_concept_images(tmp_path, None, None).captions == ["a photo of a circle"]
    with pytest.raises(CoErasingError, match="asks for 3"):
        load_concept_images(tmp_path, 3, None)


@pytest.mark.slow
def test_evaluate_attack_method_relearn(tiny_stack, artifact, tiny_classifier, rows_csv, reference_images, tmp_path,
                                        capsys):
    before = _snapshot(artifact.parent)
    out = tmp_path / "relearn"
    args = ["attack", "--prompts", str(rows_csv), "--output_dir", str(out), "--ckpt_path", str(tiny_stack.sd_path),
            "--artifact", str(artifact), "--device", "cpu", "--limit", "2", "--num_inference_steps", "2",
            "--detector", "classifier", "--classifier", str(tiny_classifier), "--target", "church",
            "--attack_method", "relearn", "--relearn_images", str(reference_images), "--relearn_num_images", "2",
            "--relearn_caption", "a photo of a circle", "--relearn_steps", "0,1,3", "--relearn_lr", "1e-3",
            "--relearn_batch_size", "1"]
    assert run_cli(evaluate.main, args) == 0, capsys.readouterr().err
    assert _snapshot(artifact.parent) == before  # nothing written into the artifact's folder
    curve = json.loads((out / "relearn" / "curve.json").read_text())
    assert set(curve) == {"erased", "base"}
    for points in curve.values():
        assert [p["k"] for p in points] == [0, 1, 3] and all(p["n"] == 2 for p in points)
        assert points[0]["final_loss"] is None and points[-1]["final_loss"] is not None
    records = {p.name: p.read_bytes() for p in (out / "relearn" / "erased").glob("k_*.json")}
    stamps = {p: p.stat().st_mtime_ns for p in (out / "relearn").rglob("k_*.json")}
    assert run_cli(evaluate.main, args) == 0  # a rerun reuses every record
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    (out / "relearn" / "erased" / "k_000001.json").unlink()  # interrupted: only k = 1 is measured again, the same
    assert run_cli(evaluate.main, args) == 0
    assert {p.name: p.read_bytes() for p in (out / "relearn" / "erased").glob("k_*.json")} == records
    assert _snapshot(artifact.parent) == before
    assert run_cli(evaluate.main, [*args[:-2], "--relearn_batch_size", "2"]) == 2  # other settings: refused
    assert "other settings" in " ".join(capsys.readouterr().err.split())
    no_images = [a for a in args if a not in ("--relearn_images", str(reference_images))]
    assert run_cli(evaluate.main, no_images) == 2 and "--relearn_images" in capsys.readouterr().err
