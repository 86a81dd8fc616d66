"""GIE (docs/baselines.md §GIE): processors, gating, batch layout, attack path, artifact and adapter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from coerasing.errors import CoErasingError
from coerasing.methods import apply_artifact, get_method, read_artifact
from coerasing.methods.gie import (
    ADAPTER_FILE,
    CFG,
    CROSS_EXTEND,
    CROSS_INJECT,
    SELF_COPY,
    GIEAdapter,
    GIEAttnProcessor,
    GIEConfig,
    GIEController,
    GIEMethod,
    GIERuntime,
    encode_target,
    fit_adapter,
    toy_training_prompts,
    train_gie_adapter,
    window_active,
    write_gie_artifact,
)
from coerasing.testing import SD14_SCHEDULER_CONFIG

SIZE = 64
PROMPTS = ["a photo of a cat", "a red house by the sea"]
SEEDS = [3, 11]


@pytest.fixture(scope="module")
def pipe(tiny_stack):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_stack.sd_path), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny stack is fastest on one thread, and one thread does not oversubscribe a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def gie(pipe, **settings) -> Iterator[GIERuntime]:
    runtime = GIERuntime(pipe, GIEConfig(**{"target": "nudity", "w": -2.0, **settings}))
    try:
        yield runtime
    finally:
        runtime.close()


def plain_images(pipe, guidance: float, steps: int, prompts=PROMPTS, seeds=SEEDS, **inputs) -> np.ndarray:
    inputs = inputs or {"prompt": list(prompts)}
    return pipe(**inputs, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images


def pairs(runtime: GIERuntime, guidance: float, steps: int, **inputs) -> tuple[np.ndarray, np.ndarray]:
    inputs = inputs or {"prompts": PROMPTS}
    return runtime.render_pairs(SEEDS, guidance, SIZE, SIZE, steps, output_type="np", **inputs)


# ----------------------------------------------------------------------------------------------
# Settings and gating


def test_config_needs_a_target_and_checks_its_ranges():
    with pytest.raises(CoErasingError, match="--target is required"):
        GIEConfig().validate()
    with pytest.raises(CoErasingError, match="--cross_fraction"):
        GIEConfig(target="nudity", cross_fraction=1.5).validate()
    with pytest.raises(CoErasingError, match="--adapter_grid"):
        GIEConfig(target="nudity", adapter_grid="-1,x").validate()
    config = GIEConfig(target="nudity", w=-1.5, adapter_grid="-3,-0.5,-1").validate()
    assert config.w_grid() == [-0.5, -1.0, -3.0]
    assert GIEConfig.from_settings({**config.settings(), "unknown": 1}) == config


def _official_calls(fraction: float, steps: int, plus_one: bool, calls: int) -> set[int]:
    return set(range(min(int(fraction * (steps + int(plus_one))), calls)))


@pytest.mark.parametrize("scheduler_class", [PNDMScheduler, DDIMScheduler])
def test_timestep_gating_matches_official_call_counting_within_one_step(scheduler_class):
    scheduler = scheduler_class.from_config(SD14_SCHEDULER_CONFIG)
    scheduler.set_timesteps(40)
    timesteps = [float(t) for t in scheduler.timesteps]
    ours_cross = {i for i, t in enumerate(timesteps) if window_active(t, 0.8, 1000)}
    ours_self = {i for i, t in enumerate(timesteps) if window_active(t, 0.4, 1000)}
    official_cross = _official_calls(0.8, 40, True, len(timesteps))
    official_self = _official_calls(0.4, 40, False, len(timesteps))
    if scheduler_class is PNDMScheduler:  # 41 UNet calls: one extra step at each cutoff (t = 201 and 601)
        assert len(timesteps) == 41
        assert ours_cross - official_cross == {32} and timesteps[32] == 201
        assert ours_self - official_self == {16} and timesteps[16] == 601
        assert official_cross <= ours_cross and official_self <= ours_self
    else:
        assert ours_cross == official_cross and ours_self == official_self
    assert window_active(0.0, 1.0, 1000) and not window_active(999.0, 0.0, 1000)


# ----------------------------------------------------------------------------------------------
# The processor on one attention layer


def _reference_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], heads, -1).permute(0, 2, 1, 3)


def _merge(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    return attn.to_out[0](x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))


def _controller(target_count: int = 2, width: int = 6) -> GIEController:
    torch.manual_seed(1)
    return GIEController(torch.randn(1, 77, width), target_count, 0.8, 0.4, 256, 1000)


def test_cross_attention_injection_edits_only_branch_two_cond_rows():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    hidden, context = torch.randn(4, 5, 8), torch.randn(4, 77, 6)
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, hidden, context)
    controller = _controller()
    processor = GIEAttnProcessor(controller, "layer")
    weights = torch.tensor([[-1.5, 0.5]])
    with torch.no_grad(), controller.session(CFG, 1, weights):
        controller.trace = []
        controller.timestep = 900.0  # inside the window: t > 200
        injected = processor(attn, hidden, context)
        controller.timestep = 100.0  # after it: own softmax over 77 + m tokens
        extended = processor(attn, hidden, context)
    assert [(e.kind, e.rows) for e in controller.trace] == [(CROSS_INJECT, (3,)), (CROSS_EXTEND, (3,))]
    # rows 0, 1 (uncond) and 2 (branch 1) are diffusers' default attention
    torch.testing.assert_close(injected[:3], plain[:3], atol=1e-6, rtol=0)
    torch.testing.assert_close(extended[:3], plain[:3], atol=1e-6, rtol=0)
    with torch.no_grad():
        scale = 4**-0.5
        q = _reference_heads(attn.to_q(hidden), 2)
        k, v = _reference_heads(attn.to_k(context), 2), _reference_heads(attn.to_v(context), 2)
        kt = _reference_heads(attn.to_k(controller.target_states), 2)
        vt = _reference_heads(attn.to_v(controller.target_states[:, 1:3]), 2)
        a1 = torch.softmax(torch.einsum("hqd,hkd->hqk", q[2], k[2]) * scale, -1)
        m_star = torch.softmax(torch.einsum("hqd,hkd->hqk", q[3], kt[0]) * scale, -1)[..., 1:3]
        a2 = torch.cat([a1, weights[0] * m_star], dim=-1)  # [A1 over P, w * M* over T], no renormalisation
        expected = _merge(attn, (a2 @ torch.cat([v[3], vt[0]], dim=1))[None])
        extended_expected = AttnProcessor2_0()(
            attn, hidden[3:], torch.cat([context[3:], controller.target_states[:, 1:3]], dim=1))
    torch.testing.assert_close(injected[3:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(extended[3:], extended_expected, atol=1e-5, rtol=1e-5)


def test_self_attention_copy_uses_branch_one_probabilities_with_own_values():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    hidden = torch.randn(4, 9, 8)
    with torch.no_grad():
        plain = AttnProcessor2_0()(attn, hidden)
    controller = _controller()
    controller.self_max_query = 9
    processor = GIEAttnProcessor(controller, "layer")
    with torch.no_grad(), controller.session(CFG, 1, torch.zeros(1, 2)):
        controller.timestep = 900.0
        copied = processor(attn, hidden)
        controller.self_max_query = 8  # maps over the limit stay plain
        untouched = processor(attn, hidden)
        controller.self_max_query, controller.timestep = 9, 500.0  # after the 40 % window
        late = processor(attn, hidden)
        q, k, v = (_reference_heads(f(hidden), 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        a1 = torch.softmax(torch.einsum("hqd,hkd->hqk", q[2], k[2]) * 4**-0.5, -1)
        expected = _merge(attn, (a1 @ v[3])[None])
    torch.testing.assert_close(copied[:3], plain[:3], atol=1e-6, rtol=0)
    torch.testing.assert_close(copied[3:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(untouched, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(late, plain, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Through the pipeline


def test_edits_off_and_no_target_tokens_give_the_plain_pipeline(pipe):
    with gie(pipe, cross_fraction=0.0, self_fraction=0.0) as runtime:
        runtime.controller.target_count = 0  # nothing appended: every processor path is plain attention
        runtime.controller.trace = []
        first, second = pairs(runtime, 3.0, 4)
        assert runtime.controller.trace == []
    plain = plain_images(pipe, 3.0, 4)
    np.testing.assert_allclose(first, plain, atol=1e-5)
    np.testing.assert_allclose(second, plain, atol=1e-5)


def test_injection_off_is_plain_attention_over_prompt_and_target_states(pipe):
    """GIE's "w = 1 and injection off equals the plain pipeline" check: on P's states plus T's token states."""
    with gie(pipe, w=1.0, cross_fraction=0.0, self_fraction=0.0) as runtime:
        _, second = pairs(runtime, 1.0, 4)
        target, m = runtime.controller.target_states, runtime.target_count
    states = pipe.encode_prompt(PROMPTS, pipe.device, 1, False)[0]
    appended = torch.cat([states, target[:, 1 : 1 + m].expand(len(PROMPTS), -1, -1)], dim=1)
    plain = plain_images(pipe, 1.0, 4, prompt_embeds=appended)
    np.testing.assert_allclose(second, plain, atol=1e-5)
    assert np.abs(second - plain_images(pipe, 1.0, 4)).max() > 1e-3  # the target tokens do act


