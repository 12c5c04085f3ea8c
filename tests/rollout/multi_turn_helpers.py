"""Shared pieces of the multi-turn tests: images, prompts with scripted environment replies, and sampling whose
assistant turns end by a stop token after a few tokens (so conversations go on)."""
import io
from typing import List, Sequence, Tuple

from PIL import Image

from mmrl_megatron.config.schema import DataConfig
from mmrl_megatron.data import PromptProcessor
from mmrl_megatron.data.format import make_row, parse_row
from mmrl_megatron.rollout import RolloutRequest, SamplingParams
from mmrl_megatron.rollout.environments.scripted import SCRIPT_KEY

# every eighth byte token stops a turn: with a near-uniform tiny model a turn lasts about 8 tokens, so most
# turns end by "stop" within max_new_tokens and the conversation continues
STOP_TOKEN_IDS = list(range(0, 256, 8))


def png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    """A PNG with a colour gradient, so that crops and resizes change the pixels the model sees."""
    image = Image.new("RGB", (width, height), color)
    for x in range(width):
        image.putpixel((x, x * height // width), (x * 255 // width, 90, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_replies():
    """Two scripted environment replies, each with text and an image (of two different sizes)."""
    return [{"text": "Zoomed in:", "images": [png(40, 30)]}, {"text": "And here:", "images": [png(30, 60, (20, 90, 200))]}]


def processor_for(model_dir: str) -> PromptProcessor:
    return PromptProcessor(model_dir, DataConfig(max_prompt_length=512, max_pixels=112 * 112))


def scripted_prompts(processor: PromptProcessor, replies: Sequence[dict],
                     sizes: Sequence[Tuple[int, int]] = ((56, 56), (84, 56))) -> List:
    """One processed prompt per image size, each with the scripted environment replies in its extra_info."""
    prompts = []
    for index, (width, height) in enumerate(sizes):
        row = make_row(f"Which angle is larger? ({index})", [png(width, height)], "1", "scripted",
                       extra_info={SCRIPT_KEY: list(replies)})
        prompts.append(processor.process(parse_row(row), index))
    return prompts


def requests_for(prompts) -> List[RolloutRequest]:
    return [RolloutRequest(prompt_ids=p.prompt_ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                           images=p.images, prompt_text=p.prompt_text) for p in prompts]


def stopping_sampling(**overrides) -> SamplingParams:
    return SamplingParams(**{**dict(n=2, temperature=1.0, max_new_tokens=12, stop_token_ids=STOP_TOKEN_IDS, seed=7),
                             **overrides})
