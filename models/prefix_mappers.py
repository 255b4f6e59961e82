"""Mappers from an image embedding (or image tokens) to GPT-2 prefix embeddings, with ClipCap's semantics.

Parameter names mirror the original ClipCap code (rmokady/CLIP_prefix_caption), so an original checkpoint's
``clip_project.*`` keys load into these modules without renaming:

* ``PrefixMLP``: ``model.0`` (Linear) -> Tanh -> ``model.2`` (Linear); ``model.1`` is the parameter-free Tanh.
* ``TransformerMapper``: ``linear``, ``prefix_const`` and ``transformer.layers.N.{norm1, attn.to_queries,
  attn.to_keys_values, attn.project, norm2, mlp.fc1, mlp.fc2}``.

Both also work token-wise for OPG-style prefixes (``tokens=True``): the image encoder's patch tokens go through
the mapper instead of one pooled embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrefixMLP(nn.Module):
    """``sizes[0] -> sizes[1] -> ... -> sizes[-1]``, Linear layers with Tanh between (none after the last).

    ClipCap's MLP recipe uses ``(prefix_size, width * prefix_length // 2, width * prefix_length)`` on the
    pooled CLIP embedding (B, prefix_size) -> (B, width * prefix_length). Applied to tokens (B, N, D) it maps
    each token on its own (the Linear layers act on the last dimension).
    """

    def __init__(self, sizes: tuple[int, ...]):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least an input and an output size, got {sizes}")
        layers: list[nn.Module] = []
        for index in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[index], sizes[index + 1]))
            if index < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MapperAttention(nn.Module):
    """ClipCap's multi-head attention: no bias on the query/key-value maps, a biased output projection.

    The scale is ``(dim // num_heads) ** -0.5``. ``mask`` (B, M) or (B, N, M) is True where a key is masked OUT
    (filled with -inf before the softmax over keys), as in the original; ClipCap itself never passes one.
    """

    def __init__(self, dim: int, dim_ref: int, num_heads: int, bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"mapper width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim * 2, bias=bias)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        y = x if y is None else y
        batch, n, width = x.shape
        m = y.shape[1]
        heads, head_dim = self.num_heads, width // self.num_heads
        queries = self.to_queries(x).reshape(batch, n, heads, head_dim)  # (B, N, H, Dh)
        keys_values = self.to_keys_values(y).reshape(batch, m, 2, heads, head_dim)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]  # (B, M, H, Dh) each
        scores = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale  # (B, N, M, H)
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.unsqueeze(1)
            scores = scores.masked_fill(mask.unsqueeze(3), float("-inf"))
        weights = scores.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", weights, values).reshape(batch, n, width)
        return self.project(out)


class MapperMlp(nn.Module):
    """fc1 -> ReLU -> fc2 (ClipCap's ``MlpTransformer``; dropout 0 in every ClipCap recipe, so none here)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MapperLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MapperAttention(dim, dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MapperMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), None, mask)
        return x + self.mlp(self.norm2(x))


class MapperTransformer(nn.Module):
    """A stack of ``MapperLayer`` self-attention layers (ClipCap's ``Transformer`` without enc-dec mode)."""

    def __init__(self, dim: int, num_heads: int, num_layers: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.layers = nn.ModuleList(MapperLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: image tokens + ``prefix_length`` learned constants -> transformer.

    Pooled (ClipCap): ``linear`` maps the embedding (B, dim_clip) to ``clip_length`` tokens (B, clip_length, W).
    Tokens (OPG-style, ``tokens=True``): ``linear`` maps each image token (B, N, dim_clip) to (B, N, W).
    Either way the constants (prefix_length, W) are appended after the image tokens, all go through the
    transformer, and the outputs at the constants are the prefix (B, prefix_length, W): the constants read the
    image through attention, so the prefix length does not depend on how many image tokens there are.
    """

    def __init__(self, dim_clip: int, width: int, prefix_length: int, clip_length: int | None,
                 num_layers: int = 8, num_heads: int = 8, mlp_ratio: float = 2.0, tokens: bool = False):
        super().__init__()
        if not tokens and not clip_length:
            raise ValueError("the pooled transformer mapper needs clip_length (ClipCap's recipe uses 10)")
        self.tokens = tokens
        self.clip_length = clip_length
        self.linear = nn.Linear(dim_clip, width if tokens else clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))
        self.transformer = MapperTransformer(width, num_heads, num_layers, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        image = self.linear(x) if self.tokens else self.linear(x).view(batch, self.clip_length, -1)
        constants = self.prefix_const.unsqueeze(0).expand(batch, *self.prefix_const.shape)
        out = self.transformer(torch.cat((image, constants), dim=1))
        return out[:, image.shape[1]:]
