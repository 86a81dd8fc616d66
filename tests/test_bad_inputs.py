"""Bad and odd inputs across the command lines: every one exits non-zero with an ``error:`` line that names
the flag, and no traceback (table-driven; the hostile-input probe's cases are among them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import compare
import erase_pipeline
import evaluate
import generate_data
from coerasing import convert
from coerasing.cli import run_cli

from .conftest import REPO_ROOT


@pytest.fixture(scope="module")
def world(tiny_stack, tmp_path_factory):
    """Files the cases point at: a plain file, YAML files of wrong types, a garbage checkpoint, an image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "a_file").write_text("not a folder")
    (root / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "images" / "a.png")
    yamls = {
        "iterations_text.yaml": "iterations: ten\n",
        "bool_text.yaml": "text_uncond: maybe\n",
        "list_prompt.yaml": "prompt: [nudity, naked]\n",
        "nan_lr.yaml": "lr: .nan\n",
        "float_iterations.yaml": "iterations: 1.5\n",
        "a_list.yaml": "- train_method\n- noxattn\n",
        "broken.yaml": "train_method: [noxattn\n",
        "unknown_key.yaml": "train_method: noxattn\nnot_a_flag: 3\n",
        "null_modality.yaml": "modality: null\n",
        "bool_prompt.yaml": "prompt: yes\n",
    }
    for name, text in yamls.items():
        (root / name).write_text(text)
    (root / "garbage.pth").write_bytes(b"\x00\x01 not a checkpoint")
    torch.save({"conv_in.weight": torch.zeros(1)}, root / "partial.pth")
    return root


def _erase(stack, *extra: str) -> list[str]:
    output = stack.root / "bad_input_runs"  # never the repository's checkpoints/ (the cases should fail first)
    return ["--ckpt_path", str(stack.sd_path), "--devices", "cpu", "--iterations", "2", "--prompt", "nudity",
            "--train_method", "noxattn", "--output_dir", str(output), *extra]


def _image(stack, world, *extra: str) -> list[str]:
    return _erase(stack, "--modality", "image", "--image", str(world / "images"), "--ip_adapter",
                  str(stack.ip_adapter_bin), "--image_encoder_path", str(stack.image_encoder_path), *extra)


