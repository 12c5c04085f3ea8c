"""A role is one megatron model (actor, reference or critic) driven through megatron-core's pipeline
schedule, for scoring (forward only) and for updates (forward + backward + clipped optimizer step).

With expert parallelism the MoE layers exchange tokens between data-parallel ranks once per micro-batch,
so every data-parallel rank runs as many micro-batches as the busiest one: a rank with fewer repeats its
last micro-batch as a filler whose loss and scores are discarded (zero gradient; its tokens do count in
the MoE routing metrics)."""
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .batch import MicroBatch
from .optim import current_lr, queue_clipped_step
from .update_graphs import UpdateGraphs, on_update_stream

# loss_fn(model_output, micro_batch) -> (scalar loss normalised to the whole mini-batch, {stat: (sum, count)}),
# the statistics as device tensors (or floats); plus any per-token [B, L] outputs named in train_step's keep
LossFn = Callable[[torch.Tensor, MicroBatch], Tuple[torch.Tensor, Dict[str, Tuple[float, float]]]]
# score_fn(model_output, micro_batch) -> [B, L] per-response-token values
ScoreFn = Callable[[torch.Tensor, MicroBatch], torch.Tensor]


def _model_forward(model, micro_batch: MicroBatch):
    return model(micro_batch.input_ids, micro_batch.position_ids, micro_batch.packed_seq_params,
                 pixel_values=micro_batch.pixel_values, image_grid_thw=micro_batch.image_grid_thw,
                 prompt_mask=micro_batch.prompt_mask, output_rows=micro_batch.output_rows)


def _micro_batches_to_run(count: int, device: torch.device, dims) -> int:
    """`count`, or with expert parallelism the largest count of any data-parallel rank (a collective)."""
    if dims.expert == 1:
        return count
    most = torch.tensor([count], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=dims.data_parallel_group)
    return int(most.item())


