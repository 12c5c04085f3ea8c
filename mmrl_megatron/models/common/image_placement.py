"""Put vision features in place of the image placeholder tokens' embeddings."""
import torch


def feature_rows(mask: torch.Tensor) -> torch.Tensor:
    """For every position of `mask`, the index of its feature row: the running count of True positions
    (row-major) minus one; 0 where no True position precedes (those positions are masked out by the caller)."""
    return (mask.flatten().cumsum(0) - 1).clamp(min=0).view(mask.shape)


def place_image_features(embeddings: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """`embeddings` [..., H] with the i-th True position of `mask` [...] (row-major order) holding features[i].

    A gather by the mask's running count rather than masked_scatter: masked_scatter's backward is a
    masked_select, whose size depends on the data, so it reads the count back from the GPU (a host sync in
    every backward). The caller guarantees features has one row per True position (checked on the host)."""
    return torch.where(mask.unsqueeze(-1), features.to(embeddings.dtype)[feature_rows(mask)], embeddings)
