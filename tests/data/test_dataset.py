"""PromptDataset over verl-format parquet: round trip, bad rows counted not fatal, order, sharding, resume."""
import logging

import pytest
import torch

from mmrl_megatron.config.schema import AugmentConfig, DataConfig
from mmrl_megatron.data import DataError, PromptDataset, PromptProcessor
from mmrl_megatron.data.errors import SkippedRow
from mmrl_megatron.data.format import make_row, parse_row, write_rows
from tests.data.images import png


def _rows(count, start=0):
    return [make_row(f"Question {start + i}?", [png(56 + 28 * (i % 2), 56)], str(start + i), "unit",
                     extra_info={"index": start + i}) for i in range(count)]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=400))


def _dataset(files, processor, batch_size=4, **kwargs):
    return PromptDataset([str(path) for path in files], processor.config, "", batch_size, processor=processor, **kwargs)


def test_round_trip(tmp_path, processor):
    """Invariant: every field written in verl's layout comes back (images byte-identical, ground truth, source,
    extra_info), each image's pad token is expanded to grid_h * grid_w / 4 tokens, and content-part lists
    give the same tokens as strings with "<image>" placeholders."""
    rows = _rows(6) + [make_row("Text only 6?", [], "6", "unit", extra_info={"index": 6})]
    write_rows(str(tmp_path / "a.parquet"), rows, row_group_size=3)
    samples = [s for batch in _dataset([tmp_path / "a.parquet"], processor, train=False) for s in batch]
    assert [s.index for s in samples] == list(range(7))
    for sample, row in zip(samples, rows):
        assert sample.images == [image["bytes"] for image in row["images"]]
        assert sample.ground_truth == row["reward_model"]["ground_truth"] and sample.data_source == "unit"
        assert sample.extra_info == row["extra_info"]
        image_tokens = sample.prompt_ids.count(processor.image_token_id)
        if row["images"]:
            assert image_tokens == int(sample.image_grid_thw.prod()) // 4 == sample.pixel_values.shape[0] // 4
            assert sample.prompt_text.count("<|image_pad|>") == 1
        else:
            assert image_tokens == 0 and sample.pixel_values is None
    assert samples[0].image_grid_thw.tolist() != samples[1].image_grid_thw.tolist()

    parts = _rows(2)
    for number, row in enumerate(parts):
        row["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Question {number}?"}]}]
    write_rows(str(tmp_path / "parts.parquet"), parts)
    part_samples = [s for batch in _dataset([tmp_path / "parts.parquet"], processor, train=False) for s in batch]
    assert [s.prompt_ids for s in part_samples] == [s.prompt_ids for s in samples[:2]]
    assert all(torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(part_samples, samples))


def test_bad_rows_are_counted_and_skipped(tmp_path, processor, caplog):
    """Invariant: a corrupt image, a row missing reward_model, a 10x-too-long prompt, an empty prompt and a
    wrong-typed prompt are each skipped with a warning naming file and row, counted under their reason,
    and iteration continues to every good row."""
    rows = _rows(8)
    rows[1]["images"] = [{"bytes": png(56, 56)[:40]}]
    rows[2]["reward_model"] = None
    rows[3]["prompt"] = [{"role": "user", "content": "<image>" + "long " * 800}]
    rows[4]["prompt"] = [{"role": "user", "content": "  "}]
    rows[4]["images"] = []
    path = tmp_path / "bad.parquet"
    write_rows(str(path), rows, row_group_size=4)
    dataset = _dataset([path], processor, batch_size=2, train=False)
    with caplog.at_level(logging.WARNING):
        indices = [s.index for batch in dataset for s in batch]
    assert indices == [0, 5, 6, 7]
    counts = dataset.metrics()
    assert counts["data/skipped_undecodable_image"] == 1 and counts["data/skipped_missing_field"] == 1
    assert counts["data/skipped_overlong_prompt"] == 1 and counts["data/skipped_empty_prompt"] == 1
    assert counts["data/skipped_total"] == 4
    assert f"{path} row 1 skipped (undecodable_image)" in caplog.text
    assert f"{path} row 3 skipped (overlong_prompt)" in caplog.text


