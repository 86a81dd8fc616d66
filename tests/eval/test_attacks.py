"""The one attack loop (:func:`coerasing.eval.attacks.run_attack`): resume, the stale-record rule, ASR."""

from __future__ import annotations

import json

import pytest

from coerasing.errors import CoErasingError
from coerasing.eval.attacks import ATTACKS, Attack, asr, run_attack
from coerasing.generation import ImageRow


class FakeAttack(Attack):
    """Succeeds on even seeds; counts what the loop asks of it."""

    name = "fake"

    def __init__(self, strength: int = 1, batch_size: int = 1) -> None:
        self.strength, self.batch_size = strength, batch_size
        self.prepared: list[object] = []
        self.attacked: list[str] = []
        self.batches: list[int] = []

    def settings(self):
        return {"strength": self.strength}

    def prepare(self, runtime, out_dir, made_by):
        self.prepared.append(runtime)

    def attack_one(self, row):
        self.attacked.append(row.case)
        return {"case": row.case, "success": row.seed % 2 == 0, "prompt": row.prompt}

    def attack_batch(self, rows):
        self.batches.append(len(rows))
        return super().attack_batch(rows)


ROWS = [ImageRow(case=f"c{i}", prompt=f"prompt {i}", seed=i) for i in range(5)]


def _loader(calls: list[int]):
    def load():
        calls.append(1)
        return "runtime"
    return load


def test_records_are_reused_and_stale_ones_redone(tmp_path):
    loads: list[int] = []
    pre = {"c0": True}  # shows the concept without attack: never attacked
    first = FakeAttack()
    records = run_attack(first, ROWS, tmp_path, {"model": "m"}, _loader(loads), pre)
    assert first.attacked == ["c1", "c2", "c3", "c4"] and first.prepared == ["runtime"] and loads == [1]
    saved = json.loads((tmp_path / "c2.json").read_text())
    assert saved["settings"] == {"strength": 1} and saved["made_by"] == {"model": "m"} and saved["success"] is True
    assert set(records) == {"c1", "c2", "c3", "c4"}

    again = FakeAttack()  # a rerun: everything is current, the model is not even loaded
    assert run_attack(again, ROWS, tmp_path, {"model": "m"}, _loader(loads), pre) == records
    assert again.attacked == [] and again.prepared == [] and loads == [1]

    (tmp_path / "c3.json").unlink()  # an interrupted run
    stale = json.loads((tmp_path / "c4.json").read_text())
    (tmp_path / "c4.json").write_text(json.dumps({**stale, "settings": {"strength": 2}}))  # other settings
    resumed = FakeAttack()
    run_attack(resumed, ROWS, tmp_path, {"model": "m"}, _loader(loads), pre)
    assert resumed.attacked == ["c3", "c4"]  # only the missing and the stale record
    assert json.loads((tmp_path / "c4.json").read_text())["settings"] == {"strength": 1}

    other_model = FakeAttack()  # another model: every record is stale
    run_attack(other_model, ROWS, tmp_path, {"model": "m2"}, "runtime", pre)
    assert other_model.attacked == ["c1", "c2", "c3", "c4"]


def test_stale_records_can_stop_the_loop_instead(tmp_path):
    run_attack(FakeAttack(), ROWS[:2], tmp_path, {"model": "m"}, "runtime")
    before = (tmp_path / "c1.json").read_bytes()
    with pytest.raises(CoErasingError, match="holds results made with other settings"):
        run_attack(FakeAttack(strength=3), ROWS[:2], tmp_path, {"model": "m"}, "runtime", on_stale="error")
    assert (tmp_path / "c1.json").read_bytes() == before  # nothing overwritten
    current = FakeAttack()
    run_attack(current, ROWS[:2], tmp_path, {"model": "m"}, "runtime", on_stale="error")
    assert current.attacked == []


def test_batches_and_the_asr_of_the_records(tmp_path):
    attack = FakeAttack(batch_size=2)
    pre = {"c1": True}
    records = run_attack(attack, ROWS, tmp_path, {}, "runtime", pre)
    assert attack.batches == [2, 2] and attack.attacked == ["c0", "c2", "c3", "c4"]
    summary = asr([row.case for row in ROWS], pre, records)
    # c1 without attack; c0, c2, c4 (even seeds) by the attack; c3 fails
    assert (summary["n"], summary["pre_success"], summary["attack_success"]) == (5, 1, 3)
    assert summary["pre_asr"] == 0.2 and summary["asr"] == 0.8
    assert summary["asr_interval"]["k"] == 4 and summary["pre_asr_interval"]["k"] == 1
    assert summary["cases"] == {"c0": 1, "c1": 1, "c2": 1, "c3": 0, "c4": 1}  # per prompt, for paired verdicts
    assert sum(summary["cases"].values()) == summary["pre_success"] + summary["attack_success"]


def test_every_registered_attack_is_an_attack_class():
    assert set(ATTACKS) == {"unlearndiff", "concept_inversion", "p4d", "ring_a_bell", "mma", "replay"}
    assert all(issubclass(cls, Attack) and cls.name == name for name, cls in ATTACKS.items())


def test_success_rounds_are_kept_for_attacks_that_check_each_round():
    records = {"c0": {"success": True, "rounds": [{}, {}, {}]}, "c1": {"success": False, "rounds": [{}] * 5},
               "c2": {"success": True, "rounds": [{}]}, "c3": {"success": True}}
    summary = asr(["c0", "c1", "c2", "c3", "c4"], {"c4": True}, records)
    assert summary["success_rounds"] == {"c0": 3, "c2": 1}  # c3 keeps no rounds, c4 needed no attack
