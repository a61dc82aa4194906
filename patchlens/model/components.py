"""The pieces of a `HookedViT`, each with TransformerLens-named `HookPoint`s.

Weights are stored in the fused layouts that run fastest (one ``qkv`` linear, one output
projection); the TransformerLens views ``W_Q``/``W_K``/``W_V`` ``[head, d_model, d_head]`` and
``W_O`` ``[head, d_head, d_model]`` are properties over them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from patchlens.errors import InputError
from patchlens.model.config import ViTConfig
from patchlens.model.hooks import HookDecl, declare_hooks
from patchlens.model.rotary import Rotation, apply_rotation


def is_hooked(*points: HookPoint) -> bool:
    """True if any of the hook points has a forward or backward hook attached, or computes
    something itself (a spliced SAE, `patchlens.model.splice`): fast paths must call it."""
    return any(p.fwd_hooks or p.bwd_hooks or getattr(p, "transforms", False) for p in points)


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    return {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": quick_gelu,
        "relu": F.relu,
        "silu": F.silu,
        "sigmoid": torch.sigmoid,
        "identity": lambda x: x,  # for linearised test models
    }[name]


class LayerNorm(nn.Module):
    """LayerNorm with ``hook_scale`` ``[*lead, 1]`` and ``hook_normalized`` ``[*lead, d]``.

    ``axes`` names the normalised tensor's axes (``"batch pos d_model"``); ``split_axes``, if
    given, the axes when ``cfg.use_split_qkv_input`` feeds it per-head copies. Takes the fused
    ``F.layer_norm`` kernel unless one of its hooks is in use.
    """

    def __init__(self, d: int, eps: float, axes: str = "batch pos d_model",
                 split_axes: str | None = None):
        super().__init__()
        self.d, self.eps = d, eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        lead = axes.rsplit(" ", 1)[0]
        split_lead = split_axes.rsplit(" ", 1)[0] if split_axes else None
        split = "use_split_qkv_input"
        declare_hooks(self, {
            "hook_scale": HookDecl(f"{lead} 1", "LayerNorm scale sqrt(var + eps)",
                                   axes_if={split: f"{split_lead} 1"} if split_axes else None),
            "hook_normalized": HookDecl(axes, "normalised, then scaled and shifted",
                                        axes_if={split: split_axes} if split_axes else None),
        })

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if not is_hooked(self.hook_scale, self.hook_normalized):
            return F.layer_norm(x, (self.d,), self.w, self.b, self.eps)
        if torch.is_grad_enabled() and (x.requires_grad or self.w.requires_grad):
            # differentiable path: gradients flow through the scale too (TransformerLens math)
            x = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            return self.hook_normalized(x / scale * self.w + self.b)
        # inference: one fused kernel gives the output, the mean and 1 / scale
        out, mean, rstd = torch.native_layer_norm(x, (self.d,), self.w, self.b, self.eps)
        scale = 1.0 / rstd
        kept = scale.clone()
        new_scale = self.hook_scale(scale)
        if not torch.equal(new_scale, kept):  # a hook edited the scale: apply it
            out = (x - mean) / new_scale * self.w + self.b
        return self.hook_normalized(out)


class Embed(nn.Module):
    """Patch projection, prefix tokens and position embedding. Returns the token embeddings
    (prefix tokens then patches) and the position embedding per token (zero where a token has
    none); `HookedViT` hooks them as ``hook_embed`` and ``hook_pos_embed``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.proj = nn.Conv2d(
            cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size,
            bias=cfg.patch_bias,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, d)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, d)) if cfg.distilled else None
        self.reg_tokens = nn.Parameter(torch.zeros(cfg.n_registers, d)) if cfg.n_registers else None
        n_pos = cfg.n_pos_prefix + cfg.n_patches
        self.pos_embed = nn.Parameter(torch.zeros(n_pos, d)) if cfg.pos_embed else None

    def prefix_tokens(self) -> list[Tensor]:
        return [t for t in (self.cls_token, self.dist_token, self.reg_tokens) if t is not None]

    def position_embedding(self, grid: tuple[int, int]) -> Float[Tensor, "pos d_model"]:
        """Position embedding for every token at patch grid ``grid`` (resampled if needed)."""
        cfg = self.cfg
        k = cfg.n_pos_prefix
        pos_prefix, pos_patch = self.pos_embed[:k], self.pos_embed[k:]
        if tuple(grid) != tuple(cfg.grid_size):
            pos_patch = resample_position_embedding(pos_patch, cfg.grid_size, grid, cfg.pos_interp)
        zeros = pos_patch.new_zeros(cfg.n_prefix - k, cfg.d_model)
        return torch.cat([pos_prefix, zeros, pos_patch], dim=0)

    def forward(
        self, x: Float[Tensor, "batch chan height width"]
    ) -> tuple[Float[Tensor, "batch pos d"], Float[Tensor, "batch pos d"] | None]:
        patches = self.proj(x)
        grid = (patches.shape[-2], patches.shape[-1])
        patches = patches.flatten(2).transpose(1, 2)
        b = patches.shape[0]
        prefix = [t.unsqueeze(0).expand(b, -1, -1) for t in self.prefix_tokens()]
        tokens = torch.cat(prefix + [patches], dim=1) if prefix else patches
        if self.pos_embed is None:
            return tokens, None
        return tokens, self.position_embedding(grid).unsqueeze(0).expand(b, -1, -1)


