"""The family registry (models/family.py) and the one config.json reader (models/hf_config.py)."""
import json
import subprocess
import sys

import pytest

from mmrl_megatron.models.errors import ModelError
from mmrl_megatron.models.family import ModelFamily, family_for, registered_families
from mmrl_megatron.models.hf_config import read_hf_config


def test_every_family_package_is_found_by_its_model_type():
    """Invariant: each models/<family>/ exporting FAMILY is registered under its config.json model_type."""
    families = registered_families()
    assert {"qwen2_5_vl", "kimi_vl"} <= set(families)
    for model_type, family in families.items():
        assert isinstance(family, ModelFamily) and family.model_type == model_type
        assert family_for({"model_type": model_type}) is family


def test_override_and_unknown_model_type():
    """Invariant: model.family overrides config.json's model_type; an unknown one is a ModelError naming it and
    listing the known families."""
    assert family_for({"model_type": "llava"}, "kimi_vl").model_type == "kimi_vl"
    with pytest.raises(ModelError, match=r"model_type 'llava'.*kimi_vl.*qwen2_5_vl"):
        family_for({"model_type": "llava"})


def test_importing_the_families_loads_neither_megatron_nor_transformers():
    """Invariant: finding the families is cheap: the heavy libraries load inside the FAMILY callables."""
    code = ("import sys; from mmrl_megatron.models.family import registered_families; registered_families(); "
            "print([m for m in ('megatron', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_read_hf_config_names_the_file(tmp_path):
    """Invariant: a missing, corrupt or non-object config.json is a ModelError naming its path; a megatron
    checkpoint's hf/config.json is read when the directory has none at its top."""
    with pytest.raises(ModelError, match=f"{tmp_path}/config.json not found"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is not readable JSON"):
        read_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ModelError, match="not a JSON object"):
        read_hf_config(str(tmp_path))
    checkpoint = tmp_path / "mcore"
    (checkpoint / "hf").mkdir(parents=True)
    (checkpoint / "hf" / "config.json").write_text(json.dumps({"model_type": "kimi_vl"}))
    assert read_hf_config(str(checkpoint)) == {"model_type": "kimi_vl"}
