"""Which timm / Hugging Face / open_clip ViT families convert to `HookedViT`, measured.

    PYTHONPATH=$PWD python tools/support_table.py            # print the table
    PYTHONPATH=$PWD python tools/support_table.py --write    # and update the docs

Every model of the plain-ViT timm modules, one model of each other transformer-like timm module,
a list of Hugging Face vision-transformer model types and every open_clip architecture is built
with random weights, shrunk (2 layers of width 64 where the constructor takes it; the image
towers of open_clip only), converted, and its output compared with the source's in float64
(exact: relative difference <= 1e-9). Refused models report the `UnsupportedModelError`
message, which names the missing feature. Models whose construction would be large and that
are refused by class are built on the ``meta`` device (no memory, no init), which is enough for
the converter to name its refusal.

``--only LIBRARY`` re-checks one library (keeping the other rows); ``--write`` stores one row
per model in ``docs/support_table.json`` and the summary table
between the markers of ``docs/loading.md``; ``tests/test_support_table.py`` re-checks a sample.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "support_table.json"
DOC_PATH = ROOT / "docs" / "loading.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
EXACT = 1e-9
SHRINK = dict(depth=2, embed_dim=64, num_heads=4)
#: timm modules whose every model is tried (the plain-ViT families)
TIMM_VIT_MODULES = ("vision_transformer", "deit", "eva", "vision_transformer_relpos",
                    "vision_transformer_hybrid", "vision_transformer_sam", "beit", "naflexvit",
                    "vitamin", "qwen3_vit", "gemma4_vit")
#: other transformer-like timm modules: one model each (refused by class)
TIMM_OTHER_MODULES = ("cait", "xcit", "crossvit", "pit", "levit", "volo", "tnt", "twins",
                      "mvitv2", "hiera", "swin_transformer", "swin_transformer_v2", "davit",
                      "coat", "nest", "tiny_vit", "efficientformer", "fastvit", "maxxvit")
#: Hugging Face model types -> base model class (ViT-like vision models)
HF_TYPES = {
    "vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel", "dinov3_vit": "DINOv3ViTModel",
    "clip_vision_model": "CLIPVisionModel", "siglip_vision_model": "SiglipVisionModel",
    "siglip2_vision_model": "Siglip2VisionModel", "aimv2_vision_model": "Aimv2VisionModel",
    "beit": "BeitModel", "data2vec-vision": "Data2VecVisionModel", "vit_mae": "ViTMAEModel",
    "vit_msn": "ViTMSNModel", "ijepa": "IJepaModel", "yolos": "YolosModel",
    "vitdet": "VitDetModel", "hiera": "HieraModel", "swin": "SwinModel", "swinv2": "Swinv2Model",
    "levit": "LevitModel", "pvt_v2": "PvtV2Model",
}
HF_SHRINK = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                 intermediate_size=128, image_size=64, patch_size=16, projection_dim=32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def row(library: str, family: str, name: str, status: str, reason: str = "",
        error: float | None = None) -> dict[str, Any]:
    return dict(library=library, family=family, name=name, status=status, reason=reason,
                error=error)


def _first_sentence(msg: str) -> str:
    msg = " ".join(str(msg).split())
    m = re.match(r"(.+?[.!?])(\s|$)", msg)
    return (m.group(1) if m else msg)[:220]


def _compare(library, family, name, convert: Callable, forward: Callable, size) -> dict:
    """Convert, run both in float64 on two images, classify the result."""
    from patchlens import UnsupportedModelError

    try:
        hooked = convert()
    except UnsupportedModelError as e:
        return row(library, family, name, "refused", _first_sentence(e))
    except Exception as e:  # noqa: BLE001 - a converter bug: reported, not hidden
        return row(library, family, name, "error", _first_sentence(f"{type(e).__name__}: {e}"))
    x = torch.randn(2, 3, *(size or hooked.cfg.image_size),
                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    try:
        with torch.no_grad():
            err = rel_err(hooked(x), forward(x))
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return row(library, family, name, "error", _first_sentence(f"{type(e).__name__}: {e}"))
    return row(library, family, name, "exact" if err <= EXACT else "mismatch", error=err)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.02)
    return model.eval().double()


# ---- timm -----------------------------------------------------------------------------------
def _timm_module(name: str) -> str:
    import timm

    return timm.models._registry._model_to_module[name]


def build_timm(name: str, meta: bool = False) -> torch.nn.Module:
    """A timm model shrunk where its constructor takes the keywords; on the ``meta`` device
    (no memory, no init) as registered. A real model is never built at full size."""
    import timm

    if meta:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False).eval()
    last: Exception | None = None
    for kw in (SHRINK, dict(depth=2, embed_dim=64), dict(depth=2)):
        try:
            return timm.create_model(name, pretrained=False, **kw).eval()
        except Exception as e:  # noqa: BLE001 - constructors reject keywords in many ways
            last = e
    raise RuntimeError(f"could not build it shrunk ({type(last).__name__}: "
                       f"{_first_sentence(last)})")


def check_timm(name: str) -> dict[str, Any]:
    from patchlens import HookedViT, UnsupportedModelError
    from patchlens.model.convert.timm import timm_config

    family = _timm_module(name)
    try:
        src = _perturb(build_timm(name)) if family in TIMM_VIT_MODULES else None
    except RuntimeError as e:
        src, why = None, _first_sentence(e)
    else:
        why = "could not build it shrunk"
    if src is None:  # refused by what the registered model is: the meta-device model tells
        try:
            timm_config(build_timm(name, meta=True))
        except UnsupportedModelError as e:
            return row("timm", family, name, "refused", _first_sentence(e))
        except Exception as e:  # noqa: BLE001
            return row("timm", family, name, "not built", _first_sentence(f"{type(e).__name__}: {e}"))
        return row("timm", family, name, "not built", why)
    return _compare("timm", family, name, lambda: HookedViT.from_timm(src), src, None)


def timm_names() -> list[str]:
    import timm

    names = [n for n in timm.list_models() if _timm_module(n) in TIMM_VIT_MODULES]
    seen: dict[str, str] = {}
    for n in timm.list_models():
        m = _timm_module(n)
        if m in TIMM_OTHER_MODULES and m not in seen:
            seen[m] = n
    return names + list(seen.values())


# ---- Hugging Face ---------------------------------------------------------------------------
def hf_config_for(model_type: str):
    """The model type's default config, shrunk where a field has the same kind of value."""
    import transformers as T

    config = T.AutoConfig.for_model(model_type)
    for k, v in HF_SHRINK.items():
        if isinstance(getattr(config, k, None), int):
            setattr(config, k, v)
    return config


