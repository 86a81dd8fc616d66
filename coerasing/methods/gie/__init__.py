"""GIE: Growth Inhibitors for Erasure (Chen et al., ICLR 2025, arXiv 2408.01014), at inference time.

docs/baselines.md §GIE. GIE changes no weight: every image is generated as a *pair* from the same
initial noise, branch 1 on the prompt P and branch 2 on "P + T" (T: the target words); only branch
2's image is kept. In the conditional half of classifier-free guidance, branch 2's attention maps
are rewritten from branch 1's while the image takes shape:

- **Cross-attention injection** (first ``cross_fraction`` = 80 % of the schedule): branch 2's map
  over P's tokens is branch 1's post-softmax map (same layer, same head), and over the m target
  tokens it is the *growth inhibitor* ``w · softmax(scale · Q₂ · K_Tᵀ)`` (Q₂: branch 2's own queries;
  the softmax runs over the 77 states of T encoded alone, BOS/EOS/padding included, and the
  columns of T's m tokens are kept, as in the official code). No renormalisation; the output is
  ``A₂ @ [V(P states); V(T states)]``. After the window branch 2 attends with its own plain softmax
  over all 77 + m tokens (the official code does the same: the target words come back unweighted).
- **Self-attention copying** (first ``self_fraction`` = 40 %, maps of at most ``self_max_query`` =
  256 queries, i.e. ≤ 16×16 at 512 px): branch 2's self-attention probabilities are branch 1's,
  with branch 2's own values.
- ``w`` is one fixed value per concept (negative erases, more negative erases more: ``w > 0`` would
  *add* the target words, ``w = 0`` gives back branch 1) or is predicted per target token by an
  adapter MLP 16 → 64 → 32 → 1 (ReLU, no output activation) from the mean cross-attention
  probability of that token in each of the 16 cross-attention layers at the first denoising step
  (an extra first-step UNet call with ``w = 1``, discarded; the real run restarts from the same noise).

Everything else (the unconditional rows of both branches, branch 1, larger self-attention maps, all
layers outside the windows) is diffusers' plain scaled-dot-product attention.

Design: branch 2's text states
------------------------------
Branch 2's text states are branch 1's 77 states of P (the CLIP text encoder is causal, so P's
tokens have the same states inside "P + T") with the m target tokens' states (T encoded alone,
positions 1..m, BOS and EOS excluded) appended as m extra key/value tokens: branch 2 cross-attends
over 77 + m tokens. Cross-attention has no positional encoding, so where the target tokens sit does
not matter. So GIE works from text states alone: prompts, ready ``prompt_embeds`` and the white-box
attack's edited states all take the same path, and no token count of P is needed.

Gating by noise level
---------------------
A processor acts while the timestep of the current UNet call (recorded by a UNet forward
pre-hook) satisfies ``t > (1 − fraction) · num_train_timesteps`` (``fraction = 1``: the whole
schedule; ``0``: never). The official code counts UNet calls instead: cross-injection on calls
``< int(0.8 · (steps + 1))``, self-copying on calls ``< int(0.4 · steps)``. For its sampler, PNDM
with 40 steps (41 UNet calls at t = 976, 951, 951, 926, …, 1), that is calls 0–31 (t ≥ 226) and
0–15 (t ≥ 626); our rule gives calls 0–32 (t > 200) and 0–16 (t > 600): the same up to one step at
each cutoff. For DDIM with 40 steps (t = 976, 951, …, 1) it gives exactly the official 32 and 16.

Batch layout
------------
:meth:`GIERuntime.render` calls the pipeline with every prompt (or ``prompt_embeds`` row) and every
generator duplicated, ``[P1, P1, P2, P2, …]`` (both rows of a pair share their seed, hence their
initial noise) and keeps ``images[1::2]``. diffusers orders a classifier-free-guidance batch as
``[uncond rows…, cond rows…]``: only the conditional half is edited, pairs ``(2i, 2i + 1)`` inside
it; branch 2's unconditional rows attend to their own 77 tokens, like branch 1's. Without guidance
(``guidance ≤ 1``) the whole batch is conditional. :meth:`GIERuntime.noise_pred` (the attack's ε)
duplicates its batch the same way (branch 1 and branch 2 share ``z_t``), treats all rows as
conditional and returns branch 2's ε. While GIE is applied, a UNet call that does not come through
the runtime raises an error instead of silently giving the base model's output.

The adapter's training (ours; the authors' weights and procedure are unpublished)
--------------------------------------------------------------------------------
:func:`train_gie_adapter` takes training prompts of the concept (never evaluation prompts) and a
detector (for the toy world: the toy classifier, positive when its predicted shape is the concept;
prompts: the toy world's *training* captions of that shape, :func:`toy_training_prompts`, read from
the method layer's data file ``coerasing/methods/toy_captions.json``):

1. features: for prompt ``i`` (seed ``adapter_seed + i``) and each target token, the 16-vector of
   first-step mean target probabilities (the ``w = 1`` feature pass);
2. labels: sweep the grid ``adapter_grid`` from the least to the most negative ``w``, generating
   branch 2's image with that fixed ``w`` (``adapter_steps`` steps, ``adapter_guidance``); a prompt's
   label is the least negative ``w`` whose image the detector calls concept-free, else the most
   negative grid value. All target tokens of a prompt share its label (the detector judges images);
3. fit: the MLP by full-batch MSE regression of the label on the features (Adam, ``adapter_lr``,
   ``adapter_epochs``, seeded), with the features standardised by their training mean and standard
   deviation (kept as buffers of the adapter: the layers stay 16 → 64 → 32 → 1);
4. ``adapter.safetensors`` and ``artifact.json`` (settings, labels, losses) go into ``output_dir``.

Deliberate deviations from the official code (CD22104/Growth-Inhibitors-for-Erasure)
------------------------------------------------------------------------------------
- Branch 2's EOS and padding positions carry P's states (the "prompt" variant of our notes); the
  official code puts the in-context state of T's first token at branch 2's EOS and "P + T"'s own
  padding states after it (an indexing slip). In the injection window our map over P's tokens is
  branch 1's full 77-token map (the official one drops branch 1's first m padding columns); after
  the window branch 2 attends over P's 77 states plus the m target states. No prompt overflows
  (the official code fails when "P + T" exceeds 77 tokens).
- Timestep gating instead of call counting (above: equal up to one step at each cutoff).
- diffusers' batch order ``[uncond, cond]`` instead of ``[cond, uncond]`` (same computation).
- Plain paths use scaled-dot-product attention (diffusers' default processor); explicit
  probabilities only for the rows an edit needs (the official code re-implements the classic
  processor everywhere). Softmax in float32.
- The adapter's feature pass runs only the conditional rows (the unconditional rows cannot affect
  them); the adapter and its training are ours (above). In :meth:`GIERuntime.noise_pred` the
  adapter's features come from fixed noise (seed ``adapter_seed``) at the first timestep of a
  ``num_inference_steps`` schedule, since the attack gives ``z_t`` at arbitrary ``t``; ``w`` is not
  differentiated through.

The package, by job
-------------------
:mod:`.config` (constants, :class:`GIEConfig`), :mod:`.processors` (controller, attention
processors), :mod:`.adapter` (the ``w`` adapter), :mod:`.runtime` (:class:`GIERuntime`),
:mod:`.training` (artifact writer, the adapter's training), :mod:`.method` (:class:`GIEMethod`).
"""

