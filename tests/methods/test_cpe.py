"""CPE (docs/baselines.md §CPE): the ResAG equations, the largest-gate merge, the objective, attaching to a
pipeline, training, determinism and resume, on the tiny offline stack."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from coerasing.errors import CoErasingError
from coerasing.methods import apply_artifact, cpe, read_artifact
from coerasing.methods.concepts import concept_kind
from coerasing.methods.cpe import prompts as cpe_prompts
from coerasing.methods.cpe import training as cpe_training
from coerasing.models import TextComponents
from coerasing.toy import TOY_MODEL_DIR
from coerasing.toy.training_world import ToyTrainingWorld

TRAINED = dict(stages=2, stage_iterations=10, adversarial_prompts=4, anchors_per_step=8, rank=4, anchor_weight=10.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny stack is fastest on one thread, and one thread does not oversubscribe a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tiny_stack):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_stack.sd_path), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_config(stack, folder, **overrides) -> cpe.CPEConfig:
    settings = dict(prompt="cat", ckpt_path=str(stack.sd_path), device="cpu", save_path=str(folder), stages=2,
                    stage_iterations=5, first_stage_factor=2, adversarial_prompts=3, anchors_per_step=4, lr=3e-3,
                    seed=0)
    settings.update(overrides)
    return cpe.CPEConfig(**settings)


@pytest.fixture(scope="module")
def trained(tiny_stack, tmp_path_factory):
    """A short CPE run erasing "cat" on the tiny stack."""
    return cpe.train_cpe(make_config(tiny_stack, tmp_path_factory.mktemp("cpe") / "cat", **TRAINED))


def random_eraser(text_dim, out_features, gate_dim, rank, seed, separate_key=False, scale=0.5):
    """An eraser with every parameter non-zero (so the gate and the residual both matter)."""
    generator = torch.Generator().manual_seed(seed)
    eraser = cpe.ConceptEraser(text_dim, out_features, gate_dim, rank, separate_key)
    with torch.no_grad():
        for parameter in eraser.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return eraser


def by_hand(eraser, x, layer):
    """(s, ē, residual of ``layer``) for one concept, token by token in float64 Python arithmetic."""
    wq = eraser.gate.to_q.double().tolist()
    wk = eraser.gate.to_k.double().tolist() if eraser.gate.separate_key else wq
    w = eraser.gate.to_gate.double().tolist()
    down, up = eraser.down[layer].double().tolist(), eraser.up[layer].double().tolist()
    rows, length, dim = x.shape
    gate_dim, rank, out = len(wq[0]), len(down[0]), len(up[0])
    gates, pooled, residual = [], [], []
    for b in range(rows):
        xs = x[b].double().tolist()
        q = [[sum(xs[t][i] * wq[i][k] for i in range(dim)) for k in range(gate_dim)] for t in range(length)]
        k_ = [[sum(xs[t][i] * wk[i][k] for i in range(dim)) for k in range(gate_dim)] for t in range(length)]
        g_row, p_row, r_row = [], [], []
        for t in range(length):
            scores = [sum(q[t][k] * k_[j][k] for k in range(gate_dim)) for j in range(length)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            weights = [v / sum(weights) for v in weights]
            e_bar = [sum(weights[j] * xs[j][i] for j in range(length)) for i in range(dim)]
            s = 1 / (1 + math.exp(-sum(e_bar[i] * w[i] for i in range(dim))))
            u = [s * v for v in e_bar]
            h = [sum(u[i] * down[i][k] for i in range(dim)) for k in range(rank)]
            g_row.append(s)
            p_row.append(e_bar)
            r_row.append([sum(h[k] * up[k][o] for k in range(rank)) / rank for o in range(out)])
        gates.append(g_row)
        pooled.append(p_row)
        residual.append(r_row)
    return (torch.tensor(gates, dtype=torch.float64), torch.tensor(pooled, dtype=torch.float64),
            torch.tensor(residual, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Equations


@pytest.mark.parametrize("separate_key", [False, True])
def test_gate_and_residual_match_a_computation_by_hand(separate_key):
    eraser = random_eraser(text_dim=3, out_features=[5, 2], gate_dim=2, rank=2, seed=1, separate_key=separate_key)
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
    base = torch.nn.Linear(3, 5, bias=False)
    adapter = cpe.CPEAdapter([eraser])
    wrapped = cpe.CPELinear(base, adapter, layer=0)
    gates, pooled, residual = by_hand(eraser, x, layer=0)
    with torch.no_grad():
        s, e_bar = eraser.gate(x)
        torch.testing.assert_close(s.double(), gates, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(e_bar.double(), pooled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(eraser.residual(0, eraser.residual_input(x)).double(), residual, rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(wrapped(x).double(), (x @ base.weight.T).double() + residual, rtol=1e-5,
                                   atol=1e-6)
    assert (wrapped.weight is base.weight) and wrapped.out_features == 5
    # The faithful default scores with Wq twice, so its score matrix is symmetric; a separate Wk's is not.
    query = x @ eraser.gate.to_q
    scores = query @ (x @ eraser.gate.to_k if separate_key else query).transpose(1, 2)
    assert torch.allclose(scores, scores.transpose(1, 2), atol=1e-6) == (not separate_key)


def test_fresh_eraser_is_the_identity_and_uses_the_official_initialisation():
    eraser = cpe.ConceptEraser(768, [320, 640], gate_dim=64, rank=4)
    eraser.reset_parameters(torch.Generator().manual_seed(0))
    assert all(torch.count_nonzero(up) == 0 for up in eraser.up) and torch.count_nonzero(eraser.gate.to_gate) == 0
    assert eraser.down.abs().max() <= 1 / math.sqrt(768 * 4) and eraser.down.abs().max() > 0.5 / math.sqrt(768 * 4)
    assert eraser.gate.to_q.abs().max() <= 1 / math.sqrt(768 * 64) / 768**2
    x = torch.randn(2, 77, 768)
    s, e_bar = eraser.gate(x)
    assert torch.allclose(s, torch.full_like(s, 0.5))
    assert torch.allclose(e_bar, x.mean(dim=1, keepdim=True).expand_as(x), atol=1e-5)  # A is uniform at init
    assert torch.count_nonzero(eraser.residual(1, eraser.residual_input(x))) == 0


def test_largest_gate_merge_matches_a_computation_by_hand():
    first = random_eraser(4, [3, 6], gate_dim=2, rank=2, seed=3, scale=1.0)
    second = random_eraser(4, [3, 6], gate_dim=2, rank=2, seed=4, scale=1.0)
    adapter = cpe.CPEAdapter([first, second])
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(5))
    gates, residuals = [], []
    for eraser in (first, second):
        s, _, residual = by_hand(eraser, x, layer=1)
        gates.append(s)
        residuals.append(residual)
    winner = (gates[1] > gates[0]).long()  # [B, T]
    assert 0 < int(winner.sum()) < winner.numel(), "pick weights for which both concepts win some tokens"
    expected = torch.where(winner.unsqueeze(-1).bool(), residuals[1], residuals[0])
    with torch.no_grad():
        torch.testing.assert_close(adapter.residual(1, x).double(), expected, rtol=1e-5, atol=1e-6)
        # One concept alone: its own residual everywhere.
        torch.testing.assert_close(cpe.CPEAdapter([first]).residual(1, x).double(), residuals[0], rtol=1e-5,
                                   atol=1e-6)


def test_gap_loss_equals_the_per_layer_squared_error_and_its_gradients():
    generator = torch.Generator().manual_seed(6)
    weights = [torch.randn(out, 8, generator=generator) for out in (5, 5, 7, 7)]
    bank = cpe.ProjectionBank.build(["a.to_k", "a.to_v", "b.to_k", "b.to_v"], weights,
                                    torch.tensor([0.3, 1.2, 0.1, 0.9], dtype=torch.float64), text_length=6)
    eraser = random_eraser(8, [5, 5, 7, 7], gate_dim=3, rank=2, seed=7)
    x = torch.randn(3, 6, 8, generator=generator)
    z = torch.randn(3, 6, 8, generator=generator).requires_grad_(True)

    def direct(base_input):
        total = 0
        for layer, weight in enumerate(weights):
            gap = eraser.residual(layer, eraser.residual_input(x))
            if base_input is not None:
                gap = gap + base_input @ weight.T
            # The official per-layer mean, weighted, summed and divided by the number of layers.
            total = total + bank.spectral[layer] * (gap**2).mean(dim=(1, 2)) / len(weights)
        return total

    for base_input in (None, z):
        got, want = cpe.gap_loss(eraser, bank, x, base_input), direct(base_input)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        inputs = [eraser.down, eraser.gate.to_q, *([z] if base_input is not None else [])]
        for a, b in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_layer_weights_are_the_spectral_norms_of_the_frozen_attention(pipe):
    bank = cpe.ProjectionBank.from_unet(pipe.unet, text_length=77)
    assert bank.names == cpe.kv_layer_names(pipe.unet) and len(bank.names) == 32
    block = pipe.unet.get_submodule(bank.names[2].rsplit(".", 1)[0])
    top = lambda m: torch.linalg.svdvals(m.double())[0]  # noqa: E731
    w_o, w_v, w_q = block.to_out[0].weight.detach(), block.to_v.weight.detach(), block.to_q.weight.detach()
    assert math.isclose(bank.spectral[2], top(w_o @ w_v) * top(w_q) / 77, rel_tol=1e-5)
    assert math.isclose(bank.spectral[3], top(w_o), rel_tol=1e-5)
    assert math.isclose(bank.coef[3], bank.spectral[3] / (32 * 77 * w_v.shape[0]), rel_tol=1e-5)


def test_anchor_sampling_mixes_noisy_pairs():
    anchors = torch.randn(5, 77, 8, generator=torch.Generator().manual_seed(8))
    clean = cpe.sample_anchors(anchors, 4, 0.0, torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    index = torch.randint(5, (8,), generator=generator)
    torch.randn(8, 77, 8, generator=generator)
    mix = torch.rand(4, generator=generator).view(-1, 1, 1)
    torch.testing.assert_close(clean, mix * anchors[index[0::2]] + (1 - mix) * anchors[index[1::2]])
    noisy = cpe.sample_anchors(anchors, 4, 1e-3, torch.Generator().manual_seed(9))
    relative = (noisy - clean).flatten(1).norm(dim=1) / clean.flatten(1).norm(dim=1)
    assert bool((relative > 0.005).all() and (relative < 0.05).all())  # 0.001·√(77·8) ≈ 2.5 % per state


# ----------------------------------------------------------------------------------------------
# Defaults


def test_concept_kinds_defaults_and_anchors():
    assert [concept_kind(c) for c in ("nudity", "Van Gogh", "circle", "church")] == [
        "explicit", "artist", "toy", "object"]
    for concept in ("naked", "picasso", "church", "star"):
        kind = concept_kind(concept)
        anchors = cpe.default_anchors(concept, kind)
        assert anchors and not any(cpe_prompts._mentions(text, concept) for text in anchors)
    assert not any("dali" in text for text in cpe.default_anchors("salvador dali", "artist"))
    assert "{}" in cpe.default_templates("star", "toy") and "a photo of a {}" in cpe.default_templates("star", "toy")
    assert not any("starfish" in t for t in cpe.default_templates("star", "toy"))
    config = cpe.CPEConfig(prompt="nudity, naked,erotic,sexual", stages=3).resolved()
    assert config.concepts == ["nudity", "naked", "erotic", "sexual"]
    assert (config.kind, config.eta, config.gate_dim, config.rank, config.anchor_weight, config.stages) == (
        "explicit", 3.0, 64, 4, 1e4, 3)
    toy_model = ToyTrainingWorld().default_model("circle")
    assert cpe.CPEConfig(prompt="circle").resolved(toy_model).ckpt_path == str(TOY_MODEL_DIR)
    assert ToyTrainingWorld().default_model("church") is None
    with pytest.raises(CoErasingError, match="--ckpt_path"):  # a toy shape never falls back to SD v1.4
        cpe.CPEConfig(prompt="circle").resolved()
    with pytest.raises(CoErasingError, match="--kind"):
        cpe.CPEConfig(prompt="nudity,van gogh").validate()
    with pytest.raises(CoErasingError, match="--prompt"):
        cpe.CPEConfig(prompt=" , ").validate()
    with pytest.raises(CoErasingError, match="--rank"):
        cpe.CPEConfig(prompt="cat", rank=0).validate()


# ----------------------------------------------------------------------------------------------
# Pipelines and artifacts


def latents(pipe, prompt="a photo of a cat"):
    return pipe(prompt, num_inference_steps=2, guidance_scale=7.5, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def test_zero_initialised_cpe_leaves_the_pipeline_unchanged_and_close_restores_it(pipe, tmp_path):
    unet = pipe.unet
    originals = {name: unet.get_submodule(name) for name in cpe.kv_layer_names(unet)}
    keys = list(unet.state_dict())
    before = latents(pipe)
    layout = cpe.CPELayout(["cat", "dog"], list(originals), [m.out_features for m in originals.values()],
                           text_dim=32, gate_dim=4, rank=2, separate_key=False)
    erasers = [layout.new_eraser() for _ in layout.concepts]
    for index, eraser in enumerate(erasers):
        eraser.reset_parameters(torch.Generator().manual_seed(index))
    cpe.save_cpe(tmp_path / "fresh", erasers, layout, {"note": "untrained"})

    runtime = apply_artifact(pipe, tmp_path / "fresh")
    assert isinstance(runtime, cpe.CPERuntime)
    assert all(isinstance(unet.get_submodule(name), cpe.CPELinear) for name in originals)
    assert torch.equal(latents(pipe), before)
    with pytest.raises(CoErasingError, match="already"):
        apply_artifact(pipe, tmp_path / "fresh")
    runtime.close()
    runtime.close()  # idempotent
    assert all(unet.get_submodule(name) is module for name, module in originals.items())
    assert list(unet.state_dict()) == keys and not unet._forward_pre_hooks
    assert torch.equal(latents(pipe), before)


def relative_kv_change(unet, text, folder, prompts):
    """Per prompt, ‖f(x) − f⁰(x)‖ / ‖f⁰(x)‖ over all 32 wrapped layers, f with the artifact attached."""
    names = cpe.kv_layer_names(unet)
    x = text.encode(prompts)
    with torch.no_grad():
        base = [unet.get_submodule(name)(x) for name in names]
        attachment = cpe.attach_cpe(unet, *cpe.load_cpe(folder))
        try:
            erased = [unet.get_submodule(name)(x) for name in names]
        finally:
            attachment.detach()
    change = sum(((e - b) ** 2).sum(dim=(1, 2)) for e, b in zip(erased, base, strict=True))
    return (change / sum((b**2).sum(dim=(1, 2)) for b in base)).sqrt()


def test_training_moves_the_target_and_keeps_the_anchors(tmp_path):
    """On the toy world (a trained text encoder; the tiny stack's random one hardly tells prompts apart):
    held-out prompts naming the erased shape move, held-out prompts of the other shapes and the anchors do not."""
    from coerasing.models import load_text_components, load_unet
    from coerasing.toy.world import explicit_prompts, unrelated_prompts

    config = cpe.CPEConfig(prompt="circle", device="cpu", save_path=str(tmp_path / "circle"), stages=2,
                           stage_iterations=50, adversarial_prompts=4, anchors_per_step=8)
    folder = cpe.CPEMethod().train(config, ToyTrainingWorld())  # the toy world lends its model
    assert json.loads((folder / "run.json").read_text())["config"]["ckpt_path"] == str(TOY_MODEL_DIR)
    unet = load_unet(str(TOY_MODEL_DIR), torch.device("cpu"))
    text = load_text_components(str(TOY_MODEL_DIR), torch.device("cpu"), torch.float32)
    target = relative_kv_change(unet, text, folder, [p.prompt for p in explicit_prompts(["circle"])])
    unrelated = relative_kv_change(unet, text, folder, [p.prompt for p in unrelated_prompts("circle")])
    anchors = relative_kv_change(unet, text, folder, cpe.default_anchors("circle", "toy")[::4])
    assert target.min() > 0.3, target
    assert unrelated.mean() < target.mean() / 20 and anchors.mean() < target.mean() / 20, (unrelated, anchors)


def test_artifact_round_trip_changes_noise_pred_for_the_target(pipe, trained):
    artifact = read_artifact(trained)
    assert artifact.method == "cpe" and artifact.settings["kind"] == "object"
    assert (artifact.settings["eta"], artifact.settings["rank"], artifact.settings["gate_dim"]) == (1.0, 4, 16)
    assert artifact.settings["warmup_steps"] == 5 and artifact.settings["anchor_noise"] == 1e-3
    assert [p.name for p in cpe.stage_artifacts(trained)] == ["stage_1", "stage_2"]
    run = json.loads((trained / "run.json").read_text())
    assert run["status"] == "finished" and run["config"]["neutral"] == "a photo" and run["config"]["lr"] == 3e-3
    with (trained / "loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == cpe.total_steps(cpe.CPEConfig(**run["config"])) == 2 * 10 + 10 + 10
    assert {row["phase"] for row in rows} == {"erase", "attack"} and all(row["loss"] for row in rows)

    states = TextComponents(pipe.tokenizer, pipe.text_encoder).encode(["a photo of cat"])
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([500])
    with torch.no_grad():
        base = pipe.unet(sample, timestep, encoder_hidden_states=states).sample
        runtime = apply_artifact(pipe, trained)
        try:
            erased = runtime.noise_pred(sample, timestep, states)
        finally:
            runtime.close()
        after = pipe.unet(sample, timestep, encoder_hidden_states=states).sample
    assert (erased - base).abs().max() > 1e-4
    assert torch.equal(after, base)


# ----------------------------------------------------------------------------------------------
# Determinism and resume


def weights(folder):
    return load_file(str(folder / cpe.WEIGHTS_FILE))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_identical_weights_and_concepts_train_independently(tiny_stack, tmp_path):
    pair = make_config(tiny_stack, tmp_path / "a", prompt="cat,dog")
    first = weights(cpe.train_cpe(pair))
    again = weights(cpe.train_cpe(make_config(tiny_stack, tmp_path / "b", prompt="cat,dog")))
    other_seed = weights(cpe.train_cpe(make_config(tiny_stack, tmp_path / "c", prompt="cat,dog", seed=1)))
    alone = weights(cpe.train_cpe(make_config(tiny_stack, tmp_path / "d", prompt="cat")))
    assert same(first, again)
    assert not torch.equal(first["concepts.0.down"], other_seed["concepts.0.down"])
    assert any(torch.count_nonzero(first[f"concepts.1.up.{i}"]) for i in range(32))
    assert same({k: v for k, v in first.items() if k.startswith("concepts.0.")}, alone)
    assert json.loads((tmp_path / "a" / cpe.LAYOUT_FILE).read_text())["concepts"] == ["cat", "dog"]


def test_resume_after_a_crash_is_bit_identical(tiny_stack, tmp_path, monkeypatch):
    settings = dict(stages=3)
    full = cpe.train_cpe(make_config(tiny_stack, tmp_path / "full", **settings))

    save_state = cpe_training._save_train_state

    def crash_after_stage_1(folder, stage, config, trainers):
        save_state(folder, stage, config, trainers)
        if stage == 1:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(cpe_training, "_save_train_state", crash_after_stage_1)
    with pytest.raises(RuntimeError, match="simulated"):
        cpe.train_cpe(make_config(tiny_stack, tmp_path / "cut", **settings))
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert json.loads((cut / "run.json").read_text())["status"].startswith("stopped")
    assert not (cut / "stage_2").exists() and not (cut / "artifact.json").exists()
    with pytest.raises(CoErasingError, match="--resume"):
        cpe.train_cpe(make_config(tiny_stack, cut, **settings))
    with pytest.raises(CoErasingError, match="eta"):
        cpe.train_cpe(make_config(tiny_stack, cut, eta=2.0, resume=True, **settings))

    resumed = cpe.train_cpe(make_config(tiny_stack, cut, resume=True, **settings))
    for sub in ("stage_1", "stage_2", "stage_3", "."):
        assert same(weights(full / sub), weights(resumed / sub)), sub
    assert (full / "loss.csv").read_text() == (resumed / "loss.csv").read_text()


class StubContext:
    """The parts of :class:`coerasing.methods.base.TraceContext` CPE uses, on the tiny stack."""

    def __init__(self, stack, root):
        self.concept, self.seed, self.device = "cat", 0, "cpu"
        self.stack, self.root, self.calls = stack, root, 0

    def preset(self, name):
        return {"stages": 2, "stage_iterations": 3, "adversarial_prompts": 2, "anchors_per_step": 2} if name == "cpe" \
            else {}

    def world(self):
        return {"ckpt_path": str(self.stack.sd_path)}

    def run_folder(self, kind, settings):
        return self.root / kind

    def once(self, folder, request, work):
        if not (folder / "done.json").exists():
            self.calls += 1
            work()
            (folder / "done.json").write_text(json.dumps(request))


def test_trace_trains_once_and_returns_one_point_per_stage(tiny_stack, tmp_path):
    context = StubContext(tiny_stack, tmp_path)
    method = cpe.CPEMethod()
    points = method.trace(context)
    assert [(p.label, p.strength, p.artifact.name) for p in points] == [
        ("stage1", 12.0, "stage_1"), ("stage2", 15.0, "stage_2")]  # object kind: the first stage is 4x longer
    assert all(read_artifact(p.artifact).method == "cpe" for p in points)
    assert method.trace(context) == points and context.calls == 1
