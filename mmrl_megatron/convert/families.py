"""Which rule table converts which checkpoint: HF config model_type -> family.

A family registers "module" whose `rules(hf_config, role) -> List[Rule]` and `ALIASES` (stored HF
prefix -> canonical prefix pairs) define its conversion; modules import on first use. A module may also
define its own `load_hf_into_model` / `iter_hf_tensors` applying its table to layouts the generic ones
(loader.py, exporter.py) do not know: Kimi-VL's handle expert parallelism and the router's bias buffer."""
import importlib
from typing import Mapping

from .errors import CheckpointError
from .rules import RuleTable

FAMILIES = {
    "qwen2_5_vl": "mmrl_megatron.convert.qwen2_5_vl",
    "kimi_vl": "mmrl_megatron.convert.kimi_vl",
}


def family_module(hf_config: Mapping):
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"config.json model_type {model_type!r} has no conversion rules; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def rule_table(hf_config: Mapping, role: str = "actor") -> RuleTable:
    return RuleTable(family_module(hf_config).rules(hf_config, role), hf_config["model_type"])


def aliases(hf_config: Mapping):
    return getattr(family_module(hf_config), "ALIASES", ())


def family_override(hf_config: Mapping, function_name: str):
    """The family module's own `function_name` (load_hf_into_model, iter_hf_tensors), or None."""
    return getattr(family_module(hf_config), function_name, None)
