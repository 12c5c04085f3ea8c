"""The offline converters: HF -> megatron checkpoint (written at TP=1) -> loaded at TP=2 x PP=2 -> HF is
bit-exact for every tensor, with the side files copied; checkpoints that do not fit stop with the tensor's name."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmrl_megatron.convert.checkpoint_manifest import write_manifest
from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from tests.cpu_ranks import run_on_cpu_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIDE_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"]
CHANGED_TENSOR = "model.layers.1.mlp.down_proj.weight"
TRUNCATED_FILE = "part0__0_0.distcp"  # the first part's data, as checkpoint_parts.join_parts names it
# the tiny model is about 0.5 MB: 64 KiB chunks split it into many parts, several tensors and layers apart
CHUNK_GB = str(64 * 1024 / 1024 ** 3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_tool(script: str, *args: str) -> None:
    """Run a tool as a user would (one process, no launcher), failing the test with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()), MASTER_ADDR="127.0.0.1")
    completed = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def _rewrite_config(directory: str, top=None, text=None) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    config.update(top or {})
    config["text_config"].update(text or {})
    with open(path, "w") as handle:
        json.dump(config, handle)


def _error_of(function, *args) -> str:
    """The CheckpointError message function(*args) raises ('' when it succeeds)."""
    from mmrl_megatron.convert.errors import CheckpointError

    try:
        function(*args)
    except CheckpointError as error:
        return str(error)
    return ""


def _export_and_mismatches(mcore_dir: str, out_dir: str, hf_dir: str, bad_mcore_dirs, bad_hf_dirs):
    """On 4 ranks: export at TP=2 x PP=2 and convert hf_dir again at TP=2 x PP=2, both in 64 KiB chunks; at
    TP=PP=1, load both checkpoints whole with megatron's own strict load and name the tensors that differ from
    hf_dir's, export the TP=2 x PP=2 checkpoint again at TP=1 (streamed, so the TP=1 pieces are read across
    the stored TP=2 chunks), then try each misfit checkpoint, whole and streamed. Returns (names written,
    differing tensors, errors, streamed errors)."""
    import torch.distributed as dist

    from mmrl_megatron.convert import iter_hf_tensors
    from mmrl_megatron.models import build_model_from_dir
    from mmrl_megatron.models.checkpoint_conversion import convert_hf_to_mcore, convert_mcore_to_hf
    from mmrl_megatron.parallel import ParallelDims, start_processes

    world, device = dist.get_world_size(), torch.device("cpu")
    dims = start_processes(ParallelDims(world, tensor=2, pipeline=2), device)
    written = convert_mcore_to_hf(mcore_dir, out_dir, dims, max_chunk_bytes=64 * 1024)
    written_at_tp2_pp2 = f"{mcore_dir}_tp2pp2"
    convert_hf_to_mcore(hf_dir, written_at_tp2_pp2, dims, max_chunk_bytes=64 * 1024)
    dims = start_processes(ParallelDims(world), device)  # every rank holds the whole model: every rank must notice
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    differing = [(path, name) for path in (mcore_dir, written_at_tp2_pp2)
                 for name, tensor in iter_hf_tensors([build_model_from_dir(path, dims)], dims)
                 if not torch.equal(tensor, original[name])]
    convert_mcore_to_hf(written_at_tp2_pp2, f"{out_dir}_from_tp2pp2", dims, max_chunk_bytes=64 * 1024)
    errors = [_error_of(build_model_from_dir, path, dims) for path in list(bad_mcore_dirs) + list(bad_hf_dirs)]
    streamed_errors = [_error_of(convert_mcore_to_hf, path, f"{path}_out", dims) for path in bad_mcore_dirs]
    return written, differing, errors, streamed_errors


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    hf_dir = build_tiny_checkpoint(str(root / "hf"), tie_word_embeddings=False)
    mcore_dir, back_dir = str(root / "mcore"), str(root / "hf_back")
    run_tool("tools/checkpoint_convert/hf_to_mcore.py", "--hf-dir", hf_dir, "--out", mcore_dir, "--max-chunk-gb", CHUNK_GB)

    # misfits: megatron checkpoints whose config asks for a wider MLP (wrong shape), a layer more (the stacked
    # layer tensors are too short), tied embeddings (the stored output layer is unknown to the model) (their
    # manifests rewritten, so only the misfit stands), and one with a tensor data file truncated; HF
    # directories with one tensor reshaped or dropped
    bad_mcore = [str(root / name) for name in ("mcore_shape", "mcore_layers", "mcore_unknown", "mcore_truncated")]
    for path, change in zip(bad_mcore, [dict(text={"intermediate_size": 72}), dict(text={"num_hidden_layers": 5}),
                                        dict(top={"tie_word_embeddings": True}, text={"tie_word_embeddings": True})]):
        shutil.copytree(mcore_dir, path)
        _rewrite_config(os.path.join(path, "hf"), **change)
        write_manifest(path)
    shutil.copytree(mcore_dir, bad_mcore[-1])
    with open(os.path.join(bad_mcore[-1], TRUNCATED_FILE), "r+b") as handle:
        handle.truncate(100)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    bad_hf = {"shape": str(root / "hf_shape"), "missing": str(root / "hf_missing")}
    for path, edit in [(bad_hf["shape"], lambda t: t.update({CHANGED_TENSOR: t[CHANGED_TENSOR][:, :-1].clone()})),
                       (bad_hf["missing"], lambda t: t.pop(CHANGED_TENSOR))]:
        shutil.copytree(hf_dir, path)
        changed = dict(tensors)
        edit(changed)
        save_file(changed, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    results = run_on_cpu_ranks(4, _export_and_mismatches, mcore_dir, back_dir, hf_dir,
                               bad_mcore, [bad_hf["shape"], bad_hf["missing"]])
    return hf_dir, mcore_dir, back_dir, results


def test_round_trip_is_bit_exact(round_trip):
    """Invariant: every HF tensor survives HF -> megatron (TP=1) -> megatron at TP=2 x PP=2 -> HF, and HF -> megatron
    written at TP=2 x PP=2 -> HF exported at TP=1, with torch.equal, under its original name and shape (vocabulary
    padding removed), for untied embeddings, a TP-padded vocabulary and one KV head per TP rank, both conversions
    streamed in chunks far smaller than the model; the checkpoint the parts were joined into, and one converted at
    TP=2 x PP=2, load whole through megatron's own strict load, every tensor exact."""
    hf_dir, _, back_dir, results = round_trip
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    for directory in (back_dir, f"{back_dir}_from_tp2pp2"):
        exported = load_file(os.path.join(directory, "model.safetensors"))
        assert sorted(exported) == sorted(original)
        assert "lm_head.weight" in exported
        for name, tensor in original.items():
            assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), (directory, name)
    written_on_rank0, differing, _, _ = results[0]
    assert sorted(written_on_rank0) == sorted(original)
    assert differing == []
    assert not os.path.exists(os.path.join(round_trip[1], ".parts"))


