"""The toy world: procedurally rendered objects, their captions, the held-out split and evaluation prompts.

An image shows one object (a shape in a colour) on a plain background. Captions name the shape and/or
colour through templates ("a photo of a red circle"), or use an *implicit name*: a word that in the
training captions always means one shape (and possibly one colour) without naming it ("an apple" is
always a red circle, "a ball" always a circle). Erasing "circle" by its text alone leaves such words
working; that is what the toy world is for (Co-Erasing, arXiv 2505.11131, §1).

Held-out split (deterministic, no randomness involved):

- Caption strings. Every caption comes from a template of one *kind* (``full``: colour + shape,
  ``shape``, ``colour``, ``implicit``, ``implicit_colour``: colour + colour-free implicit name). For
  every label combination one template of the kind is held out, chosen by rotation (see
  :func:`heldout_template`): e.g. for (red, circle) the full template 3 is held out, so
  ``"a drawing of a red circle"`` is never a training caption although every template and every
  (shape, colour) pair is seen in training. :func:`caption` never returns a held-out caption for
  ``split="train"``; :func:`explicit_prompts` and :func:`implicit_prompts` only return held-out ones.
- Renders. The builder's training scenes come from ``np.random.default_rng([seed, step])`` streams;
  evaluation scenes from :func:`heldout_scenes`, which draws from ``default_rng(HELDOUT_SEED_OFFSET +
  seed)``. Scenes are continuous, so this makes them distinct draws, not a different kind of scene.

The renderer draws at 4× the resolution and box-filters down (anti-aliasing); 32×32 is the toy stack's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

#: Shapes the renderer can draw (all erasable: each has ≥ 2 implicit names).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: Object colours, name → RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 190),
}

#: Backgrounds, name → RGB (no object colour is close to a background).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}

#: Implicit names: noun phrase → (shape, colour or ``None`` for "any colour").
IMPLICIT_NAMES: dict[str, tuple[str, str | None]] = {
    "apple": ("circle", "red"),
    "coin": ("circle", "yellow"),
    "ball": ("circle", None),
    "tile": ("square", None),
    "box": ("square", None),
    "pyramid": ("triangle", None),
    "tent": ("triangle", None),
    "starfish": ("star", None),
    "sheriff badge": ("star", "yellow"),
    "plus sign": ("cross", None),
    "hospital sign": ("cross", "red"),
}

#: Caption templates by kind. Fields: ``{c}`` colour, ``{s}`` shape, ``{b}`` background, ``{n}`` implicit
#: name with its article, ``{nn}`` implicit name without article.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "full": (
        "a photo of a {c} {s}",
        "a {c} {s}",
        "a picture of a {c} {s}",
        "a drawing of a {c} {s}",
        "a {c} {s} on a {b} background",
        "an image of a {c} {s}",
    ),
    "shape": (
        "a {s}",
        "a photo of a {s}",
        "a {s} on a {b} background",
        "a picture of a {s}",
        "a drawing of a {s}",
    ),
    "colour": (
        "a {c} object",
        "a photo of a {c} object",
        "something {c} on a {b} background",
    ),
    "implicit": (
        "{n}",
        "a photo of {n}",
        "a picture of {n}",
        "{n} on a {b} background",
        "a drawing of {n}",
    ),
    "implicit_colour": (
        "a {c} {nn}",
        "a photo of a {c} {nn}",
        "a picture of a {c} {nn}",
    ),
}

#: Probability of each caption kind when captioning a training scene (renormalised over the kinds
#: that apply to the scene).
KIND_WEIGHTS: dict[str, float] = {"full": 0.45, "shape": 0.15, "colour": 0.08, "implicit": 0.22, "implicit_colour": 0.1}

#: Seeds of :func:`heldout_scenes` start here, far from any training seed.
HELDOUT_SEED_OFFSET = 10_000_019

SIZE_RANGE = (0.28, 0.42)  # circumradius as a fraction of the image side
MARGIN = 0.04  # minimum gap between the object's circumcircle and the image border (fraction)


def article(word: str) -> str:
    """``"an"`` before a vowel sound (by first letter), else ``"a"``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def with_article(name: str) -> str:
    """``"apple"`` → ``"an apple"``."""
    return f"{article(name)} {name}"


@dataclass(frozen=True)
class Scene:
    """One object: shape, colour and background names; circumradius and centre as image fractions."""

    shape: str
    colour: str
    background: str
    size: float
    cx: float
    cy: float

    def to_dict(self) -> dict[str, str | float]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices (pixels, y down) of a polygonal shape with circumradius ``r`` centred at ``(cx, cy)``."""
    if shape == "square":
        h = r / math.sqrt(2.0) * 1.1  # half side; corners slightly outside the circumcircle's 0.78 r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Equilateral, pointing up, enlarged so its bounding box half-width is ~r; the bounding box (not
        # the centroid) is centred on (cx, cy).
        half_h = 1.15 * r * 1.5 / 2.0
        half_w = 1.15 * r * math.sqrt(3.0) / 2.0
        return [(cx, cy - half_h), (cx + half_w, cy + half_h), (cx - half_w, cy + half_h)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.5 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, w = r * 0.95, r * 0.34  # arm half-length, arm half-width
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
            (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
            (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_mask(scene: Scene, resolution: int, supersample: int = 4) -> np.ndarray:
    """The object's coverage in ``[0, 1]``, ``[resolution, resolution]`` float32 (box-filtered supersampling)."""
    big = resolution * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = scene.cx * big, scene.cy * big, scene.size * big
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=255)
    mask = np.asarray(canvas, dtype=np.float32) / 255.0
    return mask.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))


