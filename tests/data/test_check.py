"""`python -m mmrl_megatron.data.check` reports every unusable row with its reason and exits 0 only when rows are usable."""
from mmrl_megatron.data.check import main
from mmrl_megatron.data.format import make_row, write_rows
from tests.data.images import huge_png, png


def test_check_reports_rows_and_exit_status(tmp_path, tiny_model_dir, capsys):
    """Invariant: each bad row is printed with file, row and reason; the usable count is printed; a model
    directory adds the length limit; the exit status is 1 only when no row anywhere is usable."""
    rows = [make_row(f"Q{i}?", [png(56, 56)], str(i), "unit") for i in range(4)]
    rows[1]["images"] = [{"bytes": b"\x89PNG broken"}]
    rows[2]["prompt"] = [{"role": "user", "content": "<image>" + "word " * 300}]
    good, broken = tmp_path / "mixed.parquet", tmp_path / "broken.parquet"
    write_rows(str(good), rows)
    write_rows(str(broken), [rows[1]])

    assert main([str(good), str(broken)]) == 0
    out = capsys.readouterr().out
    assert f"{good} row 1: undecodable_image" in out and f"{good}: 3 usable of 4 rows" in out
    assert f"{broken}: 0 usable of 1 rows" in out

    assert main([str(good), "--model", tiny_model_dir, "--max-prompt-length", "600"]) == 0
    out = capsys.readouterr().out
    assert f"{good} row 2: overlong_prompt" in out and f"{good}: 2 usable of 4 rows" in out

    assert main([str(broken), str(tmp_path / "absent.parquet")]) == 1
    assert "absent.parquet: no such file" in capsys.readouterr().out


def test_check_reports_image_tokens_and_oversized_images_by_row(tmp_path, tiny_model_dir, capsys):
    """Invariant: a prompt holding the literal image pad and an image whose header exceeds the pixel limit are
    reported as their rows (file, row, reason) and the other rows still count, with and without a model."""
    rows = [make_row(f"Q{i}?", [png(56, 56)], str(i), "unit") for i in range(3)]
    rows[1] = make_row("What is <|image_pad|>?", [png(56, 56)], "1", "unit")
    rows[2]["images"] = [{"bytes": huge_png()}]
    path = tmp_path / "rows.parquet"
    write_rows(str(path), rows)
    assert main([str(path), "--model", tiny_model_dir]) == 0
    out = capsys.readouterr().out
    assert f"{path} row 1: image_token_in_text" in out and f"{path} row 2: oversized_image" in out
    assert f"{path}: 1 usable of 3 rows" in out
    assert main([str(path)]) == 0
    assert f"{path} row 2: oversized_image" in capsys.readouterr().out


def test_model_without_tokenizer_is_one_line(tmp_path, tiny_model_dir, capsys):
    """Invariant: `data.check --model DIR` with no tokenizer in DIR prints one line naming DIR and exits 2."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    data = tmp_path / "rows.parquet"
    write_rows(str(data), [make_row("Q?", [png(56, 56)], "1", "unit")])
    assert main([str(data), "--model", str(model)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"--model: {model} has no tokenizer (none of tokenizer.json, "
                                         "tokenizer_config.json); point at a complete Hugging Face model directory, "
                                         "or copy the tokenizer files into it"]
    assert captured.out == ""


def test_check_decodes_videos_without_a_model(tmp_path, capsys):
    """Invariant: without a model, the check still decodes each video's sampled frames: a truncated clip is
    reported with file, row and reason, and good frame lists and clips count as usable."""
    from tests.data.videos import encoded_clip, frame_arrays, png_frames

    clip = encoded_clip(frame_arrays(8, 56, 84), 4)
    entries = [{"video": png_frames(frame_arrays(4, 56, 84)), "bytes": None}, {"video": None, "bytes": clip[:200]},
               {"video": None, "bytes": clip}]
    path = tmp_path / "videos.parquet"
    write_rows(str(path), [make_row("What moves?", [], "1", "unit", videos=[entry]) for entry in entries])
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path} row 1: undecodable_video: video 0: " in out and f"{path}: 2 usable of 3 rows" in out
