"""What the text-only attacks share (Ring-A-Bell, MMA-Diffusion's text attack, their replay).

These attacks never look at the erased UNet: a search over discrete tokens that uses only the text
encoder finds an adversarial *string* per target prompt; the attacked model then generates from that
string with the row's seed, guidance and size, and the detector judges the image. Because the
string depends only on the text encoder, the same prompt file can be replayed against any model
(:class:`coerasing.eval.attacks.replay.Replay`).

- :class:`PromptEncoder`: the tokenizer and text encoder as the searches see them: the layout
  ``[BOS, x_1…x_K, EOS, pad…]``, batched text states ``E(ids)`` (``last_hidden_state``), the pooled
  row at the first EOS, and the embedding path (one-hot rows times the token table) for gradients.
- :class:`PromptSearchAttack`: the part of :class:`~coerasing.eval.attacks.base.Attack` common to
  both searches: one search per distinct prompt text (rows that repeat a prompt with other seeds
  reuse its string), then generation and detection (:func:`judge_prompt`), records, and the prompt
  file ``attack_prompts.csv`` (:func:`write_prompt_file`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...files import atomic_write_text
from ...generation import GenerationSettings, ImageRow, default_size, row_call_settings, save_png
from ...methods.base import Runtime
from ..attack import encode_token_embeddings
from ..detectors import Detection, Detector
from .base import Attack, Record

#: The prompt file every text attack writes into its output folder (read back by ``--attack_prompts``).
PROMPT_FILE = "attack_prompts.csv"
PROMPT_COLUMNS: tuple[str, ...] = ("case", "prompt", "seed", "guidance", "method", "attack_prompt", "objective",
                                   "success")


# ----------------------------------------------------------------------------------------------
# The text encoder as the searches see it


@dataclass
class PromptEncoder:
    """A tokenizer and its text encoder (frozen); every size is read from them, nothing hard-coded."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    #: Sequences per forward pass in :meth:`states`.
    chunk: int = 256

    def __post_init__(self) -> None:
        self.text_encoder.requires_grad_(False).eval()

    @classmethod
    def from_pipe(cls, pipe: Any) -> PromptEncoder:
        return cls(pipe.tokenizer, pipe.text_encoder)

    @property
    def length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def bos(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos if pad is None else int(pad)

    @property
    def vocab_size(self) -> int:
        return int(self.table.shape[0])

    @property
    def table(self) -> torch.Tensor:
        """The token-embedding table ``[V, d]``."""
        return self.text_encoder.get_input_embeddings().weight

    @property
    def device(self) -> torch.device:
        return self.table.device

    def special_ids(self) -> set[int]:
        return {int(i) for i in self.tokenizer.all_special_ids} | {self.bos, self.eos, self.pad}

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``[B, T]`` ids as the pipeline makes them (padded to ``T``, truncated)."""
        return self.tokenizer(list(texts), padding="max_length", max_length=self.length, truncation=True,
                              return_tensors="pt").input_ids

    def content_ids(self, text: str) -> list[int]:
        """The text's tokens without BOS/EOS, untruncated."""
        return list(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False).strip()

    def layout(self, free: torch.Tensor) -> torch.Tensor:
        """``[B, T]``: ``[BOS, free…, EOS, pad…]`` for free tokens ``[B, K]`` (``K ≤ T − 2``)."""
        free = torch.as_tensor(free, dtype=torch.long).reshape(-1, free.shape[-1])
        batch, k = free.shape
        if k > self.length - 2:
            raise ValueError(f"{k} free tokens do not fit in {self.length} with BOS and EOS")
        ids = torch.full((batch, self.length), self.pad, dtype=torch.long)
        ids[:, 0], ids[:, 1 : 1 + k], ids[:, 1 + k] = self.bos, free, self.eos
        return ids

    @torch.no_grad()
    def states(self, ids: torch.Tensor) -> torch.Tensor:
        """``E(ids)``: ``[B, T, d]`` float32 text states, ``chunk`` sequences per forward."""
        parts = [self.text_encoder(ids[start : start + self.chunk].to(self.device))[0].float()
                 for start in range(0, ids.shape[0], self.chunk)]
        return torch.cat(parts)

    def eos_index(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B]``: the position of the first EOS after BOS (located explicitly, not by argmax of ids)."""
        is_eos = ids[:, 1:] == self.eos
        return is_eos.int().argmax(dim=1) + 1

    def pooled(self, states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[B, d]``: each sequence's text state at its first EOS (CLIP's pooled output, no projection)."""
        index = self.eos_index(ids).to(states.device)
        return states[torch.arange(states.shape[0], device=states.device), index]

    def states_from_one_hot(self, one_hot: torch.Tensor, ids: torch.Tensor, start: int = 1) -> torch.Tensor:
        """``[1, T, d]`` with rows ``start…start+K−1`` embedded as ``one_hot @ table`` (differentiable in
        ``one_hot``)."""
        table = self.table
        embeds = table[ids[0].to(self.device)].detach()
        soft = one_hot.to(table.dtype) @ table.detach()
        k = one_hot.shape[0]
        full = torch.cat([embeds[:start], soft, embeds[start + k :]])[None]
        return encode_token_embeddings(self.text_encoder, ids[:1].to(self.device), full).float()


def search_generator(seed: int, prompt: str) -> torch.Generator:
    """The search's CPU generator for one target prompt, from ``(seed, prompt text)``: a prompt's string
    does not depend on the row's image seed, and rows repeating a prompt share it."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    state = np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")]).generate_state(2, np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_ids(allowed: torch.Tensor, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Ids drawn uniformly from ``allowed`` (a 1-D id tensor)."""
    picks = torch.randint(0, allowed.numel(), tuple(shape), generator=generator)
    return allowed[picks]


# ----------------------------------------------------------------------------------------------
# Generation, detection, records and the prompt file


def judge_prompt(runtime: Runtime, detector: Detector, row: ImageRow, generation: GenerationSettings,
                 prompt: str) -> tuple[Any, Detection, float]:
    """Generate ``prompt`` with the row's seed, guidance and size (one image per call, so the image does not
    depend on what else is attacked) and detect: ``(image, detection, guidance)``."""
    guidance, height, width = row_call_settings(row, generation, default_size(runtime.pipe))
    image = runtime.render([row.seed], guidance, height, width, generation.num_inference_steps,
                           prompts=[prompt])[0]
    return image, detector.detect([image])[0], guidance


def prompt_file_text(records: Iterable[Record]) -> str:
    """The CSV text of :data:`PROMPT_FILE` for ``records`` (one line per record, in case order)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(PROMPT_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in sorted(records, key=lambda r: (len(str(r["case"])), str(r["case"]))):
        search = record.get("search") or {}
        writer.writerow({**record, "method": (record.get("settings") or {}).get("method", ""),
                         "objective": search.get("objective", ""),
                         "attack_prompt": record.get("attack_prompt") or ""})
    return buffer.getvalue()


def write_prompt_file(out_dir: Path, records: Mapping[str, Record]) -> Path | None:
    """``out_dir/attack_prompts.csv`` from the records that carry an attack prompt (none: nothing written)."""
    found = [record for record in records.values() if record.get("attack_prompt")]
    if not found:
        return None
    return atomic_write_text(Path(out_dir) / PROMPT_FILE, prompt_file_text(found))


@dataclass
class PromptSearchAttack(Attack):
    """A search for an adversarial string per prompt, then one generation per row (see the module docstring).

    Subclasses set ``name`` and implement :meth:`settings`, :meth:`prepare_search` (once per model:
    what every prompt's search needs, e.g. a concept vector) and :meth:`search` (one prompt → a dict
    with ``attack_prompt``, ``objective`` and the search's details).
    """

    generation: GenerationSettings
    detector: Callable[[], Detector]
    seed: int = 0
    save_images: bool = True
    _runtime: Runtime | None = field(default=None, init=False, repr=False)
    _detector: Detector | None = field(default=None, init=False, repr=False)
    _out_dir: Path | None = field(default=None, init=False, repr=False)
    _encoder: PromptEncoder | None = field(default=None, init=False, repr=False)
    _found: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)

    @property
    def encoder(self) -> PromptEncoder:
        assert self._encoder is not None, "prepare() first"
        return self._encoder

    def prepare(self, runtime: Runtime, out_dir: Path, made_by: Mapping[str, Any]) -> None:
        self._runtime, self._out_dir, self._detector = runtime, Path(out_dir), self.detector()
        self._encoder = PromptEncoder.from_pipe(runtime.pipe)
        self._found = {}
        self.prepare_search(self._encoder)

    def prepare_search(self, encoder: PromptEncoder) -> None:  # noqa: B027
        """Once per model, before the first search (default: nothing)."""

    @abstractmethod
    def search(self, prompt: str, generator: torch.Generator) -> dict[str, Any]:
        """The adversarial string for one target prompt: ``{"attack_prompt", "objective", …}``."""

    def found(self, prompt: str) -> dict[str, Any]:
        """:meth:`search` once per prompt text in this run (``seconds``: how long it took)."""
        if prompt not in self._found:
            start = time.perf_counter()
            found = self.search(prompt, search_generator(self.seed, prompt))
            self._found[prompt] = {**found, "seconds": round(time.perf_counter() - start, 3)}
        return self._found[prompt]

    def attack_one(self, row: ImageRow) -> Record:
        assert self._runtime is not None and self._detector is not None
        result = self.found(row.prompt)
        image, detection, guidance = judge_prompt(self._runtime, self._detector, row, self.generation,
                                                  result["attack_prompt"])
        if self.save_images and self._out_dir is not None:
            save_png(image, self._out_dir / row.file)
        return {"case": row.case, "prompt": row.prompt, "seed": row.seed, "guidance": guidance, "attacked": True,
                "success": bool(detection.positive), "attack_prompt": result["attack_prompt"],
                "search": result, "detection": detection.to_json()}

    def describe(self, record: Record) -> str:
        objective = (record.get("search") or {}).get("objective")
        score = f" (objective {objective:.4g})" if isinstance(objective, float) else ""
        return (f"case {record['case']}: {self.name} {'succeeded' if record['success'] else 'failed'}{score}: "
                f"{str(record.get('attack_prompt'))[:80]!r}")

    def finish(self, out_dir: Path, records: Mapping[str, Record]) -> None:
        write_prompt_file(out_dir, records)

    def close(self) -> None:
        self._runtime = self._detector = self._encoder = None


def cosine_loss(pooled: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 − cos(pooled, target)`` per row."""
    return 1 - F.cosine_similarity(pooled.float(), target.float()[None].expand_as(pooled), dim=-1)