def resample_position_embedding(
    pos: Float[Tensor, "n d"], old: tuple[int, int], new: tuple[int, int], method: str | None
) -> Float[Tensor, "m d"]:
    """Resample patch position embeddings from grid ``old`` to ``new`` as the source library does."""
    if method is None:
        raise ValueError(
            f"This model was converted for a {old[0]}x{old[1]} patch grid and cannot resample its "
            f"position embedding to {new[0]}x{new[1]}; pass images of the native size."
        )
    d = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    if method == "timm":
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos.unsqueeze(0), list(new), list(old), num_prefix_tokens=0)[0]
    if method in ("hf_dinov2", "hf_dinov2_reg"):  # float32 bicubic; only "_reg" antialiases
        out = F.interpolate(
            grid.to(torch.float32), size=new, mode="bicubic", align_corners=False,
            antialias=method == "hf_dinov2_reg",
        ).to(pos.dtype)
    elif method == "hf_vit":
        out = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"Unknown position-embedding resampling method {method!r}.")
    return out.permute(0, 2, 3, 1).reshape(-1, d)


class Attention(nn.Module):
    """Multi-head self-attention, optionally rotary.

    Hooks: ``hook_q|hook_k|hook_v|hook_z`` ``[batch, pos, head, d_head]``, with rotary position
    embeddings (``cfg.rope``) also ``hook_rot_q|hook_rot_k`` (q and k after the rotation, as in
    TransformerLens), ``hook_attn_scores|hook_pattern`` ``[batch, head, query_pos, key_pos]``
    (explicit path only), ``hook_result`` ``[batch, pos, head, d_model]`` (only with
    ``cfg.use_attn_result``); ``norm`` (``cfg.attn_norm``) normalises the concatenated head
    outputs before the output projection and has its own hooks.
    Uses ``F.scaled_dot_product_attention`` unless the scores or pattern are hooked.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        h, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
        self.qkv = nn.Linear(d, 3 * h * dh, bias=cfg.qkv_bias)
        head_axes = "batch pos head d_head"
        self.q_norm = LayerNorm(dh, cfg.eps, head_axes) if cfg.qk_norm else None
        self.k_norm = LayerNorm(dh, cfg.eps, head_axes) if cfg.qk_norm else None
        self.scale = dh**-0.5
        pattern_axes = "batch head query_pos key_pos"
        explicit = "only when scores or pattern are hooked (otherwise fused SDPA)"
        hooks = {
            "hook_q": HookDecl(head_axes, "queries (after q_norm, before any rotation)",
                               alias="q"),
            "hook_k": HookDecl(head_axes, "keys (after k_norm, before any rotation)", alias="k"),
            "hook_v": HookDecl(head_axes, "values", alias="v"),
        }
        if cfg.rope:
            hooks["hook_rot_q"] = HookDecl(head_axes, "queries after the rotary position "
                                           "embedding (prefix tokens unrotated)", alias="rot_q")
            hooks["hook_rot_k"] = HookDecl(head_axes, "keys after the rotary position "
                                           "embedding (prefix tokens unrotated)", alias="rot_k")
        else:
            self.hook_rot_q = self.hook_rot_k = None
        declare_hooks(self, {
            **hooks,
            "hook_attn_scores": HookDecl(pattern_axes, "scaled q.k scores before the softmax",
                                         alias="attn_scores", note=explicit),
            "hook_pattern": HookDecl(pattern_axes, "attention pattern (softmax of the scores)",
                                     alias="pattern", note=explicit),
            "hook_z": HookDecl(head_axes, "per-head attention output, before W_O", alias="z"),
        })
        self.norm = LayerNorm(h * dh, cfg.eps, "batch pos d_attn") if cfg.attn_norm else None
        self.proj = nn.Linear(h * dh, d, bias=cfg.proj_bias)
        declare_hooks(self, {
            "hook_result": HookDecl("batch pos head d_model", "per-head output after W_O"
                                    + (" (of the normalised z)" if cfg.attn_norm else "")
                                    + ", before LayerScale",
                                    opt_in="use_attn_result", alias="result"),
        })

    # TransformerLens weight views -------------------------------------------------------
    def _qkv_weight(self, i: int) -> Tensor:
        h, dh, d = self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model
        return self.qkv.weight[i * h * dh : (i + 1) * h * dh].reshape(h, dh, d).transpose(1, 2)

    def _qkv_bias(self, i: int) -> Tensor:
        h, dh = self.cfg.n_heads, self.cfg.d_head
        if self.qkv.bias is None:
            return self.qkv.weight.new_zeros(h, dh)
        return self.qkv.bias[i * h * dh : (i + 1) * h * dh].reshape(h, dh)

    W_Q = property(lambda self: self._qkv_weight(0))
    W_K = property(lambda self: self._qkv_weight(1))
    W_V = property(lambda self: self._qkv_weight(2))
    b_Q = property(lambda self: self._qkv_bias(0))
    b_K = property(lambda self: self._qkv_bias(1))
    b_V = property(lambda self: self._qkv_bias(2))

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        h, dh = self.cfg.n_heads, self.cfg.d_head
        return self.proj.weight.T.reshape(h, dh, self.cfg.d_model)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        if self.proj.bias is None:
            return self.proj.weight.new_zeros(self.cfg.d_model)
        return self.proj.bias

    @property
    def OV(self) -> FactoredMatrix:
        """The OV circuit ``W_V @ W_O`` ``[head, d_model, d_model]`` (TransformerLens
        `FactoredMatrix`; LayerScale, if any, multiplies its output in the block)."""
        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self) -> FactoredMatrix:
        """The QK circuit ``W_Q @ W_K^T`` ``[head, d_model, d_model]`` (scores before the
        ``1/sqrt(d_head)`` scale). Not defined with ``qk_norm`` (a norm sits between)."""
        if self.cfg.qk_norm:
            raise InputError("This model normalises queries and keys (qk_norm): the attention "
                             "scores are not a bilinear form W_Q W_K^T of the input, so there is "
                             "no QK matrix. Use the cached hook_q / hook_k instead.")
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"] | None = None,
        split: tuple[Tensor, Tensor, Tensor] | None = None,
        rope: Rotation | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Attention output (before LayerScale). ``split`` gives normalised per-head inputs
        ``[batch, pos, head, d_model]`` for q, k, v (TransformerLens ``use_split_qkv_input``);
        an entry may be the shared normalised stream ``[batch, pos, d_model]`` instead;
        ``rope`` the rotary tables of this input's patch grid (rotary models)."""
        cfg = self.cfg
        h, dh = cfg.n_heads, cfg.d_head
        if split is None:
            b, n, _ = x.shape
            q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).reshape(b, n, 3, h, dh).unbind(2)
        else:  # per-head inputs [b, n, h, d], or the shared stream [b, n, d] for some of them
            b, n = split[0].shape[:2]
            q, k, v = (
                torch.einsum("bphd,hdk->bphk", inp, self._qkv_weight(i)) + self._qkv_bias(i)
                if inp.ndim == 4 else
                F.linear(inp, self.qkv.weight[i * h * dh:(i + 1) * h * dh],
                         None if self.qkv.bias is None else
                         self.qkv.bias[i * h * dh:(i + 1) * h * dh]).reshape(b, n, h, dh)
                for i, inp in enumerate(split)
            )
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.hook_rot_q is not None:
            if rope is None:
                raise ValueError("This attention layer is rotary: pass the tables (rope=).")
            q = self.hook_rot_q(apply_rotation(q, rope))
            k = self.hook_rot_k(apply_rotation(k, rope))
        if is_hooked(self.hook_attn_scores, self.hook_pattern):
            z = self._explicit_attention(q, k, v)
        else:
            z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2)).transpose(1, 2)
        z = self.hook_z(z)
        flat = z.reshape(b, n, h * dh)
        if self.norm is not None:
            flat = self.norm(flat)
        if cfg.use_attn_result and is_hooked(self.hook_result):
            per_head = flat.reshape(b, n, h, dh)
            result = self.hook_result(torch.einsum("bphk,hkd->bphd", per_head, self.W_O))
            return result.sum(dim=2) + self.b_O
        return self.proj(flat)

    def _explicit_attention(
        self,
        q: Float[Tensor, "batch pos head d_head"],
        k: Float[Tensor, "batch pos head d_head"],
        v: Float[Tensor, "batch pos head d_head"],
    ) -> Float[Tensor, "batch pos head d_head"]:
        """Scores and pattern materialised (and hooked), then ``z``; same numbers as SDPA's
        math: ``softmax((q * scale) k^T) v``."""
        qs = q * self.scale
        if q.device.type == "cpu" and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        ):
            # One strided GEMM over heads per image reads the token-major q, k, v in place;
            # a matmul over [batch, head] would first copy all three head-major (measured
            # ~20% of this block on CPU). Same kernels, same sums: identical numbers.
            b, n, h, dh = q.shape
            scores = q.new_empty(b, h, n, k.shape[1])
            for i in range(b):
                torch.bmm(qs[i].transpose(0, 1), k[i].permute(1, 2, 0), out=scores[i])
            pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(dim=-1))
            z = q.new_empty(b, n, h, v.shape[-1])
            for i in range(b):
                torch.bmm(pattern[i], v[i].transpose(0, 1), out=z[i].transpose(0, 1))
            return z
        scores = self.hook_attn_scores(qs.transpose(1, 2) @ k.permute(0, 2, 3, 1))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        return (pattern @ v.transpose(1, 2)).transpose(1, 2)


