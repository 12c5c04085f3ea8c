"""The CPU redirection (parallel/cpu_support.py) leaves torch's device context working: models built under
`with torch.device("meta")` (the streamed converters; transformers' from_pretrained) get meta tensors."""
from tests.cpu_ranks import run_on_cpu_ranks


def _devices_built_under_meta():
    import torch

    with torch.device("meta"):  # run_on_cpu_ranks has switched the redirection on in this process
        return [torch.nn.Linear(2, 2).weight.device.type, torch.empty(3).device.type, torch.zeros(3).device.type]


def test_meta_device_context_survives_the_redirection():
    """Invariant: after enable_cpu_execution, factories and modules still honour the device context."""
    assert run_on_cpu_ranks(1, _devices_built_under_meta)[0] == ["meta", "meta", "meta"]
