"""The package dependency order holds, model families stay apart, config.json is read in one place (issue 18,
acceptance 2), and megatron's parallel_state is read only inside parallel/ (everything else is handed a
ParallelDims).

Order, top to bottom: trainer -> {rollout, bridge, algorithms, rewards, data} -> models -> convert ->
{config, parallel}. A module may import its own package, its layer's other packages (the bridge pushes to
a rollout engine) and any package below; never one above. Inside models/, a family package (models/<family>/)
imports models/common/ and the models modules, never another family: what two families share lives in
common/. Checked on every module's imports (ast, so imports inside functions count too), without importing them.
"""
import ast
import os

import mmrl_megatron

PACKAGE_ROOT = os.path.dirname(mmrl_megatron.__file__)
LAYERS = [{"trainer"}, {"rollout", "bridge", "algorithms", "rewards", "data"}, {"models"}, {"convert"},
          {"config", "parallel"}]
RANK = {package: depth for depth, packages in enumerate(LAYERS) for package in packages}
CONFIG_READER = "models/hf_config.py"
PARALLEL_STATE = "megatron.core.parallel_state"


def _modules():
    for directory, _, files in os.walk(PACKAGE_ROOT):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                yield os.path.relpath(path, PACKAGE_ROOT), ast.parse(open(path).read(), path)


def _imported_modules(relative: str, node) -> list:
    """The mmrl_megatron module paths an Import/ImportFrom node reaches, split ("mmrl_megatron", "models",
    ...), relative imports resolved."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.level:
        parts = ["mmrl_megatron", *relative.split(os.sep)[:-1]]
        base = parts[:len(parts) - node.level + 1]
        names = [".".join(base + ([node.module] if node.module else []))]
        if not node.module:  # `from .. import models`
            names = [f"{names[0]}.{alias.name}" for alias in node.names]
    else:
        names = [node.module or ""]
    return [name.split(".") for name in names if name.startswith("mmrl_megatron.")]


def _imported(relative: str, node) -> list:
    """The mmrl_megatron.<package> names an Import/ImportFrom node reaches."""
    return [parts[1] for parts in _imported_modules(relative, node)]


def upward_imports():
    problems = []
    for relative, tree in _modules():
        own = relative.split(os.sep)[0]
        if own not in RANK:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for package in _imported(relative, node):
                if package in RANK and RANK[package] < RANK[own]:
                    problems.append(f"mmrl_megatron/{relative}:{node.lineno} ({own}) imports {package}, which is "
                                    "above it")
    return problems


def _family_packages() -> set:
    """The packages under models/ other than common/: each is one model family."""
    models = os.path.join(PACKAGE_ROOT, "models")
    return {name for name in os.listdir(models) if name != "common"
            and os.path.isfile(os.path.join(models, name, "__init__.py"))}


def cross_family_imports():
    families, problems = _family_packages(), []
    for relative, tree in _modules():
        parts = relative.split(os.sep)
        if parts[0] != "models" or len(parts) < 3 or parts[1] not in families:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for module in _imported_modules(relative, node):
                other = module[2] if len(module) > 2 and module[1] == "models" else None
                if other in families and other != parts[1]:
                    problems.append(f"mmrl_megatron/{relative}:{node.lineno} (family {parts[1]}) imports family "
                                    f"{other}; move what both share into models/common/")
    return problems


def _opens_config_json(node) -> bool:
    """A call that builds or opens a path ending in config.json: os.path.join(..., "config.json"),
    open("config.json"), or a path literal ending in /config.json."""
    if not isinstance(node, ast.Call):
        return False
    return any(isinstance(arg, ast.Constant) and isinstance(arg.value, str)
               and (arg.value == "config.json" or arg.value.endswith("/config.json")) for arg in node.args)


def config_json_readers():
    return [f"mmrl_megatron/{relative}:{node.lineno}" for relative, tree in _modules()
            if relative != CONFIG_READER for node in ast.walk(tree) if _opens_config_json(node)]


def _parallel_state_imports(node) -> bool:
    """Whether an Import/ImportFrom node brings in megatron.core.parallel_state (or a name from it)."""
    if isinstance(node, ast.Import):
        return any(alias.name == PARALLEL_STATE or alias.name.startswith(PARALLEL_STATE + ".") for alias in node.names)
    if node.module == "megatron.core":
        return any(alias.name == "parallel_state" for alias in node.names)
    return node.module is not None and (node.module == PARALLEL_STATE or node.module.startswith(PARALLEL_STATE + "."))


def parallel_state_readers():
    return [f"mmrl_megatron/{relative}:{node.lineno}" for relative, tree in _modules()
            if relative.split(os.sep)[0] != "parallel"
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and _parallel_state_imports(node)]


def test_no_module_imports_upward():
    """Invariant: no package imports a package above it in the dependency order."""
    assert upward_imports() == []


def test_no_family_imports_another_family():
    """Invariant: a family package imports models/common/ and the models modules, never another family."""
    assert cross_family_imports() == []


def test_config_json_is_read_in_one_place():
    """Invariant: only models/hf_config.py builds a config.json path; everyone else gets the dict from it."""
    assert config_json_readers() == []


def test_parallel_state_is_read_only_in_parallel():
    """Invariant: outside parallel/ no module imports megatron's parallel_state;
    ranks, sizes and groups come from the ParallelDims passed in."""
    assert parallel_state_readers() == []


def test_the_checks_see_violations(tmp_path, monkeypatch):
    """Invariant: the checks name the module and line of an upward import, of a family importing another
    family (not of one importing common/ or itself), of a config.json read and of each way of importing
    parallel_state; parallel/ itself may import it."""
    (tmp_path / "convert").mkdir()
    (tmp_path / "convert" / "bad.py").write_text(
        "import json, os\nfrom ..models import build_model\n\ndef f(d):\n"
        "    return json.load(open(os.path.join(d, 'config.json')))\n")
    for family in ("alpha", "beta", "common"):
        (tmp_path / "models" / family).mkdir(parents=True)
        (tmp_path / "models" / family / "__init__.py").write_text("")
    (tmp_path / "models" / "alpha" / "vision.py").write_text(
        "from ..common import vlm\nfrom . import tiny\nfrom ..beta.vision import tower\n\ndef f():\n"
        "    import mmrl_megatron.models.beta.tiny\n")
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "groups.py").write_text(
        "def f():\n    from megatron.core import parallel_state as ps\n    import megatron.core.parallel_state\n"
        "    from megatron.core.parallel_state import get_data_parallel_rank\n"
        "    from megatron.core import tensor_parallel\n")
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "dims.py").write_text("from megatron.core import parallel_state\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE_ROOT"]), "PACKAGE_ROOT", str(tmp_path))
    assert upward_imports() == ["mmrl_megatron/convert/bad.py:2 (convert) imports models, which is above it"]
    assert cross_family_imports() == [
        f"mmrl_megatron/models/alpha/vision.py:{line} (family alpha) imports family beta; move what both share "
        "into models/common/" for line in (3, 6)]
    assert config_json_readers() == ["mmrl_megatron/convert/bad.py:5"]
    assert parallel_state_readers() == [f"mmrl_megatron/trainer/groups.py:{line}" for line in (2, 3, 4)]
