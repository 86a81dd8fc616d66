"""coerasing: Co-Erasing (ICML 2025) concept erasure for Stable Diffusion, on diffusers.

Modules, one concept each (METHOD.md sections in brackets):
``sampling`` (partial denoising, §4.3), ``objectives`` (negative-guidance target, text-guided
refinement, latent blur; §4.5, §5.2-5.5), ``params`` (``--train_method``, §6), ``ip_adapter``
(IP-Adapter wiring), ``images`` (reference images), ``models`` (loading, devices),
``checkpoints`` (atomic save, strict load, resume), ``train`` (the loop of both stages),
``reference_images`` (stage 0), ``config``/``cli`` (flags ⇄ YAML ⇄ config), ``testing``
(the tiny offline stack).
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
