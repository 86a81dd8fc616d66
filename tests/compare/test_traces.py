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
