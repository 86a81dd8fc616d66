"""The method layer's copy of the toy world's training captions is what the toy world says today."""

from __future__ import annotations

from coerasing.methods.concepts import TOY_CAPTIONS_FILE, concept_kind, toy_shapes, toy_training_captions
from coerasing.toy.captions_file import CAPTIONS_FILE, captions_text, main
from coerasing.toy.world import SHAPES, caption_labels


def test_the_committed_file_is_current():
    assert CAPTIONS_FILE == TOY_CAPTIONS_FILE
    assert TOY_CAPTIONS_FILE.read_text(encoding="utf-8") == captions_text(), (
        "rewrite it: python -m coerasing.toy.captions_file")


def test_the_method_layer_reads_the_training_captions_and_shapes():
    assert toy_shapes() == tuple(SHAPES)
    assert toy_training_captions() == caption_labels("train")
    assert not set(toy_training_captions()) & set(caption_labels("heldout"))
    assert [concept_kind(s) for s in ("circle", "Star", "church")] == ["toy", "toy", "object"]


def test_the_writer_writes_the_file(tmp_path):
    main([str(tmp_path / "captions.json")])
    assert (tmp_path / "captions.json").read_text(encoding="utf-8") == captions_text()
