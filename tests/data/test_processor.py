"""PromptProcessor (data/processor.py): rows whose text carries the model's own image tokens are skipped and
counted, not fatal; a model directory without a tokenizer or image processor is one DataError naming it."""
import logging
import shutil

import pytest

from mmrl_megatron.config.schema import DataConfig
from mmrl_megatron.data import DataError, PromptDataset, PromptProcessor
from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.data.format import make_row, parse_row, write_rows
from tests.data.images import png


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    return PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=400))


@pytest.fixture(scope="module")
def kimi(tiny_kimi_vl_dir):
    return PromptProcessor(tiny_kimi_vl_dir, DataConfig(max_prompt_length=400))


@pytest.mark.parametrize("family, token", [("qwen", "<|image_pad|>"), ("qwen", "<|vision_start|>"),
                                           ("qwen", "<|vision_end|>"), ("kimi", "<|media_pad|>"),
                                           ("kimi", "<|media_start|>")])
def test_image_token_in_prompt_text_is_a_skipped_row(request, family, token):
    """Invariant: a prompt whose text holds the literal image pad or image-span token is skipped with reason
    image_token_in_text naming the token, for every family (not the run-stopping template error)."""
    processor = request.getfixturevalue(family)
    with pytest.raises(SkippedRow) as raised:
        processor.process(parse_row(make_row(f"What does {token} mean?", [png(56, 56)], "1", "unit")), index=0)
    assert raised.value.reason == "image_token_in_text" and token in str(raised.value)


def test_dataset_skips_and_counts_rows_with_image_tokens(tmp_path, qwen, caplog):
    """Invariant: in a training file such a row is warned about with file and row, counted, and the other rows
    train."""
    rows = [make_row(f"Question {i}?", [png(56, 56)], str(i), "unit") for i in range(3)]
    rows[1] = make_row("Count the <|image_pad|> tokens.", [png(56, 56)], "1", "unit")
    path = tmp_path / "pads.parquet"
    write_rows(str(path), rows)
    dataset = PromptDataset([str(path)], qwen.config, "", 2, processor=qwen, train=False)
    with caplog.at_level(logging.WARNING):
        indices = [sample.index for batch in dataset for sample in batch]
    assert indices == [0, 2]
    assert dataset.metrics()["data/skipped_image_token_in_text"] == 1
    assert f"{path} row 1 skipped (image_token_in_text)" in caplog.text


@pytest.mark.parametrize("removed, message", [
    (("tokenizer.json", "tokenizer_config.json"), "has no tokenizer (none of tokenizer.json, tokenizer_config.json)"),
    (("preprocessor_config.json",), "its image processor cannot be loaded"),
])
def test_model_directory_without_tokenizer_or_processor(tmp_path, tiny_model_dir, removed, message):
    """Invariant: a model directory lacking its tokenizer or preprocessor files gives one DataError naming the
    directory and what is missing."""
    incomplete = tmp_path / "model"
    shutil.copytree(tiny_model_dir, incomplete)
    for name in removed:
        (incomplete / name).unlink()
    with pytest.raises(DataError) as raised:
        PromptProcessor(str(incomplete), DataConfig())
    assert str(raised.value).startswith(str(incomplete)) and message in str(raised.value)
    assert "\n" not in str(raised.value)
