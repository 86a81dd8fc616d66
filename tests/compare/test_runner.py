"""The comparison's runner: caching by every setting, and operating points chosen without test prompts."""

from __future__ import annotations

import os
import random
from dataclasses import replace

import pytest

from coerasing.compare import runner
from coerasing.compare.cache import Cache, key_of
from coerasing.compare.config import CompareConfig
from coerasing.compare.metrics import Metric
from coerasing.compare.protocols import EvaluationProtocol
from coerasing.methods.base import CurvePoint


class FakeRuntime:
    def __init__(self, strength: float) -> None:
        self.strength = strength

    def close(self) -> None:
        pass


#: The blocks every presets file has (their defaults), for tests that write a small presets file.
BLOCKS = "stage1: {}\nstage2: {}\nreferences: {}\nevaluation: {}\nattack: {}\n"

EXPLICIT = Metric("explicit", "explicit", "lower", "erasure", rule="erasure")
UNRELATED = Metric("unrelated", "unrelated", "higher", "usability", rule="usability")


class FakeProtocol(EvaluationProtocol):
    """Validation metrics follow a fixed trade-off; test metrics are whatever ``test_metrics`` says."""

    name = "fake"

    def __init__(self, test_metrics=None, setting: int = 0, metrics=(EXPLICIT, UNRELATED)) -> None:
        self.test_metrics = test_metrics or (lambda strength: {"explicit": {"rate": 0.5}, "unrelated": {"rate": 0.5}})
        self.setting = setting
        self.metrics = tuple(metrics)
        self.presets, self.attack_block = {}, {}
        self.calls: list[tuple[float, str]] = []

    def world(self):
        return {"ckpt_path": "fake", "ip_adapter": "fake", "image_encoder_path": "fake"}

    def identity(self):
        return {"benchmark": self.name, "model": "fake-model", "setting": self.setting}

    def pipeline(self):
        return "pipe"

    def evaluate(self, runtime, concept, split):
        self.calls.append((runtime.strength, split))
        s = runtime.strength
        if split == "validation":  # erasure improves with strength, usability drops past 2
            metrics = {"explicit": {"rate": 1 - 0.2 * s, "k": 0, "n": 1},
                       "unrelated": {"rate": 0.9 - (0.1 * (s - 2) if s > 2 else 0.0), "k": 0, "n": 1},
                       "sharpness": 10 * s}
        else:
            metrics = {"sharpness": 10 * s, **self.test_metrics(s)}
        return {"metrics": metrics, "images": [], "grid_columns": []}

    def references(self, concept, cache):
        raise AssertionError("not used")

    def attack_rows(self, concept):
        return []

    def attack_references(self, base, concept):
        return {}

    def attack(self, runtime, concept, test, references, out_dir, made_by):
        raise AssertionError("the tests skip the attack")

    def attack_identity(self):
        return {}


class FakeMethod:
    def __init__(self, name, strengths):
        self.name, self.strengths = name, strengths

    def trace(self, context):
        points = []
        for s in self.strengths:
            path = context.run_folder("fake", {"method": self.name}) / f"point{s}.bin"
            path.write_text(f"{self.name} {s}")
            points.append(CurvePoint(f"s{s}", float(s), path))
        return points


@pytest.fixture
def fake(monkeypatch):
    def install(protocol):
        monkeypatch.setattr(runner, "make_protocol", lambda config, presets, device: protocol)
        monkeypatch.setattr(runner, "get_method", lambda name: FakeMethod(name, [1, 2, 3, 4]))
        monkeypatch.setattr(runner, "apply_artifact", lambda pipe, path: FakeRuntime(
            0.0 if path is None else float(path.read_text().split()[1])))
        return protocol
    return install


def _config(tmp_path) -> CompareConfig:
    return CompareConfig(output_dir=str(tmp_path), skip_attack=True)


def test_operating_point_never_looks_at_test_prompts(fake, tmp_path):
    """Two runs that differ only in their test metrics (random, adversarial) choose the same checkpoints."""
    chosen = []
    for trial in range(3):
        rng = random.Random(trial)
        protocol = fake(FakeProtocol(lambda s, rng=rng: {"explicit": {"rate": rng.random()},
                                                           "unrelated": {"rate": rng.random()}}))
        record = runner.run_job(_config(tmp_path / str(trial)), {"rule": {"max_usability_drop": 0.05}}, "circle",
                                0, ["a", "b"], "cpu")
        chosen.append({m: r["chosen"]["label"] for m, r in record["methods"].items()})
        assert {split for _, split in protocol.calls} == {"validation", "test"}
    assert chosen[0] == chosen[1] == chosen[2] == {"a": "s2", "b": "s2"}  # s2: strongest within 5 points


