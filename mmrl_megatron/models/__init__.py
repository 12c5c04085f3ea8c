"""Model families on megatron-core. A family is one package, models/<family>/, exporting FAMILY (family.py);
building a model from a config or a directory happens in building.py; config.json is read by hf_config.py.

Importing this package does not import megatron-core or transformers."""
from .building import build_meta_model, build_model, build_model_from_dir, conversion_table, load_model_weights
from .errors import ModelError
from .family import ModelFamily, family_for

__all__ = ["ModelError", "ModelFamily", "build_meta_model", "build_model", "build_model_from_dir",
           "conversion_table", "family_for", "load_model_weights"]