def test_row_format_errors_have_reasons():
    """Invariant: each kind of malformed row maps to its counter reason (wrong types, missing fields,
    placeholder/image count mismatch), and rows without placeholders get their images before the text."""
    good = _rows(1)[0]
    cases = [({"prompt": 7}, "wrong_type"), ({"prompt": [{"role": "user", "content": 3}]}, "wrong_type"),
             ({"images": "x"}, "wrong_type"), ({"extra_info": [1]}, "wrong_type"), ({"prompt": None}, "missing_field"),
             ({"reward_model": {"style": "rule"}}, "missing_field"), ({"prompt": "<image><image>two?"}, "image_count_mismatch"),
             ({"prompt": [{"role": "user", "content": ""}], "images": []}, "empty_prompt")]
    for change, reason in cases:
        with pytest.raises(SkippedRow) as raised:
            parse_row({**good, **change})
        assert raised.value.reason == reason, change
    parsed = parse_row({**good, "prompt": "no placeholder?"})
    assert parsed.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "no placeholder?"}]


def test_images_by_local_path(tmp_path):
    """Invariant: an image given as a local file path (plain or file://) loads its bytes; a missing file is
    an undecodable image, not a crash."""
    image = tmp_path / "figure.png"
    image.write_bytes(png(56, 56))
    good = _rows(1)[0]
    for reference in (str(image), f"file://{image}"):
        assert parse_row({**good, "images": [{"bytes": None, "path": reference}]}).images == [png(56, 56)]
    with pytest.raises(SkippedRow) as raised:
        parse_row({**good, "images": [{"bytes": None, "path": str(tmp_path / "absent.png")}]})
    assert raised.value.reason == "undecodable_image"


def test_truncation_keeps_images_and_generation_prompt(tmp_path, tiny_model_dir):
    """Invariant: with overlong_prompt=truncate a long prompt is cut to the limit without losing an image token
    or the generation prompt at the end, and it is counted as truncated."""
    processor = PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=120, overlong_prompt="truncate"))
    rows = [make_row("long " * 100 + "END?", [png(56, 56)], "1", "unit")]
    write_rows(str(tmp_path / "long.parquet"), rows)
    dataset = _dataset([tmp_path / "long.parquet"], processor, batch_size=1, train=False)
    (sample,), = list(dataset)
    assert len(sample.prompt_ids) == 120 and sample.truncated
    assert sample.prompt_ids.count(processor.image_token_id) == int(sample.image_grid_thw.prod()) // 4
    assert sample.prompt_text.endswith("END?<|im_end|>\n<|im_start|>assistant\n")
    assert dataset.metrics()["data/truncated"] == 1


def test_unusable_files_raise(tmp_path, processor):
    """Invariant: a file without usable rows, or without a required column, stops with a DataError naming it."""
    rows = _rows(2)
    for row in rows:
        row["images"] = [{"bytes": b"not an image"}]
    write_rows(str(tmp_path / "corrupt.parquet"), rows)
    with pytest.raises(DataError, match="corrupt.parquet: no usable rows"):
        _dataset([tmp_path / "corrupt.parquet"], processor)
    write_rows(str(tmp_path / "nocol.parquet"), [{k: v for k, v in row.items() if k != "reward_model"}
                                                 for row in _rows(2)])
    with pytest.raises(DataError, match="nocol.parquet: missing column"):
        _dataset([tmp_path / "nocol.parquet"], processor)


