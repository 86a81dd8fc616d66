"""The robustness suite in compare.py: text attacks searched once per concept and replayed per point,
the new presets blocks, the report's attack columns, and a relearning probe that never writes into an artifact."""

from __future__ import annotations

import csv
import hashlib
import io

import pytest
import torch

from coerasing.compare import runner
from coerasing.compare.config import CompareConfig
from coerasing.compare.presets import validate_presets
from coerasing.compare.protocols import ToyProtocol
from coerasing.compare.report import ATTACK_METRICS, csv_rows, markdown, summarize
from coerasing.errors import CoErasingError
from coerasing.eval.attacks import asr

from .test_runner import EXPLICIT, FakeMethod, FakeProtocol, FakeRuntime

REQUIRED = {"stage1": {}, "stage2": {}, "references": {}, "evaluation": {}, "attack": {}, "rule": {}}


class TextProtocol(FakeProtocol):
    """A fake protocol with the two text attacks: counts searches (per concept) and replays (per model)."""

    def __init__(self) -> None:
        super().__init__()
        self.presets = {"ring_a_bell": {"population": 4}, "mma": {"steps": 1}}
        self.searches: list[tuple[str, str]] = []
        self.replays: list[tuple[str, float]] = []

    def attack_rows(self, concept):
        return []

    def text_attack_search(self, base, concept, name, out_dir, made_by):
        self.searches.append((concept, name))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "attack_prompts.csv").write_text(f"case,attack_prompt\nc1,{name} string\n", encoding="utf-8")
        return out_dir / "attack_prompts.csv"

    def replay(self, runtime, concept, test, prompts_file, out_dir, made_by):
        self.replays.append((prompts_file.read_text(encoding="utf-8").splitlines()[1], runtime.strength))
        success = runtime.strength < 2
        return asr(["c1", "c2"], {"c2": False}, {"c1": {"success": success}})


@pytest.fixture
def text_world(monkeypatch):
    protocol = TextProtocol()
    monkeypatch.setattr(runner, "make_protocol", lambda config, presets, device: protocol)
    monkeypatch.setattr(runner, "get_method", lambda name: FakeMethod(name, [1, 2, 3, 4]))
    monkeypatch.setattr(runner, "apply_artifact", lambda pipe, path: FakeRuntime(
        0.0 if path is None else float(path.read_text().split()[1])))
    return protocol


def test_text_attacks_search_once_per_concept_and_replay_at_every_point(text_world, tmp_path):
    config = CompareConfig(output_dir=str(tmp_path), attacks="ring_a_bell,mma")
    presets = {"rule": {"max_usability_drop": 0.05}}
    records = [runner.run_job(config, presets, concept, seed, ["a", "b"], "cpu")
               for concept in ("circle", "square") for seed in (0, 1)]
    # one search per concept and attack, over two methods and two training seeds
    assert sorted(text_world.searches) == [("circle", "mma"), ("circle", "ring_a_bell"),
                                           ("square", "mma"), ("square", "ring_a_bell")]
    # replays: the base model and each method's chosen point (s2), per concept and attack; the fake artifacts
    # do not depend on the seed, so the second seed's replays come from the cache
    assert len(text_world.replays) == 2 * 2 * 3
    assert {strength for _, strength in text_world.replays} == {0.0, 2.0}
    for record in records:
        assert "attack" not in record["base"] and "inversion" not in record["base"]  # --attacks left them out
        for entry in (record["base"], *record["methods"].values()):
            for name in ("ring_a_bell", "mma"):
                assert set(entry[name]["cases"]) == {"c1", "c2"}
        assert record["base"]["ring_a_bell"]["cases"] == {"c1": 1, "c2": 0}
        assert record["methods"]["a"]["mma"]["cases"] == {"c1": 0, "c2": 0}


