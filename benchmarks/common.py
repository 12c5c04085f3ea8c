"""Helpers shared by the benchmarks: device choice, a single-process megatron-core start, the measured
bf16 matmul peak (the MFU denominator), device-timeline phase timing, peak memory and RESULTS.md rows."""
import datetime
import json
import os
import socket
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

GIB = float(1 << 30)


def pick_device(requested: str, quick: bool) -> torch.device:
    """'cuda' or 'cpu' as asked; 'auto' is the GPU when there is one, except for --quick runs (CPU smoke tests)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    if requested == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_single_process_megatron(device: torch.device, seed: int = 0):
    """A world of one (gloo on CPU, NCCL on GPU) with megatron-core's groups at TP = PP = 1, seeded as the
    trainer seeds (parallel.start_processes); returns its parallel.ParallelDims."""
    from mmrl_megatron.parallel import ParallelDims, start_processes

    os.environ.setdefault("MASTER_PORT", str(_free_port()))  # concurrent runs must not share the default port
    return start_processes(ParallelDims(world_size=1), device, seed)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 50) -> float:
    """FLOP/s of a size^3 matmul in `dtype`, timed here: MFU is reported against what this device reaches
    in this run, not a datasheet figure."""
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):  # cuBLAS heuristics and clocks settle
        torch.matmul(left, right, out=out)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(left, right, out=out)
    synchronize(device)
    return 2.0 * size ** 3 * repeats / (time.perf_counter() - start)


class PhaseClock:
    """Seconds per named phase on the device's timeline: CUDA events on a GPU (recording them does not
    synchronise, so the timed work runs as it would untimed), perf_counter on the CPU.

    mark(phase) opens a phase and closes the previous one; stop() closes the last. Phases named more
    than once accumulate (e.g. the forward of every micro-batch). Each phase is also a record_function range
    (`phase.<name>`), so a profile_summary of the timed work splits its idle time by phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._marks: List[Tuple[Optional[str], object]] = []
        self._range: Optional[torch.profiler.record_function] = None

    def _close_range(self) -> None:
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, start, end) -> float:
        if self.device.type == "cuda":
            return start.elapsed_time(end) / 1000.0
        return end - start

    def mark(self, phase: str) -> None:
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # a CUDA-graph capture records work without running it: nothing to time
        self._close_range()
        self._range = torch.profiler.record_function(f"phase.{phase}")
        self._range.__enter__()
        self._marks.append((phase, self._now()))

    def stop(self) -> None:
        self._close_range()
        self._marks.append((None, self._now()))

    def reset(self) -> None:
        self._marks = []

    def seconds_per_phase(self) -> Dict[str, float]:
        synchronize(self.device)
        totals: Dict[str, float] = {}
        for (phase, start), (_, end) in zip(self._marks[:-1], self._marks[1:]):
            if phase is not None:
                totals[phase] = totals.get(phase, 0.0) + self._seconds(start, end)
        return totals


def _resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def allocated_bytes(device: torch.device) -> int:
    """Memory in use now: tensors held by the CUDA caching allocator, or the process's resident set on CPU."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.memory_allocated(device)
    return _resident_bytes("VmRSS")


class PeakMemory:
    """Peak memory while the block runs: the CUDA allocator's peak on a GPU; on the CPU the kernel's
    resident-set high-water mark, reset on entry (/proc/self/clear_refs), else the resident set on exit.
    CPU figures include the allocator's slack and are smoke values; GPU figures are the ones to report."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._high_water_reset = False

    def __enter__(self) -> "PeakMemory":
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # 5: reset the high-water mark to the current resident set
            self._high_water_reset = True
        except OSError:
            self._high_water_reset = False
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = _resident_bytes("VmHWM" if self._high_water_reset else "VmRSS")


