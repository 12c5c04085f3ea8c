"""benchmarks/common.py's profile accounting with synthetic profiler events (times in microseconds): which
device events are kernels, and the idle-time attribution (every stretch without a kernel goes to the innermost
record_function range the host was in)."""
import importlib.util
import os
from types import SimpleNamespace

import pytest

COMMON = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "common.py")


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("benchmark_common", COMMON)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _event(start, end, name="aten::add", annotation=False, device_type=None):
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name,
                           is_user_annotation=annotation, device_type=device_type)


def test_a_ranges_device_span_is_not_a_kernel(common):
    """Invariant: the profiler reports a record_function range on the device as well (GPU user annotations);
    such a span covers the idle time between its kernels, so only real device work counts as kernels."""
    from torch.autograd import DeviceType

    kernel = _event(100, 200, "nvjet_gemm", device_type=DeviceType.CUDA)
    events = [kernel, _event(0, 900, "rollout.admit", True, DeviceType.CUDA),
              _event(0, 900, "rollout.admit", True, DeviceType.CPU),
              _event(10, 20, "aten::mm", device_type=DeviceType.CPU)]
    assert common.device_kernels(events) == [kernel]


def test_a_range_is_not_a_top_operator(common):
    """Invariant: the operator ranking leaves out record_function ranges (a range's device-side span covered
    0.59 s of a 0.72 s text call and ranked above the GEMMs inside it)."""
    averages = [SimpleNamespace(key="rollout.admit", self_device_time_total=590_000, is_user_annotation=True),
                SimpleNamespace(key="aten::mm", self_device_time_total=460_000, is_user_annotation=False),
                SimpleNamespace(key="aten::add", self_device_time_total=0, is_user_annotation=False)]
    profiler = SimpleNamespace(key_averages=lambda: averages)
    assert common._top_operators(profiler, top=3) == {"aten::mm": 0.46}


def test_idle_time_goes_to_the_innermost_range(common):
    """Invariant: with kernels at [100, 200) and [500, 600) inside a host window [0, 1000): the 100 us before the
    first kernel lie in no range, the 300 us between them split into rollout.admit (200-300, 400-500) and
    rollout.retire nested in it (300-400), and the 380 us after the last kernel (620-1000) go to
    rollout.decode_step; gaps under IDLE_GAP_US (10 us between kernels at 600 and 610) count nowhere."""
    kernels = [_event(100, 200), _event(500, 600), _event(610, 620)]
    host = [_event(0, 1000, "aten::empty"), _event(150, 500, "rollout.admit", True),
            _event(300, 400, "rollout.retire", True), _event(600, 1000, "rollout.decode_step", True)]
    assert common._idle_by_range(kernels, host) == {"rollout.decode_step": 0.38, "rollout.admit": 0.2,
                                                    "rollout.retire": 0.1, "outside": 0.1}


def test_no_kernels_means_no_idle_time_to_attribute(common):
    """Invariant: a CPU run (no kernels) reports nothing, not its whole wall time as GPU idle time."""
    assert common._idle_by_range([], [_event(0, 100, "rollout.admit", True)]) == {}
