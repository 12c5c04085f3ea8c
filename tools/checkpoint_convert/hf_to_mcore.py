"""Convert a Hugging Face Qwen2.5-VL directory into a megatron-core distributed checkpoint.

    python tools/checkpoint_convert/hf_to_mcore.py --hf-dir HF_DIR --out MCORE_DIR
    torchrun --nproc_per_node 4 tools/checkpoint_convert/hf_to_mcore.py --hf-dir HF_DIR --out MCORE_DIR --tp 2 --pp 2

The checkpoint holds global tensors, so it loads under any TP/PP whatever layout wrote it. The model is
converted one chunk of at most --max-chunk-gb at a time, never held whole; more ranks convert their
shares in parallel. Config, tokenizer and processor files are copied into MCORE_DIR/hf.
"""
import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--out", required=True, help="new, empty directory for the megatron checkpoint")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size used while converting")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used while converting")
    parser.add_argument("--max-chunk-gb", type=float, default=5.0,
                        help="most of the model held in memory at once, per rank (peak is about twice this)")
    args = parser.parse_args(argv)

    from mmrl_megatron.models.checkpoint_conversion import convert_hf_to_mcore
    from mmrl_megatron.parallel import ParallelDims, detect_process_place, pick_device, shutdown, start_processes

    device = pick_device()
    dims = start_processes(ParallelDims(detect_process_place().world_size, tensor=args.tp, pipeline=args.pp), device)
    try:
        convert_hf_to_mcore(args.hf_dir, args.out, dims, device, max_chunk_bytes=int(args.max_chunk_gb * 1024 ** 3))
    finally:
        shutdown()


if __name__ == "__main__":  # dist_checkpointing may spawn helper processes, which re-import this file
    main()