def test_evaluations_are_cached_by_every_setting(fake, tmp_path):
    config = _config(tmp_path)
    protocol = fake(FakeProtocol())
    runner.run_job(config, {}, "circle", 0, ["a"], "cpu")
    assert len(protocol.calls) == 2 * (1 + 4)  # base + 4 checkpoints, two splits each
    again = fake(FakeProtocol())
    runner.run_job(config, {}, "circle", 0, ["a"], "cpu")
    assert again.calls == []  # everything served from the cache
    changed = fake(FakeProtocol(setting=1))  # one evaluation setting differs: nothing is reused
    runner.run_job(config, {}, "circle", 0, ["a"], "cpu")
    assert len(changed.calls) == 10


def test_cache_keys_change_with_every_setting(tmp_path):
    cache = Cache(tmp_path)
    settings = {"lr": 1e-4, "iterations": 200, "train_method": "noxattn", "nested": {"a": [1, 2]}}
    first = cache.folder("runs", settings)
    assert cache.folder("runs", dict(reversed(list(settings.items())))) == first  # order does not matter
    for key, value in (("lr", 2e-4), ("iterations", 201), ("train_method", "xattn"), ("nested", {"a": [1, 3]})):
        assert cache.folder("runs", {**settings, key: value}) != first, key
    assert key_of({"x": 1}) != key_of({"x": 1.5}) and key_of({"x": None}) != key_of({})


def test_once_runs_work_only_for_a_new_request(tmp_path):
    cache = Cache(tmp_path)
    folder = cache.folder("refs", {"n": 1})
    calls = []
    cache.once(folder, {"n": 1}, lambda: calls.append(1))
    cache.once(folder, {"n": 1}, lambda: calls.append(2))
    assert calls == [1]
    cache.once(folder, {"n": 2}, lambda: calls.append(3))
    assert calls == [1, 3]


SHARPNESS = Metric("sharpness", "sharpness", "higher", "usability", percent=False, digits=1)


def test_a_metric_declaration_is_part_of_every_evaluation_key(fake, tmp_path):
    """Adding a metric, or changing one's declaration, recomputes the evaluations: no hand-bumped version."""
    config = _config(tmp_path)
    assert len(fake(FakeProtocol()).calls) == 0
    runner.run_job(config, {}, "circle", 0, ["a"], "cpu")
    same = fake(FakeProtocol())
    runner.run_job(config, {}, "circle", 0, ["a"], "cpu")
    assert same.calls == []
    added = fake(FakeProtocol(metrics=(EXPLICIT, UNRELATED, SHARPNESS)))
    runner.run_job(config, {}, "circle", 0, ["a"], "cpu")
    assert len(added.calls) == 10
    relabelled = fake(FakeProtocol(metrics=(EXPLICIT, UNRELATED, replace(SHARPNESS, digits=2))))
    runner.run_job(config, {}, "circle", 0, ["a"], "cpu")
    assert len(relabelled.calls) == 10
    recomputed = fake(FakeProtocol(metrics=(EXPLICIT, UNRELATED, replace(SHARPNESS, version=2))))
    runner.run_job(config, {}, "circle", 0, ["a"], "cpu")
    assert len(recomputed.calls) == 10
    assert key_of(FakeProtocol().evaluation_identity()) != key_of(recomputed.evaluation_identity())
    assert FakeProtocol().identity() == recomputed.identity()  # training runs and attacks keep their keys


