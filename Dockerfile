# mmrl_megatron GPU image: the NVIDIA PyTorch container's CUDA 13 toolchain (nvcc, cuDNN, NCCL, HPC-X),
# the torch that SGLang 0.5.23 pins (2.14.1, whose PyPI wheels are CUDA 13 builds), Transformer Engine and
# apex compiled against that torch, SGLang, and this package.
#
# Build from the repository root (compiling Transformer Engine and apex takes 30-60 minutes on 32 cores):
#   docker build -t mmrl_megatron:latest .
#   docker build --build-arg TORCH_CUDA_ARCH_LIST="9.0" --build-arg MAX_JOBS=16 -t mmrl_megatron:h100 .
#
# Run on one node (the checkout mounted over the installed copy, so edits need no rebuild):
#   docker run --rm -it --gpus all --ipc=host --network=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v "$PWD":/workspace/mmrl_megatron -v /data:/data mmrl_megatron:latest \
#       torchrun --nproc_per_node 8 launch/train.py --config yaml_configs/grpo_geo3k_qwen25vl_7b.yaml
# Tests inside the image: docker run --rm --gpus all mmrl_megatron:latest pytest -q -m gpu
# Under Slurm with pyxis/enroot, the recipes pass extra srun arguments through:
#   MMRL_SRUN_ARGS="--container-image=mmrl_megatron:latest --container-mounts=$PWD:/workspace/mmrl_megatron" \
#       sbatch slurm/grpo_qwen25vl_72b.sh
#
# This image has not been built by the project's CI (no GPU, no access to nvcr.io there). The base tag
# is the newest 25.xx NGC PyTorch release on CUDA 13; none ships torch 2.14, so torch is replaced by the
# PyPI build SGLang pins and the CUDA extensions are rebuilt against it.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG SGLANG_VERSION=0.5.23
ARG TRANSFORMER_ENGINE_REF=stable
ARG APEX_REF=master
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0"
ARG MAX_JOBS=32

# NGC pins its own torch through a pip constraint file; SGLang's kernels (sgl-kernel, flashinfer) are
# built for the PyPI torch it pins, so the constraint is dropped and that torch installed instead.
ENV PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    NCCL_NVLS_ENABLE=0 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

RUN pip uninstall -y torch torchvision torchaudio transformer_engine transformer_engine_torch \
        transformer-engine-cu12 apex flash_attn || true \
    && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

RUN pip install "sglang[srt]==${SGLANG_VERSION}"

# Transformer Engine from source against the torch above (its PyPI wheels target other torch builds).
RUN NVTE_FRAMEWORK=pytorch pip install --no-build-isolation \
        "git+https://github.com/NVIDIA/TransformerEngine.git@${TRANSFORMER_ENGINE_REF}"

# apex has no usable PyPI wheel (the PyPI name "apex" is an unrelated package): built from NVIDIA/apex
# with its C++ and CUDA extensions (fused layer norm, fused Adam kernels used by megatron-core).
RUN git clone https://github.com/NVIDIA/apex /opt/apex \
    && cd /opt/apex && git checkout "${APEX_REF}" \
    && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation . \
    && rm -rf /opt/apex/build

WORKDIR /workspace/mmrl_megatron
COPY . .
# Extras sglang/mpi/test only: "all" would also ask pip for transformer-engine[pytorch] from PyPI,
# replacing the build above.
RUN pip install -e ".[sglang,mpi,test]"

# Checks the pins by package metadata: importing the CUDA extensions needs a driver, absent at build time.
RUN python -c "import importlib.metadata as m; \
names = ['torch', 'sglang', 'transformer_engine', 'apex', 'megatron-core', 'transformers', 'mmrl_megatron']; \
[print(n, m.version(n)) for n in names]; \
assert m.version('torch').startswith('${TORCH_VERSION}'), m.version('torch'); \
assert m.version('sglang') == '${SGLANG_VERSION}'"

CMD ["bash"]