class ProcessTreePeakMemory:
    """Peak memory of this process plus its children while the block runs (megatron-core writes checkpoints
    from forked child processes, which a process's own high-water mark misses), sampled with psutil every
    `interval_s` as the sum of proportional set sizes (PSS: a page shared by k processes counts 1/k in each,
    so the parent's memory a forked writer inherits is counted once). Memory-mapped file pages that are
    resident count too (safetensors are read that way)."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = None
        self._thread = None

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me] + me.children(recursive=True):
                try:
                    total += process.memory_full_info().pss
                except psutil.Error:  # a child that exited between listing and reading
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "ProcessTreePeakMemory":
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def profile_call(call: Callable[[], object], device: torch.device, trace_path: str, rows: int = 40) -> str:
    """Run `call` once under torch.profiler; write its Chrome trace to trace_path (.json.gz) and return the
    operator table sorted by each operator's own device time (CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        call()
        synchronize(device)
    profiler.export_chrome_trace(trace_path)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def significant(value: float, digits: int = 4) -> float:
    """A figure rounded to significant digits, so tiny --quick figures do not round to 0."""
    return float(f"{value:.{digits}g}")


def utc_date() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    """The command that reproduces this run, for the RESULTS.md row."""
    arguments = list(argv if argv is not None else sys.argv[1:])
    return " ".join([f"python benchmarks/{script}"] + arguments)


def print_rows(rows: Sequence[Dict], results_row: Callable[[Dict, Optional[Sequence[str]]], str],
               argv: Optional[Sequence[str]]) -> None:
    """Each row as a JSON line, then each as its RESULTS.md markdown row."""
    for row in rows:
        print(json.dumps(row), flush=True)
    for row in rows:
        print(results_row(row, argv))


