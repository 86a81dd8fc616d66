"""coerasing: Co-Erasing (ICML 2025) and the erasers it is compared with, for Stable Diffusion, on diffusers.

The module map, with the layers its imports follow, is docs/architecture.md; the equations are in
docs/method.md.
"""

import logging

__version__ = "0.1.0"


def _hide_torchvision_fallback_notice() -> None:
    """transformers ≥ 5 warns that its CLIP image processors fall back to PIL without torchvision.

    This project deliberately runs without torchvision and uses the PIL processor, so the notice
    (which tells users to install torchvision) only misleads; this filter drops that one message.
    """

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "requires torchvision (not installed)" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(_Filter())


_hide_torchvision_fallback_notice()
