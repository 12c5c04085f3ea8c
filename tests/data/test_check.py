"""`python -m mmrl_megatron.data.check` reports every unusable row with its reason and exits 0 only when rows are usable."""
from mmrl_megatron.data.check import main
from mmrl_megatron.data.format import make_row, write_rows
from tests.data.images import png


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
