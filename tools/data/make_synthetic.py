"""Write the synthetic counting task (mmrl_megatron/data/synthetic.py) as train/test parquet files.

    python tools/data/make_synthetic.py --out-dir data/synthetic [--train-size 512 --test-size 64 --seed 0]
"""
import argparse
import os

from mmrl_megatron.data.format import write_rows
from mmrl_megatron.data.synthetic import make_rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--test-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--row-group-size", type=int, default=256)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    for split, size in (("train", args.train_size), ("test", args.test_size)):
        path = os.path.join(args.out_dir, f"{split}.parquet")
        write_rows(path, make_rows(size, args.seed, split, args.image_size), args.row_group_size)
        print(f"{path}: {size} rows")


if __name__ == "__main__":
    main()