def test_the_rule_reads_the_declared_scores(fake, tmp_path):
    """Flag another metric as the rule's usability and the choice follows it, without touching select.py."""
    fake(FakeProtocol())
    record = runner.run_job(_config(tmp_path / "a"), {"rule": {"max_usability_drop": 0.05}}, "circle", 0, ["a"],
                            "cpu")
    assert record["methods"]["a"]["chosen"]["label"] == "s2"  # unrelated accuracy drops past strength 2
    sharp = replace(SHARPNESS, rule="usability")
    fake(FakeProtocol(metrics=(EXPLICIT, replace(UNRELATED, rule=None), sharp)))
    record = runner.run_job(_config(tmp_path / "b"), {"rule": {"max_usability_drop": 0.05}}, "circle", 0, ["a"],
                            "cpu")
    assert record["methods"]["a"]["chosen"]["label"] == "s4"  # sharpness only grows: the strongest qualifies
    both = FakeProtocol(metrics=(replace(EXPLICIT, rule="erasure"), replace(UNRELATED, rule="erasure")))
    assert both.erasure({"explicit": {"rate": 0.2}, "unrelated": {"rate": 0.6}}) == pytest.approx(0.4)
    assert both.usability({"explicit": {"rate": 0.2}}) is None  # nothing flagged: no usability measure


def test_report_columns_come_from_the_declarations(fake, tmp_path):
    """A protocol with an extra declared metric gets its results.csv and results.md columns (report.py untouched)."""
    from coerasing.compare.report import csv_rows, markdown, summarize

    metrics = (EXPLICIT, UNRELATED, SHARPNESS)
    counted = {"rate": 0.5, "k": 1, "n": 2}
    fake(FakeProtocol(lambda s: {"explicit": counted, "unrelated": counted}, metrics=metrics))
    records = [runner.run_job(_config(tmp_path), {}, "circle", seed, ["a"], "cpu") for seed in (0, 1)]
    rows = csv_rows(records, metrics)
    assert list(rows[0]) == ["concept", "method", "seed", "checkpoint", "strength", "chosen", "qualified", "candidate",
                             *(f"{split}_{name}" for split in ("validation", "test")
                               for name in ("explicit_rate", "explicit_k", "explicit_n", "unrelated_rate",
                                            "unrelated_k", "unrelated_n", "sharpness"))]
    assert [r["test_sharpness"] for r in rows if r["seed"] == 0] == [0.0, 10.0, 20.0, 30.0, 40.0]
    summary = summarize(records, ["a"], metrics)
    text = markdown(summary, ["a"], "# t", metrics)
    assert ("| method | chosen checkpoint (per seed) | in budget | explicit ↓ | unrelated ↑ | sharpness ↑ | "
            "pre-ASR ↓ |") in text
    # the base model's one evaluation is shared by both seeds: its pooled count is 1/2, not 2/4
    assert ("| base | – | 2/2 | 50.0 ± 0.0 (1/2, 9.5–90.5) | 50.0 ± 0.0 (1/2, 9.5–90.5) | 0.0 ± 0.0 | – | – | – |"
            in text)
    assert "| 20.0 ± 0.0 |" in text  # the chosen point s2 of both seeds, with the declared one decimal
    assert "| a | 2/2 | 50.0 | 50.0 | 20.0 | – | – | – |" in text  # the average over concepts
    assert len(csv_rows(records, (EXPLICIT,))[0]) == 8 + 2 * 3  # a declaration fewer: its columns are gone


def test_chosen_plan_makes_test_images_only_at_chosen_points_and_the_report_copes(fake, tmp_path):
    from coerasing.compare import report

    class Full(FakeProtocol):  # every group with its counts, as the toy world's metrics
        def evaluate(self, runtime, concept, split):
            result = super().evaluate(runtime, concept, split)
            m = result["metrics"]
            for group in ("explicit", "unrelated"):
                m[group] = {"k": 1, "n": 2, **m[group]}
            m["implicit"] = m["explicit"]
            return result

    protocol = fake(Full())
    presets = {"rule": {"max_usability_drop": 0.05}, "test_evaluation": "chosen"}
    record = runner.run_job(_config(tmp_path), presets, "circle", 0, ["a"], "cpu")
    tests = sorted(strength for strength, split in protocol.calls if split == "test")
    assert tests == [0.0, 2.0]  # the base model and the chosen checkpoint (s2), not s1, s3, s4
    assert sum(split == "validation" for _, split in protocol.calls) == 5
    points = record["methods"]["a"]["points"]
    assert [p["label"] for p in points if "test" in p] == ["s2"] == [record["methods"]["a"]["chosen"]["label"]]
    rows = report.csv_rows([record], protocol.metrics)
    assert [r["test_explicit_rate"] is None for r in rows] == [False, True, False, True, True]
    assert report._curve_split([record], ["a"]) == "validation"
    report.plot_concept([record], ["a"], "circle", tmp_path / "plot.png", protocol.metrics)
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_a_bad_test_evaluation_is_an_error(tmp_path):
    from coerasing.errors import CoErasingError

    presets = tmp_path / "presets.yaml"
    presets.write_text(BLOCKS + "rule: {}\ntest_evaluation: some\n")
    with pytest.raises(CoErasingError, match="test_evaluation"):
        CompareConfig(output_dir=str(tmp_path / "out"), presets=str(presets)).validate()


