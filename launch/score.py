"""Per-token log-probs of given responses under a model, in any parallel layout.

    torchrun --nproc_per_node N launch/score.py --model DIR --data FILE.parquet --out FILE.jsonl --tp T --pp P

DIR is an HF directory or a megatron checkpoint (tools/checkpoint_convert/hf_to_mcore.py). The parquet has
`prompt` (a chat list, as in training data), `images` (a list of encoded images; optional) and `response`
(a string). Prompts go through the training data path (chat template, image processing, pad expansion,
M-RoPE positions) and the actor's scoring path (packed sequences, megatron's pipeline schedule,
vocabulary-parallel log-probs), so the numbers are the ones training computes. Each output line is
{"index": row, "token_ids": [response tokens], "logprobs": [one per response token]}, in row order.
Data-parallel ranks (N / (T*P) of them) share the rows.
"""
import argparse
import json
import os
from typing import Dict, List, Optional, Tuple


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF directory or megatron distributed checkpoint")
    parser.add_argument("--data", required=True, help="parquet with prompt, images and response columns")
    parser.add_argument("--out", required=True, help="output JSON-lines file")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute precision (default: the checkpoint's)")
    parser.add_argument("--temperature", type=float, default=1.0, help="log-probs of logits / temperature")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192, help="tokens per packed micro-batch")
    parser.add_argument("--min-pixels", type=int, default=None, help="default: the model's preprocessor config")
    parser.add_argument("--max-pixels", type=int, default=None, help="default: the model's preprocessor config")
    return parser.parse_args(argv)


def _preprocessor_pixels(hf_dir: str) -> Tuple[int, int]:
    path = os.path.join(hf_dir, "preprocessor_config.json")
    with open(path) as handle:
        config = json.load(handle)
    size = config.get("size") or {}
    return (config.get("min_pixels", size.get("shortest_edge", 56 * 56)),
            config.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)))


def read_samples(data_path: str, hf_dir: str, hf_config: Dict, args, rows: range) -> List:
    """Trainer Samples (prompt ids, response ids, images, M-RoPE positions) for the given row indices."""
    import pyarrow.parquet as pq

    from mmrl_megatron.config.schema import DataConfig
    from mmrl_megatron.data import PromptProcessor
    from mmrl_megatron.data.format import parse_row
    from mmrl_megatron.trainer.batch import Sample
    from mmrl_megatron.models.family import position_rule

    default_min, default_max = _preprocessor_pixels(hf_dir)
    data_config = DataConfig(min_pixels=args.min_pixels or default_min, max_pixels=args.max_pixels or default_max,
                             max_prompt_length=1 << 30)
    processor = PromptProcessor(hf_dir, data_config)
    positions = position_rule(hf_config)
    table = pq.read_table(data_path)
    for column in ("prompt", "response"):
        if column not in table.column_names:
            raise SystemExit(f"{data_path} has no '{column}' column (columns: {table.column_names})")
    samples = []
    for index in rows:
        row = table.slice(index, 1).to_pylist()[0]
        # Scoring needs no reward; parse_row validates prompt and images the way training does.
        parsed = parse_row({**row, "reward_model": {"ground_truth": ""}})
        prompt = processor.process(parsed, index)
        response_ids = processor.tokenizer.encode(row["response"] or "", add_special_tokens=False)
        if not response_ids:
            raise SystemExit(f"{data_path} row {index}: the response is empty; there is nothing to score")
        sample = Sample(prompt_ids=prompt.prompt_ids, response_ids=response_ids, group=index,
                        pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw)
        sample.position_ids = positions(sample.prompt_ids, len(sample.response_ids), sample.image_grid_thw)
        samples.append(sample)
    return samples


def score(args) -> Optional[List[Dict]]:
    """Score this data-parallel rank's rows (collective); every row's record on global rank 0, None elsewhere."""
    import pyarrow.parquet as pq
    import torch.distributed as dist
    from megatron.core.utils import get_model_config

    from mmrl_megatron.convert.checkpoint_io import hf_files_dir
    from mmrl_megatron.models import build_model_from_dir
    from mmrl_megatron.models.hf_config import read_hf_config
    from mmrl_megatron.models.common.packing import pack_sequences
    from mmrl_megatron.parallel import ParallelDims, detect_process_place, pick_device, start_processes
    from mmrl_megatron.trainer.batch import build_micro_batches
    from mmrl_megatron.trainer.losses import response_logprobs
    from mmrl_megatron.trainer.roles import ModelRole

    device = pick_device()
    dims = start_processes(ParallelDims(detect_process_place().world_size, tensor=args.tp, pipeline=args.pp), device)
    model = build_model_from_dir(args.model, dims, role="actor", device=device, dtype=args.dtype)
    get_model_config(model).variable_seq_lengths = True  # packed micro-batches differ in length
    role = ModelRole("scorer", [model], device, dims)

    data_rank, data_size = dims.data_parallel_rank, dims.data
    num_rows = pq.read_metadata(args.data).num_rows
    rows = range(data_rank, num_rows, data_size)
    samples = read_samples(args.data, hf_files_dir(args.model), read_hf_config(args.model), args, rows)
    if samples:
        micro_batches = build_micro_batches(samples, args.micro_batch_tokens, pack_sequences)
        role.score(micro_batches,
                   lambda logits, batch: response_logprobs(logits, batch, args.temperature, dims.tensor_group),
                   "logprobs")
    # After score() every rank of a model replica holds the values; one rank per replica reports them.
    reports = dims.tensor_rank == 0 and dims.is_first_stage
    records = [{"index": s.group, "token_ids": s.response_ids, "logprobs": s.tensors["logprobs"].tolist()}
               for s in samples] if reports else []
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0)
    return sorted((r for part in gathered for r in part), key=lambda r: r["index"]) if gathered else None


def run(args) -> None:
    """Score and write args.out (from global rank 0); the process group stays up for the caller."""
    records = score(args)
    if records is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")


def main(argv=None) -> None:
    from mmrl_megatron.parallel import shutdown

    try:
        run(parse_args(argv))
    finally:
        shutdown()


if __name__ == "__main__":  # dist_checkpointing may spawn helper processes, which re-import this file
    main()