def test_order_sharding_and_resume(tmp_path, processor):
    """Invariant: the shuffled order is a deterministic permutation per epoch (different across epochs), two
    data-parallel ranks get disjoint halves of each epoch, and a dataset restored from state_dict continues
    with exactly the batches the original would have produced."""
    write_rows(str(tmp_path / "a.parquet"), _rows(10), row_group_size=3)
    write_rows(str(tmp_path / "b.parquet"), _rows(6, start=10), row_group_size=4)
    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]

    def take(dataset, batches):
        iterator = iter(dataset)
        return [[s.index for s in next(iterator)] for _ in range(batches)]

    first = take(_dataset(files, processor), 8)
    again = take(_dataset(files, processor), 8)
    assert first == again
    epoch0, epoch1 = sum(first[:4], []), sum(first[4:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(16)) and epoch0 != epoch1 != list(range(16))

    ranks = [take(_dataset(files, processor, dp_rank=rank, dp_size=2), 2) for rank in range(2)]
    assert sorted(sum(ranks[0] + ranks[1], [])) == list(range(16))

    original = _dataset(files, processor, dp_rank=1, dp_size=2)
    iterator = iter(original)
    [next(iterator) for _ in range(3)]
    state = original.state_dict()
    expected = [[s.index for s in next(iterator)] for _ in range(3)]
    restored = _dataset(files, processor, dp_rank=1, dp_size=2)
    restored.load_state_dict(state)
    assert take(restored, 3) == expected
    with pytest.raises(DataError, match="dp_rank, dp_size, seed"):
        _dataset(files, processor).load_state_dict(state)


def test_augmentation(tmp_path, tiny_model_dir):
    """Invariant: augmentation is off by default (images untouched); when on it changes training images
    deterministically per (seed, epoch, row) and never touches validation images."""
    write_rows(str(tmp_path / "a.parquet"), _rows(2))
    plain = PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=400))
    augmented = PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=400, shuffle=False,
                                                           augment=AugmentConfig(rotation_degrees=20, crop_fraction=0.3)))
    original = [r["images"][0]["bytes"] for r in _rows(2)]
    unaugmented = next(iter(_dataset([tmp_path / "a.parquet"], plain, batch_size=2)))
    assert sorted(s.images[0] for s in unaugmented) == sorted(original)
    runs = [[s.images[0] for s in next(iter(_dataset([tmp_path / "a.parquet"], augmented, batch_size=2)))]
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0] != original
    validation = next(iter(_dataset([tmp_path / "a.parquet"], augmented, batch_size=2, train=False)))
    assert [s.images[0] for s in validation] == original


def test_data_config_sets_image_resolution(tiny_model_dir):
    """Invariant: data.min_pixels / data.max_pixels decide the patch grid, over the checkpoint's own
    preprocessor limits (a 448x448 image keeps 32x32 patches by default, shrinks under a lower max_pixels,
    and a 28x28 image grows to min_pixels)."""
    def grid(width, **pixels):
        processor = PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=4096, **pixels))
        return processor.process(parse_row(make_row("q", [png(width, width)], "1", "s")), 0).image_grid_thw.tolist()

    assert grid(448) == [[1, 32, 32]]
    assert grid(448, max_pixels=112 * 112) == [[1, 8, 8]]
    assert grid(28, min_pixels=56 * 56) == [[1, 4, 4]]


def test_streams_row_groups_lazily(tmp_path, processor, caplog, monkeypatch):
    """Invariant: iteration reads one row group at a time as it needs it (so data larger than memory streams),
    and a file whose row groups are too large to stream is warned about."""
    write_rows(str(tmp_path / "a.parquet"), _rows(12), row_group_size=3)
    dataset = _dataset([tmp_path / "a.parquet"], processor, batch_size=2)
    reads = []
    original_read = dataset.source.read
    monkeypatch.setattr(dataset.source, "read", lambda group: reads.append(group.group) or original_read(group))
    iterator = iter(dataset)
    next(iterator)
    assert len(reads) == 1
    next(iterator)
    assert len(reads) == 2 and len(set(reads)) == 2

    monkeypatch.setattr("mmrl_megatron.data.source.LARGE_ROW_GROUP", 2)
    with caplog.at_level(logging.WARNING):
        _dataset([tmp_path / "a.parquet"], processor)
    assert "row group 0 has 3 rows and is read into memory whole" in caplog.text


# The chat template published with Qwen2.5-VL checkpoints (chat_template.json), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def test_published_qwen_template_renders_parsed_messages(tiny_model_dir):
    """Invariant: the messages the parser builds (system turn, images between texts) render under the real
    Qwen2.5-VL chat template to the same prompt ids as under the tiny checkpoint's template."""
    row = make_row("", [png(56, 56), png(84, 56)], "1", "s")
    row["prompt"] = [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "First <image>, then <image>: which is wider?"}]
    tiny = PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=4096))
    published = PromptProcessor(tiny_model_dir, DataConfig(max_prompt_length=4096))
    published.tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    expected, rendered = (processor.process(parse_row(row), 0) for processor in (tiny, published))
    assert rendered.prompt_ids == expected.prompt_ids and rendered.prompt_text == expected.prompt_text
    assert rendered.prompt_text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
