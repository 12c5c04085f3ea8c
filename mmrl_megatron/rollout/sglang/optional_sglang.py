"""sglang's own helpers where the sglang wheel imports (the production image), None elsewhere.

On CPU machines the wheel may be installed without its GPU dependencies (CI does so for the contract
tests); importing it then fails in ways other than ImportError, and a failed import leaves the
package half-registered, so a second attempt can fail differently. So a lookup catches everything,
the first failure is remembered (no second attempt) and said once.
"""
import importlib
import importlib.util
import logging
from typing import Any, Optional

logger = logging.getLogger(__name__)


_import_failure: Optional[str] = None  # why sglang did not import, once it has failed


def sglang_attribute(module: str, name: str) -> Optional[Any]:
    global _import_failure
    if _import_failure is not None or importlib.util.find_spec("sglang") is None:
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as error:  # noqa: BLE001 - see the module docstring
        _import_failure = f"{type(error).__name__}: {error}"
        logger.warning("sglang is installed but does not import (%s); the SGLang backend uses its local "
                       "equivalents, which only the contract tests' fake server reads", _import_failure)
        return None