# (command, argv builder, text that must be in the error line)
ERASE = {
    "zero iterations": (lambda s, w: _erase(s, "--iterations", "0"), "--iterations"),
    "save_path on a virtual filesystem": (lambda s, w: _erase(s, "--save_path", "/sys/coerasing-run"),
                                          "--save_path /sys/coerasing-run cannot be created"),
    "negative iterations": (lambda s, w: _erase(s, "--iterations", "-5"), "--iterations"),
    "fractional iterations": (lambda s, w: _erase(s, "--iterations", "1.5"), "--iterations must be an integer"),
    "word iterations": (lambda s, w: _erase(s, "--iterations", "abc"), "--iterations must be an integer"),
    "nan lr": (lambda s, w: _erase(s, "--lr", "nan"), "--lr must be a finite number"),
    "inf lr": (lambda s, w: _erase(s, "--lr", "inf"), "--lr must be a finite number"),
    "zero lr": (lambda s, w: _erase(s, "--lr", "0"), "--lr must be a positive number"),
    "negative lr": (lambda s, w: _erase(s, "--lr", "-1e-5"), "--lr"),
    "huge lr": (lambda s, w: _erase(s, "--lr", "1e30"), "--lr must be at most"),
    "nan negative_guidance": (lambda s, w: _erase(s, "--negative_guidance", "nan"), "--negative_guidance"),
    "huge negative_guidance": (lambda s, w: _erase(s, "--negative_guidance", "1e9"), "--negative_guidance"),
    "nan sampling_guidance": (lambda s, w: _erase(s, "--sampling_guidance", "nan"), "--sampling_guidance"),
    "inf sampling_guidance": (lambda s, w: _erase(s, "--sampling_guidance", "-inf"), "--sampling_guidance"),
    "negative seed": (lambda s, w: _erase(s, "--seed", "-1"), "--seed"),
    "seed beyond 64 bits": (lambda s, w: _erase(s, "--seed", str(2**64)), "--seed must be at most"),
    "zero steps": (lambda s, w: _erase(s, "--num_inference_steps", "0"), "--num_inference_steps"),
    "steps beyond the scheduler": (lambda s, w: _erase(s, "--num_inference_steps", "5000"), "--num_inference_steps"),
    "unknown sampler": (lambda s, w: _erase(s, "--sampler", "euler"), "--sampler"),
    "unknown train_method": (lambda s, w: _erase(s, "--train_method", "attention"), "--train_method"),
    "unknown modality": (lambda s, w: _erase(s, "--modality", "video"), "--modality"),
    "unknown precision": (lambda s, w: _erase(s, "--mixed_precision", "fp8"), "--mixed_precision"),
    "unknown save format": (lambda s, w: _erase(s, "--save_format", "pth,ckpt"), "--save_format"),
    "zero save_iter": (lambda s, w: _erase(s, "--save_iter", "0"), "--save_iter"),
    "bool flag with a word": (lambda s, w: _erase(s, "--compile", "maybe"), "--compile must be true or false"),
    "resume and overwrite": (lambda s, w: _erase(s, "--resume", "--overwrite"), "--resume and --overwrite"),
    "output_dir is a file": (lambda s, w: _erase(s, "--output_dir", str(w / "a_file")), "--output_dir"),
    "save_path under a file": (lambda s, w: _erase(s, "--save_path", str(w / "a_file" / "run")), "--save_path"),
    "logging_dir is a file": (lambda s, w: _erase(s, "--logging_dir", str(w / "a_file")), "--logging_dir"),
    "missing unet_ckpt_path": (lambda s, w: _erase(s, "--unet_ckpt_path", str(w / "nope.pth")), "--unet_ckpt_path"),
    "garbage unet_ckpt_path": (lambda s, w: _erase(s, "--unet_ckpt_path", str(w / "garbage.pth")),
                               "--unet_ckpt_path"),
    "partial unet_ckpt_path": (lambda s, w: _erase(s, "--unet_ckpt_path", str(w / "partial.pth")),
                               "--unet_ckpt_path"),
    "ckpt_path is a file": (lambda s, w: _erase(s, "--ckpt_path", str(w / "a_file")), "--ckpt_path"),
    "GPU that is not there": (lambda s, w: _erase(s, "--devices", "0,1"), "--devices"),
    "device that is not a device": (lambda s, w: _erase(s, "--devices", "toaster"), "--devices"),
    "empty prompt": (lambda s, w: _erase(s, "--prompt", " , "), "--prompt"),
    "prompt without a folder name": (lambda s, w: _erase(s, "--prompt", "../.."), "--prompt"),
    "even blur": (lambda s, w: _image(s, w, "--blur_factor", "4"), "--blur_factor"),
    "negative blur": (lambda s, w: _image(s, w, "--blur_factor", "-3"), "--blur_factor"),
    "blur wider than the latent": (lambda s, w: _image(s, w, "--blur_factor", "101"), "--blur_factor"),
    "negative noise_factor": (lambda s, w: _image(s, w, "--noise_factor", "-1"), "--noise_factor"),
    "nan noise_factor": (lambda s, w: _image(s, w, "--noise_factor", "nan"), "--noise_factor"),
    "zero image_number": (lambda s, w: _image(s, w, "--image_number", "0"), "--image_number"),
    "zero contrastive_size": (lambda s, w: _image(s, w, "--contrastive_size", "0"), "--contrastive_size"),
    "empty text_guide": (lambda s, w: _image(s, w, "--text_guide", "  "), "--text_guide"),
    "missing image folder": (lambda s, w: _image(s, w, "--image", str(w / "nope")), "--image"),
    "YAML word for an integer": (lambda s, w: _erase(s, "--config", str(w / "iterations_text.yaml")),
                                 "--iterations (from --config"),
    "YAML word for a boolean": (lambda s, w: _erase(s, "--config", str(w / "bool_text.yaml")), "--text_uncond"),
    "YAML list for a string": (lambda s, w: _erase(s, "--config", str(w / "list_prompt.yaml")), "--prompt"),
    "YAML nan": (lambda s, w: _erase(s, "--config", str(w / "nan_lr.yaml")), "--lr"),
    "YAML fraction for an integer": (lambda s, w: _erase(s, "--config", str(w / "float_iterations.yaml")),
                                     "--iterations"),
    "YAML null for a required value": (lambda s, w: _erase(s, "--config", str(w / "null_modality.yaml")),
                                       "--modality"),
    "YAML boolean for a string": (lambda s, w: _erase(s, "--config", str(w / "bool_prompt.yaml")), "--prompt"),
    "YAML that is a list": (lambda s, w: _erase(s, "--config", str(w / "a_list.yaml")), "--config"),
    "YAML that does not parse": (lambda s, w: _erase(s, "--config", str(w / "broken.yaml")), "--config"),
    "YAML with an unknown key": (lambda s, w: _erase(s, "--config", str(w / "unknown_key.yaml")), "--config"),
    "missing YAML": (lambda s, w: _erase(s, "--config", str(w / "nope.yaml")), "--config"),
    "YAML that is a folder": (lambda s, w: _erase(s, "--config", str(w)), "--config"),
    "unknown flag": (lambda s, w: _erase(s, "--iteration", "5"), "--iteration"),
    "unknown method": (lambda s, w: _erase(s, "--method", "magic"), "--method"),
}