def test_zero_weight_with_all_edits_on_reproduces_branch_one(pipe):
    with gie(pipe, w=0.0, cross_fraction=1.0, self_fraction=1.0, self_max_query=10**6) as runtime:
        runtime.controller.trace = []
        first, second = pairs(runtime, 3.0, 4)
        kinds = {e.kind for e in runtime.controller.trace}
    assert kinds == {CROSS_INJECT, SELF_COPY}
    np.testing.assert_allclose(second, first, atol=1e-5)
    np.testing.assert_allclose(first, plain_images(pipe, 3.0, 4), atol=1e-5)


def test_edits_happen_only_on_cond_branch_two_rows_at_the_stated_timesteps(pipe):
    steps = 10
    with gie(pipe, cross_fraction=0.5, self_fraction=0.3, self_max_query=16) as runtime:
        runtime.controller.trace = trace = []
        runtime.render(SEEDS, 3.0, SIZE, SIZE, steps, prompts=PROMPTS)
        cross_layers = runtime.cross_layers
    scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    assert {e.rows for e in trace} == {(5, 7)}  # batch [u1, u1', u2, u2', c1, c1', c2, c2']: cond branch 2
    for call, t in enumerate(timesteps):
        events = [e for e in trace if e.call == call]
        assert all(e.timestep == t for e in events)
        cross = [e.kind for e in events if e.kind != SELF_COPY]
        assert cross == [CROSS_INJECT if t > 500 else CROSS_EXTEND] * cross_layers
        copies = [e for e in events if e.kind == SELF_COPY]
        assert all(e.query_len <= 16 for e in copies)
        assert len(copies) == (sum(1 for n in pipe.unet.attn_processors if "attn1" in n and "down_blocks.0" not in n
                                   and "up_blocks.3" not in n) if t > 700 else 0)
    assert {e.call for e in trace if e.kind == SELF_COPY} == {i for i, t in enumerate(timesteps) if t > 700}