def build_hf(model_type: str) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    return getattr(T, HF_TYPES[model_type])(hf_config_for(model_type))


def _hf_reference(model_type: str, model: torch.nn.Module) -> Callable:
    def forward(x):
        out = model(pixel_values=x)
        if model_type in ("vit", "deit"):
            return out.last_hidden_state[:, 0]  # patchlens leaves out HF's tanh pooler
        return out.pooler_output

    return forward


def check_hf(model_type: str) -> dict[str, Any]:
    from patchlens import HookedViT, UnsupportedModelError
    from patchlens.model.convert.hf import hf_config

    arch = HF_TYPES[model_type]
    try:  # an architecture refused by type needs no model: the config tells
        hf_config(hf_config_for(model_type), architecture=arch)
    except UnsupportedModelError as e:
        return row("transformers", arch, model_type, "refused", _first_sentence(e))
    except Exception:  # noqa: BLE001 - decided by the model below
        pass
    try:
        src = _perturb(build_hf(model_type))
    except Exception as e:  # noqa: BLE001
        return row("transformers", arch, model_type, "not built",
                   _first_sentence(f"{type(e).__name__}: {e}"))
    return _compare("transformers", arch, model_type, lambda: HookedViT.from_hf(src),
                    _hf_reference(model_type, src), None)


# ---- open_clip ------------------------------------------------------------------------------
@contextlib.contextmanager
def _shrunk_timm(**kwargs) -> Iterator[None]:
    """open_clip's TimmModel passes no size overrides to timm: add them (shrunk trunks)."""
    import timm

    orig = timm.create_model
    timm.create_model = functools.partial(orig, **kwargs)
    try:
        yield
    finally:
        timm.create_model = orig


def build_open_clip_tower(name: str, meta: bool = False) -> torch.nn.Module:
    """The image tower of open_clip architecture ``name`` (2 layers of width 64 for open_clip's
    own ViT; timm trunks shrunk where timm takes the keywords)."""
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(name)
    vision = dict(cfg["vision_cfg"])
    if "timm_model_name" not in vision and not isinstance(vision.get("layers"), (list, tuple)):
        vision.update(layers=2, width=64, head_width=16)
    quick = bool(cfg.get("quick_gelu", False))
    device = torch.device("meta") if meta else contextlib.nullcontext()
    torch.manual_seed(0)
    if "timm_model_name" in vision:
        # shrunk where timm takes the keywords; as registered only on the meta device
        for kw in (SHRINK, dict(depth=2)) + (({},) if meta else ()):
            try:
                with _shrunk_timm(**kw), device:
                    return _build_vision_tower(cfg["embed_dim"], vision, quick).eval()
            except Exception:  # noqa: BLE001 - constructors reject the keywords in many ways
                continue
        raise RuntimeError("could not build its timm trunk shrunk")
    with device:
        return _build_vision_tower(cfg["embed_dim"], vision, quick).eval()


