"""tools/data: geometry3k preprocessing from parquet or save_to_disk copies, and the synthetic counting task."""
import importlib.util
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmrl_megatron.config.schema import DataConfig
from mmrl_megatron.data import PromptDataset
from mmrl_megatron.data.synthetic import RED
from mmrl_megatron.rewards.math_answer import compute_score
from tests.data.conftest import tiny_model_dir  # noqa: F401  (fixture)
from tests.data.images import png

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "data", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _geo3k_table(count, offset=0):
    return pa.Table.from_pylist([{"images": [{"bytes": png(56 + 28 * (i % 2), 56), "path": None}],
                                  "problem": f"<image>Find x in triangle {offset + i}.", "answer": str(offset + i)}
                                 for i in range(count)])


def _samples(path, model_dir):
    dataset = PromptDataset([str(path)], DataConfig(max_prompt_length=1024), model_dir, batch_size=4, train=False)
    return [sample for batch in dataset for sample in batch]


def test_geo3k_from_parquet_and_save_to_disk(tmp_path, tiny_model_dir):
    """Invariant: both local forms of hiyouga/geometry3k become the same verl-format splits, with the
    think-then-box instruction, the original image bytes and the answer as ground truth, loadable by
    PromptDataset; an example whose image is unreadable is left out, not written broken."""
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    pq.write_table(_geo3k_table(5), hub / "train-00000-of-00001.parquet")
    pq.write_table(_geo3k_table(3, offset=100), hub / "test-00000-of-00001.parquet")

    saved = tmp_path / "saved"
    for split, table in (("train", _geo3k_table(5)), ("test", _geo3k_table(3, offset=100))):
        (saved / split).mkdir(parents=True)
        with pa.OSFile(str(saved / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))

    tool = _tool("preprocess_geo3k")
    outputs = {}
    for name, source in (("hub", tmp_path / "hub"), ("saved", saved)):
        tool.main([str(source), "--out-dir", str(tmp_path / f"out_{name}")])
        outputs[name] = {split: pq.read_table(tmp_path / f"out_{name}" / f"{split}.parquet").to_pylist()
                         for split in ("train", "test")}
    assert outputs["hub"] == outputs["saved"]
    train = outputs["hub"]["train"]
    assert len(train) == 5 and len(outputs["hub"]["test"]) == 3
    assert train[2]["prompt"][0]["content"].startswith("<image>Find x in triangle 2. You FIRST think")
    assert "\\boxed{}" in train[2]["prompt"][0]["content"] and train[2]["reward_model"]["ground_truth"] == "2"
    assert train[2]["images"][0]["bytes"] == png(56, 56) and train[2]["data_source"] == "hiyouga/geometry3k"
    samples = _samples(tmp_path / "out_hub" / "test.parquet", tiny_model_dir)
    assert [s.ground_truth for s in samples] == ["100", "101", "102"] and all(s.image_grid_thw is not None for s in samples)

    broken = _geo3k_table(2).to_pylist()
    broken[0]["images"] = [{"bytes": None, "path": "missing.png"}]
    pq.write_table(pa.Table.from_pylist(broken), tmp_path / "train-broken.parquet")
    tool.main([str(tmp_path / "train-broken.parquet"), "--out-dir", str(tmp_path / "out_broken")])
    assert pq.read_table(tmp_path / "out_broken" / "train.parquet").num_rows == 1


def test_geo3k_zoom_tool_prompts_tell_the_model_how_to_zoom(tmp_path):
    """Invariant: --zoom-tool puts the zoom environment's instruction before the think-then-box one, and changes
    nothing else in the row."""
    from mmrl_megatron.rollout.environments.zoom import INSTRUCTION as ZOOM_INSTRUCTION

    pq.write_table(_geo3k_table(2), tmp_path / "train-00000-of-00001.parquet")
    tool = _tool("preprocess_geo3k")
    rows = {}
    for name, flags in (("plain", []), ("zoom", ["--zoom-tool"])):
        tool.main([str(tmp_path / "train-00000-of-00001.parquet"), "--out-dir", str(tmp_path / name), *flags])
        rows[name] = pq.read_table(tmp_path / name / "train.parquet").to_pylist()
    plain, zoom = rows["plain"][1], rows["zoom"][1]
    assert zoom["prompt"][0]["content"] == plain["prompt"][0]["content"].replace(
        "You FIRST", f"{ZOOM_INSTRUCTION} You FIRST")
    assert {k: v for k, v in zoom.items() if k != "prompt"} == {k: v for k, v in plain.items() if k != "prompt"}


def test_synthetic_task_is_deterministic_and_correct(tmp_path, tiny_model_dir):
    """Invariant: the same seed writes identical files; each image holds as many red squares as its ground
    truth says; the ground truth checks as correct when boxed; images are 56x56 (a 4x4 patch grid)."""
    tool = _tool("make_synthetic")
    for name in ("a", "b"):
        tool.main(["--out-dir", str(tmp_path / name), "--train-size", "12", "--test-size", "4", "--seed", "3"])
    rows = pq.read_table(tmp_path / "a" / "train.parquet").to_pylist()
    assert rows == pq.read_table(tmp_path / "b" / "train.parquet").to_pylist()
    for row in rows:
        image = Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")
        truth = row["reward_model"]["ground_truth"]
        assert image.size == (56, 56) and truth in {"1", "2", "3"}
        assert _count_red_components(image, RED) == int(truth)
        assert compute_score(row["data_source"], f"\\boxed{{{truth}}}", truth, row["extra_info"])["score"] == 1.0
    samples = _samples(tmp_path / "a" / "test.parquet", tiny_model_dir)
    assert len(samples) == 4 and all(s.image_grid_thw.tolist() == [[1, 4, 4]] for s in samples)


def _count_red_components(image, red):
    """Connected regions of exactly-red pixels (4-neighbourhood)."""
    width, height = image.size
    pixels = image.load()
    seen, regions = set(), 0
    for start in ((x, y) for y in range(height) for x in range(width)):
        if start in seen or pixels[start] != red:
            continue
        regions += 1
        stack = [start]
        seen.add(start)
        while stack:
            x, y = stack.pop()
            for neighbour in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if (0 <= neighbour[0] < width and 0 <= neighbour[1] < height and neighbour not in seen
                        and pixels[neighbour] == red):
                    seen.add(neighbour)
                    stack.append(neighbour)
    return regions
