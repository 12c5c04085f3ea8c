"""Test-only: put Qwen3-VL into today's registries (models.BUILDERS, convert.FAMILIES) in this process.

Until the ModelFamily registry (models/family.py) finds models/qwen3_vl/ by itself, the shared registries
cannot name Qwen3-VL without an edit outside the family's folder (issue 18, acceptance 1); the tests
register it here instead, through these adapters from the registries' signatures to the family's."""
import contextlib

from mmrl_megatron.models.qwen3_vl.conversion import ALIASES, conversion_rules  # noqa: F401 - convert reads ALIASES
from mmrl_megatron.models.qwen3_vl.geometry import read_geometry


def build(model_config, hf_config, role):
    from mmrl_megatron.models.qwen3_vl.build import build_qwen3_vl

    return build_qwen3_vl(model_config, read_geometry(hf_config), role)


def rules(hf_config, role):
    return conversion_rules(read_geometry(hf_config), role)


def register_qwen3_vl() -> None:
    from mmrl_megatron import models
    from mmrl_megatron.convert import families

    models.BUILDERS.setdefault("qwen3_vl", f"{__name__}:build")
    families.FAMILIES.setdefault("qwen3_vl", __name__)


@contextlib.contextmanager
def register_qwen3_vl_engine():
    """The embedded engine's family table (rollout/embedded/family.py FAMILIES) names Qwen3-VL's adapter
    while the block runs."""
    from mmrl_megatron.rollout.embedded import family

    family.FAMILIES["qwen3_vl"] = "mmrl_megatron.models.qwen3_vl.engine"
    try:
        yield
    finally:
        del family.FAMILIES["qwen3_vl"]
