"""build_reward_function: the trainer's one reward object, combining the answer function, the format reward
and an optional reward model into RewardResults, and counting every failure."""
from collections import Counter
from typing import Dict, List, Optional, Sequence

from mmrl_megatron.rewards.errors import RewardError
from mmrl_megatron.rewards.format_reward import format_score
from mmrl_megatron.rewards.functions import load_function
from mmrl_megatron.rewards.types import RewardItem, RewardResult
from mmrl_megatron.rewards.workers import FunctionWorkers


class RewardFunction:
    """score = answer score + format_weight * format score + reward_model_weight * reward-model score.

    The format term is added (format_weight 0.1 gives at most 1.1); reward.function=geo3k is verl's blend
    0.9 x accuracy + 0.1 x format (at most 1) instead. An answer function that raises, times out
    (reward.timeout_s) or kills its worker contributes 0 and its error is returned on the result and counted
    in metrics(); so does an item the reward model cannot read. Neither stops training. A function returning
    something other than a number or a dict with a numeric "score" is a mistake in it: RewardError.
    """

    def __init__(self, reward_config, data_config=None, device: str = "cpu"):
        if reward_config.function == "geo3k" and reward_config.format_weight:
            raise RewardError(f"reward.function 'geo3k' already includes verl's 0.1 x format term; set "
                              f"reward.format_weight=0 (it is {reward_config.format_weight})")
        self.config = reward_config
        self.errors: Counter = Counter()
        self._workers: Optional[FunctionWorkers] = None
        if reward_config.function != "none":
            load_function(reward_config.function)  # fail now, in the trainer, on a bad path or name
            self._workers = FunctionWorkers(reward_config.function, reward_config.num_workers, reward_config.timeout_s)
        self._judge = None
        if reward_config.reward_model:
            from mmrl_megatron.config.schema import DataConfig
            from mmrl_megatron.rewards.reward_model import RewardModelJudge

            judge_data = data_config or DataConfig()
            self._judge = RewardModelJudge(reward_config.reward_model, judge_data,
                                           reward_config.reward_model_batch_size, device)
        if self._workers is None and self._judge is None and not reward_config.format_weight:
            raise RewardError("reward.function is 'none', reward.format_weight is 0 and no reward.reward_model is "
                              "set: nothing would score")

    def score_batch(self, items: Sequence) -> List[RewardResult]:
        """One RewardResult per item; items are RewardItems or (data_source, response, ground_truth, extra_info)."""
        items = [item if isinstance(item, RewardItem) else RewardItem(*item) for item in items]
        results = [RewardResult(score=0.0, accuracy=0.0) for _ in items]
        if self._workers is not None:
            outcomes = self._workers.run([dict(data_source=item.data_source, solution_str=item.response_text,
                                               ground_truth=item.ground_truth, extra_info=item.extra_info or {})
                                          for item in items])
            for result, (outcome, error) in zip(results, outcomes):
                if error is not None:
                    self.errors["timeout" if error.startswith("timeout") else "exception"] += 1
                    result.error, result.components["answer"] = error, 0.0
                    continue
                score, accuracy, extras = outcome
                result.score, result.accuracy = score, accuracy
                result.components.update(extras, answer=score)
        if self.config.format_weight:
            for result, item in zip(results, items):
                result.components["format"] = format_score(item.response_text)
                result.score += self.config.format_weight * result.components["format"]
        if self._judge is not None:
            for result, (judged, error) in zip(results, self._judge.score(items)):
                if error is not None:
                    self.errors["reward_model"] += 1
                    result.error = "; ".join(filter(None, [result.error, error]))
                result.components["reward_model"] = judged
                result.score += self.config.reward_model_weight * judged
        return results

    def metrics(self) -> Dict[str, float]:
        """Failure counters since construction, for the tracker."""
        return {f"reward/errors_{kind}": float(self.errors[kind]) for kind in ("exception", "timeout", "reward_model")}

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()


def build_reward_function(reward_config, data_config=None, device: str = "cpu") -> RewardFunction:
    """The reward object for a RewardConfig; data_config (min/max pixels) and device apply to a reward model."""
    return RewardFunction(reward_config, data_config, device)