def test_cfg_batch_keeps_branch_one_and_the_uncond_half_plain(pipe):
    """Through ``pipe(...)`` with diffusers' CFG order: the same UNet rows as a plain run on duplicated prompts."""
    outputs: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_hook(
        lambda module, args, out: outputs.append((out[0] if isinstance(out, tuple) else out.sample).clone()))
    try:
        with gie(pipe, w=-3.0) as runtime:
            first, second = pairs(runtime, 3.0, 3)
        gie_calls = outputs[:]
        outputs.clear()
        duplicated = [p for p in PROMPTS for _ in range(2)]
        plain = plain_images(pipe, 3.0, 3, prompts=duplicated, seeds=[s for s in SEEDS for _ in range(2)])
    finally:
        hook.remove()
    assert len(gie_calls) == len(outputs) == 4 and gie_calls[0].shape[0] == 8
    branch1, uncond2, cond2 = [0, 2, 4, 6], [1, 3], [5, 7]
    for ours, theirs in zip(gie_calls, outputs, strict=True):
        torch.testing.assert_close(ours[branch1], theirs[branch1], atol=1e-6, rtol=0)
    torch.testing.assert_close(gie_calls[0][uncond2], outputs[0][uncond2], atol=1e-6, rtol=0)
    assert (gie_calls[0][cond2] - outputs[0][cond2]).abs().max() > 1e-4
    np.testing.assert_allclose(first, plain[0::2], atol=1e-6)
    assert np.abs(second - plain[1::2]).max() > 1e-3


