"""Zero-shot classification heads for CLIP-family models (open_clip, HF ``CLIPModel`` /
``SiglipModel``).

CLIP classifies an image by comparing its L2-normalised image embedding with the normalised
text embeddings of one prompt per class (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision", sec. 3.1.4; prompts of several templates are averaged
and re-normalised: "prompt ensembling")::

    logits = logit_scale.exp() * normalize(image_features) @ text_features.T (+ logit_bias)

`zeroshot_head` computes ``text_features`` with the source model's own text tower and attaches
them to a `HookedViT` as an ordinary linear head, so ``hooked(images)`` equals the source model's
image-text logits. The image embedding's L2 normalisation is not linear; it is an explicit step
with its own hooks, between the image projection and the head::

    hook_pooled [batch, d_pooled]
      -> image_proj (bias-free Linear; absent for SigLIP, whose pooled output is the embedding)
      -> hook_image_embed [batch, embed_dim]            (= clip.encode_image(x), unnormalised)
      -> F.normalize -> hook_normalized_embed [batch, embed_dim]
      -> head: Linear(embed_dim, n_classes), weight = logit_scale.exp() * text_features,
         bias = logit_bias (SigLIP) or zeros
      -> hook_logits [batch, n_classes]

so ``W_U`` (``[embed_dim, n_classes]``) applies to the normalised embedding, as a direct logit
attribution on ``hook_normalized_embed`` expects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from patchlens.errors import InputError, UnsupportedModelError
from patchlens.model.hooked_vit import HookedViT

DEFAULT_TEMPLATES = ("a photo of a {}.",)
_OPENAI_VOCAB = 49408  # the BPE vocabulary `open_clip.tokenize` produces ids for


def _kind(model: Any) -> str:
    """``"open_clip"`` or ``"hf"`` (transformers CLIPModel / SiglipModel)."""
    if hasattr(model, "encode_text") and hasattr(model, "visual") and hasattr(model, "logit_scale"):
        return "open_clip"
    if hasattr(model, "get_text_features") and hasattr(model, "config"):
        return "hf"
    raise UnsupportedModelError(
        f"zeroshot_head takes an open_clip CLIP model or a transformers CLIPModel / SiglipModel "
        f"(a model with a text tower and a logit scale), got {type(model).__name__}."
    )


def _tokenize(
    model: Any, kind: str, texts: list[str], tokenizer: Callable | None
) -> tuple[Tensor, Tensor | None]:
    """Token ids (and attention mask) for ``texts`` with ``tokenizer`` or open_clip's BPE."""
    if tokenizer is None:
        if kind == "hf":
            raise InputError(
                "Hugging Face text towers need their tokenizer, which reads vocabulary files "
                "(downloaded when online): pass tokenizer=AutoTokenizer.from_pretrained(repo), "
                "any callable list[str] -> input_ids, or pre-tokenized "
                "input_ids=[n_classes, (n_templates,) seq]."
            )
        text = getattr(model, "text", None)
        vocab = getattr(model, "vocab_size", 0)
        if type(text).__name__ == "HFTextEncoder" or vocab != _OPENAI_VOCAB:
            raise InputError(
                "This open_clip model does not use the OpenAI BPE vocabulary; pass its tokenizer: "
                "tokenizer=open_clip.get_tokenizer(model_name)."
            )
        import open_clip

        return open_clip.tokenize(texts, context_length=model.context_length), None
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        siglip = "siglip" in getattr(getattr(model, "config", None), "model_type", "")
        out = tokenizer(texts, padding="max_length" if siglip else True, return_tensors="pt")
    else:
        out = tokenizer(texts)
    if isinstance(out, Mapping):
        ids, mask = out["input_ids"], out.get("attention_mask")
    else:
        ids, mask = out, None
    ids = torch.as_tensor(ids)
    return ids, (torch.as_tensor(mask) if mask is not None else None)


@torch.no_grad()
def _encode(model: Any, kind: str, ids: Tensor, mask: Tensor | None, batch_size: int) -> Tensor:
    """Unnormalised text features ``[n_texts, embed_dim]``, in chunks of ``batch_size``."""
    device = model.logit_scale.device
    feats = []
    for i in range(0, ids.shape[0], batch_size):
        chunk = ids[i : i + batch_size].to(device)
        if kind == "open_clip":
            out = model.encode_text(chunk)
        else:
            m = mask[i : i + batch_size].to(device) if mask is not None else None
            out = model.get_text_features(input_ids=chunk, attention_mask=m)
        feats.append(out if isinstance(out, Tensor) else out.pooler_output)
    return torch.cat(feats)


def text_embeddings(
    clip_model: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    tokenizer: Callable | None = None,
    *,
    input_ids: Int[Tensor, "..."] | None = None,
    attention_mask: Tensor | None = None,
    batch_size: int = 256,
) -> Float[Tensor, "n_classes embed_dim"]:
    """Normalised, template-averaged (and re-normalised) text embeddings, one row per class.

    ``input_ids`` (``[n_classes, seq]`` or ``[n_classes, n_templates, seq]``, with an optional
    ``attention_mask`` of the same shape) replaces tokenizing ``template.format(name)``.
    """
    kind = _kind(clip_model)
    n = len(class_names)
    if n == 0:
        raise InputError("zeroshot_head needs at least one class name.")
    if input_ids is None:
        if not templates or any("{}" not in t for t in templates):
            raise InputError(f"templates must be non-empty and contain '{{}}', got {templates!r}.")
        texts = [t.format(c) for c in class_names for t in templates]
        ids, mask = _tokenize(clip_model, kind, texts, tokenizer)
        n_templates = len(templates)
    else:
        ids, mask = torch.as_tensor(input_ids), attention_mask
        if ids.ndim not in (2, 3) or ids.shape[0] != n:
            raise InputError(
                f"input_ids must be [n_classes={n}, seq] or [n_classes, n_templates, seq], got "
                f"{tuple(ids.shape)}."
            )
        n_templates = ids.shape[1] if ids.ndim == 3 else 1
        ids = ids.reshape(n * n_templates, ids.shape[-1])
        if mask is not None:
            mask = torch.as_tensor(mask).reshape(ids.shape)
    feats = _encode(clip_model, kind, ids, mask, batch_size)
    feats = nn.functional.normalize(feats, dim=-1).reshape(n, n_templates, -1)
    if n_templates == 1:
        return feats[:, 0]
    return nn.functional.normalize(feats.mean(dim=1), dim=-1)


