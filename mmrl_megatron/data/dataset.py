"""PromptDataset: this data-parallel rank's stream of processed prompts over verl-format parquet files.

Order: each epoch visits the row groups in a permutation drawn from (seed, epoch) and the rows of each
group in a permutation drawn from (seed, epoch, group), so only one row group is in memory at a time
and every rank computes the same global order without communication. Rank r takes the positions
p with p % dp_size == r of that order; a prompt is never split across ranks (the trainer expands it
to n samples). The position is the next global position to examine, so `state_dict` after a batch
resumes exactly after that batch. Bad rows are skipped, warned about (file and row) and counted.
"""
import logging
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from mmrl_megatron.data.errors import DataError, SkippedRow
from mmrl_megatron.data.format import parse_row
from mmrl_megatron.data.processor import PromptProcessor
from mmrl_megatron.data.source import ParquetSource, RowGroup
from mmrl_megatron.data.types import PromptSample

logger = logging.getLogger(__name__)


class PromptDataset:
    """Batches of `batch_size` PromptSamples for one data-parallel rank.

    train=True: shuffled per data.shuffle, augmented per data.augment, repeating over epochs forever.
    train=False (validation): file order, no augmentation, one pass per iteration, last batch may be short.
    """

    def __init__(self, files: Sequence[str], data_config, model_dir: str, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, train: bool = True, processor: Optional[PromptProcessor] = None):
        if batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"batch_size {batch_size} must be >= 1 and dp_rank {dp_rank} in [0, {dp_size})")
        self.source = ParquetSource(files)
        self.processor = processor or PromptProcessor(model_dir, data_config)
        self.batch_size, self.dp_rank, self.dp_size, self.train = batch_size, dp_rank, dp_size, train
        self.shuffle = train and data_config.shuffle
        self.seed = data_config.seed
        self.skip_counts: Counter = Counter()
        self.truncated_count = 0
        self._epoch, self._position, self._usable_in_epoch = 0, 0, 0
        for path in self.source.files:
            self._require_usable_row(path)

    def _require_usable_row(self, path: str) -> None:
        """Stop before training when a file has no row that processes (the reasons are listed)."""
        reasons: Counter = Counter()
        for row_number, row in self.source.file_rows(path):
            try:
                self.processor.process(parse_row(row), index=row_number)
                return
            except SkippedRow as skipped:
                reasons[skipped.reason] += 1
        raise DataError(f"{path}: no usable rows ({dict(reasons)}); run `python -m mmrl_megatron.data.check {path}` "
                        f"to see each row's problem")

    def _epoch_row_groups(self, epoch: int) -> List[RowGroup]:
        groups = self.source.row_groups
        if not self.shuffle:
            return list(groups)
        return [groups[i] for i in np.random.default_rng((self.seed, epoch)).permutation(len(groups))]

    def _row_order(self, epoch: int, group: RowGroup) -> np.ndarray:
        if not self.shuffle:
            return np.arange(group.num_rows)
        return np.random.default_rng((self.seed, epoch, group.first_index)).permutation(group.num_rows)

    def _first_own_position(self, at_least: int) -> int:
        return at_least + (self.dp_rank - at_least) % self.dp_size

    def _sample(self, row: Dict[str, Any], group: RowGroup, local: int) -> Optional[PromptSample]:
        index = group.first_index + local
        augment_seed = None
        if self.train:  # a seed per (seed, epoch, row): resumed runs augment exactly as uninterrupted ones
            augment_seed = int(np.random.SeedSequence((self.seed, self._epoch, index)).generate_state(1)[0])
        try:
            sample = self.processor.process(parse_row(row), index=index, augment_seed=augment_seed)
        except SkippedRow as skipped:
            self.skip_counts[skipped.reason] += 1
            logger.warning("%s row %d skipped (%s): %s", group.file, group.first_row_in_file + local,
                           skipped.reason, skipped)
            return None
        self.truncated_count += sample.truncated
        return sample

    def _samples(self) -> Iterator[PromptSample]:
        while True:
            start = 0
            for group in self._epoch_row_groups(self._epoch):
                end = start + group.num_rows
                first = self._first_own_position(max(self._position, start))
                if first < end:
                    table, order = self.source.read(group), self._row_order(self._epoch, group)
                    for position in range(first, end, self.dp_size):
                        self._position = position + 1
                        local = int(order[position - start])
                        sample = self._sample(self.source.row(table, local), group, local)
                        if sample is not None:
                            self._usable_in_epoch += 1
                            yield sample
                start = end
            if self._usable_in_epoch == 0:
                raise DataError(f"data-parallel rank {self.dp_rank} found no usable row in epoch {self._epoch} of "
                                f"{self.source.files} ({self.source.num_rows} rows for {self.dp_size} ranks; "
                                f"skipped: {dict(self.skip_counts)})")
            if not self.train:
                return
            self._epoch, self._position, self._usable_in_epoch = self._epoch + 1, 0, 0

    def __iter__(self) -> Iterator[List[PromptSample]]:
        if not self.train:
            self._epoch, self._position, self._usable_in_epoch = 0, 0, 0
        batch: List[PromptSample] = []
        for sample in self._samples():
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    @property
    def epoch(self) -> int:
        return self._epoch

    def metrics(self) -> Dict[str, float]:
        """Counters for the tracker: rows skipped per reason, prompts truncated, and the epoch."""
        counters = {f"data/skipped_{reason}": float(count) for reason, count in sorted(self.skip_counts.items())}
        counters.update({"data/skipped_total": float(sum(self.skip_counts.values())),
                         "data/truncated": float(self.truncated_count), "data/epoch": float(self._epoch)})
        return counters

    def state_dict(self) -> Dict[str, Any]:
        """This rank's position; resuming with it continues right after the last batch handed out."""
        return {"epoch": self._epoch, "position": self._position, "usable_in_epoch": self._usable_in_epoch,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "seed": self.seed,
                "skip_counts": dict(self.skip_counts), "truncated_count": self.truncated_count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved = (state["dp_rank"], state["dp_size"], state["seed"])
        if saved != (self.dp_rank, self.dp_size, self.seed):
            raise DataError(f"data state was saved for (dp_rank, dp_size, seed) {saved} but this run has "
                            f"{(self.dp_rank, self.dp_size, self.seed)}; resume with the same layout and data.seed")
        self._epoch, self._position, self._usable_in_epoch = state["epoch"], state["position"], state["usable_in_epoch"]
        self.skip_counts = Counter(state["skip_counts"])
        self.truncated_count = state["truncated_count"]