def markdown_row(cells: Sequence[object]) -> str:
    """One benchmarks/RESULTS.md table row: | date | device | workload | ours | baseline | ratio | command |."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _busy_seconds(intervals: List[Tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels overlapping on several streams count once)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def _idle_gaps(kernels, host_events, top: int) -> List[Dict[str, object]]:
    """The `top` longest stretches with no kernel running (ms), each with the host operators that began in it
    (most frequent first): what the GPU waited for."""
    import collections

    spans = sorted((k.time_range.start, k.time_range.end) for k in kernels)
    gaps, reach = [], None
    for start, end in spans:
        if reach is not None and start > reach:
            gaps.append((start - reach, reach, start))
        reach = end if reach is None else max(reach, end)
    found = []
    for length, begin, end in sorted(gaps, reverse=True)[:top]:
        names = collections.Counter(e.name for e in host_events if begin <= e.time_range.start < end)
        found.append({"ms": round(length / 1e3, 3), "host": dict(names.most_common(4))})
    return found


IDLE_GAP_US = 20.0  # shorter kernel-to-kernel gaps are launch latency (a graph's own), not host work


def _idle_by_range(kernels, host_events) -> Dict[str, float]:
    """Milliseconds with no kernel running, in gaps of at least IDLE_GAP_US, split by the innermost
    torch.profiler.record_function range the host was in meanwhile (the engine marks its phases: rollout.*);
    "outside" where it was in none. The profiled host events bound the window, so idle time before the first
    kernel and after the last counts too. Where a call's idle time goes, not only its longest stretches; empty
    without kernels (a CPU run)."""
    if not kernels:
        return {}
    spans = sorted((k.time_range.start, k.time_range.end) for k in kernels)
    ranges = [(e.time_range.start, e.time_range.end, e.name) for e in host_events if e.is_user_annotation]
    finish = max([e.time_range.end for e in host_events] + [spans[-1][1]])
    idle: Dict[str, float] = {}
    reach = min([e.time_range.start for e in host_events] + [spans[0][0]])
    for start, end in spans + [(finish, finish)]:
        if start - reach >= IDLE_GAP_US:
            inside = [r for r in ranges if r[0] < start and r[1] > reach]
            cuts = sorted({reach, start} | {t for r in inside for t in r[:2] if reach < t < start})
            for a, b in zip(cuts, cuts[1:]):
                covering = [r for r in inside if r[0] <= a and r[1] >= b]
                name = max(covering)[2] if covering else "outside"  # the latest-starting range is the innermost
                idle[name] = idle.get(name, 0.0) + (b - a) / 1e3
        reach = max(reach, end)
    return {name: round(ms, 3) for name, ms in sorted(idle.items(), key=lambda item: -item[1])}


def scalar_read_sites(call: Callable[[], object], top: int = 5) -> Dict[str, int]:
    """Run `call` once and count where its scalar reads (`.item()`, `.tolist()`, `float(t)`: each one a host
    synchronisation on a GPU) come from: the innermost frames outside torch, most frequent first."""
    import collections
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    sites: collections.Counter = collections.Counter()

    class CountScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                frames = [f for f in traceback.extract_stack() if f"{os.sep}torch{os.sep}" not in f.filename][-3:-1]
                sites[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(frames))] += 1
            return func(*args, **(kwargs or {}))

    # backward runs on autograd's device threads, which a dispatch mode (thread-local) would not see
    with torch.autograd.set_multithreading_enabled(False), CountScalarReads():
        call()
    return dict(sites.most_common(top))


def _top_operators(profiler, top: int) -> Dict[str, float]:
    """The operators (aten ops and autograd nodes) whose own kernels took most device time: kernel names
    such as elementwise_kernel do not say which part of the model launched them. record_function ranges are
    not operators: their device-side spans (device_kernels) would rank a range above the work inside it."""
    totals = sorted(((event.key, event.self_device_time_total / 1e6) for event in profiler.key_averages()
                     if not event.is_user_annotation), key=lambda item: -item[1])
    return {name[:60]: round(seconds, 4) for name, seconds in totals[:top] if seconds > 0}


def device_kernels(events) -> list:
    """The profiled kernels (and copies): the device's events less the GPU-side spans of record_function
    ranges, which the profiler reports on the device too (a range such as rollout.admit spans the idle time
    between its kernels, so counting it would hide that time and inflate the busy share)."""
    from torch.autograd import DeviceType

    return [event for event in events if event.device_type == DeviceType.CUDA and not event.is_user_annotation]


def profile_summary(call: Callable[[], object], device: torch.device, top: int = 12) -> Dict[str, object]:
    """Run `call` once under torch.profiler and summarise what a hot path is judged by: wall seconds, kernels
    launched, host synchronisations (stream/device/event waits) and scalar reads (`.item()`, `.tolist()`,
    `float(t)`), the share of the wall time some kernel was running, the kernels and the operators with
    most device time, the longest idle stretches of the GPU with what the host began in them, and all idle
    time by the phase the host was in (record_function ranges). A first run
    warms up the profiled one; a last one says where the scalar reads come from (scalar_read_sites: its
    dispatch mode makes torch.compile'd kernels run eagerly, so it must not be the profiled run's warm-up)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    call()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        wall = time.perf_counter() - start
    events = profiler.events()
    kernels = device_kernels(events)
    busy = _busy_seconds([(k.time_range.start / 1e6, k.time_range.end / 1e6) for k in kernels])
    host_events = [event for event in events if event.device_type == DeviceType.CPU]
    device_time: Dict[str, float] = {}
    for kernel in kernels:
        device_time[kernel.name] = device_time.get(kernel.name, 0.0) + kernel.time_range.elapsed_us() / 1e6
    return {
        "wall_s": round(wall, 4), "kernels": len(kernels),
        "host_syncs": sum(event.name in SYNC_EVENTS for event in events),
        "scalar_reads": sum(event.name == "aten::_local_scalar_dense" for event in events),
        "gpu_busy_fraction": round(busy / wall, 3) if wall > 0 else 0.0,
        "top_kernels_s": {name[:80]: round(seconds, 4) for name, seconds in
                          sorted(device_time.items(), key=lambda item: -item[1])[:top]},
        "top_operators_s": _top_operators(profiler, top),
        "largest_idle_gaps": _idle_gaps(kernels, host_events, top),
        "idle_ms_by_range": _idle_by_range(kernels, host_events),
        "scalar_read_sites": scalar_read_sites(call),
    }