def test_noise_pred_runs_through_gie_with_gradients_to_the_text_states(pipe):
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    states = pipe.encode_prompt(PROMPTS, pipe.device, 1, False)[0].detach()
    t = torch.tensor([900])
    with torch.no_grad():
        base = pipe.unet(latents, t, encoder_hidden_states=states).sample
    with gie(pipe, w=-2.0) as runtime:
        leaf = states.clone().requires_grad_(True)
        eps = runtime.noise_pred(latents, t, leaf)
        eps.square().mean().backward()
    assert eps.shape == base.shape
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    assert (eps.detach() - base).abs().max() > 1e-4
    with gie(pipe, w=0.0, cross_fraction=1.0, self_fraction=1.0) as runtime, torch.no_grad():
        torch.testing.assert_close(runtime.noise_pred(latents, t, states), base, atol=1e-5, rtol=1e-4)


def test_close_restores_processors_and_removes_the_hook(pipe):
    unet = pipe.unet
    before = dict(unet.attn_processors)
    hooks = (len(unet._forward_pre_hooks), len(unet._forward_hooks))
    runtime = GIERuntime(pipe, GIEConfig(target="nudity", w=-1.0))
    assert all(isinstance(p, GIEAttnProcessor) for p in unet.attn_processors.values())
    with pytest.raises(CoErasingError, match="already applied"):
        GIERuntime(pipe, GIEConfig(target="nudity", w=-1.0))
    assert len(unet._forward_pre_hooks) == hooks[0] + 1
    with pytest.raises(CoErasingError, match="GIERuntime.render"):
        pipe("a cat", num_inference_steps=1, height=SIZE, width=SIZE)
    runtime.close()
    runtime.close()  # idempotent
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert (len(unet._forward_pre_hooks), len(unet._forward_hooks)) == hooks
    pipe("a cat", num_inference_steps=1, height=SIZE, width=SIZE)  # the plain pipeline again


def test_prompt_embeds_and_prompts_render_the_same(pipe):
    with gie(pipe) as runtime:
        by_prompt = pairs(runtime, 3.0, 2)[1]
        states = pipe.encode_prompt(PROMPTS, pipe.device, 1, False)[0]
        by_states = pairs(runtime, 3.0, 2, prompt_embeds=states)[1]
        images = runtime.render(SEEDS, 3.0, SIZE, SIZE, 2, prompts=PROMPTS)
        array = runtime.render(SEEDS, 3.0, SIZE, SIZE, 2, prompts=PROMPTS, output_type="np")
    np.testing.assert_allclose(by_prompt, by_states, atol=1e-6)
    assert len(images) == 2 and images[0].size == (SIZE, SIZE)
    assert array.dtype == np.uint8 and array.shape == (2, SIZE, SIZE, 3)
    for image, row in zip(images, array, strict=True):
        np.testing.assert_array_equal(np.asarray(image), row)


