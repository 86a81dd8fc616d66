"""``compare.py --presets FILE.yaml``, typed like the flags.

Every block of the presets file is declared here once, as a schema of its keys: a method's block
takes that method's own config flags (the ones ``erase_pipeline.py --method NAME`` has), with
their types, ranges and choices; the other blocks (``references``, ``evaluation``, ``attack``,
``rule``) are declared from the dataclasses they fill, and the robustness attacks' (``ring_a_bell``,
``mma``, ``p4d``, ``relearn``) from their ``evaluate.py`` flags (:data:`ROBUSTNESS_FLAGS`).
:func:`validate_presets` checks a whole file before any work starts and returns it with every value
converted by the flags' own conversion (:func:`coerasing.flags.convert`), so

- an unknown block or key is an error that names it, its block and the keys allowed there;
- a missing block, or a block that is not a mapping, is an error;
- a value of the wrong type or out of range names the block and the key (``stage1.lr``);
- keys that ``compare.py`` sets itself (the base model, the seed, the output folder) are refused;
- ``candidates``: each method's tuning candidates (docs/comparison.md §2), each a mapping of overrides
  of the blocks that method's ``trace`` reads (:attr:`coerasing.methods.base.Method.candidate_blocks`),
  checked like those blocks; candidate 0 is ``{}`` (the base presets). :func:`check_candidates` then
  refuses a run whose tuned methods do not all have the same number of candidates.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Sequence
from dataclasses import Field, dataclass, fields
from typing import Any

from ..config import EraseConfig, GenerateConfig
from ..errors import CoErasingError
from ..eval.attack import SCHEDULES, SPACES, AttackSettings
from ..eval.config import EvalConfig
from ..eval.relearn import parse_steps
from ..flags import base_type, check_value, convert, flag_fields, flag_types
from ..methods import get_method, method_names

#: Keys the comparison fills in itself for every cell; a preset may not set them.
RESERVED = frozenset({
    "save_path", "output_dir", "logging_dir", "ckpt_path", "model", "seed", "device", "devices", "resume",
    "overwrite", "image", "unet_ckpt_path", "ip_adapter", "image_encoder_path", "modality", "label",
})
#: Keys of a method's block that take a list: each value is one point of its curve.
LIST_KEYS: dict[str, frozenset[str]] = {"gie": frozenset({"w"})}
#: Blocks every presets file has (use ``name: {}`` for all defaults).
REQUIRED = ("stage1", "stage2", "references", "evaluation", "attack", "rule")
#: The presets' ``test_evaluation``: test images at every checkpoint, or only at each method's chosen one.
TEST_EVALUATIONS = ("all", "chosen")
#: Top-level keys that are single values, not blocks (with their allowed values, where fixed).
SCALARS = ("concepts", "methods", "seeds", "test_evaluation")
SCALAR_CHOICES: dict[str, tuple[str, ...]] = {"test_evaluation": TEST_EVALUATIONS}


@dataclass(frozen=True)
class Key:
    """One key of a presets block: its type, and its range (from a flag's declaration or given here)."""

    kind: type
    optional: bool = False
    declared: Field | None = None
    low: float | None = None
    high: float | None = None
    exclusive_low: bool = False
    choices: tuple[Any, ...] | None = None
    many: bool = False
    hint: str = ""

    def check(self, where: str, value: Any) -> Any:
        """``value`` converted and range-checked; errors name ``where`` (``block.key``)."""
        if self.many:
            items = value if isinstance(value, (list, tuple)) else None
            if not items:
                raise CoErasingError(f"{where} must be a non-empty list of values, e.g. [-3.0, -4.0]; got {value!r}.")
            return [Key(self.kind, False, self.declared, self.low, self.high, self.exclusive_low, self.choices,
                        hint=self.hint).check(f"{where}[{i}]", item) for i, item in enumerate(items)]
        converted = convert(where, self.kind, self.optional, value, where=where)
        if self.declared is not None:
            check_value(self.declared, converted, where)
        if converted is None or isinstance(converted, bool):
            return converted
        if self.choices is not None and converted not in self.choices:
            raise CoErasingError(f"{where} {converted!r} is not known; choose one of: "
                                 f"{', '.join(map(str, self.choices))}.")
        if isinstance(converted, (int, float)):
            low, high = self.low, self.high
            if low is not None and (converted < low or (self.exclusive_low and converted == low)):
                bound = f"greater than {low}" if self.exclusive_low else f"at least {low}"
                raise CoErasingError(f"{where} must be {bound}, got {converted}.{self.hint}")
            if high is not None and converted > high:
                raise CoErasingError(f"{where} must be at most {high}, got {converted}.{self.hint}")
        return converted


Schema = dict[str, Key]


def flag_schema(cls: type, reserved: frozenset[str] = RESERVED, lists: frozenset[str] = frozenset()) -> Schema:
    """The keys of a block that fills the config dataclass ``cls``: its flags less ``reserved``."""
    types_ = flag_types(cls)
    schema = {}
    for f in flag_fields(cls):
        if f.name in reserved or f.metadata["positional"]:
            continue
        kind, optional = types_[f.name]
        schema[f.name] = Key(kind, optional, f, many=f.name in lists)
    return schema


def dataclass_schema(cls: type, ranges: dict[str, tuple[float | None, float | None]],
                     skip: tuple[str, ...] = (), choices: dict[str, tuple[Any, ...]] | None = None) -> Schema:
    """The keys of a plain settings dataclass; numbers are at least 1 (integers) or 0 unless ``ranges`` says."""
    hints = typing.get_type_hints(cls)
    schema = {}
    for f in fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        kind, optional = base_type(hints[f.name])
        if kind not in (bool, int, float, str):
            continue
        default_low = 1 if kind is int else 0
        low, high = ranges.get(f.name, (default_low, None))
        schema[f.name] = Key(kind, optional or f.default is None, low=low, high=high,
                             choices=(choices or {}).get(f.name))
    return schema


def _attack_schema() -> Schema:

    schema = dataclass_schema(AttackSettings, {"lr": (0, None), "weight_decay": (0, None), "seed": (0, None)},
                              skip=("resample_noise",), choices={"space": SPACES, "schedule": SCHEDULES})
    schema["lr"] = Key(float, low=0, exclusive_low=True)
    schema.update({
        "rows": Key(int, low=1, hint=" (explicit test prompts attacked per cell)"),
        "inversion_steps": Key(int, low=0, hint=" (0 turns the concept-inversion attack off)"),
        "inversion_lr": Key(float, low=0, exclusive_low=True),
        "inversion_images": Key(int, low=1),
        "inversion_references": Key(int, low=1, hint=" (unseen images of the concept concept inversion learns from)"),
    })
    return schema


#: The robustness attacks' blocks: each is declared from its ``evaluate.py`` flags (prefix stripped, e.g.
#: ``--rab_population`` → ``ring_a_bell.population``; ``seed`` is ``--attack_seed``), less the keys the
#: comparison fills in itself (Ring-A-Bell's pairs: the concept's shipped ones; relearn's images: the
#: comparison's reference images, captioned by their prompts).
ROBUSTNESS_FLAGS: dict[str, tuple[str, frozenset[str]]] = {
    "ring_a_bell": ("rab_", frozenset({"pairs", "concept_vector"})),
    "mma": ("mma_", frozenset()),
    "p4d": ("p4d_", frozenset()),
    "relearn": ("relearn_", frozenset({"images", "caption"})),
}


def _robustness_schema(name: str) -> Schema:
    prefix, skip = ROBUSTNESS_FLAGS[name]
    flags = flag_schema(EvalConfig, frozenset())
    schema = {key[len(prefix):]: value for key, value in flags.items()
              if key.startswith(prefix) and key[len(prefix):] not in skip}
    schema["seed"] = flags["attack_seed"]
    return schema


def _evaluation_schema(toy: bool) -> Schema:
    if toy:
        from ..choices import SCHEDULERS
        from ..toy.protocol import ToyEvalSettings

        return dataclass_schema(ToyEvalSettings, {"guidance_scale": (0, 100), "first_timestep": (2, 999)},
                                choices={"scheduler": SCHEDULERS})

    keys = ("num_inference_steps", "guidance_scale", "height", "width", "batch_size", "scheduler", "threshold",
            "target", "top_k", "detector")
    schema = {name: key for name, key in flag_schema(EvalConfig, frozenset()).items() if name in keys}
    schema["coco_images"] = Key(int, low=1, hint=" (COCO prompts of the CLIP usability score per split)")
    return schema


def block_schemas(toy: bool) -> dict[str, Schema]:
    """Every block's schema: the comparison's own blocks and one per method with its own config."""

    schemas: dict[str, Schema] = {
        "stage1": flag_schema(EraseConfig),
        "stage2": flag_schema(EraseConfig),
        "references": flag_schema(GenerateConfig),
        "evaluation": _evaluation_schema(toy),
        "attack": _attack_schema(),
        "preserve": {"weight": Key(float, low=0, high=1e4, hint=" (λ of coerasing-preserve's stage 2)"),
                     "prompts": Key(str)},
        **{name: _robustness_schema(name) for name in ROBUSTNESS_FLAGS},
        "rule": {"max_usability_drop": Key(float, low=0, high=0.99, hint=" It is a fraction of the base model's "
                                           "usability score: 5 points is 0.05."),
                 "base_usability_images": Key(int, low=0, high=100_000, hint=" The base model's usability for the "
                                              "budget is measured once on this many validation images (0: the "
                                              "validation set's own).")},
    }
    for name in method_names():
        cls = get_method(name).config_class
        if cls is not None and cls is not EraseConfig:
            schemas[name] = flag_schema(cls, lists=LIST_KEYS.get(name, frozenset()))
    return schemas


def _allowed(names: Any) -> str:
    return ", ".join(sorted(names)) or "(none)"


def _check_block(where: str, block: Any, schema: Schema) -> dict[str, Any]:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise CoErasingError(f"{where} must be a mapping of keys to values (use '{{}}' for all defaults), got "
                             f"{block!r}.")
    out = {}
    for key, value in block.items():
        name = str(key)
        if name in RESERVED and name not in schema:
            raise CoErasingError(f"{where}.{name} is set by compare.py itself for every cell (the base model, the "
                                 "seed, the devices and the output folders come from its flags); remove it.")
        if name not in schema:
            raise CoErasingError(f"{where} has an unknown key {name!r}. Keys allowed in {where}: "
                                 f"{_allowed(schema)}.")
        out[name] = schema[name].check(f"{where}.{name}", value)
    if where.endswith("relearn") and "steps" in out:
        try:
            parse_steps(str(out["steps"]))
        except CoErasingError as exc:
            raise CoErasingError(f"{where}.steps: {exc}") from None
    return out


def _check_scalar(where: str, name: str, value: Any) -> Any:
    if name == "seeds" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if name in SCALAR_CHOICES:
        if value not in SCALAR_CHOICES[name]:
            raise CoErasingError(f"{where}.{name} {value!r} is not known; choose one of: "
                                 f"{', '.join(SCALAR_CHOICES[name])}.")
        return value
    if not isinstance(value, str):
        raise CoErasingError(f"{where}.{name} must be a comma-separated string, e.g. 'circle,star' or '0,1,2'; got "
                             f"{value!r}.")
    return value


def _check_labels(where: str, labels: Any) -> dict[str, str]:
    if not isinstance(labels, dict) or not all(isinstance(v, str) and v.strip() for v in labels.values()):
        raise CoErasingError(f"{where}.labels must map concept names to their words, e.g. 'vangogh: Van Gogh'.")
    return {str(k): v for k, v in labels.items()}


def validate_presets(data: Any, source: str, toy: bool) -> dict[str, Any]:
    """The presets file ``data`` (parsed YAML from ``source``), checked and converted; ``quick`` not applied."""
    where = f"--presets {source}:"
    if not isinstance(data, dict):
        raise CoErasingError(f"{where} the file must be a mapping of settings blocks ({', '.join(REQUIRED)}, …).")
    schemas = block_schemas(toy)
    missing = [name for name in REQUIRED if name not in data]
    if missing:
        raise CoErasingError(f"{where} has no {', '.join(repr(m) for m in missing)} block; every presets file has "
                             f"{', '.join(REQUIRED)} (write 'name: {{}}' to take the defaults).")
    allowed = {*schemas, *SCALARS, "labels", "quick", "candidates"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key)
        if name not in allowed:
            raise CoErasingError(f"{where} has an unknown block {name!r}. Blocks allowed: {_allowed(allowed)}.")
        if name in SCALARS:
            out[name] = _check_scalar(where, name, value)
        elif name == "labels":
            out[name] = _check_labels(where, value)
        elif name == "quick":
            out[name] = _check_quick(where, value, schemas)
        elif name == "candidates":
            out[name] = _check_candidates(where, value, schemas)
        else:
            out[name] = _check_block(f"{where} {name}", value, schemas[name])
    return out


def _check_quick(where: str, quick: Any, schemas: dict[str, Schema]) -> dict[str, Any]:
    if quick is None:
        return {}
    if not isinstance(quick, dict):
        raise CoErasingError(f"{where} quick must be a mapping of blocks that --quick overrides, got {quick!r}.")
    allowed = {*schemas, *SCALARS}
    out: dict[str, Any] = {}
    for key, value in quick.items():
        name = str(key)
        if name not in allowed:
            raise CoErasingError(f"{where} quick has an unknown block {name!r}. Blocks allowed in quick: "
                                 f"{_allowed(allowed)}.")
        out[name] = (_check_scalar(f"{where} quick", name, value) if name in SCALARS
                     else _check_block(f"{where} quick.{name}", value, schemas[name]))
    return out


def apply_quick(presets: dict[str, Any], quick: bool) -> dict[str, Any]:
    """``presets`` with its ``quick`` block merged in (when ``quick``) and removed; a deep copy.

    ``--quick`` also drops the ``candidates`` block: a smoke run trains each method once (its base presets)."""
    presets = copy.deepcopy(presets)
    overrides = presets.pop("quick", {}) or {}
    if quick:
        presets.pop("candidates", None)
        for key, value in overrides.items():
            presets[key] = {**(presets.get(key) or {}), **value} if isinstance(value, dict) else value
    return presets


# ----------------------------------------------------------------------------------------------
# Tuning candidates: the same budget for every method, declared before the run

#: The single-value key of a candidate: the stage-1 checkpoint (its iteration) that stage 2 starts from.
STAGE2_START = "stage2_start"


def _check_candidates(where: str, value: Any, schemas: dict[str, Schema]) -> dict[str, list[dict[str, Any]]]:
    """The ``candidates`` block: method → list of candidates, each a mapping of overrides of the blocks the
    method's ``trace`` reads; candidate 0 must be ``{}`` (the base presets), and no two candidates are equal."""
    if not isinstance(value, dict):
        raise CoErasingError(f"{where} candidates must map method names to lists of candidate settings, e.g. "
                             f"'esd: [{{}}, {{stage1: {{lr: 5.0e-5}}}}]'; got {value!r}.")
    out: dict[str, list[dict[str, Any]]] = {}
    for key, items in value.items():
        method = str(key)
        if method not in method_names():
            raise CoErasingError(f"{where} candidates.{method}: unknown method; known: {_allowed(method_names())}.")
        cls = get_method(method)
        blocks = tuple(getattr(cls, "candidate_blocks", ()))
        if getattr(cls, "tuned_by_curve", False) or not blocks:
            why = ("its curve is a grid of fixed settings, which is its tuning budget" if
                   getattr(cls, "tuned_by_curve", False) else "its trace declares no blocks a candidate may change")
            raise CoErasingError(f"{where} candidates.{method}: {method} takes no tuning candidates ({why}); remove "
                                 "the entry.")
        if not isinstance(items, list) or not items:
            raise CoErasingError(f"{where} candidates.{method} must be a non-empty list of candidates, the first "
                                 f"'{{}}' (the base presets); got {items!r}.")
        checked = []
        for index, item in enumerate(items):
            here = f"candidates.{method}[{index}]"
            if item is None:
                item = {}
            if not isinstance(item, dict):
                raise CoErasingError(f"{where} {here} must be a mapping of block overrides, e.g. "
                                     f"'{{{blocks[0]}: {{...}}}}'; got {item!r}.")
            if index == 0 and item:
                raise CoErasingError(f"{where} {here} must be {{}}: candidate 0 is the base presets themselves "
                                     "(so a run without candidates chooses among the same checkpoints); put the "
                                     "overrides in candidates 1, 2, ….")
            candidate: dict[str, Any] = {}
            for name, block in item.items():
                name = str(name)
                if name not in blocks:
                    raise CoErasingError(f"{where} {here} has an unknown block {name!r}; a candidate of {method} "
                                         f"may change: {_allowed(blocks)}.")
                if name == STAGE2_START:
                    candidate[name] = Key(int, low=1, hint=" (an iteration of stage 1 with a checkpoint)").check(
                        f"{where} {here}.{name}", block)
                elif not isinstance(block, dict) or not block:
                    raise CoErasingError(f"{where} {here}.{name} must be a non-empty mapping of keys to values, "
                                         f"got {block!r}.")
                else:
                    candidate[name] = _check_block(f"{where} {here}.{name}", block, schemas[name])
            if candidate in checked:
                raise CoErasingError(f"{where} {here} repeats candidate {checked.index(candidate)} of {method}; "
                                     "every candidate must differ (a repeat only inflates the count).")
            checked.append(candidate)
        out[method] = checked
    return out


def declared_candidates(presets: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """``method``'s declared candidates: the presets' list, else one (``{}``, the base presets)."""
    return copy.deepcopy((presets.get("candidates") or {}).get(method) or [{}])


def candidate_presets(presets: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """One presets mapping per candidate of ``method``: the base presets with the candidate's block overrides
    merged in and its single values (``stage2_start``) and index in a ``candidate`` block."""
    out = []
    for index, candidate in enumerate(declared_candidates(presets, method)):
        merged = copy.deepcopy(presets)
        merged.pop("candidates", None)
        values: dict[str, Any] = {"index": index}
        for name, block in candidate.items():
            if isinstance(block, dict):
                merged[name] = {**(merged.get(name) or {}), **block}
            else:
                values[name] = block
        merged["candidate"] = values
        out.append(merged)
    return out


def _stage1_saves(presets: dict[str, Any]) -> list[int]:
    """Stage 1's save points under ``presets`` (its ``iterations`` and ``save_iter``, else their defaults)."""
    defaults = {f.name: f.default for f in fields(EraseConfig)}
    stage1 = presets.get("stage1") or {}
    length = int(stage1.get("iterations", defaults["iterations"]))
    every = int(stage1.get("save_iter", defaults["save_iter"]))
    return sorted({*range(every, length + 1, every), length})


def check_candidates(presets: dict[str, Any], methods: Sequence[str],
                     lookup: Callable[[str], Any] = get_method) -> dict[str, int]:
    """Every tuned method of the run (all but those whose curve is their grid, such as GIE) has the same number of
    candidates, and every ``stage2_start`` is one of stage 1's save points; returns the counts. Called before any
    training or evaluation (``lookup``: the method registry)."""
    counts: dict[str, int] = {}
    for name in methods:
        if getattr(lookup(name), "tuned_by_curve", False):
            continue
        counts[name] = len(declared_candidates(presets, name))
        for index, merged in enumerate(candidate_presets(presets, name)):
            start = merged["candidate"].get(STAGE2_START)
            saves = _stage1_saves(merged)
            if start is not None and start not in saves:
                raise CoErasingError(f"the presets' candidates.{name}[{index}].{STAGE2_START} is {start}, which is "
                                     f"not a checkpoint of stage 1 (it saves at iterations "
                                     f"{', '.join(map(str, saves))}: every stage1.save_iter and its end); choose "
                                     "one of them.")
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise CoErasingError(f"the methods of this run do not have the same tuning budget (candidates per method: "
                             f"{listing}). Every method that is trained must declare the same number of candidates in "
                             "the presets' 'candidates' block (a method without an entry has one: its base presets), "
                             "so that no method is tuned more than another; add or remove candidates, or leave the "
                             "unequal methods out of --methods.")
    return counts
