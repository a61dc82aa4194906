"""TransformerLens weight views of a `HookedViT`: ``W_E``, ``W_pos``, the per-layer weights
stacked over layers (``W_Q`` ``[layer, head, d_model, d_head]`` ...), and the ``OV`` / ``QK``
circuits as TransformerLens ``FactoredMatrix``.

The weights are stored in the layouts that run fastest (a fused ``qkv`` linear, a patch
convolution); these are views over them with TransformerLens's shapes, so gradients flow and
edits to a view's tensor in place edit the model only where the view is a slice (``W_Q`` ...),
never for the stacked copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix

from patchlens.errors import InputError


class WeightViews:
    """Mixin for `HookedViT` (which has ``cfg``, ``embed`` and ``blocks``)."""

    # ---- embedding ---------------------------------------------------------------------------
    @property
    def W_E(self) -> Float[Tensor, "d_patch d_model"]:
        """The patch embedding as a matrix ``[in_channels * patch_h * patch_w, d_model]``: a
        patch's pixels, flattened channel-major then row-major (``patch.reshape(-1)`` of a
        ``[C, ph, pw]`` crop), times ``W_E`` plus ``b_E`` is its token embedding. (A ViT has no
        vocabulary: this is the linear map that plays the role of TransformerLens's
        ``W_E [d_vocab, d_model]``.)"""
        w = self.embed.proj.weight
        return w.reshape(w.shape[0], -1).T

    @property
    def b_E(self) -> Float[Tensor, "d_model"]:
        """The patch embedding's bias (zeros for models without one, e.g. CLIP)."""
        b = self.embed.proj.bias
        return b if b is not None else self.embed.proj.weight.new_zeros(self.cfg.d_model)

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        """The position embedding of every token at the native image size ``[n_ctx, d_model]``
        (prefix tokens first, rows of zeros for prefix tokens without a position embedding):
        what ``hook_pos_embed`` holds for each image."""
        if self.embed.pos_embed is None:
            raise InputError("This model has no learned absolute position embedding "
                             "(cfg.pos_embed=False), so it has no W_pos.")
        return self.embed.position_embedding(self.cfg.grid_size)

    # ---- per-layer weights stacked over layers ---------------------------------------------
    def _stacked(self, get: Callable) -> Tensor:
        return torch.stack([get(block) for block in self.blocks])

    W_Q = property(lambda self: self._stacked(lambda b: b.attn.W_Q),
                   doc="Query weights ``[layer, head, d_model, d_head]``.")
    W_K = property(lambda self: self._stacked(lambda b: b.attn.W_K),
                   doc="Key weights ``[layer, head, d_model, d_head]``.")
    W_V = property(lambda self: self._stacked(lambda b: b.attn.W_V),
                   doc="Value weights ``[layer, head, d_model, d_head]``.")
    W_O = property(lambda self: self._stacked(lambda b: b.attn.W_O),
                   doc="Output weights ``[layer, head, d_head, d_model]``.")
    b_Q = property(lambda self: self._stacked(lambda b: b.attn.b_Q),
                   doc="Query biases ``[layer, head, d_head]``.")
    b_K = property(lambda self: self._stacked(lambda b: b.attn.b_K),
                   doc="Key biases ``[layer, head, d_head]``.")
    b_V = property(lambda self: self._stacked(lambda b: b.attn.b_V),
                   doc="Value biases ``[layer, head, d_head]``.")
    b_O = property(lambda self: self._stacked(lambda b: b.attn.b_O),
                   doc="Attention output biases ``[layer, d_model]``.")
    W_in = property(lambda self: self._stacked(lambda b: b.mlp.W_in),
                    doc="MLP input weights ``[layer, d_model, d_mlp]`` (the linear branch of a "
                        "gated MLP, as in TransformerLens).")
    b_in = property(lambda self: self._stacked(lambda b: b.mlp.b_in),
                    doc="MLP input biases ``[layer, d_mlp]``.")
    W_out = property(lambda self: self._stacked(lambda b: b.mlp.W_out),
                     doc="MLP output weights ``[layer, d_mlp, d_model]``.")
    b_out = property(lambda self: self._stacked(lambda b: b.mlp.b_out),
                     doc="MLP output biases ``[layer, d_model]``.")

    @property
    def W_gate(self) -> Tensor | None:
        """Gate weights ``[layer, d_model, d_mlp]`` of a gated (SwiGLU) MLP, else None."""
        if self.cfg.mlp_kind != "swiglu":
            return None
        return self._stacked(lambda b: b.mlp.W_gate)

    @property
    def OV(self) -> FactoredMatrix:
        """OV circuits of every head ``[layer, head, d_model, d_model]`` (``W_V @ W_O``)."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """QK circuits of every head ``[layer, head, d_model, d_model]`` (``W_Q @ W_K^T``; not
        defined for models with ``qk_norm``)."""
        if self.cfg.qk_norm:
            return self.blocks[0].attn.QK  # raises the explanation
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))
