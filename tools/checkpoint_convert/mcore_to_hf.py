"""Convert a megatron-core distributed checkpoint to HF safetensors: one from hf_to_mcore.py, or a training run's
checkpoint (RUN/checkpoints/step_N), whose actor is exported.

    python tools/checkpoint_convert/mcore_to_hf.py --mcore-dir MCORE_DIR --out HF_DIR
    torchrun --nproc_per_node 2 tools/checkpoint_convert/mcore_to_hf.py --mcore-dir MCORE_DIR --out HF_DIR --tp 2

Writes the original HF tensor names with vocabulary padding removed, in shards of at most
--max-shard-gb, plus the config, tokenizer and processor files kept in MCORE_DIR/hf. The checkpoint is
read one chunk of at most --max-chunk-gb at a time, never held whole.
"""
import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mcore-dir", required=True, help="megatron distributed checkpoint directory")
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size used while converting")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used while converting")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file written")
    parser.add_argument("--max-chunk-gb", type=float, default=5.0,
                        help="most of the model held in memory at once, per rank (peak is about twice this)")
    args = parser.parse_args(argv)

    from mmrl_megatron.models.checkpoint_conversion import convert_mcore_to_hf
    from mmrl_megatron.parallel import ParallelDims, detect_process_place, pick_device, shutdown, start_processes

    device = pick_device()
    dims = start_processes(ParallelDims(detect_process_place().world_size, tensor=args.tp, pipeline=args.pp), device)
    try:
        convert_mcore_to_hf(args.mcore_dir, args.out, dims, device, max_shard_bytes=int(args.max_shard_gb * 1024 ** 3),
                            max_chunk_bytes=int(args.max_chunk_gb * 1024 ** 3))
    finally:
        shutdown()


if __name__ == "__main__":  # dist_checkpointing may spawn helper processes, which re-import this file
    main()