class ModelRole:
    """Model chunks of this pipeline stage (DDP-wrapped when trainable) plus optimizer and schedule; `dims` is
    the parallel.ParallelDims they were built under."""

    def __init__(self, name: str, chunks: List[torch.nn.Module], device: torch.device, dims, optimizer=None,
                 scheduler=None, offload_between_uses: bool = False, graphs: Optional[UpdateGraphs] = None):
        self.name, self.chunks, self.device, self.dims = name, chunks, device, dims
        self.optimizer, self.scheduler = optimizer, scheduler
        # with graphs, update micro-batches whose shapes repeat replay as CUDA graphs (update_graphs.py) and the
        # update runs on their stream; build_role checks the layout allows it and builds DDP on that stream
        self.graphs = graphs
        self.offload_between_uses = offload_between_uses and device.type == "cuda"
        if self.offload_between_uses:
            self._move_parameters(torch.device("cpu"))
        self._routing_stats: Dict[str, Tuple[float, float]] = {}
        if self.trainable:
            self._read_routing_before_gradients_finalize()

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    def _read_routing_before_gradients_finalize(self) -> None:
        """MoE routers count their tokens during the backward passes and finalize_model_grads (run by the
        schedule) resets the counts, so the routing metrics are read just before it, once per update."""
        from megatron.core.utils import get_model_config

        from ..models.common.moe_metrics import moe_routing_metrics

        config = get_model_config(self.chunks[0])
        finalize = config.finalize_model_grads_func
        if not config.num_moe_experts or finalize is None:
            return

        def finalize_after_reading_routing(model_chunks, *args, **kwargs):
            metrics = moe_routing_metrics(model_chunks, self.dims)
            self._routing_stats = {key: (value, 1.0) for key, value in metrics.items()}
            return finalize(model_chunks, *args, **kwargs)

        config.finalize_model_grads_func = finalize_after_reading_routing

    def _move_parameters(self, device: torch.device) -> None:
        for chunk in self.chunks:
            for tensor in list(chunk.parameters()) + list(chunk.buffers()):
                tensor.data = tensor.data.to(device, non_blocking=True)

    def _schedule(self, micro_batches: List[MicroBatch], output_fn, forward_only: bool) -> List:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        placed = [mb.to(self.device) for mb in micro_batches]
        count = _micro_batches_to_run(len(placed), self.device, self.dims)
        batches = iter([(mb, False) for mb in placed] + [(placed[-1], True)] * (count - len(placed)))

        def forward_step(data_iterator, model):
            micro_batch, filler = next(data_iterator)
            if filler:
                return _model_forward(model, micro_batch), lambda output: (output.sum() * 0.0, {})
            return _model_forward(model, micro_batch), lambda output: output_fn(output, micro_batch, count)

        if self.offload_between_uses:
            self._move_parameters(self.device)
        try:
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=batches, model=self.chunks, num_microbatches=count,
                seq_length=max(mb.num_tokens for mb in micro_batches), micro_batch_size=1,
                forward_only=forward_only,
            )
        finally:
            if self.offload_between_uses:
                self._move_parameters(torch.device("cpu"))
        return outputs[:len(placed)] if self.dims.is_last_stage else []

    def _graphed_schedule(self, micro_batches: List[MicroBatch], output_fn, loss_key) -> List:
        """The update's forward-backward as megatron-core's one-stage schedule runs it (the loss divided by the
        micro-batch count, the gradients finalised after the last), each micro-batch through self.graphs."""
        from megatron.core.utils import get_model_config

        model, count = self.chunks[0], len(micro_batches)
        self.graphs.begin_update()

        def forward_backward(micro_batch: MicroBatch) -> Dict:
            loss, stats = output_fn(_model_forward(model, micro_batch), micro_batch, count)
            (loss / count).backward()
            return stats

        # the graph holds `count` as a constant, like the loss key's values
        results = [self.graphs.run(mb.to(self.device), (loss_key, count), forward_backward) for mb in micro_batches]
        get_model_config(model).finalize_model_grads_func(self.chunks)
        return results

    @torch.no_grad()
    def score(self, micro_batches: List[MicroBatch], score_fn: ScoreFn, name: str) -> None:
        """Store score_fn's per-token values as sample.tensors[name] on every pipeline stage."""
        for chunk in self.chunks:
            chunk.eval()

        def output_fn(output, micro_batch, count):
            return torch.zeros((), device=output.device), {name: score_fn(output, micro_batch).float()}

        self._store_per_token(self._schedule(micro_batches, output_fn, forward_only=True), micro_batches, [name])

    def _store_per_token(self, results: List[Dict], micro_batches: List[MicroBatch], names: Sequence[str]) -> None:
        """Move the per-token outputs `names` ([B, L] per micro-batch, on the last pipeline stage) into every
        stage's samples, with one device-to-host copy for the whole pass; `results` loses those keys."""
        for name in names:
            per_micro_batch = []
            for index, micro_batch in enumerate(micro_batches):
                values = results[index].pop(name) if results else torch.zeros(micro_batch.mask.shape,
                                                                                 device=self.device)
                values = values.float().to(self.device).contiguous()
                if self.dims.pipeline > 1:
                    # values exist on the last stage; every stage needs them for advantages and metrics
                    dist.broadcast(values, src=self.dims.last_stage_rank, group=self.dims.pipeline_group)
                per_micro_batch.append(values)
            host = torch.cat([values.flatten() for values in per_micro_batch]).cpu()
            offset = 0
            for values, micro_batch in zip(per_micro_batch, micro_batches):
                rows = host[offset:offset + values.numel()].view(values.shape)
                offset += values.numel()
                for row, sample in enumerate(micro_batch.samples):
                    sample.tensors[name] = rows[row, :len(sample.response_ids)].clone()

    def train_step(self, micro_batches: List[MicroBatch], loss_fn: LossFn, grad_clip: float,
                   lr_override: Optional[float] = None, keep: Sequence[str] = (), loss_key: Hashable = None):
        """One optimizer step over the micro-batches; returns (stats {name: (sum, count)}, grad_norm, stepped).

        lr_override (the supervised warm-up) steps at that learning rate without advancing the schedule.
        keep: names of per-token [B, L] outputs the loss returns among its statistics (the on-policy update's
        own log-probs), stored as sample.tensors[name] like score's.
        loss_key: the host values loss_fn closes over (its normaliser); with it, a role built with cuda_graphs
        replays the micro-batches whose shapes repeat (images take the eager schedule: the vision tower copies
        host-side indices to the GPU).
        A non-finite loss on any rank (checked across all ranks on the device) skips the step: stepped=False."""
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        def output_fn(output, micro_batch, count):
            loss, stats = loss_fn(output, micro_batch)
            # the schedule divides by the number of micro-batches; our losses are already mini-batch normalised
            return loss * count, dict(stats, _finite=torch.isfinite(loss.detach()).float())

        graphed = (self.graphs is not None and loss_key is not None
                   and all(mb.pixel_values is None for mb in micro_batches))
        with on_update_stream(self.graphs):
            results = (self._graphed_schedule(micro_batches, output_fn, loss_key) if graphed
                       else self._schedule(micro_batches, output_fn, forward_only=False))
        if lr_override is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_override
        # the step is queued before anything is read back, so the host prepares it while the GPU finishes
        # the backward; a non-finite loss on any rank makes it a no-op on every rank
        read_step = queue_clipped_step(self.optimizer, grad_clip, self._all_finite(results))
        self._store_per_token(results, micro_batches, keep)
        stats = self._read_stats(results)
        stats.update(self._routing_stats)
        self._routing_stats = {}
        stepped, grad_norm = read_step()
        if stepped and lr_override is None and self.scheduler is not None:
            self.scheduler.step(1)
        return stats, grad_norm, stepped

    def _all_finite(self, results: List[Dict]) -> torch.Tensor:
        """1.0 (a 0-d device tensor, not read) when every micro-batch's loss on every rank is finite; the
        finite flags leave the results (pipeline fillers and stages without outputs have none)."""
        flags = [item.pop("_finite") for item in results if "_finite" in item]
        finite = torch.stack(flags).min() if flags else torch.ones((), device=self.device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite

    def _read_stats(self, results: List[Dict]) -> Dict[str, Tuple[float, float]]:
        """Sum each statistic's (sum, count) over the micro-batches on the device, then read all of them
        with one host transfer."""
        totals: Dict[str, List[torch.Tensor]] = {}
        for item in results:
            for key, pair in item.items():
                pair = [torch.as_tensor(part, dtype=torch.float32, device=self.device) for part in pair]
                totals[key] = pair if key not in totals else [a + b for a, b in zip(totals[key], pair)]
        if not totals:
            return {}
        values = torch.stack([part for pair in totals.values() for part in pair]).tolist()
        return {key: (values[2 * index], values[2 * index + 1]) for index, key in enumerate(totals)}

    def restore_scheduled_lr(self) -> None:
        """Put the schedule's learning rate back after lr_override steps."""
        self.scheduler.step(0)

    def lr(self) -> float:
        return current_lr(self.optimizer)
