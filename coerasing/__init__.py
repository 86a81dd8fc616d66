"""coerasing: Co-Erasing (ICML 2025) and the erasers it is compared with, for Stable Diffusion, on diffusers.

Module map (docs/architecture.md has the layers; docs/method.md the equations):

- the paper's pieces, one concept each: ``sampling`` (bucket and partial denoising, Eq. 1–2),
  ``objectives`` (target, loss, refinement, token noise, blur; Eq. 3–7), ``params``
  (``--train_method``, §6), ``ip_adapter`` (the image branch, Eq. 8), ``images`` (reference images,
  CLIP preprocessing);
- loading and files: ``models`` (components from a Hub id or folder, devices), ``formats`` (every
  UNet weight format: read, write, convert), ``checkpoints`` (a run folder: resume state, run.json,
  loss log), ``files`` (atomic writes, fingerprints);
- running: ``train`` (the one erasing loop of both stages), ``generation`` (all image generation:
  reference images, evaluation, comparison), ``reference_images`` (stage 0);
- command lines: ``choices`` (the names users pick from), ``flags`` (flags declared once on config
  dataclasses), ``config`` (``erase_pipeline.py``, ``generate_data.py``), ``cli`` (errors as one paragraph);
- ``methods`` (every eraser behind one interface: ESD and Co-Erasing with its ablations, CPE,
  STEREO, GIE), ``textual_inversion`` (STEREO's search and the concept-inversion attack);
- ``eval`` (``evaluate.py``: prompts, generation, detectors, the UnlearnDiff attack, report),
  ``compare`` (``compare.py``: erasers side by side), ``stats``, ``grid``;
- ``toy`` (the shipped toy world: renderer, builder, classifier, detector, evaluation protocol, demo);
  ``testing`` (the tiny random stack for tests and benchmarks only).
"""

__version__ = "0.1.0"


def _hide_torchvision_fallback_notice() -> None:
    """transformers ≥ 5 warns that its CLIP image processors fall back to PIL without torchvision.

    This project deliberately runs without torchvision and uses the PIL processor, so the notice
    (which tells users to install torchvision) only misleads; this filter drops that one message.
    """
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "requires torchvision (not installed)" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(_Filter())


_hide_torchvision_fallback_notice()
