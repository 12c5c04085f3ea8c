"""Import the pinned sglang wheel's own modules on a CPU machine, standing in for what needs CUDA or ZMQ.

CI installs `sglang==0.5.23` without dependencies (its dependencies pin a CUDA torch and GBs of kernel
packages) plus the pure-Python packages its request types, HTTP app, server-argument parser and
weight serialisation import at load time (README's install command). The rest of its import graph
(Triton, TVM-FFI, torchvision, ZMQ, sentencepiece, quantisation and grammar libraries, the
scheduler) is only reached at import time, never by the code these tests run, so it is replaced by
inert placeholder modules while sglang loads, and removed again afterwards so that no other test
sees them.

`import_sglang()` returns None where sglang is not installed; tests then skip, except under CI
(CI=true), where a missing wheel is a failure.
"""
import asyncio
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Optional

PINNED = "0.5.23"

# Packages sglang imports at load time but none of the code under test runs. Whole sglang submodules
# are here when importing them drags in GPU kernels (the scheduler: mamba/Triton ops).
PLACEHOLDER_ROOTS = (
    "triton", "tvm_ffi", "torchvision", "sentencepiece", "compressed_tensors", "gguf", "partial_json_parser",
    "setproctitle", "einops", "jsonschema", "xgrammar", "soundfile", "IPython", "aiohttp", "zmq",
    "sglang.srt.managers.scheduler",
)
SGLANG_MODULES = (
    "sglang.srt.managers.io_struct",
    "sglang.srt.sampling.sampling_params",
    "sglang.srt.server_args",
    "sglang.srt.utils",
    "sglang.srt.weight_sync.tensor_bucket",
    "sglang.srt.model_executor.model_runner_components.weight_updater",
    "sglang.srt.entrypoints.http_server",
)


class _Placeholder:
    """Any attribute, call or subscript of a placeholder is another placeholder; as a decorator it is a no-op."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return _Placeholder(f"{self._name}()")

    def __getitem__(self, item):
        return _Placeholder(f"{self._name}[]")

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False


def _any_pydantic_schema(cls, source, handler):
    from pydantic_core import core_schema

    return core_schema.any_schema()


class _PlaceholderClass(type):
    def __getattr__(cls, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Placeholder(f"{cls.__name__}.{item}")


class _PlaceholderModule(types.ModuleType):
    """Capitalised names are classes (sglang subclasses them, uses them in isinstance and pydantic fields)."""

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        if item[:1].isupper():
            value = _PlaceholderClass(item, (), {"__get_pydantic_core_schema__": classmethod(_any_pydantic_schema)})
        else:
            value = _Placeholder(f"{self.__name__}.{item}")
        setattr(self, item, value)
        return value


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, name, path, target=None):
        if any(name == root or name.startswith(root + ".") for root in self.roots):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        module.__version__ = "3.0.0"  # sglang compares triton's version at import
        return module

    def exec_module(self, module):
        pass


def _uvloop_stand_in() -> types.ModuleType:
    module = types.ModuleType("uvloop")
    module.EventLoopPolicy = asyncio.DefaultEventLoopPolicy
    module.install = lambda: None
    return module


_imported: Optional[types.SimpleNamespace] = None


def import_sglang() -> Optional[types.SimpleNamespace]:
    """sglang's modules by short name (io_struct, server_args, ...), or None where sglang is not installed."""
    global _imported
    if _imported is not None:
        return _imported
    if importlib.util.find_spec("sglang") is None:
        return None
    # torch and transformers probe for Triton and torchvision once and cache the answer: let them see
    # the real (absent) packages before the placeholders exist
    import torch._inductor.compile_fx  # noqa: F401
    import torch.utils.flop_counter  # noqa: F401
    import transformers.utils.import_utils  # noqa: F401

    # an earlier import attempt without the placeholders (mmrl_megatron's optional helpers) may have
    # left half-registered sglang modules behind
    for name in [name for name in sys.modules if name == "sglang" or name.startswith("sglang.")]:
        del sys.modules[name]
    finder = _PlaceholderFinder(PLACEHOLDER_ROOTS)
    had_uvloop = "uvloop" in sys.modules or importlib.util.find_spec("uvloop") is not None
    if not had_uvloop:
        sys.modules["uvloop"] = _uvloop_stand_in()
    sys.meta_path.insert(0, finder)
    try:
        modules = {name.rsplit(".", 1)[-1]: importlib.import_module(name) for name in SGLANG_MODULES}
    finally:
        sys.meta_path.remove(finder)
        for name in [name for name, module in sys.modules.items() if isinstance(module, _PlaceholderModule)]:
            del sys.modules[name]
    import sglang

    if sglang.__version__ != PINNED:
        raise RuntimeError(f"installed sglang is {sglang.__version__}, the backend is pinned to {PINNED}")
    # modules that looked for sglang's helpers before it was importable: look again, so that this
    # process sends what production sends (sglang's SafeUnpickler refuses the local fallback's classes)
    for name in ("mmrl_megatron.rollout.sglang.optional_sglang", "mmrl_megatron.rollout.sglang.serialization",
                 "mmrl_megatron.rollout.sglang.update_group"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])
    _imported = types.SimpleNamespace(**modules)
    return _imported


def require_sglang() -> types.SimpleNamespace:
    """The imported modules; skip where sglang is absent, except in CI, where that is a failure."""
    import pytest

    modules = import_sglang()
    if modules is None:
        message = f"sglang {PINNED} is not installed (pip install --no-deps sglang=={PINNED}, see README)"
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the contract tests against the real wheel: " + message)
        pytest.skip(message)
    return modules