# ----------------------------------------------------------------------------------------------
# Artifact and adapter


def test_fixed_w_artifact_round_trip(pipe, tmp_path):
    config = GIEConfig(target="nudity", w=-1.5, output_dir=str(tmp_path / "gie"))
    folder = get_method("gie").train(config)
    artifact = read_artifact(folder)
    assert artifact.method == "gie" and artifact.settings["target"] == "nudity" and artifact.settings["w"] == -1.5
    assert isinstance(get_method("gie"), GIEMethod) and GIEMethod.artifact_kind == "addon"
    runtime = apply_artifact(pipe, folder)
    try:
        assert isinstance(runtime, GIERuntime) and runtime.fixed_w == -1.5
    finally:
        runtime.close()
    with pytest.raises(CoErasingError, match="already holds a GIE artifact"):
        get_method("gie").train(replace(config, w=-4.0))  # never silently replaced
    assert read_artifact(folder).settings["w"] == -1.5
    get_method("gie").train(replace(config, w=-4.0, overwrite=True))
    assert read_artifact(folder).settings["w"] == -4.0 and "overwrite" not in read_artifact(folder).settings
    write_gie_artifact(tmp_path / "no_w", GIEConfig(target="nudity"))
    with pytest.raises(CoErasingError, match="no fixed w"):
        apply_artifact(pipe, tmp_path / "no_w")


def test_adapter_shape_fit_and_save(tmp_path):
    adapter = GIEAdapter()
    assert [p.shape for p in adapter.net.parameters()][::2] == [(64, 16), (32, 64), (1, 32)]
    assert adapter(torch.rand(5, 3, 16)).shape == (5, 3)
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(300, 16, generator=generator) * 0.05  # attention-probability-sized inputs
    direction = torch.randn(16, generator=generator)
    labels = features @ direction * 20 - 2.0
    fitted, losses = fit_adapter(features[:240], labels[:240], epochs=600, lr=3e-3)
    assert losses[-1] < 0.05 * losses[0]
    with torch.no_grad():
        predicted = fitted(features[240:])
    residual = ((predicted - labels[240:]) ** 2).mean() / labels[240:].var()
    assert residual < 0.1  # the planted linear relation, on held-out points
    path = fitted.save(tmp_path / ADAPTER_FILE)
    loaded = GIEAdapter.load(path)
    torch.testing.assert_close(loaded(features), fitted(features).detach())


class ScriptedDetector:
    """Positive for the images listed per call (call 0: the first image only; later calls: all)."""

    def __init__(self) -> None:
        self.calls = 0

    def detect(self, images):
        positives = [i == 0 for i in range(len(images))] if self.calls == 0 else [True] * len(images)
        self.calls += 1
        return [SimpleNamespace(positive=p) for p in positives]


def test_adapter_training_labels_by_the_sweep_and_the_artifact_runs(pipe, tmp_path):
    config = GIEConfig(target="nudity", adapter_grid="-3,-1", adapter_prompts=3, adapter_steps=2,
                       adapter_epochs=30, adapter_guidance=3.0, output_dir=str(tmp_path / "gie"))
    prompts = ["a nude person", "a naked man", "a photo of nudity", "never used"]
    folder = train_gie_adapter(config, ScriptedDetector(), prompts, pipe=pipe)
    record = json.loads((folder / "artifact.json").read_text())
    training = record["adapter_training"]
    assert training["prompts"] == prompts[:3]
    assert training["labels"] == [-3.0, -1.0, -1.0]  # still positive at -1 and -3 → the strongest
    assert training["final_loss"] < training["first_loss"] and (folder / ADAPTER_FILE).is_file()
    run = json.loads((folder / "run.json").read_text())
    assert run["config"]["target"] == "nudity" and run["config"]["w"] is None and run["adapter"] is True
    assert "torch" in run["versions"]
    assert pipe.unet.attn_processors and not any(isinstance(p, GIEAttnProcessor)
                                                 for p in pipe.unet.attn_processors.values())
    runtime = apply_artifact(pipe, folder)
    try:
        assert runtime.fixed_w is None and runtime.adapter is not None
        weights = runtime.token_weights(SEEDS, SIZE, SIZE, 2, prompts=PROMPTS)
        assert weights.shape == (2, runtime.target_count) and torch.isfinite(weights).all()
        assert len(runtime.render(SEEDS[:1], 3.0, SIZE, SIZE, 2, prompts=PROMPTS[:1])) == 1
        states = pipe.encode_prompt(PROMPTS[:1], pipe.device, 1, False)[0].detach().requires_grad_(True)
        runtime.noise_pred(torch.randn(1, 4, 8, 8), torch.tensor([500]), states).sum().backward()
        assert states.grad is not None and states.grad.abs().sum() > 0
    finally:
        runtime.close()


