"""The toy world: deterministic renders, captions true of their scenes, a disjoint held-out split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from coerasing.toy import world
from coerasing.toy.world import (
    BACKGROUNDS,
    COLOURS,
    IMPLICIT_NAMES,
    SHAPES,
    TEMPLATES,
    Scene,
    caption,
    caption_labels,
    describes,
    explicit_prompts,
    implicit_prompts,
    render,
    render_array,
    render_mask,
    sample_scene,
    unrelated_prompts,
)

torch.set_num_threads(1)


def _centred(shape: str, colour: str = "red", background: str = "white", size: float = 0.35) -> Scene:
    return Scene(shape, colour, background, size, 0.5, 0.5)


def test_sampling_rendering_and_captions_are_deterministic():
    def draw(seed: int) -> tuple[list[Scene], list[str], np.ndarray]:
        rng = np.random.default_rng(seed)
        scenes = [sample_scene(rng) for _ in range(20)]
        captions = [caption(s, rng) for s in scenes]
        return scenes, captions, np.stack([render_array(s) for s in scenes])

    a, b, c = draw(3), draw(3), draw(4)
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])
    assert a[0] != c[0]


def test_render_is_rgb_at_requested_resolution():
    image = render(_centred("star"), 32)
    assert image.mode == "RGB" and image.size == (32, 32)
    assert render(_centred("star"), 64).size == (64, 64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", list(COLOURS))
def test_object_has_the_scene_colour_at_its_centre(shape, colour):
    for background in BACKGROUNDS:
        scene = Scene(shape, colour, background, 0.3, 0.45, 0.55)
        array = render_array(scene, 32)
        y, x = int(scene.cy * 32), int(scene.cx * 32)
        assert tuple(array[y, x]) == COLOURS[colour]
        assert tuple(array[0, 0]) == BACKGROUNDS[background]  # corners stay background


def test_sampled_objects_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        mask = render_mask(scene, 32)
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert border.max() == 0.0
        assert 0.2 < mask.sum() / (np.pi * (scene.size * 32) ** 2) < 1.2


def test_shapes_are_distinguishable():
    masks = {shape: render_mask(_centred(shape), 32) > 0.5 for shape in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        differing = np.logical_xor(masks[a], masks[b]).sum()
        assert differing >= 0.15 * min(masks[a].sum(), masks[b].sum()), (a, b)
    # Pixel counts differ too: the circle is the largest, the star covers under 60 % of it.
    counts = {shape: int(mask.sum()) for shape, mask in masks.items()}
    assert counts["circle"] == max(counts.values()) and counts["star"] < 0.6 * counts["circle"]
    assert len(set(counts.values())) == len(SHAPES)


def test_every_implicit_name_means_one_shape_and_never_names_it():
    per_shape = {shape: 0 for shape in SHAPES}
    words = set(SHAPES)
    for name, (shape, colour) in IMPLICIT_NAMES.items():
        assert shape in SHAPES and (colour is None or colour in COLOURS)
        assert not words & set(name.split()), name
        per_shape[shape] += 1
    assert all(count >= 2 for count in per_shape.values()), per_shape
    # In every caption that uses the name, it asserts that shape (and colour, if it has one).
    for text, (shape, colour, _) in caption_labels("all").items():
        for name, (name_shape, name_colour) in IMPLICIT_NAMES.items():
            if f" {name}" in f" {text}":
                assert shape == name_shape and (name_colour is None or colour == name_colour), text


def test_captions_are_true_of_their_scene():
    table = caption_labels("all")
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        assert describes(table[text], scene), (text, scene)
    kinds = {caption_labels("train")[caption(sample_scene(rng), rng)] for _ in range(50)}
    assert len(kinds) > 10


def test_caption_strings_have_one_meaning():
    seen: dict[str, tuple] = {}
    for shape, colour, background in itertools.product(SHAPES, COLOURS, BACKGROUNDS):
        scene = Scene(shape, colour, background, 0.3, 0.5, 0.5)
        for kind in world.caption_kinds(scene):
            for spec in world.caption_specs(scene, kind, "all"):
                labels = world.spec_labels(spec)
                assert seen.setdefault(spec.text(), labels) == labels, spec


def test_heldout_split_is_disjoint_and_covers_everything_in_training():
    train, heldout = set(caption_labels("train")), set(caption_labels("heldout"))
    assert train and heldout and not train & heldout
    assert train | heldout == set(caption_labels("all"))
    rng = np.random.default_rng(2)
    for _ in range(300):
        assert caption(sample_scene(rng), rng) in train
    # Each template and each (shape, colour) pair is still seen in training.
    for kind, templates in TEMPLATES.items():
        for template in templates:
            prefix = template.split("{")[0]
            assert any(t.startswith(prefix) for t in train), (kind, template)
    for shape, colour in itertools.product(SHAPES, COLOURS):
        assert f"a {colour} {shape}" in train or f"a photo of a {colour} {shape}" in train


def test_evaluation_prompts_are_heldout_and_labelled():
    train, heldout = set(caption_labels("train")), set(caption_labels("heldout"))
    explicit, implicit = explicit_prompts(), implicit_prompts()
    assert len(explicit) == len(SHAPES) * (len(COLOURS) + 1)
    assert {p.shape for p in implicit} == set(SHAPES)
    for p in explicit + implicit:
        assert p.prompt in heldout and p.prompt not in train, p
        assert p.shape in SHAPES and (p.colour is None or p.colour in COLOURS)
    for p in explicit:
        assert p.shape in p.prompt.split()
    for p in implicit:
        assert not set(SHAPES) & set(p.prompt.split()), p
    assert all(p.shape != "circle" for p in unrelated_prompts("circle"))
    assert {p.shape for p in unrelated_prompts("circle")} == set(SHAPES) - {"circle"}
