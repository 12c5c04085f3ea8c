"""sglang's own helpers where the sglang wheel imports (the production image), None elsewhere.

On CPU machines the wheel may be installed without its GPU dependencies (CI does so for the contract
tests); importing it then fails in ways other than ImportError, and a failed import leaves the
package half-registered, so a second attempt can fail differently. So each lookup catches
everything, and says once why sglang's helper is not used when the package is present.
"""
import importlib
import importlib.util
import logging
from typing import Any, Optional

logger = logging.getLogger(__name__)


def sglang_attribute(module: str, name: str) -> Optional[Any]:
    if importlib.util.find_spec("sglang") is None:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as error:  # noqa: BLE001 - see the module docstring
        logger.warning("sglang is installed but %s.%s does not import (%s: %s); using the local equivalent",
                       module, name, type(error).__name__, error)
        return None
