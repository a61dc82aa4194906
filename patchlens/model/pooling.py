"""Attention-pooling heads: a learned query attends over the tokens after the last block.

- `AttentionPool` (``pooling="map"``): multihead attention pooling with a latent query, then a
  residual LayerNorm + MLP (Lee et al. 2019, "Set Transformer", PMA; as SigLIP / timm
  ``AttentionPoolLatent``, Perception Encoder's pool).
- `AttentionalPooler` (``pooling="coca"``): open_clip's CoCa pooler (Yu et al. 2022, "CoCa"):
  a LayerNormed learned query attends over the LayerNormed tokens; the pooled output is the
  first query's (open_clip's default ``pool_type="tok"``; the other queries only feed CoCa's
  text decoder and are not converted).

Both map ``[batch, pos, d_model] -> [batch, d_pooled]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from patchlens.model.components import MLP, LayerNorm
from patchlens.model.config import ViTConfig


def _attend(q: Tensor, k: Tensor, v: Tensor, h: int) -> Tensor:
    """``[1, d]`` query, ``[b, n, d]`` keys / values -> ``[b, 1, d]``, ``h`` heads."""
    b, n, d = k.shape
    dh = d // h
    q = q.reshape(1, 1, h, dh).transpose(1, 2).expand(b, -1, -1, -1)
    k = k.reshape(b, n, h, dh).transpose(1, 2)
    v = v.reshape(b, n, h, dh).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)


class AttentionPool(nn.Module):
    """MAP head: ``cfg.pool_heads`` heads, latent ``[1, d]``, fused ``kv``, then
    ``out + mlp(norm(out))`` (the MLP has ``cfg.map_mlp_ratio`` times the width)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.pool_heads
        self.latent = nn.Parameter(torch.zeros(1, d))
        self.q = nn.Linear(d, d, bias=True)
        self.kv = nn.Linear(d, 2 * d, bias=True)
        self.proj = nn.Linear(d, d)
        self.norm = LayerNorm(d, cfg.eps, "batch latent d_model")
        hidden = int(d * cfg.map_mlp_ratio)
        self.mlp = MLP(cfg.replace(d_mlp=hidden, mlp_kind="mlp", mlp_bias=True, mlp_norm=False),
                       lead="batch latent", aliases=False)

    def forward(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch d"]:
        k, v = self.kv(x).chunk(2, dim=-1)
        out = self.proj(_attend(self.q(self.latent), k, v, self.n_heads))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class AttentionalPooler(nn.Module):
    """open_clip ``AttentionalPooler`` (query 0): ``ln_k`` on the tokens (hooked), ``ln_q`` on
    the learned query, ``cfg.pool_heads``-head attention from ``d_model`` tokens to a
    ``d_pooled``-wide output, output projection."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d, out = cfg.d_model, cfg.d_pooled
        self.n_heads = cfg.pool_heads
        self.ln_k = LayerNorm(d, cfg.eps, "batch pos d_model")
        self.latent = nn.Parameter(torch.zeros(1, out))
        self.ln_q = nn.LayerNorm(out, eps=cfg.eps)
        self.q = nn.Linear(out, out, bias=True)
        self.kv = nn.Linear(d, 2 * out, bias=True)
        self.proj = nn.Linear(out, out)

    def forward(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch d_pooled"]:
        k, v = self.kv(self.ln_k(x)).chunk(2, dim=-1)
        return self.proj(_attend(self.q(self.ln_q(self.latent)), k, v, self.n_heads))[:, 0]