from .adapter import GIEAdapter, fit_adapter
from .config import (
    ADAPTER_FILE,
    ADAPTER_HIDDEN,
    CFG,
    COND,
    CROSS_EXTEND,
    CROSS_INJECT,
    DEFAULT_W_GRID,
    METHOD_NAME,
    SD1_CROSS_LAYERS,
    SELF_COPY,
    GIEConfig,
    window_active,
)
from .method import GIEMethod
from .processors import EditEvent, EditPlan, GIEAttnProcessor, GIEController, attention_probs
from .runtime import GIERuntime, encode_target
from .training import Detector, label_prompts, toy_training_prompts, train_gie_adapter, write_gie_artifact

__all__ = [
    "ADAPTER_FILE", "ADAPTER_HIDDEN", "CFG", "COND", "CROSS_EXTEND", "CROSS_INJECT", "DEFAULT_W_GRID", "METHOD_NAME",
    "SD1_CROSS_LAYERS", "SELF_COPY", "Detector", "EditEvent", "EditPlan", "GIEAdapter", "GIEAttnProcessor",
    "GIEConfig", "GIEController", "GIEMethod", "GIERuntime", "attention_probs", "encode_target", "fit_adapter",
    "label_prompts", "toy_training_prompts", "train_gie_adapter", "window_active", "write_gie_artifact",
]
