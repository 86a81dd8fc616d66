"""ESD-family curves on the tiny stack: one shared stage-1 run, cached, extended by resuming."""

from __future__ import annotations

import pytest

from coerasing import train
from coerasing.compare.cache import Cache
from coerasing.compare.runner import Context
from coerasing.methods import get_method


class TinyProtocol:
    def __init__(self, stack):
        self.stack = stack

    def world(self):
        return {"ckpt_path": str(self.stack.sd_path), "ip_adapter": str(self.stack.ip_adapter_bin),
                "image_encoder_path": str(self.stack.image_encoder_path)}

    def identity(self):
        return {"model": "tiny"}

    def references(self, concept, cache):
        raise AssertionError("stage 1 needs no reference images")


PRESETS = {"stage1": {"train_method": "noxattn", "lr": 1e-4, "iterations": 4, "save_iter": 2,
                      "num_inference_steps": 5},
           "stage2": {"iterations": 2}}


@pytest.fixture
def erase_calls(monkeypatch):
    calls = []
    real = train.erase

    def counting(config):
        calls.append((config.iterations, config.resume))
        return real(config)

    monkeypatch.setattr(train, "erase", counting)
    return calls


def test_stage1_is_trained_once_shared_and_extended_by_resume(tiny_stack, tmp_path, erase_calls):
    context = Context(Cache(tmp_path), TinyProtocol(tiny_stack), PRESETS, "nudity", 0, "cpu")
    esd = get_method("esd").trace(context)
    assert [p.label for p in esd] == ["it2", "it4"] and erase_calls == [(4, False)]
    before = esd[-1].artifact.read_bytes()
    assert [p.label for p in get_method("esd").trace(context)] == ["it2", "it4"] and len(erase_calls) == 1
    equal = get_method("esd-equal-compute").trace(context)
    assert [p.label for p in equal] == ["it2", "it4", "it6"]
    assert erase_calls[1] == (6, True)  # the same run, resumed from iteration 4
    assert equal[1].artifact == esd[1].artifact and esd[1].artifact.read_bytes() == before  # never rewritten

    other = Context(Cache(tmp_path), TinyProtocol(tiny_stack), {**PRESETS, "stage1": {**PRESETS["stage1"],
                                                                                        "lr": 2e-4}},
                    "nudity", 0, "cpu")
    changed = get_method("esd").trace(other)
    assert changed[0].artifact.parent != esd[0].artifact.parent and erase_calls[-1] == (4, False)
    seed = Context(Cache(tmp_path), TinyProtocol(tiny_stack), PRESETS, "nudity", 1, "cpu")
    assert get_method("esd").trace(seed)[0].artifact.parent != esd[0].artifact.parent


class _PresetsOnly:
    """A trace context whose training runs are faked (``train_run`` patched): only the curve's shape matters."""

    concept, seed, device = "circle", 0, "cpu"

    def __init__(self, root, candidate=None):
        self.root, self.candidate = root, candidate or {}

    def preset(self, name):
        return {"stage1": {"prompt": "circle", "iterations": 4, "save_iter": 2},
                "stage2": {"prompt": "circle", "iterations": 2, "save_iter": 1},
                "candidate": self.candidate}.get(name, {})  # a block the presets lack is empty, as in Context

    def world(self):
        return {"ckpt_path": "model", "ip_adapter": "adapter", "image_encoder_path": "encoder"}

    def references(self):
        return self.root / "references"


class _LocalRuns(_PresetsOnly):
    """:class:`_PresetsOnly` whose run folders are real folders under ``root`` and whose work runs at once."""

    def run_folder(self, kind, settings):
        return self.root / kind

    def once(self, folder, request, work):
        folder.mkdir(parents=True, exist_ok=True)
        work()


@pytest.mark.parametrize("method", ["coerasing", "no-refinement"])
def test_two_stage_curves_start_with_every_stage1_checkpoint(method, tmp_path, monkeypatch):
    """The verdicts issue: Co-Erasing may stop where ESD may, so its curve holds stage 1's checkpoints."""
    from coerasing.methods import coerasing as co

    monkeypatch.setattr(co, "train_run", lambda context, kind, settings: tmp_path / kind)
    context = _PresetsOnly(tmp_path)
    curve = get_method(method).trace(context)
    esd = get_method("esd").trace(context)
    assert [p.label for p in curve] == ["it2", "it4", "it5", "it6"]
    assert curve[:2] == esd  # the same checkpoints (files) as ESD's, not retrained
    assert [p.artifact.parent.name for p in curve] == ["stage1", "stage1", "stage2", "stage2"]


def test_coerasing_preserve_adds_the_anchor_term_to_stage2_only(tmp_path, monkeypatch):
    from coerasing.methods import coerasing as co
    from coerasing.methods.concepts import toy_anchor_prompts

    runs = []

    def fake_run(context, kind, settings):
        runs.append((kind, settings))
        return tmp_path / kind

    class Context(_LocalRuns):
        def preset(self, name):
            return {"preserve": {"weight": 3.0}}.get(name) or super().preset(name)

    monkeypatch.setattr(co, "train_run", fake_run)
    curve = get_method("coerasing-preserve").trace(Context(tmp_path))
    assert [p.label for p in curve] == ["it2", "it4", "it5", "it6"]
    (stage1, first), (stage2, second) = runs
    assert stage1 == "stage1" and "preserve_weight" not in first  # stage 1 is ESD's, shared
    assert second["preserve_weight"] == 3.0 and second["text_guide"] == "circle"
    anchors = open(second["preserve_prompts"]).read().split("\n")
    assert [a for a in anchors if a] == toy_anchor_prompts("circle")


@pytest.mark.parametrize("method", ["coerasing", "no-refinement", "coerasing-preserve"])
def test_stage2_start_picks_an_earlier_stage1_checkpoint(method, tmp_path, monkeypatch):
    """A tuning candidate's ``stage2_start`` starts stage 2 from that stage-1 checkpoint (not stage 1's end); the
    curve passes through stage 1 up to there, and stage 2's strengths count on from it."""
    from coerasing.errors import CoErasingError
    from coerasing.methods import coerasing as co

    runs = []

    def fake_run(context, kind, settings):
        runs.append((kind, settings))
        return tmp_path / kind

    monkeypatch.setattr(co, "train_run", fake_run)
    curve = get_method(method).trace(_LocalRuns(tmp_path, {"stage2_start": 2}))
    (_, first), (stage2, second) = runs
    assert stage2 == "stage2" and second["unet_ckpt_path"] == str(tmp_path / "stage1" / "unet_2.pth")
    assert first["iterations"] == 4  # stage 1 itself is the shared run, unchanged
    assert [(p.label, p.strength) for p in curve] == [("it2", 2.0), ("it3", 3.0), ("it4", 4.0)]
    assert [p.artifact.name for p in curve] == ["unet_2.pth", "unet_1.pth", "unet_2.pth"]
    assert [p.artifact.parent.name for p in curve] == ["stage1", "stage2", "stage2"]

    runs.clear()
    get_method(method).trace(_LocalRuns(tmp_path))  # no candidate: stage 1's end, as before
    assert runs[1][1]["unet_ckpt_path"] == str(tmp_path / "stage1" / "unet_4.pth")
    with pytest.raises(CoErasingError, match="stage2_start 3 is not a checkpoint of stage 1.*2, 4"):
        get_method(method).trace(_LocalRuns(tmp_path, {"stage2_start": 3}))