def test_attacks_flag_is_checked_and_skip_attack_skips_all():
    assert CompareConfig(skip_attack=True).attack_names() == ()
    assert CompareConfig(attacks="p4d, ring_a_bell").attack_names() == ("ring_a_bell", "p4d")
    assert "relearn" in CompareConfig().attack_names()
    with pytest.raises(CoErasingError, match="unknown attack"):
        CompareConfig(attacks="unlearndiff,gcg").attack_names()


def test_robustness_blocks_are_typed_from_the_evaluate_flags():
    presets = validate_presets({**REQUIRED, "ring_a_bell": {"population": "20", "eta": 2},
                                "mma": {"topk": 8, "banned": "circle,coin"}, "p4d": {"variant": "k"},
                                "relearn": {"steps": "0,5", "lr": 1e-4}}, "x.yaml", toy=True)
    assert presets["ring_a_bell"] == {"population": 20, "eta": 2.0}
    assert presets["p4d"] == {"variant": "k"} and presets["relearn"]["steps"] == "0,5"
    bad = {
        "ring_a_bell": ({"population": 1}, "ring_a_bell.population"),  # evaluate.py's --rab_population min 2
        "mma": ({"top_k": 8}, "Keys allowed in"),
        "p4d": ({"variant": "x"}, "p4d.variant"),
        "relearn": ({"steps": "0,a"}, "relearn.steps"),
    }
    for name, (block, message) in bad.items():
        with pytest.raises(CoErasingError, match=message.replace(".", r"\.")):
            validate_presets({**REQUIRED, name: block}, "x.yaml", toy=True)
    with pytest.raises(CoErasingError, match="unknown key 'pairs'"):  # the comparison sets the concept's pairs
        validate_presets({**REQUIRED, "ring_a_bell": {"pairs": "p.csv"}}, "x.yaml", toy=True)
    with pytest.raises(CoErasingError, match=r"quick\.relearn\.steps"):
        validate_presets({**REQUIRED, "quick": {"relearn": {"steps": "-1"}}}, "x.yaml", toy=True)
    shipped = CompareConfig().load_presets()
    quick = CompareConfig(quick=True).load_presets()
    for name in ("ring_a_bell", "mma", "p4d", "relearn"):
        assert shipped[name] and quick[name] != shipped[name]


def _asr(pre: int, broken: int, n: int) -> dict:
    cases = {f"c{i}": int(i < pre + broken) for i in range(n)}
    return {"n": n, "pre_success": pre, "attack_success": broken, "pre_asr": pre / n, "asr": (pre + broken) / n,
            "cases": cases}


def _rate(k: int, n: int) -> dict:
    return {"rate": k / n, "k": k, "n": n, "low": 0.0, "high": 1.0}


