"""CUDA-graph replay of update micro-batches whose shapes repeat (`actor.cuda_graphs`).

On one GPU the update's host work (megatron-core's layer code, the kernel launches) leaves the GPU idle for
16-28% of a 3B step, depending on the host (benchmarks/RESULTS.md, 2026-12-04). A micro-batch whose
signature was seen before replays its captured forward + loss + backward as one graph launch instead. The
signature is everything the host reads while building that work: the device tensors' shapes and dtypes,
every host-side value (packing bounds, CPU tensors, the samples' lengths and which response tensors they
carry) and the caller's key for what its loss closes over (the normaliser). Before a replay, the
micro-batch's device tensors are copied into the captured micro-batch's; the gradients accumulate into
megatron-core's DDP buffers, which never move, so replays add up like eager passes.

A signature is captured at its second occurrence: the first runs eagerly and compiles, autotunes and
allocates whatever the capture then records. Lengths that never repeat (RL rollouts) therefore cost a
dictionary lookup per micro-batch and no capture. Each captured graph keeps its activations' memory in a
private pool, so at most `capacity` graphs are kept (UpdateGraphs says which).

The role's update runs on a stream of its own, and megatron-core's DDP is built on it (trainer/build.py). DDP
keeps every parameter's gradient-accumulation node alive from its construction, and autograd runs such a
node on the stream that was current then: built on the default stream, each parameter's accumulation would
wait on the default stream from inside the capture, which breaks it (torch warns "The AccumulateGrad node's
stream does not match ..."). A graph cannot be captured on the default stream itself.
"""
import contextlib
import dataclasses
from collections import OrderedDict
from typing import Callable, Dict, Hashable, Iterator, List, Optional, Sequence

import torch

from .batch import MicroBatch

ForwardBackward = Callable[[MicroBatch], Dict]  # runs one micro-batch's forward, loss and backward: its stats
SIGNATURES_REMEMBERED = 256  # signatures seen once, kept to recognise a repeat (a few steps' micro-batches)


def _describe(value) -> Hashable:
    """What the host can read of `value`: a device tensor's shape and dtype, a host tensor's values too."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu":
            return ("host", value.dtype, tuple(value.shape), tuple(value.flatten().tolist()))
        return ("device", value.dtype, tuple(value.shape))
    if dataclasses.is_dataclass(value):
        return (type(value).__name__,) + tuple((f.name, _describe(getattr(value, f.name)))
                                               for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(item) for item in value)
    return value


def _model_input_fields(micro_batch: MicroBatch):
    """(name, value) of the micro-batch's fields the model and loss read directly: all but its samples and
    the stacked response tensors built from them."""
    return [(f.name, getattr(micro_batch, f.name)) for f in dataclasses.fields(micro_batch)
            if f.name not in ("samples", "stacked_tensors")]


def graph_signature(micro_batch: MicroBatch, loss_key: Hashable) -> Hashable:
    """Equal for two micro-batches exactly when one's captured work computes the other's results once its
    device tensors are copied in."""
    fields = tuple((name, _describe(value)) for name, value in _model_input_fields(micro_batch))
    samples = tuple((len(s.prompt_ids), len(s.response_ids), tuple(sorted(s.tensors))) for s in micro_batch.samples)
    return loss_key, fields, samples


def _device_tensors(micro_batch: MicroBatch, stacked_names: Sequence[str]) -> List[torch.Tensor]:
    """The micro-batch's device tensors in a fixed order: its fields', then the response tensors
    `stacked_names` stacked."""
    found: List[torch.Tensor] = []

    def collect(value) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                found.append(value)
        elif dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                collect(getattr(value, f.name))

    for _, value in _model_input_fields(micro_batch):
        collect(value)
    found.extend(micro_batch.stacked(name) for name in stacked_names)
    return found


def _cloned(value):
    """`value` with every tensor copied out of the graph's output buffers, which the next replay overwrites."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _cloned(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(item) for item in value)
    return value


