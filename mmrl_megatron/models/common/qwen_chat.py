"""Qwen's chat markup, which Qwen2.5-VL and Qwen3-VL share: the special tokens, a chat template reduced to
what RL prompts use, and the tiny checkpoints' byte-level tokenizer that carries both (byte_tokenizer.py)."""
from .byte_tokenizer import byte_level_tokenizer

SPECIAL_TOKENS = ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# system/user/assistant turns whose content is a string or a list of {"type": "image"} / {"type": "video"} /
# {"type": "text", "text": ...} parts
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer():
    """The byte-level tokenizer with Qwen's special tokens (ids 256..262) and the reduced chat template."""
    return byte_level_tokenizer(SPECIAL_TOKENS, CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