def test_report_attack_columns_are_recomputed_from_the_records():
    records = []
    for seed, broken in enumerate((1, 3)):
        attacks = {"attack": _asr(1, broken, 4), "ring_a_bell": _asr(1, broken - 1, 4), "p4d": _asr(1, 0, 4),
                   "relearn": {**_rate(broken, 4), "steps": 10, "cases": {}, "curve": []}}
        base = {"validation": {"metrics": {"explicit": _rate(4, 4)}},
                "test": {"metrics": {"explicit": _rate(4, 4)}, "entry": "cache/evals/base.json"},
                "attack": _asr(4, 0, 4), "ring_a_bell": _asr(4, 0, 4), "relearn": _rate(4, 4)}
        point = {"label": "it1", "strength": 1.0, "validation": {"metrics": {"explicit": _rate(1, 4)}},
                 "test": {"metrics": {"explicit": _rate(1, 4)}, "entry": f"cache/evals/a{seed}.json"}}
        records.append({"concept": "circle", "seed": seed, "base": base,
                        "methods": {"a": {"points": [point], "chosen": {"label": "it1", "qualified": True},
                                          **attacks}}})
    summary = summarize(records, ["a"], [EXPLICIT])
    a, base = summary["per_concept"]["circle"]["a"], summary["per_concept"]["circle"]["base"]
    assert (a["ring_a_bell_pooled"]["k"], a["ring_a_bell_pooled"]["n"]) == (1 + 0 + 1 + 2, 8)
    assert abs(a["ring_a_bell"]["mean"] - (1 / 4 + 3 / 4) / 2) < 1e-12
    assert (a["relearn_pooled"]["k"], a["relearn_pooled"]["n"]) == (4, 8)
    assert (a["asr_pooled"]["k"], a["pre_asr_pooled"]["k"]) == (1 + 1 + 1 + 3, 2)
    assert (base["ring_a_bell_pooled"]["k"], base["ring_a_bell_pooled"]["n"]) == (4, 4)  # one evaluation, once
    assert "mma" not in a  # no result, no column value
    rows = csv_rows(records, [EXPLICIT])
    chosen = [r for r in rows if r["method"] == "a"]
    assert [(r["attack_ring_a_bell_k"], r["attack_ring_a_bell_n"]) for r in chosen] == [(1, 4), (3, 4)]
    assert [r["attack_relearn_rate"] for r in chosen] == [0.25, 0.75] and chosen[0]["attack_mma_rate"] is None
    text = markdown(summary, ["a"], "# t", [EXPLICIT])
    robustness = text.split("## Robustness")[1]
    heading = next(line for line in robustness.splitlines() if line.startswith("| method"))
    expected = [m.heading for m in ATTACK_METRICS if m.name not in ("mma", "inversion")]  # no results, no column
    assert expected == [cell.strip() for cell in heading.split("|")[2:-1]]
    pooled, per_concept = robustness.split("| a |")[1:3]
    assert "| base (sanity) |" in robustness and "50.0 ± 35.4 (4/8," in per_concept
    assert "| 50.0 (4/8, 21.5–78.5) |" in pooled.splitlines()[0]  # all concepts pooled: RAB's 1/4 + 3/4
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    assert "attack_p4d_k" in buffer.getvalue().splitlines()[0]


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} | {"": sorted(p.name for p in folder.iterdir())}


def test_relearn_in_compare_never_writes_into_the_artifact_folder(tmp_path):
    """The toy world's probe at an 'erased' checkpoint (the toy UNet, perturbed): its folder is unchanged byte
    for byte, the pipeline's weights are back afterwards, and the result carries the curve and per-case hits."""
    from coerasing.compare.cache import Cache
    from coerasing.formats import save_unet
    from coerasing.methods import apply_artifact

    presets = {**REQUIRED, "references": {"num_images": 2, "batch_size": 2, "num_inference_steps": 2},
               "evaluation": {"num_inference_steps": 2, "explicit_images": 2},
               "attack": {"rows": 2}, "relearn": {"steps": "0,1,2", "num_images": 2, "batch_size": 1, "lr": 1e-3}}
    protocol = ToyProtocol(presets)
    cache = Cache(tmp_path / "out")
    pipe = protocol.pipeline()
    start = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.001)
    artifact = tmp_path / "artifact" / "unet.pth"
    artifact.parent.mkdir()
    save_unet(pipe.unet, artifact)
    pipe.unet.load_state_dict(start)
    before = _snapshot(artifact.parent)
    runtime = apply_artifact(pipe, artifact)
    erased = {k: v.clone() for k, v in runtime.pipe.unet.state_dict().items()}
    result = protocol.relearn(runtime, "circle", protocol.references("circle", cache), tmp_path / "probe",
                              {"key": "x"})
    assert all(torch.equal(v, erased[k]) for k, v in runtime.pipe.unet.state_dict().items())
    runtime.close()
    assert _snapshot(artifact.parent) == before
    assert [p["steps"] for p in result["curve"]] == [0, 1, 2] and result["steps"] == 1 and result["n"] == 2
    assert set(result["cases"]) == {row.case for row in protocol.attack_rows("circle")}