GENERATE = {
    "no label": (lambda s, w: ["--ckpt_path", str(s.sd_path)], "--label"),
    "zero images": (lambda s, w: ["--label", "x", "--num_images", "0"], "--num_images"),
    "fractional images": (lambda s, w: ["--label", "x", "--num_images", "2.5"], "--num_images"),
    "zero batch": (lambda s, w: ["--label", "x", "--batch_size", "0"], "--batch_size"),
    "nan guidance": (lambda s, w: ["--label", "x", "--guidance_scale", "nan"], "--guidance_scale"),
    "height not a multiple of 8": (lambda s, w: ["--label", "x", "--height", "30"], "--height"),
    "zero height": (lambda s, w: ["--label", "x", "--height", "0"], "--height"),
    "huge width": (lambda s, w: ["--label", "x", "--width", "100000"], "--width"),
    "negative seed": (lambda s, w: ["--label", "x", "--seed", "-3"], "--seed"),
    "seeds past 64 bits": (lambda s, w: ["--label", "x", "--seed", str(2**64 - 2), "--num_images", "5"], "--seed"),
    "template without label": (lambda s, w: ["--label", "x", "--prompt_template", "a photo"], "--prompt_template"),
    "template with an unknown placeholder": (lambda s, w: ["--label", "x", "--prompt_template", "a {label} {oops}"],
                                             "unknown placeholder(s) {oops}"),
    "several devices": (lambda s, w: ["--label", "x", "--device", "0,1"], "--device"),
    "GPU that is not there": (lambda s, w: ["--label", "x", "--ckpt_path", str(s.sd_path), "--device", "3"],
                              "--device"),
    "unknown precision": (lambda s, w: ["--label", "x", "--mixed_precision", "fp8"], "--mixed_precision"),
    "output_dir is a file": (lambda s, w: ["--label", "x", "--output_dir", str(w / "a_file")], "--output_dir"),
    "steps beyond the scheduler": (lambda s, w: ["--label", "x", "--num_inference_steps", "5000"],
                                   "--num_inference_steps"),
    "label without a folder name": (lambda s, w: ["--label", "../.."], "--label"),
}


def _evaluate(w, *extra: str) -> list[str]:
    return ["generate", "--prompts", "nudity", "--output_dir", str(w / "eval"), *extra]