class MLP(nn.Module):
    """MLP (``fc1 -> act -> fc2``) or gated (``act(gate) * linear``, fc1 packed as
    ``[gate; linear]``). Hooks: ``hook_pre`` (the gate for gated MLPs), ``hook_pre_linear``
    (gated only) and ``hook_post`` ``[batch, pos, d_mlp]`` (TransformerLens names); ``norm``
    (``cfg.mlp_norm``) normalises ``hook_post`` before fc2 and has its own hooks."""

    def __init__(self, cfg: ViTConfig, lead: str = "batch pos", aliases: bool = True):
        super().__init__()
        self.cfg = cfg
        self.gated = cfg.mlp_kind != "mlp"
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp * (2 if self.gated else 1), bias=cfg.mlp_bias)
        self.act = activation("silu" if cfg.mlp_kind == "swiglu" else cfg.act_fn)
        axes = f"{lead} d_mlp"
        hooks = {"hook_pre": HookDecl(axes, "gate pre-activation" if self.gated
                                      else "pre-activation", alias="mlp_pre")}
        if self.gated:
            hooks["hook_pre_linear"] = HookDecl(axes, "linear branch of the gate",
                                                alias="mlp_pre_linear")
        hooks["hook_post"] = HookDecl(axes, "activation (gated product for GLU)",
                                      alias="mlp_post")
        if not aliases:
            hooks = {k: dataclasses.replace(d, alias=None) for k, d in hooks.items()}
        declare_hooks(self, hooks)
        self.norm = LayerNorm(cfg.d_mlp, cfg.eps, axes) if cfg.mlp_norm else None
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)

    # TransformerLens weight views. For the gated (SwiGLU) MLP, as in TransformerLens,
    # ``W_gate`` feeds the activation (``hook_pre``) and ``W_in`` the linear branch
    # (``hook_pre_linear``); fc1 stores [gate; linear].
    def _fc1(self, part: int) -> tuple[Tensor, Tensor]:
        d = self.cfg.d_mlp
        w, b = self.fc1.weight[part * d : (part + 1) * d], self.fc1.bias
        return w.T, (b[part * d : (part + 1) * d] if b is not None else w.new_zeros(d))

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self._fc1(1 if self.gated else 0)[0]

    @property
    def b_in(self) -> Float[Tensor, "d_mlp"]:
        return self._fc1(1 if self.gated else 0)[1]

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"] | None:
        return self._fc1(0)[0] if self.gated else None

    @property
    def b_gate(self) -> Float[Tensor, "d_mlp"] | None:
        return self._fc1(0)[1] if self.gated else None

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.fc2.weight.T

    @property
    def b_out(self) -> Tensor:
        return self.fc2.bias if self.fc2.bias is not None else self.fc2.weight.new_zeros(self.cfg.d_model)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.fc1(x)
        if self.gated:
            gate, lin = pre.chunk(2, dim=-1)
            post = self.act(self.hook_pre(gate)) * self.hook_pre_linear(lin)
        else:
            post = self.act(self.hook_pre(pre))
        post = self.hook_post(post)
        if self.norm is not None:
            post = self.norm(post)
        return self.fc2(post)


