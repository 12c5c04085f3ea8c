"""Held-out evaluation, called by the loop at step 0 and every trainer.eval_every steps.

Reported: eval/reward_{greedy,sampled} and eval/accuracy_{greedy,sampled} over the whole validation set
(greedy: one answer per prompt; sampled: rollout.n answers at the rollout temperature, fixed seed), and per
data source, from the greedy answers (as verl's and EasyR1's validation decode by default),
val/<data_source>/{accuracy, reward, response_length} plus the metrics evaluation.metrics configures for
that source (rewards/task_metrics.py).

Every data-parallel rank evaluates its share. The per-answer values are gathered over the data-parallel
group before any metric is aggregated, so a corpus metric (BLEU) sees the source's whole set, a source
that only some ranks hold is weighted by its answers, and every rank returns the same numbers. (The ranks
of one model-parallel group hold the same answers; the data-parallel group counts each once.)
"""
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch.distributed as dist

from ..config import ConfigError
from ..config.schema import Config
from ..rewards.errors import RewardError
from ..rewards.task_metrics import TaskMetric, build_task_metrics
from ..rollout import SamplingParams
from .experience import ExperienceSources, generate_and_score
from .metrics import add_stats, reduce_across_ranks

logger = logging.getLogger(__name__)
TaskMetrics = Dict[str, List[TaskMetric]]  # data source -> its configured metrics


@dataclass
class ScoredAnswer:
    """One greedy validation answer, as the per-source metrics need it (gathered across ranks)."""
    data_source: str
    reward: float
    accuracy: float
    response_length: int  # tokens
    values: Dict[str, Any] = field(default_factory=dict)  # metric name -> its per-sample value
    errors: Dict[str, str] = field(default_factory=dict)  # metric name -> what it raised on this answer
    wrong_type: Optional[str] = None  # a metric returned a non-number (a mistake in it): the run stops


def task_metrics_from_config(config: Config) -> TaskMetrics:
    """evaluation.metrics built; ConfigError naming the key for an unknown name or a missing file or function."""
    try:
        return build_task_metrics(config.evaluation.metrics, "evaluation.metrics")
    except RewardError as error:
        raise ConfigError(str(error)) from None


def validation_sources(files: Iterable[str]) -> set:
    """The data sources the validation files hold, named as data.format.parse_row names a row's."""
    import pyarrow.parquet as pq

    sources = set()
    for path in files:
        handle = pq.ParquetFile(path)
        if "data_source" not in handle.schema_arrow.names:
            sources.add("unknown")
            continue
        sources |= {str(value or "unknown") for value in handle.read(columns=["data_source"]).column(0).to_pylist()}
    return sources


def check_evaluation_config(config: Config, files_to_be_built: Iterable[str] = ()) -> None:
    """At start: the configured metrics load, and name data sources the validation files hold (unless some of
    those files are still to be built). ConfigError naming the key, so a mistake costs seconds, not a run."""
    configured = config.evaluation.metrics
    if not configured:
        return
    if not config.data.val_files:
        raise ConfigError("evaluation.metrics is set but data.val_files is empty: give the validation parquet "
                          "files whose data sources it names")
    task_metrics_from_config(config)
    if set(config.data.val_files) & set(files_to_be_built):
        return
    present = validation_sources(config.data.val_files)
    missing = sorted(set(configured) - present)
    if missing:
        raise ConfigError(f"evaluation.metrics names data source(s) {missing} that data.val_files do not hold "
                          f"(their data_source values: {sorted(present)}); correct the key")


def score_answer(prompt, sample, decode: Callable[[List[int]], str], metrics: List[TaskMetric]) -> ScoredAnswer:
    """The answer's reward, accuracy and length, and each metric's per-sample value. A metric that raises is
    recorded as an error for this answer (counted, left out of its aggregate), so one odd response neither
    stops the run nor leaves the other ranks waiting in the gather."""
    answer = ScoredAnswer(prompt.data_source, sample.score, sample.accuracy, len(sample.response_ids))
    if not metrics:
        return answer
    arguments = dict(data_source=prompt.data_source, solution_str=decode(sample.response_ids),
                     ground_truth=prompt.ground_truth, extra_info=prompt.extra_info or {})
    for metric in metrics:
        try:
            answer.values[metric.name] = metric.per_sample(**arguments)
        except RewardError as error:
            answer.wrong_type = str(error)
        except Exception as error:  # a user's metric may raise anything on an odd response
            answer.errors[metric.name] = f"{type(error).__name__}: {error}"
    return answer


def _mean(answers: List[ScoredAnswer], attribute: str) -> float:
    return sum(float(getattr(answer, attribute)) for answer in answers) / len(answers)


def per_source_metrics(answers: List[ScoredAnswer], task_metrics: TaskMetrics, dims) -> Dict[str, float]:
    """val/<data_source>/<key> over every data-parallel rank's answers (parallel.ParallelDims `dims`); the same on
    every rank. RewardError on every rank when any metric returned a non-number."""
    group = dims.data_parallel_group
    gathered: List = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, answers, group=group)
    by_source: Dict[str, List[ScoredAnswer]] = defaultdict(list)
    for answer in (answer for share in gathered for answer in share):
        if answer.wrong_type:
            raise RewardError(answer.wrong_type)
        by_source[answer.data_source].append(answer)
    metrics = {}
    for source, rows in sorted(by_source.items()):
        prefix = f"val/{source}/"
        metrics.update({prefix + key: _mean(rows, key) for key in ("accuracy", "reward", "response_length")})
        for metric in task_metrics.get(source, ()):
            values = [row.values[metric.name] for row in rows if metric.name in row.values]
            failed = [row.errors[metric.name] for row in rows if metric.name in row.errors]
            if values:
                metrics.update({prefix + key: float(value) for key, value in metric.aggregate(values).items()})
            if failed:
                metrics[f"{prefix}{metric.name}_errors"] = float(len(failed))
                if dist.get_rank() == 0:
                    logger.warning("evaluation metric %s raised on %d of %d answers of %s (left out of it); first: %s",
                                   metric.name, len(failed), len(rows), source, failed[0])
    return metrics


def evaluate(batches: Iterable, sources: ExperienceSources, max_new_tokens: int, temperature: float,
             samples_per_prompt: int, task_metrics: Optional[TaskMetrics] = None) -> Dict[str, float]:
    """The eval/ and val/ metrics of the module docstring over this rank's validation batches."""
    task_metrics = task_metrics or {}
    modes = {"greedy": SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0),
             "sampled": SamplingParams(n=samples_per_prompt, temperature=temperature, max_new_tokens=max_new_tokens,
                                       seed=0)}
    stats, answers = {}, []
    for prompts in batches:
        for mode, sampling in modes.items():
            samples = generate_and_score(prompts, sources, sampling, 0, 0.0)
            add_stats(stats, {f"eval/reward_{mode}": (sum(s.score for s in samples), float(len(samples))),
                              f"eval/accuracy_{mode}": (sum(s.accuracy for s in samples), float(len(samples)))})
            if mode == "greedy":
                for sample in samples:
                    prompt = prompts[sample.group]  # a sample's group is its prompt's index in the batch
                    answers.append(score_answer(prompt, sample, sources.decode,
                                                task_metrics.get(prompt.data_source, [])))
    metrics = reduce_across_ranks(stats, {})
    metrics.update(per_source_metrics(answers, task_metrics, sources.dims))
    dist.barrier()
    return metrics
