"""One step's experience: samples (prompt + response + what each phase adds), token-budget micro-batches
packed without padding, and the padded [B, L] response views the algorithm functions take.

Convention: response tensors are left-aligned, right-padded [B, L]; response token j of a sequence is
predicted at packed position offset + prompt_length - 1 + j. Only those positions reach the output layer
(`output_rows`, in sample order), so the model's last stage returns one row per response token and
`labels` and `response_index` refer to those rows. A multi-turn response also holds the environment's turns;
its loss_mask keeps them out of the loss, the KL and the advantages (they are 0 in the response mask) and
lets their image pads take images.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..models.common.transfer import to_device

# Per-sample response-aligned 1-D tensors the phases fill in (name -> [response_length]).
ResponseTensors = Dict[str, torch.Tensor]


@dataclass
class Sample:
    """One response to one prompt, and everything computed about it during a step."""

    prompt_ids: List[int]
    response_ids: List[int]
    group: int  # index of its prompt within this rank's step; the n samples of a prompt share it
    rollout_logprobs: Optional[List[float]] = None
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None  # [3, prompt + response]
    finish_reason: str = "stop"
    score: float = 0.0
    accuracy: float = 0.0
    tensors: ResponseTensors = field(default_factory=dict)
    # multi-turn: per response token 1 if the policy generated it, 0 if the environment wrote it; None: all 1
    loss_mask: Optional[List[int]] = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def trained_tokens(self) -> int:
        """Response tokens the policy generated: the ones the loss counts."""
        return len(self.response_ids) if self.loss_mask is None else sum(self.loss_mask)

    @property
    def assistant_turns(self) -> int:
        """Runs of generated tokens in the response (1 for a single-turn response)."""
        mask = self.loss_mask or [1]
        return sum(1 for index, value in enumerate(mask) if value and (index == 0 or not mask[index - 1]))


def split_by_token_budget(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """Consecutive index groups whose total length stays within `budget` (a longer sequence goes alone).

    Order is kept so a micro-batch's samples stay together and results map back by index."""
    groups: List[List[int]] = []
    current: List[int] = []
    used = 0
    for index, length in enumerate(lengths):
        if current and used + length > budget:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    if current:
        groups.append(current)
    return groups


def pad_responses(values: Sequence[torch.Tensor], width: Optional[int] = None) -> torch.Tensor:
    """Right-pad 1-D tensors into [B, width] with zeros."""
    width = width if width is not None else max((len(v) for v in values), default=0)
    out = torch.zeros(len(values), width, dtype=torch.float32)
    for row, value in enumerate(values):
        out[row, :len(value)] = value.float()
    return out


def response_mask(samples: Sequence[Sample]) -> torch.Tensor:
    """[B, L]: 1 on the response tokens the policy generated, 0 on environment turns and padding."""
    width = max(len(s.response_ids) for s in samples)
    mask = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        mask[row, :len(sample.response_ids)] = 1.0 if sample.loss_mask is None else torch.tensor(sample.loss_mask)
    return mask


@dataclass
class MicroBatch:
    """Packed model inputs for a few samples plus their response-aligned training tensors."""

    samples: List[Sample]
    input_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, R], the token each output row predicts
    position_ids: torch.Tensor  # [3, 1, T]
    packed_seq_params: object
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    response_index: torch.Tensor  # [B, L] the output row of each response token's prediction
    mask: torch.Tensor  # [B, L]
    # [1, T] True on the tokens the model was given (prompt, environment turns): the only ones images may occupy
    prompt_mask: torch.Tensor
    output_rows: Optional[torch.Tensor] = None  # [R] packed positions sent to the output layer; None: all T
    # stacked()'s results by name, with the sample tensors each was stacked from
    stacked_tensors: Dict[str, Tuple[Tuple[torch.Tensor, ...], torch.Tensor]] = field(default_factory=dict,
                                                                                      repr=False)

    def to(self, device: torch.device) -> "MicroBatch":
        """Move the model inputs; image_grid_thw stays on the host, where the vision tower reads its shape."""
        for name in ("input_ids", "labels", "position_ids", "pixel_values", "response_index", "mask", "prompt_mask",
                     "output_rows"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, to_device(value, device))
        if self.packed_seq_params is not None:
            self.packed_seq_params = self.packed_seq_params.to(device)
        return self

    def response_view(self, packed: torch.Tensor) -> torch.Tensor:
        """Per-row model output [1, R] or [R] -> [B, L] response values, 0 on padding."""
        return packed.reshape(-1)[self.response_index] * self.mask

    def stacked(self, name: str) -> torch.Tensor:
        """The samples' response tensor `name` as [B, L] on the mask's device, built once while the samples
        hold the same tensors (a CUDA-graph replay copies it into the captured micro-batch's)."""
        sources = tuple(s.tensors[name] for s in self.samples)
        cached = self.stacked_tensors.get(name)
        if (cached is None or cached[1].device != self.mask.device
                or any(a is not b for a, b in zip(cached[0], sources))):
            cached = sources, to_device(pad_responses(sources, self.mask.shape[1]), self.mask.device)
            self.stacked_tensors[name] = cached
        return cached[1]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def build_micro_batch(samples: List[Sample], pack_sequences: Callable) -> MicroBatch:
    """Pack `samples` into one sequence stream (no padding) with their labels, positions and images."""
    sequences = [s.prompt_ids + s.response_ids for s in samples]
    input_ids, cu_seqlens, packed_seq_params = pack_sequences(sequences)
    prompt_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    width = max(len(s.response_ids) for s in samples)
    response_index = torch.zeros(len(samples), width, dtype=torch.long)
    output_rows, row_count = [], 0
    for row, (sample, start) in enumerate(zip(samples, cu_seqlens[:-1].tolist())):
        prompt_mask[0, start:start + len(sample.prompt_ids)] = True
        if sample.loss_mask is not None:
            prompt_mask[0, start + len(sample.prompt_ids):start + sample.length] = torch.tensor(sample.loss_mask) == 0
        first, count = start + len(sample.prompt_ids) - 1, len(sample.response_ids)
        output_rows.append(torch.arange(first, first + count))
        response_index[row, :count] = torch.arange(row_count, row_count + count)
        row_count += count
    output_rows = torch.cat(output_rows)
    labels = input_ids[:, output_rows + 1]
    position_ids = torch.cat([s.position_ids for s in samples], dim=1).unsqueeze(1)
    with_images = [s for s in samples if s.pixel_values is not None]
    pixel_values = torch.cat([s.pixel_values for s in with_images]) if with_images else None
    image_grid_thw = torch.cat([s.image_grid_thw for s in with_images]) if with_images else None
    return MicroBatch(samples, input_ids, labels, position_ids, packed_seq_params, pixel_values, image_grid_thw,
                      response_index, response_mask(samples), prompt_mask, output_rows)


def build_micro_batches(samples: List[Sample], token_budget: int, pack_sequences: Callable) -> List[MicroBatch]:
    groups = split_by_token_budget([s.length for s in samples], token_budget)
    return [build_micro_batch([samples[i] for i in group], pack_sequences) for group in groups]
