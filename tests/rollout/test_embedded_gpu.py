"""The embedded engine on a GPU: CUDA-graph decode equals eager decode; log-prob parity with HF (fp32 exact,
bf16 reported); weight offload round trip."""
import dataclasses

import pytest
import torch

from mmrl_megatron.config.schema import EmbeddedEngineConfig
from mmrl_megatron.models.qwen2_5_vl.tiny import build_tiny_checkpoint
from mmrl_megatron.rollout import SamplingParams
from mmrl_megatron.rollout.embedded import EmbeddedEngine

from .embedded_helpers import hf_logprobs, make_requests

pytestmark = pytest.mark.gpu

GRIDS = [[1, 4, 4], None, [1, 4, 6], None, [1, 6, 4]]
SAMPLING = SamplingParams(n=3, temperature=0.9, top_p=0.95, max_new_tokens=40, seed=5, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_vl_gpu")))


def _engine(checkpoint, dtype, **settings):
    engine = EmbeddedEngine(checkpoint, "cuda", dtype, max_batch_size=16, settings=EmbeddedEngineConfig(**settings))
    engine.load_checkpoint()
    return engine


def _hf_model(checkpoint, dtype, device):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(device).eval()


def test_cuda_graph_decode_equals_eager(checkpoint):
    """Replaying captured decode graphs gives the same tokens and log-probs as the eager decode step."""
    requests = make_requests(_hf_model(checkpoint, torch.float32, "cpu").config, GRIDS)
    eager = _engine(checkpoint, torch.float32, cuda_graphs=False).generate(requests, SAMPLING)
    graphed_engine = _engine(checkpoint, torch.float32, cuda_graphs=True)
    graphed = graphed_engine.generate(requests, SAMPLING)
    assert any(graphs.captured for graphs in graphed_engine._graphs.values())
    assert [r.response_ids for r in graphed] == [r.response_ids for r in eager]
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_match_hf_on_gpu(checkpoint, dtype):
    """fp32: engine log-probs equal HF's forward within 1e-4 on the GPU; bf16: the mean absolute difference is
    printed (the figure issue 6 asks to report) and must stay small."""
    hf = _hf_model(checkpoint, dtype, "cuda")
    requests = make_requests(hf.config, GRIDS)
    results = _engine(checkpoint, dtype).generate(requests, SAMPLING)
    differences = []
    for result in results:
        request = requests[result.request_index]
        on_device = dataclasses.replace(
            request, pixel_values=None if request.pixel_values is None else request.pixel_values.to("cuda", dtype),
            image_grid_thw=None if request.image_grid_thw is None else request.image_grid_thw.to("cuda"))
        expected = hf_logprobs(hf, on_device, result, SAMPLING.temperature).cpu()
        differences.append((torch.tensor(result.logprobs) - expected).abs())
    difference = torch.cat(differences)
    print(f"engine vs HF log-prob difference ({dtype}): mean {difference.mean():.2e}, max {difference.max():.2e}")
    assert difference.max() < (1e-4 if dtype == torch.float32 else 0.5)
    assert difference.mean() < (1e-5 if dtype == torch.float32 else 0.05)


def test_offload_and_resume_keep_weights_and_results(checkpoint):
    """With offload_weights, release_memory moves weights to CPU and frees the cache; resume brings them
    back and the same seed gives the same rollout."""
    engine = _engine(checkpoint, torch.float32, offload_weights=True)
    requests = make_requests(engine.model.config, GRIDS)
    before = engine.generate(requests, SAMPLING)
    engine.release_memory()
    assert engine.model.lm_head.weight.device.type == "cpu" and engine._cache is None
    engine.resume_memory()
    assert engine.model.lm_head.weight.device.type == "cuda"
    after = engine.generate(requests, SAMPLING)
    assert [r.response_ids for r in after] == [r.response_ids for r in before]