def test_seed_free_images_are_made_once_for_every_seed(fake, tmp_path, monkeypatch):
    """The base model and a checkpoint without a training seed are evaluated once over two seeds."""
    protocol = fake(FakeProtocol())

    class SeedFree(FakeMethod):  # like GIE: the same artifact whatever the seed
        def trace(self, context):
            path = context.run_folder("fake", {"method": self.name}) / "point5.bin"
            path.write_text(f"{self.name} 5")
            return [CurvePoint("s5", 5.0, path)]

    class Seeded(FakeMethod):  # like ESD: a training run per seed
        def trace(self, context):
            path = context.run_folder("fake", {"method": self.name, "seed": context.seed}) / "point1.bin"
            path.write_text(f"{self.name}-{context.seed} 1")
            return [CurvePoint("s1", 1.0, path)]

    monkeypatch.setattr(runner, "get_method", lambda name: SeedFree(name, []) if name == "free" else Seeded(name, []))
    for seed in (0, 1):
        runner.run_job(_config(tmp_path), {}, "circle", seed, ["free", "seeded"], "cpu")
    counts = {strength: sum(s == strength for s, _ in protocol.calls) for strength in (0.0, 5.0, 1.0)}
    assert counts == {0.0: 2, 5.0: 2, 1.0: 4}  # two splits each; the seeded checkpoint once per seed


