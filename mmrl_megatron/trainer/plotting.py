"""Turn a run's metrics.jsonl into one PNG of the curves users look at first."""
import json
import math
import os
from typing import Dict, List, Tuple

# one panel per entry: (title, y-axis label, the metrics drawn in it)
PLOTTED = (
    ("reward", "mean reward", ("reward/mean", "eval/reward_sampled", "eval/accuracy_greedy")),
    ("policy loss", "loss", ("loss/policy",)),
    ("KL to reference", "KL", ("kl/mean",)),
    ("response length", "tokens", ("response/length_mean",)),
    ("throughput", "tokens/s/GPU", ("throughput/tokens_per_s_per_gpu",)),
)
LEGEND = {"reward/mean": "training samples", "eval/reward_sampled": "held-out, sampled",
          "eval/accuracy_greedy": "held-out, greedy accuracy"}


def read_series(metrics_path: str) -> Dict[str, List[Tuple[int, float]]]:
    """{metric: [(step, value), ...]} from metrics.jsonl; non-finite values are left out."""
    series: Dict[str, List[Tuple[int, float]]] = {}
    with open(metrics_path) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{metrics_path}:{line_number} is not JSON ({error}); was the run killed mid-write? "
                                 "delete that line and retry") from None
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    series.setdefault(key, []).append((record["step"], float(value)))
    return series


def build_figure(series: Dict[str, List[Tuple[int, float]]], title: str):
    """A matplotlib figure with one labelled panel per curve in PLOTTED."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.4), squeeze=False)
    for axis, (panel_title, label, keys) in zip(axes[0], PLOTTED):
        drawn = [key for key in keys if series.get(key)]
        for key in drawn:
            steps, values = zip(*series[key])
            axis.plot(steps, values, marker="o", markersize=3, label=LEGEND.get(key, key))
        if not drawn:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
        elif len(drawn) > 1:
            axis.legend(fontsize=7)
        axis.set_title(panel_title)
        axis.set_xlabel("step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_metrics(metrics_path: str, out_path: str) -> str:
    """Write the curves of metrics.jsonl to a PNG at out_path; returns out_path."""
    import matplotlib.pyplot as plt

    run_name = os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))
    figure = build_figure(read_series(metrics_path), run_name)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path