def test_side_files_travel_with_the_checkpoint(round_trip):
    """Invariant: config, tokenizer and processor files are kept in the megatron checkpoint and copied back."""
    hf_dir, mcore_dir, back_dir, _ = round_trip
    for name in SIDE_FILES:
        with open(os.path.join(hf_dir, name), "rb") as handle:
            expected = handle.read()
        for directory in (os.path.join(mcore_dir, "hf"), back_dir):
            with open(os.path.join(directory, name), "rb") as handle:
                assert handle.read() == expected, (directory, name)


def test_misfit_checkpoints_stop_with_the_tensor_name(round_trip):
    """Invariant: a checkpoint with a wrongly shaped, missing or unknown tensor, or a truncated data file, stops the
    load (whole, and the streamed export) on every rank with an error naming that tensor or file, instead of
    loading garbage."""
    _, _, _, results = round_trip
    for _, _, whole, streamed in results:
        hf_shape, hf_missing = whole[4:]
        for shape_error, layers_error, unknown_error, truncated_error in (whole[:4], streamed):
            assert "mlp.linear_fc" in shape_error and "shape" in shape_error, shape_error
            assert "decoder.layers." in layers_error and "(5, 32)" in layers_error, layers_error
            assert "output_layer.weight" in unknown_error, unknown_error
            assert f"mcore_truncated/{TRUNCATED_FILE} has 100 bytes" in truncated_error, truncated_error
        assert CHANGED_TENSOR in hf_shape, hf_shape
        assert CHANGED_TENSOR in hf_missing, hf_missing