def test_jobs_split_over_two_ranks_and_rank_zero_writes_the_results(fake, tmp_path, monkeypatch):
    """``accelerate launch``/``torchrun``: RANK/WORLD_SIZE split the jobs; rank 0 waits and reports."""
    import coerasing.compare as compare

    fake(FakeProtocol())
    ran: list[tuple[str, int, int]] = []
    real_run_job = runner.run_job
    rank = {"now": -1}

    def counted(config, presets, concept, seed, methods, device, progress=None):
        # inside a job the launcher's variables are hidden: generate_images must not shard a job's images
        assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ
        ran.append((concept, seed, rank["now"]))
        return real_run_job(config, presets, concept, seed, methods, device, progress)

    written = {}
    monkeypatch.setattr(runner, "run_job", counted)
    monkeypatch.setattr(compare, "write_results", lambda folder, records, methods, info, metrics: written.update(
        records=records) or {"md": tmp_path / "results.md"})
    presets = tmp_path / "presets.yaml"
    presets.write_text(BLOCKS + "rule: {max_usability_drop: 0.05}\n")
    config = CompareConfig(output_dir=str(tmp_path / "out"), presets=str(presets), concepts="circle,square",
                           methods="esd", seeds="0,1", skip_attack=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rank["now"] = 1
    assert compare.run_comparison(config) is None  # rank 1 runs its share and leaves the report to rank 0
    assert os.environ["RANK"] == "1"  # and its environment is back
    monkeypatch.setenv("RANK", "0")
    rank["now"] = 0
    assert compare.run_comparison(config) is not None
    jobs = [("circle", 0), ("square", 0), ("circle", 1), ("square", 1)]
    assert sorted(ran) == sorted((c, s, i % 2) for i, (c, s) in enumerate(jobs))  # each job once, by its rank
    assert len(written["records"]) == 4
    assert {r["timing"]["process"] for r in written["records"]} == {"1/2", "2/2"}


def test_a_job_record_of_an_older_format_is_rebuilt_not_reused(fake, tmp_path, monkeypatch):
    """A rerun reuses a finished job's record, unless the record format changed since (RECORD_VERSION)."""
    import coerasing.compare as compare

    fake(FakeProtocol())
    ran: list[str] = []
    real_run_job = runner.run_job

    def counted(config, presets, concept, seed, methods, device, progress=None):
        ran.append(concept)
        return real_run_job(config, presets, concept, seed, methods, device, progress)

    monkeypatch.setattr(runner, "run_job", counted)
    monkeypatch.setattr(compare, "write_results", lambda *args: {"md": tmp_path / "results.md"})
    presets = tmp_path / "presets.yaml"
    presets.write_text(BLOCKS + "rule: {max_usability_drop: 0.05}\n")
    config = CompareConfig(output_dir=str(tmp_path / "out"), presets=str(presets), concepts="circle",
                           methods="esd", seeds="0", skip_attack=True, workers=1)
    compare.run_comparison(config)
    compare.run_comparison(config)
    assert ran == ["circle"]  # the second run read the record
    monkeypatch.setattr(runner, "RECORD_VERSION", runner.RECORD_VERSION + 1)
    compare.run_comparison(config)
    assert ran == ["circle", "circle"]  # a new format: the job ran again


def test_gie_checkpoints_and_their_evaluation_keys_hold_no_training_seed(tmp_path):
    """GIE trains nothing: both seeds get the same artifacts, so their evaluations share one cache entry."""
    from coerasing.methods import get_method

    cache, protocol, presets = Cache(tmp_path), FakeProtocol(), {"gie": {"w": [-4.0, -8.0]}}
    identities = []
    for seed in (0, 1):
        points = get_method("gie").trace(runner.Context(cache, protocol, presets, "circle", seed, "cpu"))
        identities.append([(p.label, p.artifact, runner.artifact_identity(p)) for p in points])
    assert identities[0] == identities[1] and len(identities[0]) == 2


def test_the_budget_is_the_base_models_usability_on_a_larger_set_measured_once(fake, tmp_path):
    """rule.base_usability_images: the rule's floor comes from the base model's usability on that many validation
    images (made once per concept, whatever the seed); a lower base usability there admits a stronger point."""
    from coerasing.compare import report

    class Budgeted(FakeProtocol):
        def __init__(self, base_usability: float) -> None:
            counted = {"rate": 0.5, "k": 1, "n": 2}
            super().__init__(lambda s: {"explicit": counted, "unrelated": counted})
            self.base_usability, self.budget_calls = base_usability, []

        def budget_metrics(self, runtime, concept, images, split="validation"):
            self.budget_calls.append((runtime.strength, images, split))
            rate = self.base_usability if split == "validation" else 0.75
            return {"metrics": {"unrelated": {"rate": rate, "k": 7, "n": images}}}

    presets = {"rule": {"max_usability_drop": 0.05, "base_usability_images": 400}}
    protocol = fake(Budgeted(0.85))  # floor 0.80 instead of 0.85: s3 (unrelated 0.8) now qualifies
    records = [runner.run_job(_config(tmp_path), presets, "circle", seed, ["a"], "cpu") for seed in (0, 1)]
    assert [r["methods"]["a"]["chosen"]["label"] for r in records] == ["s3", "s3"]
    # the base model, once for both seeds; with test images at every checkpoint (the default plan) also on test
    # captions, the floor of the selection agreement's test side
    assert protocol.budget_calls == [(0.0, 400, "validation"), (0.0, 400, "test")]
    assert records[0]["base"]["budget"]["metrics"]["unrelated"]["n"] == 400
    assert records[0]["base"]["test_budget"]["metrics"]["unrelated"]["rate"] == 0.75
    base_row = report.csv_rows(records[:1], protocol.metrics)[0]
    assert (base_row["budget_unrelated_rate"], base_row["budget_unrelated_n"]) == (0.85, 400)
    assert (base_row["test_budget_unrelated_rate"], base_row["test_budget_unrelated_n"]) == (0.75, 400)
    chosen_only = fake(Budgeted(0.85))
    record = runner.run_job(_config(tmp_path / "chosen"), {**presets, "test_evaluation": "chosen"}, "circle", 0,
                            ["a"], "cpu")
    assert chosen_only.budget_calls == [(0.0, 400, "validation")] and "test_budget" not in record["base"]
    fake(Budgeted(0.85))
    plain = runner.run_job(_config(tmp_path / "plain"), {"rule": {"max_usability_drop": 0.05}}, "circle", 0, ["a"],
                           "cpu")
    assert plain["methods"]["a"]["chosen"]["label"] == "s2" and "budget" not in plain["base"]
