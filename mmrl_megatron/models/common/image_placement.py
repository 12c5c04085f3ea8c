"""Put vision features in place of the image placeholder tokens' embeddings."""
import torch


def place_image_features(embeddings: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """`embeddings` [..., H] with the i-th True position of `mask` [...] (row-major order) holding features[i].

    A gather by the mask's running count rather than masked_scatter: masked_scatter's backward is a
    masked_select, whose size depends on the data, so it reads the count back from the GPU (a host sync in
    every backward). The caller guarantees features has one row per True position (checked on the host)."""
    index = (mask.flatten().cumsum(0) - 1).clamp(min=0).view(mask.shape)
    return torch.where(mask.unsqueeze(-1), features.to(embeddings.dtype)[index], embeddings)
