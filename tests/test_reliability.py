"""Nothing lost, nothing silently wrong: resume never rewrites other work, caches never serve stale results."""

from __future__ import annotations

import pytest
import torch

import evaluate
from coerasing.cli import run_cli
from coerasing.errors import CoErasingError
from coerasing.files import atomic_path, remove_stale_temps
from coerasing.train import erase

from .test_train import make_config


def _bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("unet*.pth"))}


def test_resume_never_changes_a_checkpoint_of_another_iteration_count(tiny_stack, tmp_path):
    folder = tmp_path / "run"
    erase(make_config(tiny_stack, folder, iterations=4, save_iter=2))
    before = _bytes(folder)
    assert set(before) == {"unet.pth", "unet_2.pth", "unet_4.pth"}
    with pytest.raises(CoErasingError, match="already reached iteration 4"):
        erase(make_config(tiny_stack, folder, iterations=2, save_iter=2, resume=True))
    assert _bytes(folder) == before
    with pytest.raises(CoErasingError, match="already holds a run"):
        erase(make_config(tiny_stack, folder, iterations=4, save_iter=2))  # neither --resume nor --overwrite
    assert _bytes(folder) == before
    erase(make_config(tiny_stack, folder, iterations=4, save_iter=2, resume=True))  # finished: nothing to do
    assert _bytes(folder) == before
    erase(make_config(tiny_stack, folder, iterations=6, save_iter=2, resume=True))  # extending keeps the rest
    after = _bytes(folder)
    assert after["unet_2.pth"] == before["unet_2.pth"] and after["unet_4.pth"] == before["unet_4.pth"]
    assert set(after) == {"unet.pth", "unet_2.pth", "unet_4.pth", "unet_6.pth"}
    final, last = (torch.load(folder / name, weights_only=True) for name in ("unet.pth", "unet_6.pth"))
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_resume_compares_resolved_paths(tiny_stack, tmp_path, monkeypatch):
    folder = tmp_path / "paths"
    erase(make_config(tiny_stack, folder, iterations=2))
    monkeypatch.chdir(tiny_stack.sd_path.parent)  # the same model by a relative path: the same setting
    erase(make_config(tiny_stack, folder, iterations=4, resume=True, ckpt_path=tiny_stack.sd_path.name))
    assert (folder / "unet_4.pth").exists()


def test_overwrite_starts_afresh_without_stale_checkpoints(tiny_stack, tmp_path):
    folder = tmp_path / "over"
    erase(make_config(tiny_stack, folder, iterations=4, save_iter=2))
    erase(make_config(tiny_stack, folder, iterations=2, save_iter=1, overwrite=True))
    assert sorted(p.name for p in folder.glob("unet*.pth")) == ["unet.pth", "unet_1.pth", "unet_2.pth"]


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    stale = tmp_path / ".unet.pth.999999999.abc.tmp"  # a pid that does not exist
    stale.write_text("half")
    with atomic_path(tmp_path / "x.txt") as tmp:  # our own live temporary file is kept
        tmp.write_text("x")
        assert remove_stale_temps(tmp_path) == [stale] and tmp.exists()
    assert not stale.exists()


def _evaluate(stack, rows_csv, out, unet=None, *extra):
    argv = ["generate", "--prompts", str(rows_csv), "--ckpt_path", str(stack.sd_path), "--output_dir", str(out),
            "--num_inference_steps", "2", "--device", "cpu", *extra]
    return run_cli(evaluate.main, argv + (["--unet", str(unet)] if unet else []))


def test_a_stale_evaluation_folder_is_never_reported_as_another_model(tiny_stack, tmp_path, capsys):
    from tests.eval.conftest import ROWS_CSV

    rows_csv = tmp_path / "rows.csv"
    rows_csv.write_text(ROWS_CSV)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_stack.sd_path / "unet")
    erased = tmp_path / "erased.pth"
    torch.save({k: v + 0.01 for k, v in unet.state_dict().items()}, erased)
    out = tmp_path / "eval"
    assert _evaluate(tiny_stack, rows_csv, out) == 0  # the base model
    images = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    capsys.readouterr()
    assert _evaluate(tiny_stack, rows_csv, out, erased) == 2  # another model into the same folder
    assert "made with other settings" in " ".join(capsys.readouterr().err.split())
    assert _evaluate(tiny_stack, rows_csv, out, None, "--num_inference_steps", "3") == 2  # another setting
    assert {p.name: p.read_bytes() for p in (out / "images").glob("*.png")} == images  # nothing overwritten
    assert _evaluate(tiny_stack, rows_csv, out) == 0  # the same settings resume (nothing to do)
    assert _evaluate(tiny_stack, rows_csv, tmp_path / "eval_erased", erased) == 0
    erased_images = {p.name: p.read_bytes() for p in (tmp_path / "eval_erased" / "images").glob("*.png")}
    assert erased_images != images