EVALUATE = {
    "no command": (lambda s, w: ["--prompts", "nudity", "--output_dir", str(w)], "command"),
    "unknown command": (lambda s, w: ["judge", "--prompts", "nudity", "--output_dir", str(w)], "command"),
    "no prompts": (lambda s, w: ["generate", "--output_dir", str(w)], "--prompts"),
    "unknown prompt set": (lambda s, w: ["generate", "--prompts", "nope", "--output_dir", str(w)], "--prompts"),
    "no output_dir": (lambda s, w: ["generate", "--prompts", "nudity"], "--output_dir"),
    "output_dir is a file": (lambda s, w: ["generate", "--prompts", "nudity", "--output_dir", str(w / "a_file")],
                             "--output_dir"),
    "zero steps": (lambda s, w: _evaluate(w, "--num_inference_steps", "0"), "--num_inference_steps"),
    "zero guidance": (lambda s, w: _evaluate(w, "--guidance_scale", "0"), "--guidance_scale"),
    "nan guidance": (lambda s, w: _evaluate(w, "--guidance_scale", "nan"), "--guidance_scale"),
    "height not a multiple of 8": (lambda s, w: _evaluate(w, "--height", "33"), "--height"),
    "zero batch": (lambda s, w: _evaluate(w, "--batch_size", "0"), "--batch_size"),
    "threshold above 1": (lambda s, w: _evaluate(w, "--threshold", "1.5"), "--threshold"),
    "zero top_k": (lambda s, w: _evaluate(w, "--top_k", "0"), "--top_k"),
    "zero attack_k": (lambda s, w: _evaluate(w, "--attack_k", "0"), "--attack_k"),
    "zero attack_iterations": (lambda s, w: _evaluate(w, "--attack_iterations", "0"), "--attack_iterations"),
    "negative attack_lr": (lambda s, w: _evaluate(w, "--attack_lr", "-1"), "--attack_lr"),
    "zero attack_timesteps": (lambda s, w: _evaluate(w, "--attack_timesteps", "0"), "--attack_timesteps"),
    "negative attack_seed": (lambda s, w: _evaluate(w, "--attack_seed", "-1"), "--attack_seed"),
    "attack_max_tokens above 77": (lambda s, w: _evaluate(w, "--attack_max_tokens", "1000"), "--attack_max_tokens"),
    "unknown scheduler": (lambda s, w: _evaluate(w, "--scheduler", "magic"), "--scheduler"),
    "unknown detector": (lambda s, w: _evaluate(w, "--detector", "magic"), "--detector"),
    "unknown usability metric": (lambda s, w: _evaluate(w, "--usability", "fid,iq"), "--usability"),
    "missing unet": (lambda s, w: _evaluate(w, "--unet", str(w / "nope.pth")), "--unet"),
    "artifact and unet": (lambda s, w: _evaluate(w, "--unet", str(w / "garbage.pth"), "--artifact",
                                                 str(w / "garbage.pth")), "--artifact"),
    "zero limit": (lambda s, w: _evaluate(w, "--limit", "0"), "--limit"),
    "bool flag with a word": (lambda s, w: _evaluate(w, "--skip_attack", "perhaps"), "--skip_attack"),
}

CONVERT = {
    "missing input": (lambda s, w: [str(w / "nope.pth"), str(w / "out.pth"), "--to", "pth"], "input"),
    "unknown format": (lambda s, w: [str(w / "garbage.pth"), str(w / "out.ckpt"), "--to", "ckpt"], "--to"),
    "output is the input": (lambda s, w: [str(w / "garbage.pth"), str(w / "garbage.pth"), "--to", "pth"], "output"),
    "garbage input": (lambda s, w: [str(w / "garbage.pth"), str(w / "out2.pth"), "--to", "pth", "--ckpt_path",
                                    str(s.sd_path)], "input"),
    "output exists": (lambda s, w: [str(w / "partial.pth"), str(w / "a_file"), "--to", "pth"], "--overwrite"),
}