def attach_zeroshot_head(
    hooked: HookedViT,
    text_features: Float[Tensor, "n_classes embed_dim"],
    logit_scale: float | Tensor,
    logit_bias: float | Tensor | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = (),
) -> HookedViT:
    """Give ``hooked`` (in place) the zero-shot head ``logit_scale * text_features`` (already
    exponentiated scale; normalised ``text_features``) and return it.

    ``hooked`` is a converted CLIP image tower: its projection head becomes ``image_proj``
    (bias-free, or with the bias of an open_clip ``TimmModel`` trunk head such as EVA02-CLIP /
    PE-Core; a model that already has a zero-shot head keeps its ``image_proj``), or, for a
    headless model (SigLIP), the pooled features are the image embedding.
    """
    cfg = hooked.cfg
    zs = cfg.zeroshot
    if zs is not None:
        proj, embed_dim = hooked.image_proj, zs["embed_dim"]
    elif hooked.head is not None:
        timm_tower = cfg.extra.get("open_clip_tower") == "TimmModel"
        if (hooked.head.bias is not None and not timm_tower) or hooked.head_dist is not None:
            raise InputError(
                "hooked has a classification head with a bias, not a CLIP image projection; "
                "convert the CLIP model itself (HookedViT.from_open_clip / from_hf(CLIPModel))."
            )
        proj, embed_dim = hooked.head, hooked.head.out_features
    else:
        proj, embed_dim = None, cfg.d_pooled
    if text_features.ndim != 2 or text_features.shape[1] != embed_dim:
        raise InputError(
            f"text features {tuple(text_features.shape)} do not fit the image embedding width "
            f"{embed_dim} of hooked; were they computed with the same CLIP model?"
        )
    n = text_features.shape[0]
    p = next(hooked.parameters())
    head = nn.Linear(embed_dim, n, bias=True).to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        scale = torch.as_tensor(logit_scale, dtype=p.dtype, device=p.device).reshape(())
        head.weight.copy_(scale * text_features.to(device=p.device, dtype=p.dtype))
        bias = 0.0 if logit_bias is None else float(torch.as_tensor(logit_bias).reshape(()))
        head.bias.fill_(bias)
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise InputError(f"{len(names)} class names for {n} rows of text features.")
    hooked.set_output_head(head, zeroshot={
        "embed_dim": embed_dim,
        "image_proj": proj is not None,
        "image_proj_bias": proj is not None and proj.bias is not None,
        "class_names": names,
        "templates": list(templates),
        "logit_scale": float(scale),
        "logit_bias": None if logit_bias is None else bias,
    }, image_proj=proj)
    return hooked.eval()


def zeroshot_head(
    clip_model: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    hooked: HookedViT | None = None,
    tokenizer: Callable | None = None,
    *,
    input_ids: Int[Tensor, "..."] | None = None,
    attention_mask: Tensor | None = None,
    batch_size: int = 256,
) -> HookedViT:
    """A `HookedViT` whose ``model(images)`` are ``clip_model``'s zero-shot logits
    ``[batch, n_classes]`` for the prompts ``template.format(class_name)``.

    Args:
        clip_model: an open_clip ``CLIP`` / ``CustomTextCLIP``, or a transformers ``CLIPModel``
            / ``SiglipModel``; its text tower embeds the prompts.
        class_names: one name per class (also stored in ``cfg.zeroshot``).
        templates: prompt templates with ``{}``; a class's prompts are averaged (normalised
            embeddings, mean, re-normalised).
        hooked: the converted image tower to attach the head to (modified in place); default:
            convert ``clip_model``'s image tower.
        tokenizer: ``list[str] -> input_ids`` (a tensor or a mapping with ``input_ids`` and
            ``attention_mask``; a transformers tokenizer is called with padding, ``"max_length"``
            for SigLIP). Default: open_clip's OpenAI BPE (shipped with open_clip, offline);
            Hugging Face models need one (or ``input_ids``).
        input_ids, attention_mask: pre-tokenized prompts ``[n_classes, (n_templates,) seq]``
            instead of ``templates`` + ``tokenizer``.
        batch_size: prompts per text-tower forward pass.
    """
    kind = _kind(clip_model)
    feats = text_embeddings(
        clip_model, class_names, templates, tokenizer, input_ids=input_ids,
        attention_mask=attention_mask, batch_size=batch_size,
    )
    if hooked is None:
        hooked = (
            HookedViT.from_open_clip(clip_model) if kind == "open_clip"
            else HookedViT.from_hf(clip_model)
        )
    with torch.no_grad():
        scale = clip_model.logit_scale.exp()
    bias = getattr(clip_model, "logit_bias", None)
    bias = bias.detach() if isinstance(bias, Tensor) else bias
    return attach_zeroshot_head(
        hooked, feats, scale, bias, class_names, templates if input_ids is None else ()
    )
