"""The comparison's fast sampler gives the 25-step protocol's classifier outcome on the toy world."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import yaml

from coerasing.generation import load_generation_pipeline
from coerasing.methods import Runtime
from coerasing.toy import TOY_MODEL_DIR
from coerasing.toy import protocol as B
from coerasing.toy.classifier import ToyClassifier

from ..conftest import REPO_ROOT


@pytest.mark.slow  # about 15 s on one core: 32 images at 25 PNDM steps and at the fast sampler
def test_fast_sampler_labels_match_the_25_step_protocol_on_32_base_images():
    """≥ 90 % of per-image classifier labels agree (32 validation images of circle, base model)."""
    evaluation = yaml.safe_load((REPO_ROOT / "configs" / "compare" / "toy.yaml").read_text())["evaluation"]
    fast = B.ToyEvalSettings(explicit_images=8, implicit_images=8, unrelated_images=16,
                             scheduler=evaluation["scheduler"], num_inference_steps=evaluation["num_inference_steps"],
                             first_timestep=evaluation.get("first_timestep"))
    old = replace(fast, scheduler="default", num_inference_steps=25, first_timestep=None)
    assert fast.num_inference_steps < old.num_inference_steps  # the point of it: fewer UNet calls
    pipe = load_generation_pipeline(str(TOY_MODEL_DIR), torch.device("cpu"), torch.float32)
    own = pipe.scheduler
    runtime = Runtime(pipe)
    rows = B.evaluation_rows("circle", "validation", old)
    assert len(rows) == 32
    torch.set_num_threads(1)
    reference = B.generate(runtime, rows, old)
    images = B.generate(runtime, rows, fast)
    assert pipe.scheduler is own  # the pipeline's own sampler is back after generating
    classifier = ToyClassifier.from_pretrained(TOY_MODEL_DIR / "classifier", "cpu")
    before = [p["shape"] for p in classifier.predict(reference)]
    after = [p["shape"] for p in classifier.predict(images)]
    agree = sum(a == b for a, b in zip(before, after, strict=True)) / len(rows)
    assert agree >= 0.9, (agree, before, after)
    assert (images != reference).any()  # a different sampler really ran


def test_samplers_swap_for_a_block_and_a_bad_name_is_a_user_error():
    from coerasing.compare.protocols import ToyProtocol
    from coerasing.errors import CoErasingError
    from coerasing.generation import scheduler_swapped

    pipe = load_generation_pipeline(str(TOY_MODEL_DIR), torch.device("cpu"), torch.float32)
    own = pipe.scheduler
    for name, cls in (("unipc", "UniPCMultistepScheduler"), ("dpm", "DPMSolverMultistepScheduler")):
        with scheduler_swapped(pipe, name):
            assert type(pipe.scheduler).__name__ == cls
            assert pipe.scheduler.config.beta_schedule == own.config.beta_schedule  # the model's noise schedule
        assert pipe.scheduler is own
    with pytest.raises(CoErasingError, match="scheduler"):
        ToyProtocol({"evaluation": {"scheduler": "magic"}})


def test_a_sampler_started_at_the_protocols_first_timestep_spans_it_evenly_and_leaves_the_pipeline_alone():
    from coerasing.generation import scheduler_swapped, spanned_timesteps

    assert spanned_timesteps(961, 1, 7) == [961, 801, 641, 481, 321, 161, 1]
    pipe = load_generation_pipeline(str(TOY_MODEL_DIR), torch.device("cpu"), torch.float32)
    own = pipe.scheduler
    own.set_timesteps(25)
    assert int(own.timesteps[0]) == 961  # 25-step PNDM ("leading", offset 1) starts here
    for name in ("dpm", "euler"):
        with scheduler_swapped(pipe, name, 961):
            pipe.scheduler.set_timesteps(7)
            assert [int(t) for t in pipe.scheduler.timesteps] == spanned_timesteps(961, 1, 7)
        with scheduler_swapped(pipe, name):  # without it: the sampler's own spacing, which starts lower
            pipe.scheduler.set_timesteps(7)
            assert int(pipe.scheduler.timesteps[0]) < 961
        assert pipe.scheduler is own
    own.set_timesteps(25)
    assert len(own.timesteps) > 7  # the pipeline's own sampler was never rewired


@pytest.mark.parametrize(("evaluation", "needle"), [
    ({"scheduler": "default", "first_timestep": 961}, "cannot start at a chosen timestep"),
    ({"scheduler": "pndm", "first_timestep": 961}, "cannot start at a chosen timestep"),
    ({"scheduler": "dpm", "first_timestep": 5, "num_inference_steps": 10}, "at most one step per timestep"),
])
def test_a_first_timestep_the_sampler_cannot_use_is_a_presets_error_before_any_work(evaluation, needle):
    from coerasing.compare.protocols import ToyProtocol
    from coerasing.errors import CoErasingError

    with pytest.raises(CoErasingError, match=needle):
        ToyProtocol({"evaluation": evaluation})


def test_caches_made_before_first_timestep_existed_keep_their_keys():
    """An unset first_timestep is not part of the protocol's identity (every cache key holds it)."""
    from dataclasses import asdict

    from coerasing.compare.protocols import ToyProtocol

    plain = ToyProtocol({"evaluation": {"scheduler": "dpm", "num_inference_steps": 20}})
    before = {k: v for k, v in asdict(plain.settings).items() if k != "first_timestep"}
    assert plain.identity()["evaluation"] == before
    started = ToyProtocol({"evaluation": {"scheduler": "dpm", "num_inference_steps": 7, "first_timestep": 961}})
    assert started.identity()["evaluation"]["first_timestep"] == 961