def _tower_kind(tower: torch.nn.Module) -> str:
    kind = type(tower).__name__
    return f"{kind}({type(tower.trunk).__name__})" if kind == "TimmModel" else kind


def check_open_clip(name: str) -> dict[str, Any]:
    from patchlens import HookedViT, UnsupportedModelError
    from patchlens.model.convert.open_clip import open_clip_config

    with contextlib.suppress(Exception):  # meta construction is best effort
        meta = build_open_clip_tower(name, meta=True)
        try:
            open_clip_config(meta)
        except UnsupportedModelError as e:
            return row("open_clip", _tower_kind(meta), name, "refused", _first_sentence(e))
    try:
        tower = _perturb(build_open_clip_tower(name))
    except Exception as e:  # noqa: BLE001
        return row("open_clip", "?", name, "not built", _first_sentence(f"{type(e).__name__}: {e}"))

    def forward(x):
        out = tower(x)
        return out[0] if isinstance(out, tuple) else out

    return _compare("open_clip", _tower_kind(tower), name,
                    lambda: HookedViT.from_open_clip(tower), forward, None)


def open_clip_names() -> list[str]:
    import open_clip

    return sorted(open_clip.list_models())


CHECKS = {"timm": check_timm, "transformers": check_hf, "open_clip": check_open_clip}


def check(library: str, name: str) -> dict[str, Any]:
    """The row of one model (``library`` in timm / transformers / open_clip)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CHECKS[library](name)


def all_models() -> list[tuple[str, str]]:
    return ([("timm", n) for n in timm_names()] + [("transformers", t) for t in HF_TYPES]
            + [("open_clip", n) for n in open_clip_names()])


# ---- rendering --------------------------------------------------------------------------------
def _short(reason: str) -> str:
    """A reason without the list of what patchlens does convert (the page says that)."""
    for cut in ("; patchlens converts", "; patchlens needs", " patchlens converts"):
        reason = reason.split(cut)[0]
    return reason.rstrip(".;, ") + "." if reason else reason


def render(rows: list[dict[str, Any]]) -> str:
    """The markdown summary: one line per (library, family)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["library"], r["family"]), []).append(r)
    lines = [
        "| Library | Family | Tried | Exact | Refused or not built: why (count, e.g.) |",
        "|---|---|---:|---:|---|",
    ]
    for (lib, fam), rs in sorted(groups.items()):
        exact = sum(r["status"] == "exact" for r in rs)
        why: dict[str, list[str]] = {}
        for r in rs:
            if r["status"] != "exact":
                label = {"refused": "", "not built": "not built: ", "error": "ERROR: ",
                         "mismatch": "MISMATCH: "}[r["status"]]
                text = label + (_short(r["reason"]) or f"relative error {r['error']:.2g}")
                why.setdefault(text, []).append(r["name"])
        cell = "<br>".join(f"{len(ns)}: {t.replace('|', '/')} (`{ns[0]}`)"
                           for t, ns in sorted(why.items(), key=lambda kv: -len(kv[1])))
        lines.append(f"| {lib} | {fam} | {len(rs)} | {exact} | {cell} |")
    total = sum(r["status"] == "exact" for r in rows)
    lines.append("")
    lines.append(f"{total} of {len(rows)} models convert exactly (float64, relative difference "
                 f"<= {EXACT:g}).")
    return "\n".join(lines)


def write_docs(rows: list[dict[str, Any]]) -> None:
    JSON_PATH.write_text(json.dumps(rows, indent=1) + "\n")
    doc = DOC_PATH.read_text()
    if START not in doc or END not in doc:
        raise SystemExit(f"{DOC_PATH} lacks the markers {START} / {END}")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC_PATH.write_text(f"{head}{START}\n{render(rows)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--write", action="store_true", help="update docs/support_table.json and "
                    "docs/loading.md")
    ap.add_argument("--only", choices=sorted(CHECKS), help="one library")
    ap.add_argument("--limit", type=int, default=0, help="first N models (a quick look)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = [(lib, n) for lib, n in all_models() if not args.only or lib == args.only]
    if args.limit:
        models = models[: args.limit]
    rows, t0 = [], time.time()
    for i, (lib, name) in enumerate(models):
        r = check(lib, name)
        rows.append(r)
        print(f"[{i + 1}/{len(models)} {time.time() - t0:5.0f}s] {lib:12s} {name:45s} "
              f"{r['status']:9s} {r['reason'][:90]}", file=sys.stderr, flush=True)
    if args.only and not args.limit and JSON_PATH.exists():  # keep the other libraries' rows
        rows = [r for r in json.loads(JSON_PATH.read_text()) if r["library"] != args.only] + rows
    print(render(rows))
    if args.write:
        write_docs(rows)


if __name__ == "__main__":
    main()
