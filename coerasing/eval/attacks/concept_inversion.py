"""Concept inversion (STEREO's attack; docs/baselines.md §STEREO) behind the attack interface.

:meth:`ConceptInversion.prepare` learns one word against the erased model from the concept's
images (:func:`coerasing.textual_inversion.concept_inversion_attack`), or reuses the word kept in
the output folder (``inversion_token.safetensors`` with ``inversion.json``) when that was learned
with the same settings by the same model. Each row is then attacked by generating ``prompt`` with
the word, with the row's seed and guidance: success when the detector sees the concept. Records
have the UnlearnDiff attack's format, so the reports are the same.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from ...errors import CoErasingError
from ...files import atomic_write_json, fingerprint, read_json_record
from ...generation import GenerationSettings, ImageRow, default_size, row_call_settings, save_png
from ...images import list_image_files, load_images
from ...methods.base import Runtime
from ...models import TextComponents
from ...textual_inversion import TextualInversionSettings, concept_inversion_attack, load_token, save_token
from ..detectors import Detector
from .base import Attack, Record

TOKEN_FILE = "inversion_token.safetensors"
WORD_FILE = "inversion.json"
#: The fields of ``inversion.json``; a word file without them is learned again.
WORD_FIELDS: dict[str, type] = {"settings": dict, "made_by": dict, "losses": list}


@dataclass
class ConceptInversion(Attack):
    """One learned word for the erased concept, then one generation per row (see the module docstring).

    ``images()``: the concept's images the word is learned from; ``images_id``: what identifies them
    in the records (a folder and its fingerprint). ``batch_size`` rows with the same guidance and size
    share one generation call; ``save_images`` writes ``<case>.png`` beside each record.
    """

    name: ClassVar[str] = "concept_inversion"

    steps: int
    lr: float
    initializer: str
    prompt: str
    seed: int
    images: Callable[[], Sequence[Image.Image]]
    images_id: dict[str, Any]
    generation: GenerationSettings
    detector: Callable[[], Detector]
    batch_size: int = 1
    save_images: bool = True
    progress: bool = True
    #: The learned word's losses (first and last step), after :meth:`prepare`.
    losses: list[float] = field(default_factory=list, init=False)
    _runtime: Runtime | None = field(default=None, init=False, repr=False)
    _detector: Detector | None = field(default=None, init=False, repr=False)
    _embeds: torch.Tensor | None = field(default=None, init=False, repr=False)
    _attack_prompt: str = field(default="", init=False, repr=False)
    _out_dir: Path | None = field(default=None, init=False, repr=False)

    shardable: ClassVar[bool] = False

    @classmethod
    def from_eval_config(cls, config: Any, references: Callable[[ImageRow], Image.Image],
                         detector: Callable[[], Detector]) -> ConceptInversion:

        def images() -> list[Image.Image]:
            return load_images(list_image_files(config.attack_images, "--attack_images"), "--attack_images")[1]

        return cls(config.inversion_steps, config.inversion_lr, config.inversion_initializer, config.inversion_prompt,
                   config.attack_seed, images,
                   {"images": config.attack_images, "images_fingerprint": fingerprint(config.attack_images)},
                   config.generation_settings(), detector)

    def settings(self) -> dict[str, Any]:
        return {"method": self.name, "steps": self.steps, "lr": self.lr, "initializer": self.initializer,
                "prompt": self.prompt, "seed": self.seed, **self.images_id}

    def prepare(self, runtime: Runtime, out_dir: Path, made_by: Mapping[str, Any]) -> None:

        self._runtime, self._out_dir, self._detector = runtime, out_dir, self.detector()
        token_file, word_file = out_dir / TOKEN_FILE, out_dir / WORD_FILE
        made = json.loads(json.dumps({"settings": self.settings(), "made_by": dict(made_by)}, default=str))
        word = read_json_record(word_file, WORD_FIELDS, warn="learning the word again") or {}
        tokenizer = encoder = token = None
        if token_file.exists() and {key: word.get(key) for key in made} == made:
            tokenizer = copy.deepcopy(runtime.pipe.tokenizer)
            encoder = copy.deepcopy(runtime.pipe.text_encoder)
            try:
                token = load_token(token_file, tokenizer, encoder)
            except CoErasingError as exc:
                print(f"warning: {exc} Learning the word again.", file=sys.stderr, flush=True)
        if token is not None:
            self._attack_prompt = self.prompt.format(tokenizer.convert_ids_to_tokens(token))
            self._embeds = TextComponents(tokenizer, encoder).encode(self._attack_prompt)
            self.losses = list(word.get("losses") or [])
            return
        ti = TextualInversionSettings.for_initializer(self.initializer, steps=self.steps, lr=self.lr, seed=self.seed)
        result = concept_inversion_attack(runtime, list(self.images()), ti, prompt=self.prompt,
                                          progress=self.progress)
        save_token(token_file, result.token.token, result.token.embedding)
        atomic_write_json(word_file, {**made, "losses": result.token.losses})
        self._attack_prompt, self._embeds, self.losses = result.prompt, result.prompt_embeds, list(result.token.losses)

    @staticmethod
    def stored_losses(out_dir: Path) -> list[float]:
        """The losses of the word kept in ``out_dir`` (a resumed attack that learned nothing)."""
        word = read_json_record(Path(out_dir) / WORD_FILE, WORD_FIELDS)
        return list(word["losses"]) if word is not None else []

    def attack_one(self, row: ImageRow) -> Record:
        return self.attack_batch([row])[0]

    def attack_batch(self, rows: Sequence[ImageRow]) -> list[Record]:
        assert self._runtime is not None and self._detector is not None and self._embeds is not None
        size = default_size(self._runtime.pipe)
        calls = [row_call_settings(row, self.generation, size) for row in rows]
        if len(set(calls)) > 1:  # rows of other guidance or size: one call each
            return [record for row in rows for record in self.attack_batch([row])]
        guidance, height, width = calls[0]
        images = self._runtime.render([row.seed for row in rows], guidance, height, width,
                                      self.generation.num_inference_steps,
                                      prompt_embeds=self._embeds.repeat(len(rows), 1, 1))
        records = []
        for row, image, detection in zip(rows, images, self._detector.detect(images), strict=True):
            if self.save_images and self._out_dir is not None:
                save_png(image, self._out_dir / row.file)
            records.append({"case": row.case, "prompt": row.prompt, "seed": row.seed, "guidance": guidance,
                            "attacked": True, "success": bool(detection.positive), "prefix_ids": [],
                            "attack_prompt": self._attack_prompt, "losses": [], "rounds": [],
                            "detection": detection.to_json()})
        return records

    def close(self) -> None:
        self._runtime = self._detector = self._embeds = None