class LayerScale(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """A pre-norm transformer block. Hooks: ``hook_resid_pre``, ``hook_attn_out``,
    ``hook_resid_mid``, ``hook_mlp_out``, ``hook_resid_post`` ``[batch, pos, d_model]``;
    ``hook_q_input|hook_k_input|hook_v_input`` ``[batch, pos, head, d_model]`` with
    ``cfg.use_split_qkv_input``, ``hook_mlp_in`` ``[batch, pos, d_model]`` with
    ``cfg.use_hook_mlp_in`` (TransformerLens's opt-in receiver inputs: patching one changes only
    what that head / MLP reads). LayerScale is applied inside ``hook_attn_out``/``hook_mlp_out``."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        resid, split = "batch pos d_model", "batch pos head d_model"
        qkv_in = "opt-in per-head copy of resid_pre feeding the"
        declare_hooks(self, {
            "hook_resid_pre": HookDecl(resid, "residual stream entering the block",
                                       alias="resid_pre"),
            "hook_q_input": HookDecl(split, f"{qkv_in} queries", opt_in="use_split_qkv_input",
                                     alias="q_input"),
            "hook_k_input": HookDecl(split, f"{qkv_in} keys", opt_in="use_split_qkv_input",
                                     alias="k_input"),
            "hook_v_input": HookDecl(split, f"{qkv_in} values", opt_in="use_split_qkv_input",
                                     alias="v_input"),
        })
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps, resid, split_axes=split)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.d_model) if cfg.layer_scale else None
        declare_hooks(self, {
            "hook_attn_out": HookDecl(resid, "attention output added to the residual stream "
                                      "(LayerScale applied)", alias="attn_out"),
            "hook_resid_mid": HookDecl(resid, "residual stream between attention and MLP",
                                       alias="resid_mid"),
            "hook_mlp_in": HookDecl(resid, "opt-in copy of resid_mid feeding the MLP (before "
                                    "ln2)", opt_in="use_hook_mlp_in", alias="mlp_in"),
        })
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps, resid)
        self.mlp = MLP(cfg)
        self.ls2 = LayerScale(cfg.d_model) if cfg.layer_scale else None
        declare_hooks(self, {
            "hook_mlp_out": HookDecl(resid, "MLP output added to the residual stream "
                                     "(LayerScale applied)", alias="mlp_out"),
            "hook_resid_post": HookDecl(resid, "residual stream leaving the block",
                                        alias="resid_post"),
        })

    def forward(
        self, resid_pre: Float[Tensor, "batch pos d_model"], rope: Rotation | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """One block; ``rope``: the rotary tables of the input's patch grid (rotary models)."""
        resid_pre = self.hook_resid_pre(resid_pre)
        # The opt-in copies run only where someone hooks them (or ln1, whose axes they change);
        # elsewhere the fused path computes the same values (up to rounding), faster.
        split_hooks = (self.hook_q_input, self.hook_k_input, self.hook_v_input)
        if self.cfg.use_split_qkv_input and is_hooked(*split_hooks, self.ln1.hook_scale,
                                                      self.ln1.hook_normalized):
            per_head = resid_pre.unsqueeze(2).expand(-1, -1, self.cfg.n_heads, -1)
            shared = None
            if is_hooked(self.ln1.hook_scale, self.ln1.hook_normalized):
                hooked = split_hooks  # ln1's hooks see per-head copies: all three
            else:
                hooked = tuple(h for h in split_hooks if is_hooked(h))
                shared = self.ln1(resid_pre) if len(hooked) < 3 else None
            # an input nobody hooks reads the shared (unsplit) normalised stream
            inputs = [hook(per_head.clone()) if hook in hooked else None for hook in split_hooks]
            split = tuple(shared if t is None else self.ln1(t) for t in inputs)
            attn = self.attn(split=split, rope=rope)
        else:
            attn = self.attn(self.ln1(resid_pre), rope=rope)
        attn_out = self.hook_attn_out(self.ls1(attn) if self.ls1 is not None else attn)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        if self.cfg.use_hook_mlp_in and is_hooked(self.hook_mlp_in):
            mlp = self.mlp(self.ln2(self.hook_mlp_in(resid_mid.clone())))
        else:
            mlp = self.mlp(self.ln2(resid_mid))
        mlp_out = self.hook_mlp_out(self.ls2(mlp) if self.ls2 is not None else mlp)
        return self.hook_resid_post(resid_mid + mlp_out)


def init_weights_(module: nn.Module, std: float = 0.02) -> None:
    """Small random init (truncated normal weights, zero biases) for models built from a config."""
    for name, p in module.named_parameters():
        if name.endswith(".w") or name.endswith("gamma"):
            nn.init.ones_(p)
        elif name.endswith(".b") or name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.trunc_normal_(p, std=std if p.dim() > 1 else 1 / math.sqrt(p.shape[-1]))
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):  # torch LayerNorms (the CoCa pooler's query norm)
            m.reset_parameters()