class _CapturedMicroBatch:
    """One graph, the device tensors of the micro-batch it was captured on (the graph's inputs) and its outputs."""

    def __init__(self, micro_batch: MicroBatch, stacked_names: Sequence[str], forward_backward: ForwardBackward,
                 stream: torch.cuda.Stream):
        # host-to-device copies cannot be captured: the response tensors the loss reads are stacked first
        self.stacked_names = stacked_names
        self.inputs = _device_tensors(micro_batch, stacked_names)
        self.graph = torch.cuda.CUDAGraph()
        # a private memory pool, so graphs replay in any order; thread_local, as megatron-core's full-iteration
        # graph captures: in the default (global) mode a CUDA call from another thread, such as NCCL's watchdog
        # querying its events, can fail the capture
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            self.outputs = forward_backward(micro_batch)
        self.replayed = False  # since the last UpdateGraphs.begin_update

    def replay(self, micro_batch: MicroBatch) -> Dict:
        for static, value in zip(self.inputs, _device_tensors(micro_batch, self.stacked_names)):
            if static.data_ptr() != value.data_ptr():
                static.copy_(value)
        self.graph.replay()
        self.replayed = True
        return _cloned(self.outputs)


def on_update_stream(graphs: Optional["UpdateGraphs"]):
    """A context running its block on graphs' update stream (UpdateGraphs.on_stream); without graphs, where
    it is."""
    return graphs.on_stream() if graphs is not None else contextlib.nullcontext()


class UpdateGraphs:
    """Per role: at most `capacity` captured micro-batches by signature, and the signatures seen once.

    A graph the last update did not replay is dropped when the next begins, so shapes that stop occurring
    give their memory back. While every slot is taken, other repeating signatures run eagerly rather than
    take turns evicting each other (each capture costs an eager pass's host time)."""

    def __init__(self, device: Optional[torch.device] = None, capacity: int = 1):
        # the update's own stream (the module docstring says why); none on the CPU, which has no streams
        self.stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self.capacity = capacity
        self._captured: Dict[Hashable, _CapturedMicroBatch] = {}
        self._seen: "OrderedDict[Hashable, tuple]" = OrderedDict()  # signature -> response tensors it stacked
        self.replays = 0  # micro-batches that ran as a graph (tests and benchmarks read it)

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Run the block on the update's stream, ordered after the caller's stream's work so far; the caller's
        stream waits for the block's work after it, so what it produced is safe to use and free there."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:  # also when the block raises: the caller's stream must not overtake work still queued
            caller.wait_stream(self.stream)

    def begin_update(self) -> None:
        for signature in [s for s, captured in self._captured.items() if not captured.replayed]:
            del self._captured[signature]
        for captured in self._captured.values():
            captured.replayed = False

    def run(self, micro_batch: MicroBatch, loss_key: Hashable, forward_backward: ForwardBackward) -> Dict:
        """forward_backward(micro_batch)'s statistics, from a graph replay when its signature repeats."""
        signature = graph_signature(micro_batch, loss_key)
        captured = self._captured.get(signature)
        if captured is None and signature in self._seen and len(self._captured) < self.capacity:
            captured = self._capture(signature, micro_batch, forward_backward)
        if captured is None:
            stats = forward_backward(micro_batch)
            self._remember(signature, tuple(sorted(micro_batch.stacked_tensors)))
            return stats
        self.replays += 1
        return captured.replay(micro_batch)

    def _remember(self, signature: Hashable, stacked_names: tuple) -> None:
        self._seen[signature] = stacked_names
        self._seen.move_to_end(signature)
        while len(self._seen) > SIGNATURES_REMEMBERED:
            self._seen.popitem(last=False)

    def _capture(self, signature: Hashable, micro_batch: MicroBatch,
                 forward_backward: ForwardBackward) -> _CapturedMicroBatch:
        try:
            captured = _CapturedMicroBatch(micro_batch, self._seen.pop(signature), forward_backward, self.stream)
        except RuntimeError as error:
            raise RuntimeError(f"actor.cuda_graphs: the update's micro-batch could not be captured as a CUDA graph "
                               f"({error}); run with actor.cuda_graphs=false") from error
        self._captured[signature] = captured
        return captured

    def clear(self) -> None:
        """Drop every graph and its memory: the role's weight or gradient storage is about to move (offload),
        and a graph replayed after that would write where the buffers used to be."""
        self._captured.clear()
        self._seen.clear()
