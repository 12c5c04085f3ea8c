"""PromptProcessor on a Kimi-VL checkpoint: the family is read from config.json, each <|media_pad|> becomes one
token per merged 2x2 patch block, truncation keeps image spans whole, and the tiny checkpoint's tokenizer,
config and generation config agree on the special tokens."""
import json
import os

import pytest

from mmrl_megatron.config.schema import DataConfig
from mmrl_megatron.data import DataError, PromptProcessor
from mmrl_megatron.data.format import make_row, parse_row
from tests.data.images import png

IMAGE_SPAN = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"


def _process(model_dir, content, images, **data):
    """(processor, sample) for one user turn `content` whose "<image>" placeholders stand for `images`."""
    processor = PromptProcessor(model_dir, DataConfig(**{"max_prompt_length": 4096, **data}))
    row = {**make_row("", images, "1", "unit"), "prompt": [{"role": "user", "content": content}]}
    return processor, processor.process(parse_row(row), 0)


def _contains(ids, span) -> bool:
    return any(ids[start:start + len(span)] == span for start in range(len(ids)))


def test_tiny_checkpoint_tokens_agree_with_its_config(tiny_kimi_vl_dir):
    """Invariant: the tiny directory's tokenizer maps <|media_pad|>, [BOS], [EOS] and [PAD] to the ids config.json
    uses, covers the vocabulary, renders images as the published placeholder string, and generation stops at
    <|im_end|> (end of turn) as well as [EOS]."""
    from transformers import AutoTokenizer, GenerationConfig

    with open(os.path.join(tiny_kimi_vl_dir, "config.json")) as handle:
        config = json.load(handle)
    tokenizer = AutoTokenizer.from_pretrained(tiny_kimi_vl_dir)
    text = config["text_config"]
    assert tokenizer.convert_tokens_to_ids("<|media_pad|>") == config["media_placeholder_token_id"]
    assert [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id] == \
        [text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]]
    assert len(tokenizer) == text["vocab_size"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False,
                                             add_generation_prompt=True)
    assert IMAGE_SPAN in rendered and rendered.endswith("<|im_assistant|>assistant<|im_middle|>")
    stops = GenerationConfig.from_pretrained(tiny_kimi_vl_dir).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops and tokenizer.eos_token_id in stops


def test_each_media_pad_expands_to_its_image_tokens(tiny_kimi_vl_dir):
    """Invariant: a prompt with a 56x56 and a 70x42 image carries 4 then 6 <|media_pad|> tokens inside their
    spans, and its ids equal the tokenizer's encoding of the template text with the pads repeated in place;
    pixel_values and the grid are the images' patches; prompt_text keeps one pad per image."""
    processor, sample = _process(tiny_kimi_vl_dir, "<image>Compare<image>them.", [png(56, 56), png(70, 42)])
    assert processor.family_name == "kimi_vl"
    tokenizer = processor.tokenizer
    assert sample.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6]]
    assert sample.pixel_values.shape == (16 + 24, 3, 14, 14)
    assert sample.prompt_text.count(IMAGE_SPAN) == 2
    before, between, after = sample.prompt_text.split("<|media_pad|>")
    expanded = before + "<|media_pad|>" * 4 + between + "<|media_pad|>" * 6 + after
    assert sample.prompt_ids == tokenizer.encode(expanded, add_special_tokens=False)
    span_ids = tokenizer.encode("<|media_start|>image<|media_content|>", add_special_tokens=False)
    media_pad, media_end = processor.image_token_id, tokenizer.convert_tokens_to_ids("<|media_end|>")
    for count in (4, 6):
        span = span_ids + [media_pad] * count + [media_end]
        assert _contains(sample.prompt_ids, span)


def test_truncation_keeps_image_spans_whole(tiny_kimi_vl_dir):
    """Invariant: with overlong_prompt=truncate a long Kimi-VL prompt is cut to the limit from the middle of its
    text (around the image) while the whole image span, its literal "image" tokens included, and the generation
    prompt survive."""
    processor, sample = _process(tiny_kimi_vl_dir, "long " * 50 + "<image>" + "long " * 50 + "END?", [png(56, 56)],
                                 max_prompt_length=120, overlong_prompt="truncate")
    span = processor.tokenizer.encode(IMAGE_SPAN.replace("<|media_pad|>", "<|media_pad|>" * 4),
                                      add_special_tokens=False)
    assert len(sample.prompt_ids) == 120 and sample.truncated
    assert _contains(sample.prompt_ids, span)
    assert sample.prompt_text.count(IMAGE_SPAN) == 1
    assert sample.prompt_text.endswith("END?<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_data_max_pixels_lowers_the_patch_limit(tiny_kimi_vl_dir):
    """Invariant: a 448x448 image (1,024 patches) is down-scaled to the checkpoint's in_token_limit of 256 patches
    (16x16) by default and to 64 patches (8x8) under data.max_pixels=112*112."""
    assert _process(tiny_kimi_vl_dir, "<image>q", [png(448, 448)])[1].image_grid_thw.tolist() == [[1, 16, 16]]
    lowered_processor, lowered = _process(tiny_kimi_vl_dir, "<image>q", [png(448, 448)], max_pixels=112 * 112)
    assert lowered.image_grid_thw.tolist() == [[1, 8, 8]]
    assert lowered.prompt_ids.count(lowered_processor.image_token_id) == 16


def test_unknown_model_type_is_a_data_error(tmp_path):
    """Invariant: a checkpoint whose config.json model_type has no data-path family stops with a DataError
    naming config.json and the known families."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(DataError, match=r"config.json: no model family for model_type 'llava'.*kimi_vl"):
        PromptProcessor(str(tmp_path), DataConfig())
