"""Plot reward, loss, KL, response length and throughput from a run's metrics.jsonl.

    python tools/plot_metrics.py runs/demo/metrics.jsonl [--out runs/demo/curves.png]
"""
import argparse
import os

from mmrl_megatron.trainer.plotting import plot_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="path to metrics.jsonl")
    parser.add_argument("--out", help="PNG path (default: curves.png beside metrics.jsonl)")
    args = parser.parse_args()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "curves.png")
    print(plot_metrics(args.metrics, out))


if __name__ == "__main__":
    main()