def render_array(scene: Scene, resolution: int = 32) -> np.ndarray:
    """``[resolution, resolution, 3]`` uint8 RGB render of ``scene`` (anti-aliased)."""
    mask = render_mask(scene, resolution)[..., None]
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    image = bg * (1.0 - mask) + fg * mask
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(scene: Scene, resolution: int = 32) -> Image.Image:
    """Render ``scene`` as an RGB PIL image of ``resolution``² pixels."""
    return Image.fromarray(render_array(scene, resolution), mode="RGB")


def render_batch(scenes: Sequence[Scene], resolution: int = 32) -> np.ndarray:
    """``[N, resolution, resolution, 3]`` uint8 renders."""
    out = np.empty((len(scenes), resolution, resolution, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render_array(scene, resolution)
    return out


# ----------------------------------------------------------------------------------------------
# Sampling scenes


def sample_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
) -> Scene:
    """A uniformly random scene; ``shape``/``colour``/``background`` fix those attributes."""
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colour or list(COLOURS)[int(rng.integers(len(COLOURS)))]
    background = background or list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size = float(rng.uniform(*SIZE_RANGE))
    low, high = size + MARGIN, 1.0 - size - MARGIN
    cx, cy = (float(v) for v in rng.uniform(low, high, size=2))
    return Scene(shape, colour, background, size, cx, cy)


def heldout_scenes(n: int, seed: int = 0, **fixed: str | None) -> list[Scene]:
    """``n`` evaluation scenes from a seed space no training stream uses (``fixed`` as in :func:`sample_scene`)."""
    rng = np.random.default_rng(HELDOUT_SEED_OFFSET + seed)
    return [sample_scene(rng, **fixed) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Captions and the held-out split


@dataclass(frozen=True)
class CaptionSpec:
    """A caption before formatting: its kind, template index and the labels it names."""

    kind: str
    template: int
    shape: str | None = None
    colour: str | None = None
    background: str | None = None
    name: str | None = None

    def text(self) -> str:
        """The caption string."""
        fields = {
            "c": self.colour or "",
            "s": self.shape or "",
            "b": self.background or "",
            "n": with_article(self.name) if self.name else "",
            "nn": self.name or "",
        }
        return TEMPLATES[self.kind][self.template].format(**fields)


def _rotation_key(kind: str, shape: str | None, colour: str | None, background: str | None, name: str | None) -> int:
    """Index of the label combination a kind's rotation runs over (see :func:`heldout_template`)."""
    colours, shapes, names = list(COLOURS), list(SHAPES), list(IMPLICIT_NAMES)
    if kind == "full":
        return shapes.index(shape) * len(colours) + colours.index(colour)
    if kind == "shape":
        return shapes.index(shape)
    if kind == "colour":
        return colours.index(colour)
    if kind == "implicit":
        return names.index(name)
    if kind == "implicit_colour":
        return names.index(name) * len(colours) + colours.index(colour)
    raise ValueError(f"unknown caption kind {kind!r}")


def heldout_template(
    kind: str,
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    name: str | None = None,
) -> int:
    """The one template of ``kind`` held out for this label combination: ``(key * 7 + 3) mod #templates``.

    The stride 7 (coprime to every template count) spreads the held-out template over all templates,
    so each template is held out for some combinations and seen in training for the others.
    """
    key = _rotation_key(kind, shape, colour, background, name)
    return (key * 7 + 3) % len(TEMPLATES[kind])


def is_heldout(spec: CaptionSpec) -> bool:
    """Whether ``spec`` belongs to the held-out split (never used for training)."""
    return spec.template == heldout_template(spec.kind, spec.shape, spec.colour, spec.background, spec.name)


def caption_kinds(scene: Scene) -> list[str]:
    """The caption kinds that can describe ``scene`` (implicit kinds only if a name fits it)."""
    kinds = ["full", "shape", "colour"]
    if any(_name_fits(name, scene) for name in IMPLICIT_NAMES):
        kinds.append("implicit")
    if any(IMPLICIT_NAMES[name] == (scene.shape, None) for name in IMPLICIT_NAMES):
        kinds.append("implicit_colour")
    return kinds


def _name_fits(name: str, scene: Scene) -> bool:
    shape, colour = IMPLICIT_NAMES[name]
    return shape == scene.shape and colour in (None, scene.colour)


def caption_specs(scene: Scene, kind: str, split: str = "train") -> list[CaptionSpec]:
    """Every caption of ``kind`` true of ``scene`` in ``split`` (``"train"``, ``"heldout"`` or ``"all"``)."""
    if kind in ("implicit", "implicit_colour"):
        names = [n for n in IMPLICIT_NAMES if _name_fits(n, scene)]
        if kind == "implicit_colour":
            names = [n for n in names if IMPLICIT_NAMES[n][1] is None]
    else:
        names = [None]
    specs = []
    for name in names:
        for index, template in enumerate(TEMPLATES[kind]):
            spec = CaptionSpec(
                kind=kind,
                template=index,
                shape=scene.shape if ("{s}" in template or name) else None,
                colour=scene.colour if "{c}" in template else None,
                background=scene.background if "{b}" in template else None,
                name=name,
            )
            if split == "all" or (split == "heldout") == is_heldout(spec):
                specs.append(spec)
    return specs


def caption(scene: Scene, rng: np.random.Generator, split: str = "train", kind: str | None = None) -> str:
    """A random caption true of ``scene``: a kind by :data:`KIND_WEIGHTS`, then a template of ``split``."""
    if kind is None:
        kinds = caption_kinds(scene)
        weights = np.asarray([KIND_WEIGHTS[k] for k in kinds], dtype=np.float64)
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    specs = caption_specs(scene, kind, split)
    if not specs:
        raise ValueError(f"no {split} caption of kind {kind!r} for {scene}")
    return specs[int(rng.integers(len(specs)))].text()


Labels = tuple[str | None, str | None, str | None]


def spec_labels(spec: CaptionSpec) -> Labels:
    """(shape, colour, background) a caption asserts; an implicit name asserts its shape (and colour)."""
    shape, colour = spec.shape, spec.colour
    if spec.name is not None:
        shape, implied = IMPLICIT_NAMES[spec.name]
        colour = colour or implied
    return shape, colour, spec.background


def caption_labels(split: str = "train") -> dict[str, Labels]:
    """Every distinct caption string of ``split`` → the labels it asserts (``None``: anything)."""
    table: dict[str, Labels] = {}
    for shape in SHAPES:
        for colour in COLOURS:
            for background in BACKGROUNDS:
                scene = Scene(shape, colour, background, 0.3, 0.5, 0.5)
                for kind in caption_kinds(scene):
                    for spec in caption_specs(scene, kind, split):
                        table[spec.text()] = spec_labels(spec)
    return dict(sorted(table.items()))


def all_captions(split: str = "train") -> list[str]:
    """Every distinct caption string of ``split`` (sorted)."""
    return list(caption_labels(split))


def describes(labels: Labels, scene: Scene) -> bool:
    """Whether a caption asserting ``labels`` is true of ``scene``."""
    shape, colour, background = labels
    return shape in (None, scene.shape) and colour in (None, scene.colour) and background in (None, scene.background)


# ----------------------------------------------------------------------------------------------
# Evaluation prompts (all held out)


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt and the labels a generated image should show (``None``: not determined by the prompt)."""

    prompt: str
    shape: str | None
    colour: str | None
    kind: str


def _heldout_prompt(kind: str, shape: str | None, colour: str | None, name: str | None = None) -> EvalPrompt:
    background = list(BACKGROUNDS)[(len(shape or "") + len(colour or "") + len(name or "")) % len(BACKGROUNDS)]
    template = heldout_template(kind, shape, colour, background, name)
    text = TEMPLATES[kind][template]
    spec = CaptionSpec(
        kind=kind,
        template=template,
        shape=shape,
        colour=colour if "{c}" in text else None,
        background=background if "{b}" in text else None,
        name=name,
    )
    assert is_heldout(spec)
    implied_shape, implied_colour = IMPLICIT_NAMES[name] if name else (shape, None)
    return EvalPrompt(spec.text(), implied_shape, colour or implied_colour, kind)


def explicit_prompts(shapes: Sequence[str] | None = None) -> list[EvalPrompt]:
    """Held-out prompts naming a shape: one per (shape, colour) (``full``) and one per shape (``shape``)."""
    prompts = []
    for shape in shapes or SHAPES:
        for colour in COLOURS:
            prompts.append(_heldout_prompt("full", shape, colour))
        prompts.append(_heldout_prompt("shape", shape, None))
    return prompts


def implicit_prompts(shapes: Sequence[str] | None = None) -> list[EvalPrompt]:
    """Held-out prompts using an implicit name (never the shape's word), labelled with the implied shape/colour."""
    prompts = []
    for name, (shape, colour) in IMPLICIT_NAMES.items():
        if shapes is not None and shape not in shapes:
            continue
        prompts.append(_heldout_prompt("implicit", shape, None, name))
        if colour is None:
            for colour_name in COLOURS:
                if (list(IMPLICIT_NAMES).index(name) + list(COLOURS).index(colour_name)) % 2 == 0:
                    prompts.append(_heldout_prompt("implicit_colour", shape, colour_name, name))
    return prompts


def unrelated_prompts(shape: str) -> list[EvalPrompt]:
    """Held-out explicit and implicit prompts of every *other* shape (what erasing ``shape`` must keep)."""
    others = [s for s in SHAPES if s != shape]
    return explicit_prompts(others) + implicit_prompts(others)
