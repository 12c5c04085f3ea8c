"""MoonViT + projector (written from Kimi-VL's published remote-code description) computes the same function
as transformers' Kimi K2.5 vision model and projector for single images, given the same weights.

The oracle is transformers 5.x's Kimi_K25VisionModel + Kimi_K25MultimodalProjection: the same MoonViT
architecture, with fused wqkv split into q/k/v and the 2-D rotary applied on half-split rather than
interleaved channel pairs. transformers' own kimi_k25 checkpoint conversion (conversion_mapping.py:
Chunk + PermuteForRope) reorders q/k rows per head accordingly; this test does the same reordering by
hand, so agreement checks patch embedding, position-table interpolation, rotary axes and frequencies,
per-image attention, the 2x2 merge order and the projector.
"""
import pytest
import torch

from mmrl_megatron.models.kimi_vl.hf_config import MoonViTConfig
from mmrl_megatron.models.kimi_vl.vision import MoonViT, MultiModalProjector

VISION = MoonViTConfig(patch_size=14, init_pos_emb_height=8, init_pos_emb_width=8, num_attention_heads=4,
                       num_hidden_layers=2, hidden_size=32, intermediate_size=64, merge_kernel_size=(2, 2))
TEXT_HIDDEN = 48
# (rows, cols) in patches: the table's own size, and a non-square one that needs bicubic resampling
GRIDS = [(8, 8), (6, 10)]


def _halves_from_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, channels (0, 1, 2, 3, ...) -> (0, 2, 4, ..., 1, 3, 5, ...): interleaved pairs to half-split."""
    head_dim = weight.shape[0] // heads
    return weight.reshape(heads, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _oracle_state(tower: MoonViT, projector: MultiModalProjector):
    """Our checkpoint-named tensors renamed and reordered for Kimi_K25VisionModel / its projector."""
    heads, vision_state = VISION.num_attention_heads, {}
    for name, tensor in tower.state_dict().items():
        name = name.replace("encoder.blocks.", "layers.").replace("encoder.final_layernorm", "final_layernorm")
        name = name.replace(".norm1.", ".norm2.").replace(".norm0.", ".norm1.")
        name = name.replace(".mlp.fc1.", ".mlp.fc2.").replace(".mlp.fc0.", ".mlp.fc1.").replace(".wo.", ".attn.proj.")
        name = name.replace("pos_emb.weight", "pos_emb.position_embeddings")
        if ".wqkv." in name:
            query, key, value = tensor.chunk(3, dim=0)
            suffix = name.rsplit(".", 1)[1]
            prefix = name.split(".wqkv.")[0]
            vision_state[f"{prefix}.attn.q_proj.{suffix}"] = _halves_from_interleaved(query, heads)
            vision_state[f"{prefix}.attn.k_proj.{suffix}"] = _halves_from_interleaved(key, heads)
            vision_state[f"{prefix}.attn.v_proj.{suffix}"] = value
        else:
            vision_state[name] = tensor
    projector_state = {name.replace("linear_1", "in_proj").replace("linear_2", "out_proj"): tensor
                       for name, tensor in projector.state_dict().items()}
    return vision_state, projector_state


def _oracle_modules():
    from transformers import DeepseekV3Config
    from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config, Kimi_K25VisionConfig
    from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25MultimodalProjection, Kimi_K25VisionModel

    vision_config = Kimi_K25VisionConfig(
        patch_size=VISION.patch_size, pos_emb_height=VISION.init_pos_emb_height,
        pos_emb_width=VISION.init_pos_emb_width, num_attention_heads=VISION.num_attention_heads,
        num_hidden_layers=VISION.num_hidden_layers, hidden_size=VISION.hidden_size,
        intermediate_size=VISION.intermediate_size, merge_kernel_size=list(VISION.merge_kernel_size),
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    vision_config._attn_implementation = "eager"
    config = Kimi_K25Config(vision_config=vision_config, projection_hidden_size=VISION.hidden_size,
                            text_config=DeepseekV3Config(hidden_size=TEXT_HIDDEN).to_dict())
    return Kimi_K25VisionModel(vision_config).eval(), Kimi_K25MultimodalProjection(config).eval()


def _perturb_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Default LayerNorm/bias initialisations are symmetric; random values make every tensor matter."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("grid", GRIDS)
def test_moonvit_and_projector_match_kimi_k25_vision_oracle(grid):
    """Invariant: for one image at its native patch grid, our MoonViT + projector output equals the oracle's
    (max abs difference < 1e-5 in fp32) after the published checkpoint conversion."""
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(5)
    tower, projector = MoonViT(VISION).eval(), MultiModalProjector(VISION, TEXT_HIDDEN).eval()
    _perturb_(tower, generator)
    _perturb_(projector, generator)
    oracle_tower, oracle_projector = _oracle_modules()
    vision_state, projector_state = _oracle_state(tower, projector)
    missing, unexpected = oracle_tower.load_state_dict(vision_state, strict=False)
    assert not unexpected and all("time_position" in name or "inv_freq" in name for name in missing), missing
    oracle_projector.load_state_dict(projector_state)

    rows, cols = grid
    pixel_values = torch.randn(rows * cols, 3, VISION.patch_size, VISION.patch_size, generator=generator)
    with torch.no_grad():
        ours = projector(tower(pixel_values, torch.tensor([[rows, cols]])))
        merged = oracle_tower(pixel_values, torch.tensor([[1, rows, cols]])).pooler_output
        expected = oracle_projector(merged).squeeze(1)
    assert ours.shape == (rows * cols // 4, TEXT_HIDDEN)
    assert (ours - expected).abs().max().item() < 1e-5


def test_images_attend_only_within_themselves():
    """Invariant: two images in one call give each the features it gets alone (per-image attention)."""
    torch.manual_seed(2)
    tower = MoonViT(VISION).eval()
    generator = torch.Generator().manual_seed(3)
    images = [torch.randn(r * c, 3, 14, 14, generator=generator) for r, c in GRIDS]
    with torch.no_grad():
        together = tower(torch.cat(images), torch.tensor(GRIDS))
        alone = torch.cat([tower(image, torch.tensor([grid])) for image, grid in zip(images, GRIDS)])
    assert torch.allclose(together, alone, atol=1e-6)
