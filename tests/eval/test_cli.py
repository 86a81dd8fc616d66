"""evaluate.py: the whole protocol end to end on the tiny stack; bad input exits 2 with "error:", no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import evaluate
from coerasing.cli import run_cli

from ..conftest import REPO_ROOT


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = run_cli(evaluate.main, argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    return code, " ".join(capsys.readouterr().err.split())  # the message is wrapped where its paths end


def test_all_on_the_tiny_stack(tiny_stack, tiny_classifier, rows_csv, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["all", "--prompts", str(rows_csv), "--output_dir", str(out), "--ckpt_path", str(tiny_stack.sd_path),
            "--device", "cpu", "--limit", "3", "--num_inference_steps", "2", "--detector", "classifier",
            "--classifier", str(tiny_classifier), "--target", "church", "--attack_k", "2",
            "--attack_iterations", "2", "--attack_timesteps", "2"]
    code, err = _run(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    asr = report["asr"]
    assert asr["all"]["n"] == 3 and asr["complete"]
    attacked = [p for p in report["per_prompt"] if p["attack_success"] is not None]
    assert len(attacked) == 3 - asr["all"]["pre_success"]
    for prompt in attacked:
        assert (out / "attack" / f"{prompt['case']}.png").exists()
        assert (out / "reference" / f"{prompt['case']}.png").exists()
    assert {"report.md", "grid.png"} <= {p.name for p in out.iterdir()}
    assert report["detector"]["targets"] == {"1": "church"}
    # a rerun resumes: nothing to generate, detect or attack again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "attack").glob("*.*") if p.name != "run.json"}
    code, err = _run(args, capsys)
    assert code == 0, err
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # results of other attack settings are not mixed in
    code, err = _run(["attack", *args[1:], "--attack_lr", "0.5"], capsys)
    assert code == 2 and "holds results made with other" in err


def test_asr_end_to_end_with_both_denominators(tiny_stack, rows_csv, tmp_path, capsys):
    """Plug-in detector positive on every 3rd image: detect → a3 shows the concept; at most 7 tokens keeps a2
    and a4; the attack's checks (a fresh detector) fail twice on a2, then succeed at once on a4."""
    out = tmp_path / "eval"
    code, err = _run(["all", "--prompts", str(rows_csv), "--output_dir", str(out), "--ckpt_path",
                      str(tiny_stack.sd_path), "--device", "cpu", "--limit", "4", "--num_inference_steps", "2",
                      "--detector", "tests.eval.conftest:every_third_factory", "--attack_max_tokens", "7",
                      "--attack_k", "2", "--attack_iterations", "1", "--attack_timesteps", "2"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["asr"]["all"] == {"n": 4, "pre_success": 1, "attack_success": 1, "pre_asr": 0.25, "asr": 0.5}
    assert report["asr"]["attackable"] == {"n": 2, "pre_success": 0, "attack_success": 1, "pre_asr": 0.0, "asr": 0.5}
    by_case = {p["case"]: p for p in report["per_prompt"]}
    assert [by_case[c]["tokens"] for c in ("a1", "a2", "a3", "a4")] == [8, 7, 9, 6]  # BOS + words + EOS
    assert by_case["a2"]["attack_success"] is False and by_case["a4"]["attack_success"] is True
    assert by_case["a1"]["attack_success"] is None and by_case["a3"]["pre_success"]
    assert len(json.loads((out / "attack" / "a2.json").read_text())["rounds"]) == 2
    assert "| attackable (≤ 7 tokens) | 2 | 0 | 0.00 % | 1 | 50.00 % |" in (out / "report.md").read_text()


CASES = {
    "no --prompts": (["generate", "--output_dir", "{tmp}"], "--prompts is required"),
    "no --output_dir": (["generate", "--prompts", "nudity"], "--output_dir is required"),
    "unknown prompt set": (["generate", "--prompts", "nudes", "--output_dir", "{tmp}"], "neither a CSV file"),
    "missing --unet": (["generate", "--prompts", "nudity", "--output_dir", "{tmp}", "--unet", "{tmp}/x.pth"],
                       "--unet"),
    "unknown detector": (["detect", "--prompts", "nudity", "--output_dir", "{tmp}", "--detector", "eyes"],
                         "is not known"),
    "attack before detect": (["attack", "--prompts", "church", "--output_dir", "{tmp}"], "run `evaluate.py detect`"),
    "style without classifier": (["detect", "--prompts", "vangogh", "--output_dir", "{tmp}"],
                                 "needs an artist classifier"),
    "bad attack setting": (["attack", "--prompts", "nudity", "--output_dir", "{tmp}", "--attack_k", "0"],
                           "--attack_k"),
    "bad usability": (["report", "--prompts", "coco_10k", "--output_dir", "{tmp}", "--usability", "fud"],
                      "--usability"),
    "report before detect": (["report", "--prompts", "church", "--output_dir", "{tmp}"], "run `evaluate.py detect`"),
    "unknown command": (["evaluate", "--prompts", "nudity"], "invalid choice"),
    "bad YAML key": (["generate", "--config", "{tmp}/bad.yaml"], "unknown keys"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_clean_error(name, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("prompts: nudity\nnot_a_flag: 1\n")
    argv, message = CASES[name]
    code, err = _run([arg.replace("{tmp}", str(tmp_path)) for arg in argv], capsys)
    assert code == 2 and "error:" in err and message in err, err
    assert "Traceback" not in err


def test_nudenet_without_the_extra_is_a_clean_error_from_the_command_line(tiny_stack, rows_csv, tmp_path):
    """Real process: NudeNet weights not installed → exit 2, one paragraph saying what to install."""
    import importlib.util

    if importlib.util.find_spec("nudenet") is not None:
        pytest.skip("nudenet is installed")
    images = tmp_path / "eval" / "images"
    images.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "evaluate.py"), "detect", "--prompts", str(rows_csv), "--output_dir",
         str(tmp_path / "eval"), "--detector", "nudenet"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and result.stderr.startswith("error:"), result.stderr
    assert "nudenet==3.0.8" in result.stderr and "Traceback" not in result.stderr


def test_config_defaults_match_the_component_settings():
    """EvalConfig repeats the defaults of GenerationSettings/AttackSettings (lazy imports); keep them equal."""
    from coerasing.eval import EvalConfig
    from coerasing.eval.attack import AttackSettings
    from coerasing.generation import GenerationSettings

    config = EvalConfig()
    assert config.generation_settings() == GenerationSettings()
    assert config.attack_settings() == AttackSettings()


def test_concept_inversion_attack_end_to_end(tiny_stack, tiny_classifier, rows_csv, reference_images, tmp_path,
                                             capsys):
    """--attack_method concept_inversion: one word learned against the model, then one image per attacked prompt."""
    out = tmp_path / "ci"
    args = ["all", "--prompts", str(rows_csv), "--output_dir", str(out), "--ckpt_path", str(tiny_stack.sd_path),
            "--device", "cpu", "--limit", "3", "--num_inference_steps", "2", "--detector", "classifier",
            "--classifier", str(tiny_classifier), "--target", "church", "--attack_method", "concept_inversion",
            "--attack_images", str(reference_images), "--inversion_steps", "3"]
    code, err = _run(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    attacked = [p for p in report["per_prompt"] if p["attack_success"] is not None]
    assert len(attacked) == 3 - report["asr"]["all"]["pre_success"] and report["asr"]["complete"]
    assert all("<inverted-concept>" in p["attack_prompt"] for p in attacked)
    assert (out / "attack" / "inversion_token.safetensors").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "attack").glob("*.*") if p.name != "run.json"}
    code, err = _run(args, capsys)  # a rerun learns nothing and attacks nothing again
    assert code == 0 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    record = next(p for p in (out / "attack").glob("*.json") if p.name not in ("run.json", "inversion.json"))
    record.unlink()  # an interrupted attack: the learned word is reused, only the missing prompt is redone
    code, err = _run(args, capsys)
    token = out / "attack" / "inversion_token.safetensors"
    assert code == 0 and record.exists() and token.stat().st_mtime_ns == stamps[token]
    code, err = _run([*args, "--inversion_steps", "4"], capsys)
    assert code == 2 and "holds results made with other" in " ".join(err.split())
    code, err = _run([*args[:-4], "--inversion_steps", "3"], capsys)
    assert code == 2 and "--attack_images" in err
