"""CPE, the Concept Pinpoint Eraser (Lee et al., ICLR 2025), as a method of this package.

CPE leaves the UNet frozen and adds a *residual attention gate* (ResAG) to the key and value
projections of every cross-attention layer (``attn2.to_k`` and ``attn2.to_v``: 32 Linears on SD
v1.4). Each erased concept has one gate network, shared by all wrapped layers, that reads the text
states ``x`` ``[B, T, d]`` (docs/baselines.md §CPE):

- token self-attention ``A = softmax((x Wq)(x Wk)ᵀ)`` with ``Wk = Wq`` in the official code (no
  ``1/√g`` scaling), the pooled context ``ē = A x`` and a per-token gate ``s = sigmoid(ē w)``;
- per wrapped layer ``l``: ``out = W_l x + (1/r) · Up_l(Down_l(s · ē))``.

Several concepts are merged per token: only the concept with the largest gate acts there.

Training is data-free (docs/baselines.md §CPE, "How it is trained"): only text states go through
the wrapped projections. Each concept's ResAG alternates erase phases (map the concept's keys and
values to ``f⁰(neutral) + η (f⁰(neutral) − f⁰(concept))``, keep anchors' keys and values, and, from
the second stage on, erase the concept under the last attack phase's perturbations) with attack
phases (K additive perturbations δ of the text states that try to restore the original keys and
values). Every layer's term is weighted by spectral norms of the frozen attention weights.

Because the base projections are linear and frozen, every loss term is a quadratic form in the
inputs; :func:`gap_loss` evaluates it through one Gram matrix and the rank-r factors instead of
running the 32 full projections per row, which is exact (same value and gradients, up to float
rounding) and makes a training step cheap on a CPU.

Files of a run folder (:func:`train_cpe`): ``artifact.json`` + ``cpe.safetensors`` + ``cpe.json``
(the final ResAGs), ``stage_<i>/`` (the same after stage ``i``, for trade-off curves),
``train_state.pt`` (resume point), ``loss.csv`` and ``run.json``.

The package, by job: :mod:`.config` (files, recipes per concept kind, :class:`CPEConfig`),
:mod:`.prompts` (templates and anchors; the authored lists are ``data/*.txt``), :mod:`.modules`
(ResAG and its attachment), :mod:`.io` (artifact files), :mod:`.loss` (the objective),
:mod:`.training` (:func:`train_cpe`), :mod:`.method` (:class:`CPEMethod`).
"""

from .config import (
    FORMAT,
    KINDS,
    LAYOUT_FILE,
    LOSS_FILE,
    METHOD_NAME,
    PRESETS,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    CPEConfig,
    KindPreset,
)
from .io import load_cpe, save_cpe, stage_artifacts
from .loss import ProjectionBank, gap_loss, quadratic_form
from .method import CPEMethod, CPERuntime
from .modules import (
    ConceptEraser,
    CPEAdapter,
    CPEAttachment,
    CPELayout,
    CPELinear,
    ResAG,
    attach_cpe,
    cross_attention_blocks,
    kv_layer_names,
)
from .prompts import default_anchors, default_templates, read_prompt_list
from .training import (
    ConceptData,
    ConceptTrainer,
    CPELossLog,
    concept_prompts,
    encode_concepts,
    encode_prompts,
    sample_anchors,
    stage_plan,
    total_steps,
    train_cpe,
)

__all__ = [
    "FORMAT", "KINDS", "LAYOUT_FILE", "LOSS_FILE", "METHOD_NAME", "PRESETS", "TRAIN_STATE_FILE", "WEIGHTS_FILE",
    "CPEAdapter", "CPEAttachment", "CPEConfig", "CPELayout", "CPELinear", "CPELossLog", "CPEMethod", "CPERuntime",
    "ConceptData", "ConceptEraser", "ConceptTrainer", "KindPreset", "ProjectionBank", "ResAG", "attach_cpe",
    "concept_prompts", "cross_attention_blocks", "default_anchors", "default_templates", "encode_concepts",
    "encode_prompts", "gap_loss", "kv_layer_names", "load_cpe", "quadratic_form", "read_prompt_list", "sample_anchors",
    "save_cpe", "stage_artifacts", "stage_plan", "total_steps", "train_cpe",
]
