"""mkdocs hook: replaces ``<!-- HOOK_TABLE -->`` in hooks.md with the hook table of a real model
(built at docs-build time, so the reference cannot go stale)."""

from __future__ import annotations


def _rows(model, names=None) -> list[str]:
    out = []
    for row in model.hook_table():
        if row["name"].startswith("blocks.") and not row["name"].startswith("blocks.0."):
            continue
        if names is not None and row["name"] in names:
            continue
        alias = f"`{row['alias']}`" if row["alias"] else ""
        opt = f"`{row['opt_in']}`" if row["opt_in"] else ""
        out.append(f"| `{row['name']}` | `[{row['axes']}]` | {row['shape']} | {alias} | {opt} "
                   f"| {row['doc']} |")
    return out


def _rotary_table() -> str:
    """The hooks a rotary / gated-MLP / sub-norm block adds to the plain one."""
    import torch

    from patchlens import HookedViT, ViTConfig

    torch.manual_seed(0)
    base = dict(d_model=64, d_head=16, n_heads=4, n_layers=2, d_mlp=128, image_size=(32, 32),
                patch_size=(8, 8), n_classes=10, n_registers=1)
    plain = {r["name"] for r in HookedViT(ViTConfig(**base)).hook_table()}
    model = HookedViT(ViTConfig(**base, rope="timm_cat", mlp_kind="swiglu", attn_norm=True,
                                mlp_norm=True)).eval()
    lines = [
        "The same model with rotary attention, a SwiGLU MLP and the EVA-02 sub-LayerNorms "
        "(`rope=\"timm_cat\"`, `mlp_kind=\"swiglu\"`, `attn_norm=True`, `mlp_norm=True`) has "
        "these hooks in addition:",
        "",
        "| hook | axes | shape on one image | short name | opt-in | what it holds |",
        "| --- | --- | --- | --- | --- | --- |",
        *_rows(model, plain),
    ]
    return "\n".join(lines)


def _table() -> str:
    import torch

    from patchlens import HookedViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(d_model=64, d_head=16, n_heads=4, n_layers=2, d_mlp=128, image_size=(32, 32),
                    patch_size=(8, 8), n_classes=10, n_registers=1)
    model = HookedViT(cfg).eval()
    lines = [
        "Generated from the hook schema (`model.hook_specs`) of a 2-layer model (d_model 64, 4 "
        "heads, d_head 16, d_mlp 128, a class token and one register, 4x4 patch grid = 18 "
        "tokens, 10 classes); shapes measured on one image with the opt-in hooks switched on.",
        "",
        "| hook | axes | shape on one image | short name | opt-in | what it holds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += _rows(model)
    lines.append("")
    lines.append("Every block `blocks.{l}` has the same hooks as `blocks.0` shown here.")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- HOOK_TABLE -->" in markdown:
        markdown = markdown.replace("<!-- HOOK_TABLE -->", _table())
    if "<!-- HOOK_TABLE_ROTARY -->" in markdown:
        markdown = markdown.replace("<!-- HOOK_TABLE_ROTARY -->", _rotary_table())
    return markdown
