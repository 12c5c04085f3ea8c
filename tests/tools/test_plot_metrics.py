"""tools/plot_metrics.py turns a tracker's metrics.jsonl into a PNG of labelled curves."""
import subprocess
import sys

from mmrl_megatron.config.schema import LoggingConfig
from mmrl_megatron.trainer.plotting import PLOTTED, build_figure, read_series
from mmrl_megatron.trainer.tracking import build_tracker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_from_tracker_output(tmp_path):
    """Invariant: every plotted panel has axis labels, and the CLI writes a real PNG."""
    tracker = build_tracker(LoggingConfig(wandb=False, console=False), str(tmp_path), is_main=True)
    for step in range(1, 6):
        tracker.log(step, {"reward/mean": step / 10, "loss/policy": 1 / step, "kl/mean": 0.01 * step,
                           "response/length_mean": 20 + step, "throughput/tokens_per_s_per_gpu": 100.0,
                           **({"eval/reward_sampled": 0.4 + step / 20} if step % 2 else {})})
    tracker.close()
    metrics = tmp_path / "metrics.jsonl"
    series = read_series(str(metrics))
    assert series["reward/mean"][-1] == (5, 0.5)
    figure = build_figure(series, "my run")
    assert figure._suptitle.get_text() == "my run"
    for axis, (title, label, _) in zip(figure.axes, PLOTTED):
        assert axis.get_xlabel() == "step" and axis.get_ylabel() == label and axis.get_title() == title
        assert len(axis.lines[0].get_xdata()) == 5
    reward_panel = figure.axes[0]
    assert [len(line.get_xdata()) for line in reward_panel.lines] == [5, 3]  # training and held-out curves
    assert [text.get_text() for text in reward_panel.get_legend().get_texts()] == ["training samples",
                                                                                  "held-out, sampled"]
    out = tmp_path / "curves.png"
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(metrics), "--out", str(out)], check=True)
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 10_000
