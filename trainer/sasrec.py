"""SASRec (Kang & McAuley 2018) as an encoder for `HSTUModel`: the quality baseline.

A causal softmax Transformer of the same size as HSTU (pre-LayerNorm blocks of multi-head
self-attention through `torch.nn.functional.scaled_dot_product_attention` and a two-layer GELU
feed-forward, final LayerNorm). It plugs into `HSTUModel` in place of `HSTUEncoder`, so it
shares the item table, the input embedding, the loss and the evaluation protocol:

    >>> from trainer.model import ModelConfig, build_model
    >>> model = build_model(ModelConfig(encoder="sasrec", dim=16, num_heads=2), capacity=10)
    >>> type(model.encoder).__name__
    'SASRecEncoder'

SDPA wants dense [B, H, N, D] inputs, so this baseline pads each batch to its longest sequence
(right padding: under the causal mask no real token attends to a padded one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.layout import ModelInputError, TokenLayout


class SASRecLayer(nn.Module):
    """x + MHA(LN(x)), then x + FFN(LN(x)), on padded [B, N, dim] inputs."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.dropout = num_heads, dropout
        self.attn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d/h)
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, h, N, d/h)
        attn = attn.transpose(1, 2).reshape(b, n, d)  # (B, N, d)
        x = x + F.dropout(self.attn_out(attn), p=self.dropout, training=self.training)
        ffn = self.ffn_out(F.dropout(F.gelu(self.ffn_in(self.ffn_norm(x))), p=self.dropout, training=self.training))
        return x + F.dropout(ffn, p=self.dropout, training=self.training)


class SASRecEncoder(nn.Module):
    """Stack of `SASRecLayer`s over jagged tokens; same call signature as `HSTUEncoder`."""

    def __init__(self, *, dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SASRecLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(
        self, x: Tensor, *, layout: TokenLayout, seconds: Tensor, query_seconds: Tensor | None = None
    ) -> Tensor:
        del seconds, query_seconds  # SASRec has no time signal
        if layout.num_candidates is not None:
            raise ModelInputError("SASRec has no candidate tokens: rank with the HSTU encoder")
        num_seq = layout.offsets.numel() - 1
        lengths = layout.offsets[1:] - layout.offsets[:-1]  # (B,)
        seq = torch.repeat_interleave(torch.arange(num_seq, device=x.device), lengths)  # (T,)
        padded = x.new_zeros(num_seq, layout.max_len, x.shape[1]).index_put((seq, layout.positions), x)  # (B, N, D)
        for layer in self.layers:
            padded = layer(padded)
        return self.final_norm(padded[seq, layout.positions])  # (T, D)
