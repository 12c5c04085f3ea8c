"""A vision-language reward model used as a judge, in-process and batched.

The judge sees the prompt (with its images), the response as the assistant turn, and a question asking
whether the response is correct; the reward is P("Yes") / (P("Yes") + P("No")) for its next token. This
works with any chat VLM checkpoint (no trained score head needed). torch and transformers are imported
when a judge is built, so answer-function workers that import this package stay light.
"""
import dataclasses
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.data.format import ParsedRow
from mmrl_megatron.rewards.errors import RewardError
from mmrl_megatron.rewards.types import RewardItem

JUDGE_QUESTION = "Is the previous answer correct? Answer Yes or No."


class RewardModelJudge:
    def __init__(self, model_dir: str, data_config, batch_size: int = 8, device: str = "cpu"):
        """data_config supplies min/max pixels; the judge's own prompt (prompt + response + question) is not
        held to data.max_prompt_length."""
        import torch
        from transformers import AutoModelForImageTextToText

        from mmrl_megatron.data.processor import PromptProcessor

        self.processor = PromptProcessor(model_dir, dataclasses.replace(data_config, max_prompt_length=sys.maxsize))
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir).to(device).eval()
        self.batch_size, self.device, self.torch = batch_size, device, torch
        tokenizer = self.processor.tokenizer
        self.answer_ids = [tokenizer.encode(word, add_special_tokens=False)[0] for word in ("Yes", "No")]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _judge_sample(self, item: RewardItem, number: int):
        if item.messages is None:
            raise RewardError("the reward model needs each RewardItem's messages (and images); pass them from "
                              "the PromptSample")
        if any(part.get("type") == "video" for message in item.messages for part in message["content"]):
            raise RewardError("reward.reward_model judges prompts with images, not videos; a video prompt reached it: "
                              "score video data with a rule reward (reward.function) only")
        messages = list(item.messages) + [
            {"role": "assistant", "content": [{"type": "text", "text": item.response_text}]},
            {"role": "user", "content": [{"type": "text", "text": JUDGE_QUESTION}]}]
        parsed = ParsedRow(messages=messages, images=list(item.images or []), ground_truth=item.ground_truth,
                           data_source=item.data_source, ability="", extra_info={})
        return self.processor.process(parsed, index=number)

    def score(self, items: Sequence[RewardItem]) -> List[Tuple[float, Optional[str]]]:
        """(P(Yes) in [0, 1], None) per item, in order, batches left-padded; (0.0, why) for an item whose images
        cannot be processed."""
        outcomes: List[Tuple[float, Optional[str]]] = [(0.0, None)] * len(items)
        judged = []
        for number, item in enumerate(items):
            try:
                judged.append((number, self._judge_sample(item, number)))
            except SkippedRow as skipped:
                outcomes[number] = (0.0, f"reward model: {skipped.reason}: {skipped}")
        for begin in range(0, len(judged), self.batch_size):
            chunk = judged[begin:begin + self.batch_size]
            for (number, _), probability in zip(chunk, self._forward([sample for _, sample in chunk])):
                outcomes[number] = (probability, None)
        return outcomes

    def _forward(self, samples) -> List[float]:
        torch = self.torch
        length = max(len(sample.prompt_ids) for sample in samples)
        input_ids = torch.full((len(samples), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            input_ids[row, length - len(sample.prompt_ids):] = torch.tensor(sample.prompt_ids)
            attention_mask[row, length - len(sample.prompt_ids):] = 1
        inputs: Dict[str, object] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                     "mm_token_type_ids": (input_ids == self.processor.image_token_id).int()}
        with_images = [sample for sample in samples if sample.pixel_values is not None]
        if with_images:
            inputs["pixel_values"] = torch.cat([sample.pixel_values for sample in with_images])
            inputs["image_grid_thw"] = torch.cat([sample.image_grid_thw for sample in with_images])
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with torch.no_grad():
            logits = self.model(**inputs).logits[:, -1, self.answer_ids].float()
        return torch.softmax(logits, dim=-1)[:, 0].tolist()
