"""docs/architecture.md, "Adding a method": a method defined outside the package, named in
``COERASING_METHODS``, is trained by ``erase_pipeline.py`` and compared by ``compare.py``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coerasing.errors import CoErasingError
from coerasing.methods import METHODS_ENV, get_method, method_names, read_artifact, trainable_names

from ..conftest import REPO_ROOT

#: A whole method in one module: a config whose fields are its flags, ``train``, ``trace`` and (inherited
#: from Runtime) an ``apply`` that leaves the base model as it is.
DUMMY_MODULE = textwrap.dedent('''
    """A method that erases nothing: it only writes its artifact."""

    from dataclasses import dataclass
    from pathlib import Path

    from coerasing.flags import check_fields, flag
    from coerasing.methods.base import CurvePoint, Method, Runtime, write_artifact


    @dataclass
    class DummyConfig:
        prompt: str = flag("circle", help="the concept")
        strength: float = flag(1.0, help="how hard it does nothing", min=0)
        output_dir: str = flag("checkpoints/dummy", help="the artifact folder", output=True)

        def validate(self):
            check_fields(self)
            return self


    class DummyMethod(Method):
        name = "dummy"
        summary = "Erases nothing (a test of adding a method)."
        artifact_kind = "addon"
        config_class = DummyConfig
        trainable = True

        def train(self, config, world=None):
            model = world.default_model(config.prompt) if world is not None else None
            settings = {"prompt": config.prompt, "strength": config.strength, "lent_model": model}
            write_artifact(config.output_dir, self.name, settings)
            return Path(config.output_dir)

        def trace(self, context):
            settings = {"prompt": context.concept, "strength": 1.0, "lent_model": context.world()["ckpt_path"]}
            folder = context.run_folder(self.name, settings)
            context.once(folder, settings, lambda: write_artifact(folder, self.name, settings))
            return [CurvePoint("s1", 1.0, folder)]

        def apply(self, artifact, pipe):
            return Runtime(pipe, artifact)
''')


def _write_dummy(folder: Path) -> str:
    (folder / "dummy_eraser.py").write_text(DUMMY_MODULE, encoding="utf-8")
    return "dummy=dummy_eraser:DummyMethod"


def test_a_method_named_in_the_environment_is_found_and_trained(tmp_path, monkeypatch):
    import erase_pipeline

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(METHODS_ENV, _write_dummy(tmp_path))
    assert "dummy" in method_names() and "dummy" in trainable_names()
    assert "esd" not in trainable_names() and {"coerasing", "cpe", "stereo", "gie"} <= set(trainable_names())
    assert type(get_method("dummy")).__name__ == "DummyMethod"
    erase_pipeline.main(["--method", "dummy", "--strength", "2.5", "--output_dir", str(tmp_path / "art")])
    artifact = read_artifact(tmp_path / "art")
    assert artifact.method == "dummy" and artifact.settings["strength"] == 2.5
    assert artifact.settings["lent_model"].endswith("toy_world")  # erase_pipeline.py lends the toy world
    with pytest.raises(CoErasingError, match="--method 'esd' is not trained by this command"):
        erase_pipeline.build_parser("esd")


def test_a_bad_registry_entry_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_dummy(tmp_path)
    monkeypatch.setenv(METHODS_ENV, "dummy")
    with pytest.raises(CoErasingError, match="name=package.module:Class"):
        method_names()
    monkeypatch.setenv(METHODS_ENV, "dummy=dummy_eraser:Nope")
    with pytest.raises(CoErasingError, match="could not import 'Nope'"):
        get_method("dummy")
    monkeypatch.setenv(METHODS_ENV, "other=dummy_eraser:DummyMethod")
    with pytest.raises(CoErasingError, match="whose name is 'other'"):
        get_method("other")


def _run(script: str, *args: str, env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_the_scripts_train_and_compare_a_method_added_from_outside(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", METHODS_ENV: _write_dummy(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(tmp_path)])}
    _run("erase_pipeline.py", "--method", "dummy", "--output_dir", str(tmp_path / "art"), env=env)
    assert read_artifact(tmp_path / "art").method == "dummy"

    out = tmp_path / "compare"
    _run("compare.py", "--quick", "--methods", "dummy", "--skip_attack", "--workers", "1", "--output_dir", str(out),
         env=env)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == {"base", "dummy"}
    assert [r["chosen"] for r in rows if r["method"] == "dummy"] == ["True"]  # its only point
    runs = list((out / "cache" / "runs" / "dummy").glob("*/artifact.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["method"] == "dummy"