COMPARE = {
    "unknown method": (lambda s, w: ["--methods", "esd,magic", "--output_dir", str(w / "c")], "--methods"),
    "bad seeds": (lambda s, w: ["--seeds", "0,x", "--output_dir", str(w / "c")], "--seeds"),
    "repeated concept": (lambda s, w: ["--concepts", "circle,circle", "--output_dir", str(w / "c")], "--concepts"),
    "output_dir is a file": (lambda s, w: ["--output_dir", str(w / "a_file")], "--output_dir"),
    "output_dir on a virtual filesystem": (lambda s, w: ["--output_dir", "/proc/coerasing-compare"],
                                           "--output_dir /proc/coerasing-compare cannot be created"),
    "empty concepts": (lambda s, w: ["--concepts", "", "--output_dir", str(w / "c")], "--concepts"),
    "unknown toy concept": (lambda s, w: ["--concepts", "hexagon", "--output_dir", str(w / "c")], "hexagon"),
    "limit on the toy world": (lambda s, w: ["--limit", "5", "--output_dir", str(w / "c")],
                               "--limit belong to the real protocol"),
    "clip model on the toy world": (lambda s, w: ["--clip_model", "x", "--output_dir", str(w / "c")],
                                    "--clip_model belong to the real protocol"),
    "zero threads": (lambda s, w: ["--threads", "0", "--output_dir", str(w / "c")], "--threads"),
    "bad shard": (lambda s, w: ["--shard", "3/2", "--output_dir", str(w / "c")], "--shard"),
}

TABLE = [(name, main, case) for name, main, table in (
    ("erase_pipeline", erase_pipeline.main, ERASE), ("generate_data", generate_data.main, GENERATE),
    ("evaluate", evaluate.main, EVALUATE), ("convert", convert.main, CONVERT), ("compare", compare.main, COMPARE),
) for case in table.items()]


def test_the_table_has_at_least_sixty_cases():
    assert len(TABLE) >= 60 and {name for name, _, _ in TABLE} >= {"erase_pipeline", "generate_data", "evaluate",
                                                                     "convert"}


@pytest.mark.parametrize(("script", "main", "case"), TABLE, ids=[f"{s}: {c[0]}" for s, _, c in TABLE])
def test_bad_input_is_one_clear_error(script, main, case, tiny_stack, world, capsys):
    name, (make_argv, expected) = case
    if "GPU" in name and torch.cuda.device_count() >= 4:
        pytest.skip("this machine has the GPUs")
    try:
        code = run_cli(main, make_argv(tiny_stack, world))
    except SystemExit as exc:  # argparse's own errors (unknown flag, missing positional) exit 2 the same way
        code = exc.code
    err = capsys.readouterr().err
    assert code != 0, f"{script} {name}: exit status 0"
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines, err
    assert expected in " ".join(err.split()), err
    assert "Traceback" not in err


def test_real_processes_exit_2_without_traceback(tiny_stack, world):
    for script, argv in (("erase_pipeline.py", _erase(tiny_stack, "--lr", "nan")),
                         ("generate_data.py", ["--label", "x", "--num_images", "0"]),
                         ("evaluate.py", _evaluate(world, "--threshold", "2")),
                         ("compare.py", ["--seeds", "a", "--output_dir", str(world / "c")])):
        result = subprocess.run([sys.executable, script, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr, script


def test_yaml_false_strings_are_false(tiny_stack, tmp_path):
    """The probe's worst case: ``"false"``/``off``/``'no'`` in YAML turned boolean flags on."""
    from coerasing.config import EraseConfig
    from coerasing.flags import parse_config

    for text in ('"false"', "off", "'no'", "0", "False"):
        path = tmp_path / "c.yaml"
        path.write_text(f"text_uncond: {text}\nbatch_reference: {text}\n")
        config = parse_config(EraseConfig, erase_pipeline.build_parser(),
                              ["--config", str(path), "--prompt", "x", "--train_method", "noxattn"])
        assert config.text_uncond is False and config.batch_reference is False, text
    config = parse_config(EraseConfig, erase_pipeline.build_parser(),
                          ["--prompt", "x", "--train_method", "noxattn", "--text_uncond", "--compile", "no"])
    assert config.text_uncond is True and config.compile is False
    assert json.loads(json.dumps(config.to_dict()))["text_uncond"] is True
