"""Validate data files before a long job: parse every row, decode every image and the sampled frames of every
video and, given a model directory, apply its processor and the prompt-length limit. Prints each skipped row
with its reason and the usable count.

    python -m mmrl_megatron.data.check data/train.parquet [more.parquet] [--model DIR] [--max-prompt-length N]

Exit status 0 when at least one row is usable, 1 otherwise, 2 (one line on stderr) when the model directory
cannot be used.
"""
import argparse
import sys
from typing import Optional

from mmrl_megatron.config.schema import DataConfig
from mmrl_megatron.data.errors import DataError, SkippedRow
from mmrl_megatron.data.format import parse_row
from mmrl_megatron.data.images import decode_images
from mmrl_megatron.data.processor import PromptProcessor
from mmrl_megatron.data.source import ParquetSource
from mmrl_megatron.data.videos import load_video

# without a model: Qwen2.5-VL's 28-pixel frame factor and 2-frame temporal patch
UNSPECIFIED_FRAME_FACTOR, UNSPECIFIED_TEMPORAL_PATCH = 28, 2


def _decode_media(parsed, data_config: DataConfig) -> None:
    decode_images(parsed.images, data_config.max_pixels)
    for number, entry in enumerate(parsed.videos):
        load_video(entry, data_config.video, UNSPECIFIED_FRAME_FACTOR, UNSPECIFIED_TEMPORAL_PATCH, f"video {number}")


def check_file(path: str, processor: Optional[PromptProcessor], data_config: DataConfig) -> int:
    """Print the problems of one file and return its number of usable rows."""
    try:
        source = ParquetSource([path])
    except DataError as error:
        print(error)
        return 0
    usable = 0
    for row_number, row in source.file_rows(path):
        try:
            parsed = parse_row(row)
            if processor is None:
                _decode_media(parsed, data_config)
            else:
                processor.process(parsed, index=row_number)
            usable += 1
        except SkippedRow as skipped:
            print(f"{path} row {row_number}: {skipped.reason}: {skipped}")
    print(f"{path}: {usable} usable of {source.num_rows} rows")
    return usable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--model", help="model directory: also apply its processor and the length limit")
    defaults = DataConfig()
    parser.add_argument("--max-prompt-length", type=int, default=defaults.max_prompt_length)
    parser.add_argument("--min-pixels", type=int, default=defaults.min_pixels)
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels)
    args = parser.parse_args(argv)
    data_config = DataConfig(max_prompt_length=args.max_prompt_length, min_pixels=args.min_pixels,
                             max_pixels=args.max_pixels)
    processor = None
    if args.model:
        try:
            processor = PromptProcessor(args.model, data_config)
        except DataError as error:
            print(f"--model: {error}", file=sys.stderr)
            return 2
    usable = sum(check_file(path, processor, data_config) for path in args.files)
    print(f"total: {usable} usable rows")
    return 0 if usable > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
