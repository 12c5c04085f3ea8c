"""launch/score.py gives the log-probs transformers' own model gives: the tiny Qwen2.5-VL scored from its HF
directory in one process and from its converted megatron checkpoint at TP=2 x PP=2 on 4 CPU ranks
(torchrun), over parquet rows with two images of different sizes, one image, and none. The oracle is
Qwen2_5_VLForConditionalGeneration on the same weights, fed the prompts the training data path builds."""
import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from tests.models.qwen_inputs import Sample, hf_logprobs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOLERANCE = 1e-4  # max abs, fp32, as the model parity tests
RESPONSES = ["The answer is 42.", "x = 7", "two circles"]


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_rows(path: str) -> None:
    rows = [
        {"prompt": [{"role": "user", "content": "<image>Compare <image>the two shapes."}],
         "images": [{"bytes": _png(84, 56, 0)}, {"bytes": _png(56, 56, 1)}], "response": RESPONSES[0]},
        {"prompt": [{"role": "user", "content": "<image>Solve for x."}], "images": [{"bytes": _png(112, 84, 2)}],
         "response": RESPONSES[1]},
        {"prompt": [{"role": "user", "content": "How many circles?"}], "images": [], "response": RESPONSES[2]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)


def _run(command, env_extra=None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **(env_extra or {}))
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def _records(path: str):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def _oracle(hf_dir: str, data_path: str, records):
    """transformers' log-probs of each record's response tokens after the row's processed prompt."""
    from mmrl_megatron.config.schema import DataConfig
    from mmrl_megatron.data import PromptProcessor
    from mmrl_megatron.data.format import parse_row

    processor = PromptProcessor(hf_dir, DataConfig(min_pixels=56 * 56, max_pixels=112 * 112,
                                                   max_prompt_length=1 << 30))
    samples, prompt_lengths = [], []
    for record, row in zip(records, pq.read_table(data_path).to_pylist()):
        prompt = processor.process(parse_row({**row, "reward_model": {"ground_truth": ""}}), record["index"])
        ids = torch.tensor(prompt.prompt_ids + record["token_ids"])
        grid = prompt.image_grid_thw
        samples.append(Sample(ids, None, prompt.pixel_values, grid, ["image"] * (0 if grid is None else len(grid))))
        prompt_lengths.append(len(prompt.prompt_ids))
    # token_logprobs position p scores token p + 1: the response starts at the prompt's length
    return [logprobs[length - 1:] for logprobs, length in zip(hf_logprobs(hf_dir, samples), prompt_lengths)]


def test_score_matches_transformers_from_hf_and_megatron_checkpoints(tmp_path):
    """Invariant: from either kind of directory and in either layout, score.py writes one record per row in row
    order with the response's token ids, and its log-probs equal transformers' within 1e-4."""
    hf_dir = build_tiny_checkpoint(str(tmp_path / "hf"), tie_word_embeddings=False)
    mcore_dir, data_path = str(tmp_path / "mcore"), str(tmp_path / "responses.parquet")
    _write_rows(data_path)
    _run([sys.executable, "tools/checkpoint_convert/hf_to_mcore.py", "--hf-dir", hf_dir, "--out", mcore_dir],
         {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29617"})
    _run([sys.executable, "launch/score.py", "--model", hf_dir, "--data", data_path, "--out", str(tmp_path / "hf.jsonl")],
         {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29618"})
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "29619",
          "launch/score.py", "--model", mcore_dir, "--data", data_path, "--out", str(tmp_path / "mcore.jsonl"),
          "--tp", "2", "--pp", "2"])

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for name in ("hf.jsonl", "mcore.jsonl"):
        records = _records(str(tmp_path / name))
        assert [record["index"] for record in records] == [0, 1, 2], name
        assert [record["token_ids"] for record in records] == [
            tokenizer.encode(text, add_special_tokens=False) for text in RESPONSES], name
        for record, expected in zip(records, _oracle(hf_dir, data_path, records)):
            got = torch.tensor(record["logprobs"])
            assert got.shape == expected.shape, (name, record["index"])
            assert (got - expected).abs().max() < TOLERANCE, (name, record["index"], (got - expected).abs().max())