def test_feature_pass_gives_one_probability_per_token_and_cross_layer(pipe):
    with gie(pipe) as runtime:
        features = runtime.prompt_features(SEEDS, SIZE, SIZE, 5, prompts=PROMPTS)
        _, m = encode_target(pipe, "nudity")
    assert features.shape == (2, m, 16)
    assert (features > 0).all() and (features < 1).all()


def test_toy_training_prompts_are_training_captions_of_the_concept():
    from coerasing.toy.world import caption_labels, explicit_prompts, implicit_prompts

    prompts = toy_training_prompts("circle", 20, seed=0)
    labels = caption_labels("train")
    assert len(prompts) == 20 and all(labels[p][0] == "circle" for p in prompts)
    evaluation = {p.prompt for p in explicit_prompts() + implicit_prompts()}
    assert not evaluation & set(toy_training_prompts("circle"))
    assert toy_training_prompts("circle", 20, seed=0) == prompts


def test_the_adapter_of_a_toy_shape_is_trained_with_what_the_toy_world_lends(tmp_path):
    """``erase_pipeline.py --method gie --target circle`` without ``--w``: the toy world lends its model and
    its classifier as the detector; the prompts are the shape's training captions."""
    from coerasing.toy.training_world import ToyTrainingWorld

    config = GIEConfig(target="circle", adapter_prompts=2, adapter_steps=2, adapter_grid="-1,-4", adapter_epochs=3,
                       adapter_batch_size=2, output_dir=str(tmp_path / "gie"))
    with pytest.raises(CoErasingError, match="needs an adapter"):  # no world: no detector to label with
        get_method("gie").train(config)
    folder = get_method("gie").train(config, ToyTrainingWorld())
    training = json.loads((folder / "artifact.json").read_text())["adapter_training"]
    assert training["detector"]["detector"] == "toy" and training["detector"]["targets"] == ["circle"]
    assert training["prompts"] == toy_training_prompts("circle", 2, seed=0) and len(training["labels"]) == 2
    assert (folder / ADAPTER_FILE).is_file() and read_artifact(folder).settings["model"].endswith("toy_world")


def test_noise_pred_takes_a_batch_of_several_timesteps_row_by_row_in_order(pipe):
    """A fine-tuning batch (the relearning probe) draws t per image; GIE gates one timestep per UNet call, so
    noise_pred splits the batch by timestep and returns each row's ε where a call of that row alone puts it."""
    torch.manual_seed(1)
    latents = torch.randn(3, 4, 8, 8)
    states = pipe.encode_prompt([*PROMPTS, PROMPTS[0]][:3], pipe.device, 1, False)[0].detach()
    t = torch.tensor([700, 100, 700])
    with gie(pipe, w=-2.0) as runtime, torch.no_grad():
        mixed = runtime.noise_pred(latents, t, states)
        alone = torch.cat([runtime.noise_pred(latents[i : i + 1], t[i : i + 1], states[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-4)
