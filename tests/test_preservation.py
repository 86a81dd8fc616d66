"""The anchor-preservation option (docs/method.md Eq. 9): off changes nothing, on keeps anchors closer."""

from __future__ import annotations

import re

import pytest
import torch

from coerasing.config import EVERYDAY_CAPTIONS, read_prompt_list
from coerasing.errors import CoErasingError
from coerasing.objectives import preservation_loss
from coerasing.train import Eraser, erase

from .test_train import make_config, same, weights


def test_the_loss_on_fixed_tensors_is_the_mean_squared_difference():
    generator = torch.Generator().manual_seed(0)
    pred, ref = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    assert torch.allclose(preservation_loss(pred, ref), ((pred - ref) ** 2).sum() / pred.numel())
    assert preservation_loss(ref, ref) == 0


@pytest.mark.parametrize("modality", ["text", "image"])
def test_weight_zero_is_bit_identical_to_todays_training(tiny_stack, reference_images, tmp_path, modality):
    plain = erase(make_config(tiny_stack, tmp_path / "plain", modality, reference_images, iterations=2))
    off = erase(make_config(tiny_stack, tmp_path / "off", modality, reference_images, iterations=2,
                            preserve_prompts="a dog,a house", preserve_weight=0.0))
    assert same(weights(plain), weights(off))


def test_the_term_keeps_anchor_predictions_closer_and_resumes_bit_identically(tiny_stack, tmp_path):
    """Same erasing draws (the anchors have their own stream); the anchor's drift from the base model is smaller."""
    anchors = "a photo of a dog,a red house,a bowl of fruit"
    plain = erase(make_config(tiny_stack, tmp_path / "plain", iterations=4, lr=1e-3))
    kept = erase(make_config(tiny_stack, tmp_path / "kept", iterations=4, lr=1e-3, preserve_prompts=anchors,
                             preserve_weight=100.0))
    assert not same(weights(plain), weights(kept))

    def drift(path):
        config = make_config(tiny_stack, tmp_path / "probe", iterations=1, preserve_prompts=anchors,
                             preserve_weight=1.0, overwrite=True)
        eraser = Eraser(config)
        base = {k: v.clone() for k, v in eraser.models.trainable.state_dict().items()}
        latents = torch.randn(eraser.latent_shape, generator=torch.Generator().manual_seed(5))
        eraser.models.trainable.load_state_dict({**base, **weights(path)})
        with torch.no_grad():
            return float(sum(eraser.preservation(latents, 500) for _ in range(6)))  # every anchor, twice

    assert drift(kept) < drift(plain)
    part = tmp_path / "part"
    erase(make_config(tiny_stack, part, iterations=2, lr=1e-3, preserve_prompts=anchors, preserve_weight=100.0))
    resumed = erase(make_config(tiny_stack, part, iterations=4, lr=1e-3, preserve_prompts=anchors,
                                preserve_weight=100.0, resume=True))
    assert same(weights(kept), weights(resumed))


def test_bad_anchor_settings_are_errors(tiny_stack, tmp_path):
    with pytest.raises(CoErasingError, match="--preserve_weight 1.0 needs --preserve_prompts"):
        make_config(tiny_stack, tmp_path / "x", preserve_weight=1.0).validate()
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(CoErasingError, match="holds no prompt"):
        make_config(tiny_stack, tmp_path / "x", preserve_weight=1.0, preserve_prompts=str(empty)).validate()


def test_the_shipped_everyday_captions_name_no_erased_concept():
    captions = read_prompt_list("everyday", "--preserve_prompts")
    assert len(captions) >= 40 and EVERYDAY_CAPTIONS.is_file()
    concept = re.compile(r"nud|naked|van gogh|\b(church|parachute|garbage|tench|circle|square|triangle|star|cross)\b")
    assert not [c for c in captions if concept.search(c.lower())]


def test_toy_anchor_prompts_never_include_an_evaluation_caption():
    from coerasing.methods.concepts import toy_anchor_prompts
    from coerasing.toy.protocol import comparison_prompts
    from coerasing.toy.world import SHAPES, caption_labels

    heldout = set(caption_labels("heldout"))
    for shape in SHAPES:
        anchors = toy_anchor_prompts(shape)
        evaluation = {p.prompt for group in comparison_prompts(shape).values() for p in group}
        assert anchors and not set(anchors) & heldout and not set(anchors) & evaluation
        assert not [a for a in anchors if shape in a]  # the erased shape's own captions are not anchors
