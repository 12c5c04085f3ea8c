"""Token-budget micro-batches and packed labels: every response token is scored at the position that predicts it."""
import torch

from mmrl_megatron.trainer.batch import Sample, build_micro_batches, split_by_token_budget
from tests.trainer.stand_ins import pack_sequences, positions


def test_split_by_token_budget_keeps_order_and_budget():
    """Invariant: groups are consecutive, within budget, and a sequence over budget travels alone."""
    assert split_by_token_budget([3, 4, 2, 9, 1], budget=7) == [[0, 1], [2], [3], [4]]
    assert split_by_token_budget([], budget=5) == []


def test_micro_batch_labels_and_response_index():
    """Invariant: only the positions that predict response tokens (start + prompt_length - 1 + j) reach the
    output layer, in sample order; each such row's label is the response token it predicts."""
    samples = [Sample([1, 2, 3], [4, 5], group=0), Sample([6, 7], [8, 9, 10], group=0)]
    for sample in samples:
        sample.position_ids = positions(sample.prompt_ids, len(sample.response_ids), None)
        sample.tensors["x"] = torch.arange(len(sample.response_ids), dtype=torch.float32) + 1
    [micro_batch] = build_micro_batches(samples, token_budget=100, pack_sequences=pack_sequences)
    assert micro_batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert micro_batch.output_rows.tolist() == [2, 3, 6, 7, 8]
    assert micro_batch.labels.tolist() == [[4, 5, 8, 9, 10]]
    labels_at_responses = micro_batch.response_view(micro_batch.labels.float())
    assert labels_at_responses.tolist() == [[4.0, 5.0, 0.0], [8.0, 9.0, 10.0]]
    assert micro_batch.mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert micro_batch.stacked("x").tolist() == [[1, 2, 0], [1, 2, 3]]
    assert micro_batch.position_ids.shape == (3, 1, 10)
    assert len(build_micro_batches(samples, token_budget=5, pack_sequences=pack_sequences)) == 2
