"""``--train_method`` → UNet parameters (docs/method.md §6), on a UNet with SD v1.4's block structure."""

from __future__ import annotations

import pytest
from diffusers import UNet2DConditionModel

from coerasing.errors import CoErasingError
from coerasing.params import TRAIN_METHODS, select_parameter_names, select_parameters
from coerasing.testing import tiny_unet_config


@pytest.fixture(scope="module")
def names() -> list[str]:
    return [name for name, _ in UNet2DConditionModel(**tiny_unet_config()).named_parameters()]


def test_full_and_attention_methods(names):
    assert select_parameter_names(names, "full") == names
    xattn = select_parameter_names(names, "xattn")
    assert xattn and all("attn2" in n for n in xattn) and len(xattn) == sum("attn2" in n for n in names)
    selfattn = select_parameter_names(names, "selfattn")
    assert selfattn and all("attn1" in n for n in selfattn)


def test_noxattn_excludes_cross_attention_time_embedding_and_output_layers(names):
    chosen = set(select_parameter_names(names, "noxattn"))
    excluded = set(names) - chosen
    assert all("attn2" in n or n.startswith(("time_embedding.", "conv_norm_out.", "conv_out.")) for n in excluded)
    assert "conv_in.weight" in chosen and "time_embedding.linear_1.weight" in excluded
    assert "conv_out.weight" in excluded and "conv_norm_out.weight" in excluded
    assert any("time_emb_proj" in n for n in chosen)  # resnet time projections are trained, as in ESD
    assert any("attn1" in n for n in chosen) and not any("attn2" in n for n in chosen)


def test_notime_excludes_only_the_time_embedding(names):
    excluded = set(names) - set(select_parameter_names(names, "notime"))
    assert excluded == {n for n in names if n.startswith("time_embedding.")}


def test_layer_methods_pick_compvis_blocks(names):
    xlayer = select_parameter_names(names, "xlayer")
    blocks = {n.split(".transformer_blocks")[0] for n in xlayer}
    assert blocks == {"up_blocks.2.attentions.0", "up_blocks.2.attentions.2"}
    assert all("attn2" in n for n in xlayer)
    selflayer = select_parameter_names(names, "selflayer")
    blocks = {n.split(".transformer_blocks")[0] for n in selflayer}
    assert blocks == {"down_blocks.1.attentions.0", "down_blocks.2.attentions.0"}
    assert all("attn1" in n for n in selflayer)


def test_select_parameters_freezes_the_rest():
    unet = UNet2DConditionModel(**tiny_unet_config())
    params = select_parameters(unet, "xattn")
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert all(p.requires_grad == ("attn2" in n) for n, p in unet.named_parameters())


def test_unknown_or_empty_selection_is_an_error(names):
    with pytest.raises(CoErasingError, match="not known"):
        select_parameter_names(names, "attention")
    without_up_block_2 = [n for n in names if not n.startswith("up_blocks.2.")]
    with pytest.raises(CoErasingError, match="selects no parameter"):
        select_parameter_names(without_up_block_2, "xlayer")
    assert set(TRAIN_METHODS) == {"full", "noxattn", "xattn", "selfattn", "notime", "xlayer", "selflayer"}
