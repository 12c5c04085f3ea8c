"""Parquet files read one row group at a time, so datasets larger than memory stream.

A row group is held as Arrow data and each row is turned into Python objects only when taken, so a rank
pays for the rows it uses, not for the other ranks' rows."""
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from mmrl_megatron.data.errors import DataError
from mmrl_megatron.data.format import REQUIRED_COLUMNS

logger = logging.getLogger(__name__)
LARGE_ROW_GROUP = 8192  # rows; a row group is the unit held in memory, so huge ones defeat streaming
COLUMNS = ("prompt", "images", "videos", "reward_model", "data_source", "ability", "extra_info")


@dataclass(frozen=True)
class RowGroup:
    """One row group of one file; `first_index` is the global index of its first row across all files."""
    file: str
    group: int
    num_rows: int
    first_index: int
    first_row_in_file: int


def open_parquet(path: str) -> pq.ParquetFile:
    """A ParquetFile whose schema has the required columns; DataError naming the file otherwise."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; check data.train_files / data.val_files")
    try:
        handle = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a non-parquet file
        raise DataError(f"{path}: not a readable parquet file ({error})") from error
    missing = [column for column in REQUIRED_COLUMNS if column not in handle.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected verl's format with columns {list(COLUMNS)} "
                        f"(tools/data/preprocess_geo3k.py shows how to write it)")
    return handle


class ParquetSource:
    """The row groups of several files in a fixed order, and random access to one row group's rows."""

    def __init__(self, files: Sequence[str]):
        if not files:
            raise DataError("no data files given; set data.train_files")
        self.files = list(files)
        self._handles = {path: open_parquet(path) for path in self.files}
        self.row_groups: List[RowGroup] = []
        index = 0
        for path in self.files:
            metadata = self._handles[path].metadata
            row_in_file = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                if rows > LARGE_ROW_GROUP:
                    logger.warning("%s: row group %d has %d rows and is read into memory whole; rewrite the file "
                                   "with smaller row groups (pyarrow write_table(row_group_size=256))", path, group, rows)
                self.row_groups.append(RowGroup(path, group, rows, index, row_in_file))
                index, row_in_file = index + rows, row_in_file + rows
        self.num_rows = index
        if self.num_rows == 0:
            raise DataError(f"{self.files}: the files hold no rows")

    def read(self, row_group: RowGroup) -> pa.Table:
        """One row group's columns as Arrow data; rows become Python objects only through `row`."""
        handle = self._handles[row_group.file]
        return handle.read_row_group(row_group.group, columns=[c for c in COLUMNS if c in handle.schema_arrow.names])

    @staticmethod
    def row(table: pa.Table, offset: int) -> Dict[str, Any]:
        """Row `offset` of a table from `read` as a dict of column values (absent optional columns are missing)."""
        return table.slice(offset, 1).to_pylist()[0]

    def file_rows(self, path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """(row number in file, row) for every row of one file, in order."""
        for row_group in (group for group in self.row_groups if group.file == path):
            table = self.read(row_group)
            for offset in range(row_group.num_rows):
                yield row_group.first_row_in_file + offset, self.row(table, offset)
