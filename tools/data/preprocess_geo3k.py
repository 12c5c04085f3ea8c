"""Turn a local copy of hiyouga/geometry3k into verl-format train/test parquet (no hub access).

Input: the dataset's parquet files (one file, or a directory holding `<split>-*.parquet`, as on the hub),
or a directory written by `datasets.DatasetDict.save_to_disk` (read through its Arrow files with pyarrow,
so the `datasets` package is not needed). Columns used: `images` (list of {bytes, path}), `problem` (with
"<image>" placeholders), `answer`.

    python tools/data/preprocess_geo3k.py ~/geometry3k --out-dir data/geo3k
    python tools/data/preprocess_geo3k.py ~/geometry3k --out-dir data/geo3k_zoom --zoom-tool   # multi-turn

Writes <out-dir>/<split>.parquet for each split found (train, validation, test). --zoom-tool adds the zoom
tool's instruction (rollout/environments/zoom.py) to every prompt, for rollout.multi_turn.environment=zoom.
"""
import argparse
import glob
import os
import re
from typing import Dict, Iterator, List

import pyarrow as pa
import pyarrow.parquet as pq

from mmrl_megatron.data.format import IMAGE_PLACEHOLDER, write_rows
from mmrl_megatron.rollout.environments.zoom import INSTRUCTION as ZOOM_INSTRUCTION

DATA_SOURCE = "hiyouga/geometry3k"
INSTRUCTION = ("You FIRST think about the reasoning process as an internal monologue and then provide the final "
               "answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final answer "
               "MUST BE put in \\boxed{}.")
SPLIT_NAME = re.compile(r"^(train|validation|valid|test|dev)")


def _read_arrow(path: str) -> pa.Table:
    """save_to_disk writes Arrow IPC streams; older versions wrote the file format."""
    with pa.memory_map(path) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()


def _split_of(filename: str) -> str:
    match = SPLIT_NAME.match(os.path.basename(filename))
    if not match:
        raise SystemExit(f"{filename}: cannot tell the split from the name (expected train-*, validation-*, test-*)")
    return {"valid": "validation", "dev": "validation"}.get(match.group(1), match.group(1))


def find_split_tables(path: str) -> Dict[str, List[pa.Table]]:
    """The tables of each split under `path` (a parquet file, a directory of them, or a save_to_disk directory)."""
    if os.path.isfile(path):
        return {_split_of(path): [pq.read_table(path)]}
    arrow_files = sorted(glob.glob(os.path.join(path, "*", "*.arrow")))
    if arrow_files:
        splits: Dict[str, List[pa.Table]] = {}
        for arrow_file in arrow_files:
            splits.setdefault(os.path.basename(os.path.dirname(arrow_file)), []).append(_read_arrow(arrow_file))
        return splits
    parquet_files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    if not parquet_files:
        raise SystemExit(f"{path}: no parquet files and no save_to_disk split directories with .arrow files")
    splits = {}
    for parquet_file in parquet_files:
        splits.setdefault(_split_of(parquet_file), []).append(pq.read_table(parquet_file))
    return splits


def _image_bytes(image, source_dir: str) -> bytes:
    if isinstance(image, dict) and image.get("bytes"):
        return image["bytes"]
    image_path = image.get("path") if isinstance(image, dict) else None
    if image_path and os.path.isfile(os.path.join(source_dir, image_path)):
        with open(os.path.join(source_dir, image_path), "rb") as handle:
            return handle.read()
    raise ValueError(f"image has neither bytes nor a readable path ({image_path!r})")


def convert_rows(tables: List[pa.Table], split: str, source_dir: str, instruction: str = INSTRUCTION) -> Iterator[Dict]:
    """verl-format rows, `instruction` after each problem; an example whose image cannot be read is reported and
    left out."""
    index = 0
    for table in tables:
        for number, example in enumerate(table.select(["images", "problem", "answer"]).to_pylist()):
            try:
                images = [_image_bytes(image, source_dir) for image in example["images"] or []]
            except ValueError as error:
                print(f"{split} example {number}: left out: {error}")
                continue
            problem = example["problem"]
            if IMAGE_PLACEHOLDER not in problem:
                problem = IMAGE_PLACEHOLDER * len(images) + problem
            yield {"data_source": DATA_SOURCE, "prompt": [{"role": "user", "content": f"{problem} {instruction}"}],
                   "images": [{"bytes": data} for data in images], "ability": "math",
                   "reward_model": {"style": "rule", "ground_truth": example["answer"]},
                   "extra_info": {"split": split, "index": index, "answer": example["answer"],
                                  "question": example["problem"]}}
            index += 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="geometry3k parquet file, directory of parquet files, or save_to_disk directory")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--row-group-size", type=int, default=256)
    parser.add_argument("--zoom-tool", action="store_true", help="tell the model about the zoom tool (multi-turn)")
    args = parser.parse_args(argv)
    instruction = f"{ZOOM_INSTRUCTION} {INSTRUCTION}" if args.zoom_tool else INSTRUCTION
    os.makedirs(args.out_dir, exist_ok=True)
    source_dir = args.source if os.path.isdir(args.source) else os.path.dirname(args.source)
    for split, tables in sorted(find_split_tables(args.source).items()):
        rows = list(convert_rows(tables, split, source_dir, instruction))
        path = os.path.join(args.out_dir, f"{split}.parquet")
        write_rows(path, rows, args.row_group_size)
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
