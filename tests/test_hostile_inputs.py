"""Property: hostile arguments to every public function (issue 15).

For each public function hypothesis draws one argument and a value for it: a bad value (wrong
type, dtype, shape, range, NaN, empty selection, fractional count) or, for arguments that only
shape the computation (batch sizes, memory budgets, chunk sizes), a valid one. A bad value must
raise a `PatchlensError` whose message names the argument; a valid one must give the same
result as the default call. Either way the model is left as it was: no hooks, no ``.grad``, the
same parameters, config flags and outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import torch_threads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patchlens as pl
from patchlens import PatchlensError, Rect, Site, das
from patchlens import circuits as C
from patchlens import diagnostics as D
from patchlens import sae as S
from patchlens.attribution import METHODS
from patchlens.attribution import metrics as am
from patchlens.patching.engine import capture

NAN = float("nan")
CFG = dict(d_model=16, d_head=8, n_heads=2, n_layers=2, d_mlp=32, image_size=(16, 16),
           patch_size=(8, 8), n_classes=4)


@dataclass
class Ctx:
    model: pl.HookedViT
    x: torch.Tensor          # [2, 3, 16, 16] float64
    y: torch.Tensor          # a second batch
    maps: torch.Tensor       # [2, 2, 2] float64
    masks: torch.Tensor      # [2, 16, 16] bool


def c(value):
    """A constant value (strategies hold functions of the context, for tensor values)."""
    return lambda ctx: value


def images(*extra):
    """Bad image batches: dtype, shape, NaN, empty, not a tensor."""
    return [lambda k: k.x.float(), lambda k: k.x[0], lambda k: k.x[:, :2],
            lambda k: k.x[..., :12], lambda k: k.x * NAN, lambda k: k.x.long(), c([1, 2]),
            c("cat.png"), c(None), lambda k: k.x[None], *extra]


def ints(low: int = 1):
    """Valid counts for arguments that only chunk the work."""
    return st.integers(low, 40).map(c)


BAD_COUNT = [c(2.5), c(2.0), c(0), c(-1), c(True), c("2"), c(NAN)]
BAD_TARGET = [c(1.5), c(99), c(-1), c("cat"), c([0, 1, 2]), c(NAN), c([])]
BAD_METRIC = [c(lambda lg: lg.argmax(-1)), c(lambda lg: lg), c(lambda lg: lg[:, 0] * NAN),
              c(3), c("logit"), c(lambda lg: [1.0, 2.0]),
              c(pl.metrics.logit([0, 1, 2])), c(pl.metrics.recovery(lambda lg: lg[:, 0] * 0))]
BAD_BUDGET = [c(0), c(-1), c("lots"), c(NAN), c(float("inf")), c("1..5GB"), c("0GB")]
OK_BUDGET = st.sampled_from([c("1KB"), c(10**9), c("3GB"), c(1), c("0.5MB")])


@dataclass
class Arg:
    bad: list                     # functions ctx -> bad value
    needles: tuple[str, ...]      # one of these must be in the message (case-insensitive)
    ok: Any = None                # strategy of functions ctx -> valid value (same result)


@dataclass
class Case:
    name: str
    call: Callable[..., Any]      # call(ctx, **kwargs)
    good: Callable[[Ctx], dict]
    args: dict[str, Arg]
    same: Callable[[Any, Any], bool] = field(default=lambda a, b: _same(a, b))
    examples: int = 12
    model: Callable[[Ctx], Any] = field(default=lambda k: k.model)   # the model left untouched


def _values(out):
    if isinstance(out, (pl.PatchResult,)):
        return out.per_example
    if isinstance(out, pl.AttributionMap):
        return out.values
    if isinstance(out, tuple):
        return out[0]
    return out


def _same(a, b) -> bool:
    va, vb = _values(a), _values(b)
    return va.shape == vb.shape and bool(torch.allclose(va, vb, atol=1e-12, rtol=1e-12))


def ap(k, **kw):
    return pl.activation_patching(k.model, kw.pop("clean"), kw.pop("corrupted"), kw.pop("metric"),
                                  progress=False, **kw)


def pp(k, **kw):
    return pl.path_patching(k.model, kw.pop("clean"), kw.pop("corrupted"), kw.pop("senders"),
                            kw.pop("receivers"), kw.pop("metric"), progress=False, **kw)


def method(name):
    def call(k, **kw):
        return METHODS[name](k.model, kw.pop("images"), **kw)
    return call


def _pairs(k):
    return [(Site("resid_pre", layers=1, tokens=[0, 2]), pl.Interchange(k.y))]


BAD_PAIRS = [c([("resid_pre", pl.Zero())]), c([(Site("resid_pre"), 3)]), c(Site("resid_pre")),
             c([(Site("resid_pre", layers=9), pl.Zero())]),
             c([(Site("resid_pre", layers=0, tokens=99), pl.Zero())]),
             c([(Site("z", layers=0, heads=5), pl.Zero())]),
             c([(Site(3), pl.Zero())]),
             lambda k: [(Site("resid_pre", layers=0), pl.Interchange(k.x.float()))],
             c([(Site("resid_pre", layers=0), pl.Add(torch.ones(3)))]),
             c([(Site("resid_pre", layers=1.5), pl.Zero())]),
             c([(Site("resid_pre", layers=0, tokens=torch.tensor([1.7])), pl.Zero())])]
PAIR_WORDS = ("pair", "site", "layer", "token", "head", "intervention", "reference", "direction",
              "hook")
IMAGE_WORDS = ("image",)

CASES = [
    Case("activation_patching", ap,
         lambda k: dict(clean=k.x, corrupted=k.y, metric=pl.metrics.logit(1), layers=[1]),
         dict(clean=Arg(images(lambda k: k.x[:1]), IMAGE_WORDS + ("clean",)),
              corrupted=Arg(images(), IMAGE_WORDS + ("corrupted",)),
              metric=Arg(BAD_METRIC, ("metric", "rounding")),
              site=Arg([c("resid_pr"), c(3), c(""), c("blocks.9.hook_resid_pre")], ("site", "hook")),
              per=Arg([c("bogus"), c(1), c(None)], ("per",)),
              layers=Arg([c(1.5), c([0, 7]), c([]), c("1"), c([True]), c(-9),
                          c(torch.tensor([0.5])), c([[0]])], ("layer",)),
              tokens=Arg([c(torch.tensor([1.7])), c([True, False]), c([[True] * 2] * 2), c(99),
                          c("foo"), c([]), c(torch.ones(2, 2)), c((0.5, 1)), c(-99),
                          c(torch.zeros(2, 2, dtype=torch.bool)), c(Rect(0, 3, 0, 1))],
                         ("token", "patch")),
              heads=Arg([c(1), c([0])], ("head",)),
              regions=Arg([c({"a": torch.ones(2, 2, dtype=torch.bool)})], ("regions",)),
              direction=Arg([c("bogus"), c(1)], ("direction",)),
              method=Arg([c("bogus"), c(None)], ("method",)),
              diagnose=Arg([c(True), c("yes"), c(1)], ("diagnose",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints()),
              memory_budget=Arg(BAD_BUDGET, ("memory",), OK_BUDGET)), examples=40),
    Case("activation_patching per=region", ap,
         lambda k: dict(clean=k.x, corrupted=k.y, metric=pl.metrics.logit(1), per="region",
                        regions={"left": Rect(0, 2, 0, 1)}, layers=[0]),
         dict(regions=Arg([c(None), c({}), c([]), c({"a": torch.ones(2, 2)}), c([[[True] * 2] * 2]),
                           c({"a": torch.ones(3, 3, dtype=torch.bool)}), c("left"), c(3),
                           c({"a": torch.ones(2, 2, dtype=torch.long)})], ("region",)))),
    Case("path_patching", pp,
         lambda k: dict(clean=k.x, corrupted=k.y, senders=pl.all_heads(k.model)[:2],
                        receivers=pl.Node("resid_final"), metric=pl.metrics.logit(2)),
         dict(clean=Arg(images(), IMAGE_WORDS + ("clean",)),
              senders=Arg([c("z"), c([]), c([pl.Node("q", 0, 0)]), c([pl.Node("z", 5, 0)]),
                           c(pl.Node("z", 0, 9)), c(3)], ("sender", "node", "z")),
              receivers=Arg([c(pl.Node("z", 0, 0)), c([]), c("resid_final"),
                             c(pl.Node("q", 7, 0))], ("receiver", "node", "q")),
              metric=Arg(BAD_METRIC, ("metric", "rounding")),
              direction=Arg([c("bogus")], ("direction",)), mlps=Arg([c("bogus")], ("mlps",)),
              combine=Arg([c("bogus")], ("combine",)),
              normalize=Arg([c("yes"), c(1.0), c(None)], ("normalize",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints()),
              memory_budget=Arg(BAD_BUDGET, ("memory",), OK_BUDGET)), examples=25),
    Case("caap", lambda k, **kw: pl.caap(k.model, kw.pop("images"), progress=False, **kw),
         lambda k: dict(images=k.x, layers=(0, 2)),
         dict(images=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS),
              target=Arg(BAD_TARGET, ("target",)),
              layers=Arg([c((0.0, 2)), c((2, 1)), c(3), c((0, 9)), c((-1, 1)), c("all")],
                         ("layers",)),
              context=Arg([c("sky"), c(torch.zeros(3, 8, 8, dtype=torch.float64)), c(3),
                           lambda k: k.x * NAN], ("context",)),
              site=Arg([c("pattern"), c("foo"), c(3)], ("site",)),
              score=Arg([c("accuracy"), c(None)], ("score",)),
              group=Arg([c(0), c(1.5), c(99), c(True)], ("group",)),
              blur_kernel=Arg([c(4), c(2.0), c(-1), c(0)], ("blur_kernel",)),
              blur_sigma=Arg([c(0), c(NAN), c(-1), c("a")], ("blur_sigma",)),
              seed=Arg([c(1.5), c("a")], ("seed",)),
              reference=Arg([lambda k: k.x], ("reference",)),
              second_class=Arg([c(1)], ("second_class",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints()),
              memory_budget=Arg(BAD_BUDGET, ("memory",), OK_BUDGET)), examples=30),
    Case("rollout", method("rollout"), lambda k: dict(images=k.x),
         dict(images=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS),
              target=Arg(BAD_TARGET, ("target",)),
              head_fusion=Arg([c("min"), c(1)], ("head_fusion",)),
              residual=Arg([c(2.0), c(-0.1), c(1.0), c(NAN), c("a")], ("residual",)))),
    Case("class_attention", method("class_attention"), lambda k: dict(images=k.x),
         dict(images=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS),
              layer=Arg([c(1.5), c(5), c(-9), c(True), c("0")], ("layer",)))),
    Case("chefer", method("chefer"), lambda k: dict(images=k.x, target=[1, 2]),
         dict(images=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS),
              target=Arg(BAD_TARGET, ("target",)))),
    Case("gradcam", method("gradcam"), lambda k: dict(images=k.x, layer=0),
         dict(images=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS),
              target=Arg(BAD_TARGET, ("target",)),
              layer=Arg([c(1.5), c(5), c(-9), c(True), c("0")], ("layer",)))),
    Case("integrated_gradients", method("integrated_gradients"),
         lambda k: dict(images=k.x, n_steps=3, target=[0, 3]),
         dict(images=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS),
              target=Arg(BAD_TARGET, ("target",)),
              n_steps=Arg([c(0), c(2.5), c(True), c("3")], ("n_steps",)),
              baseline=Arg([c("black"), c(torch.zeros(3)), lambda k: k.x.float(),
                            lambda k: k.x * NAN, c(0)], ("baseline",)),
              internal_batch_size=Arg(BAD_COUNT, ("internal_batch_size",), ints()))),
    Case("occlusion", method("occlusion"), lambda k: dict(images=k.x, target=1),
         dict(images=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS),
              target=Arg(BAD_TARGET, ("target",)),
              window=Arg([c(0), c(2.5), c(99), c(True)], ("window",)),
              perturbations_per_eval=Arg(BAD_COUNT, ("perturbations_per_eval",), ints()))),
    Case("rise", method("rise"), lambda k: dict(images=k.x, n_masks=4, batch_size=3),
         dict(images=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS),
              target=Arg(BAD_TARGET, ("target",)),
              n_masks=Arg([c(0), c(2.5), c(True)], ("n_masks",)),
              cells=Arg([c(0), c(1.5)], ("cells",)),
              p_keep=Arg([c(0), c(1.5), c(NAN), c("a")], ("p_keep",)),
              seed=Arg([c(1.5), c("a")], ("seed",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints()))),
]

# ---- the packages merged later: circuits, DAS, SAEs, rotary models ----
_CACHE: dict[str, Any] = {}


def cached(key: str, make: Callable[[Ctx], Any]) -> Callable[[Ctx], Any]:
    """A value built once per test session from the context (graphs, scores, SAEs, models)."""
    def get(k: Ctx):
        if key not in _CACHE:
            _CACHE[key] = make(k)
        return _CACHE[key]
    return get


def _timm(name: str, **kwargs):
    import timm

    torch.manual_seed(3)
    return timm.create_model(name, pretrained=False, depth=1, embed_dim=64, num_heads=2,
                             **kwargs).eval()


def _rotary(k: Ctx) -> pl.HookedViT:
    torch.manual_seed(2)
    return pl.HookedViT(pl.ViTConfig(**CFG, rope="timm_cat")).eval().double()


graph = cached("graph", lambda k: C.Graph.from_model(k.model))
scores = cached("scores", lambda k: C.edge_scores(k.model, k.x, k.y, pl.metrics.logit(1),
                                                  graph=graph(k)))
circuit = cached("circuit", lambda k: C.Circuit.top_k(scores(k), 6))
one_layer_graph = cached("graph1", lambda k: C.Graph.from_model(
    pl.HookedViT(pl.ViTConfig(**{**CFG, "n_layers": 1})).double()))
sae64 = cached("sae", lambda k: S.SAE(16, 24, hook_name="blocks.1.hook_resid_post",
                                      dtype=torch.float64).init_(seed=0))
rotary = cached("rotary", _rotary)
timm_eva = cached("eva", lambda k: _timm("eva02_tiny_patch14_224", img_size=28))
timm_rope_mixed = cached("rope_mixed", lambda k: _timm("vit_small_patch16_rope_mixed_224",
                                                       img_size=32))
DAS_SITE = Site("resid_pre", layers=1, tokens="cls")


def _das_pairs(k):
    return torch.cat([k.x, k.y]), torch.cat([k.y, k.x])


def _trained(k):
    iv = das.RotatedSubspace(2, seed=0)
    das.train_intervention(k.model, DAS_SITE, iv, _das_pairs(k), torch.tensor([1, 2, 3, 0]),
                           steps=1, batch_size=2, eval_every=1, held_out_fraction=0.5,
                           progress=False)
    return iv


trained = cached("trained", _trained)


def _add_sae(k, **kw):
    """Splice, run, unsplice: a refused splice must leave nothing behind by itself."""
    k.model.add_sae(kw.pop("sae"), **kw)
    try:
        return k.model(k.x).detach()
    finally:
        k.model.reset_saes()


def _sae_state(k):
    return {n: t.detach().clone() for n, t in sae64(k).state_dict().items()}


def _with(k, name, value):
    return {**_sae_state(k), name: value}


CIRCUIT_CASES = [
    Case("circuits.edge_scores",
         lambda k, **kw: C.edge_scores(k.model, kw.pop("clean"), kw.pop("corrupted"),
                                       kw.pop("metric"), progress=False, **kw),
         lambda k: dict(clean=k.x, corrupted=k.y, metric=pl.metrics.logit(1), graph=graph(k)),
         dict(clean=Arg(images(lambda k: k.x[:1]), IMAGE_WORDS + ("clean",)),
              corrupted=Arg(images(), IMAGE_WORDS + ("corrupted",)),
              metric=Arg(BAD_METRIC, ("metric", "rounding")),
              method=Arg([c("acdc"), c(None), c(3)], ("method",)),
              direction=Arg([c("bogus"), c(None)], ("direction",)),
              ig=Arg([c("bogus")], ("ig",)),
              ig_steps=Arg([c(0), c(2.5), c(True), c("3")], ("ig_steps",)),
              graph=Arg([c("graph"), one_layer_graph,
                         lambda k: C.Graph.from_model(k.model, (24, 24))], ("graph",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints()),
              memory_budget=Arg(BAD_BUDGET, ("memory",), OK_BUDGET)),
         same=lambda a, b: torch.allclose(a.per_example, b.per_example, atol=1e-12, rtol=0),
         examples=25),
    Case("circuits.evaluate",
         lambda k, **kw: C.evaluate(k.model, kw.pop("circuit"), kw.pop("clean"),
                                    kw.pop("corrupted"), kw.pop("metric"), progress=False, **kw),
         lambda k: dict(circuit=circuit(k), clean=k.x, corrupted=k.y, metric=pl.metrics.logit(1)),
         dict(circuit=Arg([c("top6"), c(None), scores,
                           lambda k: C.Circuit.from_edges(one_layer_graph(k), [0])],
                          ("circuit", "graph")),
              clean=Arg(images(lambda k: k.x[:1]), IMAGE_WORDS + ("clean",)),
              metric=Arg(BAD_METRIC[:6], ("metric",)),
              ablation=Arg([c("bogus"), c(None)], ("ablation",)),
              diagnose=Arg([c(True), c("yes")], ("diagnose", "reference")),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints()),
              memory_budget=Arg(BAD_BUDGET, ("memory",), OK_BUDGET)),
         same=lambda a, b: (abs(a.faithfulness - b.faithfulness) <= 1e-12
                            and torch.allclose(a.circuit, b.circuit, atol=1e-12, rtol=0)),
         examples=20),
    Case("circuits.Circuit.top_k", lambda ctx, **kw: C.Circuit.top_k(**kw),
         lambda k: dict(scores=scores(k), k=6),
         dict(scores=Arg([c("scores"), c(None), graph], ("scores", "edgescores")),
              k=Arg([c(0), c(1.5), c(-1), c(True), c("6")], ("k",)),
              by=Arg([c("bogus"), c(None)], ("by",))),
         same=lambda a, b: torch.equal(a.mask, b.mask), examples=8),
]

DAS_CASES = [
    Case("das.train_intervention",
         lambda k, **kw: das.train_intervention(k.model, kw.pop("site"), kw.pop("intervention"),
                                                kw.pop("pairs"), kw.pop("labels"),
                                                progress=False, **kw),
         lambda k: dict(site=DAS_SITE, intervention=das.RotatedSubspace(2, seed=0),
                        pairs=_das_pairs(k), labels=torch.tensor([1, 2, 3, 0]), steps=1,
                        batch_size=2, eval_every=1, held_out_fraction=0.5),
         dict(site=Arg([c(Site("resid_pre", layers=9)), c("resid_pre"), c(Site("foo", layers=0)),
                        c(Site("resid_pre", layers=1, tokens=99))],
                       ("site", "layer", "hook", "token")),
              intervention=Arg([c(pl.Zero()), c(3), c(das.RotatedSubspace(40))],
                               ("intervention", "wider")),
              pairs=Arg([c("pairs"), lambda k: (k.x,), lambda k: (k.x.float(), k.y.float()),
                         lambda k: (torch.cat([k.x, k.y]), k.y), lambda k: (k.x * NAN, k.y)],
                        ("pair", "base", "source", "image")),
              labels=Arg([c(torch.tensor([1.5, 0.0, 0.0, 0.0])), c(torch.tensor([9, 0, 0, 0])),
                          c(torch.tensor([0, 1])), c(None), c("a")], ("label",)),
              cl_weight=Arg([c(-1), c(NAN), c("a"), c(1.0)], ("cl_weight",)),
              steps=Arg([c(0), c(2.5), c(True)], ("steps",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",)),
              lr=Arg([c(0), c(-1), c(NAN), c("a")], ("lr",)),
              eval_every=Arg([c(0), c(1.5)], ("eval_every",)),
              patience=Arg([c(0), c(1.5)], ("patience",)),
              held_out_fraction=Arg([c(0), c(1.5), c(NAN), c(1.0)], ("held_out",)),
              seed=Arg([c(1.5), c("a")], ("seed",)),
              eval_batch_size=Arg([c(0), c(2.5)], ("eval_batch_size",))),
         same=lambda a, b: True, examples=20),
    Case("das.interchange_accuracy",
         lambda k, **kw: das.interchange_accuracy(k.model, kw.pop("site"), kw.pop("intervention"),
                                                  kw.pop("pairs"), kw.pop("labels"), **kw),
         lambda k: dict(site=DAS_SITE, intervention=trained(k), pairs=_das_pairs(k),
                        labels=torch.tensor([1, 2, 3, 0])),
         dict(intervention=Arg([c(das.RotatedSubspace(2)), c(3), c(pl.Zero())], ("intervention",)),
              pairs=Arg([c("pairs"), lambda k: (k.x.float(), k.y.float())],
                        ("pair", "base", "source", "image")),
              labels=Arg([c(torch.tensor([0, 1])), c(torch.tensor([9, 0, 0, 0]))], ("label",)),
              site=Arg([c(Site("resid_pre", layers=9)), c("resid_pre")], ("site", "layer")),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints())),
         same=lambda a, b: a == b, examples=10),
]

SAE_CASES = [
    Case("HookedViT.add_sae", _add_sae, lambda k: dict(sae=sae64(k)),
         dict(sae=Arg([c(torch.nn.Linear(3, 3)), c("sae"),
                       c(S.SAE(24, 8, hook_name="blocks.1.hook_resid_post", dtype=torch.float64)),
                       c(S.SAE(16, 8, dtype=torch.float64))], ("sae", "d_in", "hook")),
              hook=Arg([c("blocks.1.hook_resid_pots"), c("blocks.1.attn.hook_pattern"), c(3),
                        c("blocks.9.hook_resid_post")], ("hook",),
                       st.just(c("blocks.1.hook_resid_post"))),
              use_error_term=Arg([c("yes"), c(None), c(1)], ("use_error_term",))),
         same=lambda a, b: torch.equal(a, b), examples=12),
    Case("sae.load", lambda k, **kw: S.load(kw.pop("source"), **kw),
         lambda k: dict(source=_sae_state(k), kind="relu"),
         dict(source=Arg([c("no-such-sae"), c(3), c({}), c("/no/such/dir"),
                          lambda k: _with(k, "W_dec", torch.full((24, 16), NAN, dtype=torch.float64)),
                          lambda k: _with(k, "W_dec", torch.zeros(3, 3, dtype=torch.float64)),
                          lambda k: _with(k, "junk", torch.zeros(1))],
                         ("sae", "source", "path", "dict", "weight", "w_dec")),
              dtype=Arg([c("float64"), c(3), c(torch.int64)], ("dtype",),
                        st.just(c(torch.float64))),
              kind=Arg([c("gated"), c(3)], ("kind",))),
         same=lambda a, b: torch.equal(a.W_enc, b.W_enc) and torch.equal(a.b_dec, b.b_dec),
         examples=12),
    Case("sae.patch_features",
         lambda k, **kw: S.patch_features(k.model, kw.pop("clean"), kw.pop("corrupted"),
                                          kw.pop("metric"), progress=False, **kw),
         lambda k: dict(clean=k.x, corrupted=k.y, metric=pl.metrics.logit(1), sae=sae64(k), top=2),
         dict(clean=Arg(images(lambda k: k.x[:1]), IMAGE_WORDS + ("clean",)),
              metric=Arg(BAD_METRIC[:6], ("metric",)),
              sae=Arg([c(3), c(S.SAE(24, 8, hook_name="blocks.1.hook_resid_post",
                                     dtype=torch.float64))], ("sae", "d_in")),
              hook=Arg([c("foo"), c("blocks.9.hook_resid_post"), c(3)], ("hook",)),
              top=Arg([c(1.5), c(-1), c(True), c("2")], ("top",)),
              tokens=Arg([c("foo"), c(99), c(torch.tensor([1.7]))], ("token",)),
              direction=Arg([c("bogus")], ("direction",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints())),
         same=lambda a, b: a.equals(b) or bool(
             (a.select_dtypes("number") - b.select_dtypes("number")).abs().max().max() <= 1e-12),
         examples=15),
]

ROTARY_CASES = [
    Case("rotary: patch", lambda k, **kw: pl.patch(rotary(k), kw.pop("x"), kw.pop("pairs"), **kw),
         lambda k: dict(x=k.x, pairs=[(Site("rot_q", layers=1, heads=0, tokens=[1, 2]),
                                       pl.Interchange(k.y))]),
         dict(x=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS + ("x",)),
              pairs=Arg(BAD_PAIRS + [c([(Site("rot_q", layers=0, heads=5), pl.Zero())]),
                                     c([(Site("rot_k", layers=2), pl.Zero())])], PAIR_WORDS),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints())),
         model=rotary, examples=15),
    Case("rotary: activation_patching",
         lambda k, **kw: pl.activation_patching(rotary(k), kw.pop("clean"), kw.pop("corrupted"),
                                                kw.pop("metric"), progress=False, **kw),
         lambda k: dict(clean=k.x, corrupted=k.y, metric=pl.metrics.logit(1), site="rot_k",
                        per="head", layers=[1]),
         dict(clean=Arg(images(lambda k: k.x[:1]), IMAGE_WORDS + ("clean",)),
              site=Arg([c("rot_qk"), c(""), c("blocks.9.attn.hook_rot_k")], ("site", "hook")),
              heads=Arg([c([5]), c([0.5])], ("head",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints())),
         model=rotary, examples=12),
    # model objects only (a name would be looked up online by from_hf / from_open_clip)
    Case("rotary: loaders", lambda k, **kw: kw.pop("load")(kw.pop("source")),
         lambda k: dict(load=pl.HookedViT.from_timm, source=timm_eva(k)),
         dict(source=Arg([c(3), c("no_such_model_xyz"), c(torch.nn.Linear(2, 2)), timm_rope_mixed],
                         ("timm", "model", "rotary")),
              load=Arg([c(pl.HookedViT.from_hf), c(pl.HookedViT.from_open_clip)],
                       ("from_hf", "from_open_clip", "model"))),
         same=lambda a, b: True, examples=8),
]

BAD_MAPS = [lambda k: k.maps * NAN, lambda k: k.maps[:, :1], lambda k: k.maps.repeat(2, 1, 1),
            c("a"), lambda k: k.maps + 1j]
for name, fn, extra in [
    ("deletion", am.deletion,
     dict(baseline=Arg([c(torch.zeros(5)), lambda k: k.x.float(), lambda k: k.x * NAN, c(0.0)],
                       ("baseline",)),
          step=Arg([c(0), c(2.5), c(True)], ("step",)))),
    ("insertion", am.insertion,
     dict(start=Arg([c(torch.zeros(5)), lambda k: k.x.float(), c("blur")], ("start",)),
          step=Arg([c(0), c(2.5)], ("step",)))),
    ("perturbation", am.perturbation,
     dict(mode=Arg([c("bogus")], ("mode",)),
          fractions=Arg([c((0, 1.5)), c(()), c((0.5,)), c((0.5, 0.2)), c("ab"), c(3)],
                        ("fractions",)))),
]:
    CASES.append(Case(
        name, lambda k, fn=fn, **kw: fn(k.model, kw.pop("images"), kw.pop("maps"), **kw),
        lambda k: dict(images=k.x, maps=k.maps, target=[1, 2]),
        dict(images=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS),
             maps=Arg(BAD_MAPS, ("map",)), target=Arg(BAD_TARGET, ("target",)),
             batch_size=Arg(BAD_COUNT, ("batch_size",), ints()), **extra)))

BAD_MASKS = [lambda k: k.masks.double() * 0.5, lambda k: k.masks[:1], lambda k: k.masks[:, :8],
             c("a"), lambda k: k.masks.double() * NAN]
CASES += [
    Case("pointing_game", lambda k, **kw: am.pointing_game(kw.pop("maps"), kw.pop("masks"), **kw),
         lambda k: dict(maps=k.maps, masks=k.masks, image_size=(16, 16)),
         dict(maps=Arg([BAD_MAPS[0]] + BAD_MAPS[2:], ("map",)),
              masks=Arg(BAD_MASKS, ("mask",)),
              tolerance=Arg([c(-1), c(NAN), c("a")], ("tolerance",)),
              image_size=Arg([c((0, 0)), c("a"), c((16,)), c((16.5, 16))], ("image_size",)))),
    Case("energy_pointing_game",
         lambda k, **kw: am.energy_pointing_game(kw.pop("maps"), kw.pop("masks"), **kw),
         lambda k: dict(maps=k.maps, masks=k.masks, image_size=(16, 16)),
         dict(maps=Arg([BAD_MAPS[0]] + BAD_MAPS[2:], ("map",)),
              masks=Arg(BAD_MASKS, ("mask",)),
              image_size=Arg([c((0, 0)), c("a"), c((16,))], ("image_size",)))),
    # ---- the engine and its front doors ----
    Case("patch", lambda k, **kw: pl.patch(k.model, kw.pop("x"), kw.pop("pairs"), **kw),
         lambda k: dict(x=k.x, pairs=_pairs(k)),
         dict(x=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS + ("x",)),
              pairs=Arg(BAD_PAIRS, PAIR_WORDS),
              return_type=Arg([c("bogus"), c("loss"), c(3)], ("return_type",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints()),
              memory_budget=Arg(BAD_BUDGET, ("memory",), OK_BUDGET)), examples=25),
    Case("Recipe.run", lambda k, **kw: pl.Recipe(kw.pop("pairs")).run(k.model, kw.pop("x"), **kw),
         lambda k: dict(x=k.x, pairs=_pairs(k)),
         dict(pairs=Arg(BAD_PAIRS, PAIR_WORDS),
              return_type=Arg([c("bogus"), c(3)], ("return_type",)))),
    Case("Recipe.sweep",
         lambda k, **kw: pl.Recipe([(Site("resid_pre"), pl.Zero())]).sweep(
             k.model, k.x, kw.pop("metric"), progress=False, **kw),
         lambda k: dict(metric=pl.metrics.logit(0), layers=[0, 1], tokens=[0, 3]),
         dict(layers=Arg([c(1.5), c([9]), c([]), c(None), c([1.5])], ("layer",)),
              tokens=Arg([c(["foo"]), c(3), c([99])], ("token",)),
              colors=Arg([c([1])], ("colors",)),
              metric=Arg(BAD_METRIC[:6], ("metric",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints()))),
    Case("run_variants",
         lambda k, **kw: pl.run_variants(k.model, kw.pop("x"), kw.pop("variants"),
                                         progress=False, **kw),
         lambda k: dict(x=k.x, variants=[pl.Variant(_pairs(k), "a")],
                        metric=pl.metrics.logit(3)),
         dict(variants=Arg([c([]), c([1]), c([pl.Variant([("a", pl.Zero())])]), c(None)],
                           ("variant",)),
              capture=Arg([c(["foo"]), c(["blocks.9.hook_resid_pre"])], ("hook",)),
              observers=Arg([c([("foo", print)])], ("hook",)),
              metric=Arg(BAD_METRIC[:6], ("metric",)),
              return_type=Arg([c("bogus"), c(None)], ("return_type", "metric")),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints()),
              memory_budget=Arg(BAD_BUDGET, ("memory",), OK_BUDGET)),
         same=lambda a, b: torch.allclose(a.outputs, b.outputs, atol=1e-12, rtol=0)),
    Case("capture", lambda k, **kw: capture(k.model, kw.pop("x"), kw.pop("hooks"), **kw),
         lambda k: dict(x=k.x, hooks=["blocks.1.hook_resid_pre"]),
         dict(x=Arg(images(lambda k: k.x[:0]), IMAGE_WORDS + ("x",)),
              hooks=Arg([c(["foo"]), c(["blocks.9.attn.hook_z"])], ("hook",)),
              grads=Arg([c(True), c(["hook_pooled"])], ("metric",)),
              return_type=Arg([c("bogus")], ("return_type",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",), ints())),
         same=lambda a, b: torch.equal(a.acts["blocks.1.hook_resid_pre"],
                                       b.acts["blocks.1.hook_resid_pre"])),
    Case("HookedViT.forward", lambda k, **kw: k.model(kw.pop("x"), **kw), lambda k: dict(x=k.x),
         dict(x=Arg(images(lambda k: k.x[:, :, :8, :8]), IMAGE_WORDS),
              return_type=Arg([c("bogus"), c("loss"), c(3)], ("return_type",)),
              start_at_layer=Arg([c(1.5), c(9), c(True)], ("start_at_layer", "residual")),
              stop_at_layer=Arg([c(1.5), c(9), c(True), c("1")], ("stop_at_layer",)))),
    Case("HookedViT.run_with_cache",
         lambda k, **kw: k.model.run_with_cache(kw.pop("x"), **kw), lambda k: dict(x=k.x),
         dict(x=Arg(images(), IMAGE_WORDS),
              names_filter=Arg([c("foo"), c(["blocks.0.hook_resid_pre", "bar"])], ("hook",)),
              metric=Arg([c(lambda o: o.sum())], ("incl_bwd",)))),
    # ---- metrics and interventions ----
    Case("metrics.logit", lambda k, **kw: pl.metrics.logit(kw["classes"])(k.model(k.x)),
         lambda k: dict(classes=1),
         dict(classes=Arg([c(1.5), c("cat"), c([]), c(-1), c(9), c([0, 1, 2]), c(NAN)],
                          ("class",)))),
    Case("metrics.logit_diff",
         lambda k, **kw: pl.metrics.logit_diff(kw["classes"], kw["other"])(k.model(k.x)),
         lambda k: dict(classes=1, other=2),
         dict(classes=Arg([c(1.5), c("cat"), c([]), c(2), c([0, 2])], ("class",)),
              other=Arg([c(1.5), c(1), c([1, 1]), c([0, 1, 2])], ("other", "class")))),
    Case("metrics.recovery", lambda k, **kw: pl.metrics.recovery(kw["metric"]),
         lambda k: dict(metric=pl.metrics.logit(0)),
         dict(metric=Arg([c(3), c("logit"), c(pl.metrics.recovery(pl.metrics.logit(0)))],
                         ("recovery",))),
         same=lambda a, b: repr(a) == repr(b)),
    Case("interventions",
         lambda k, **kw: pl.patch(k.model, k.x, [(Site("resid_pre", layers=1), kw["iv"](k))]),
         lambda k: dict(iv=lambda k: pl.Scale(0.5)),
         dict(iv=Arg([c(lambda k: pl.Noise(NAN)), c(lambda k: pl.Noise(-1)),
                      c(lambda k: pl.Noise("a")), c(lambda k: pl.Scale(NAN)),
                      c(lambda k: pl.Scale("a")), c(lambda k: pl.Add([NAN] * 16)),
                      c(lambda k: pl.Add("a")), c(lambda k: pl.Add(torch.ones(16).long())),
                      c(lambda k: pl.Mean([1, 2])), c(lambda k: pl.Mean(k.x[:0])),
                      c(lambda k: pl.Mean(k.x[0])), c(lambda k: pl.Resample(k.x, seed=1.5)),
                      c(lambda k: pl.Interchange("a")), c(lambda k: pl.Interchange(k.x[0])),
                      c(lambda k: pl.Interchange(k.x.float())),
                      c(lambda k: pl.Interchange(k.x[:1].repeat(3, 1, 1, 1))),
                      c(lambda k: (lambda act, hook: act))],
                     ("noise", "scale", "add", "direction", "mean", "resample", "interchange",
                      "reference", "source", "intervention")))),
    # ---- diagnostics ----
    Case("Reference.fit", lambda k, **kw: D.Reference.fit(k.model, kw.pop("x"), scorers=False,
                                                          progress=False, **kw),
         lambda k: dict(x=k.x, sites=[("resid_pre", 1)]),
         dict(x=Arg([lambda k: k.x[:0], lambda k: k.x * NAN, c(["a"]), lambda k: k.x[0]],
                    IMAGE_WORDS + ("reference.fit",)),
              sites=Arg([c(["foo"]), c([]), c([3]), c([("resid_pre", 9)])],
                        ("site", "hook", "layer")),
              max_samples=Arg([c(0), c(2.5)], ("max_samples",)),
              batch_size=Arg(BAD_COUNT, ("batch_size",)),
              seed=Arg([c(1.5)], ("seed",))),
         same=lambda a, b: True, examples=8),
    Case("ot_divergence",
         lambda k, **kw: D.ot_divergence(kw.pop("patched"), kw.pop("natural"), **kw),
         lambda k: dict(patched=torch.randn(8, 3, generator=torch.Generator().manual_seed(0)),
                        natural=torch.randn(30, 3, generator=torch.Generator().manual_seed(1))),
         dict(patched=Arg([c(torch.full((4, 3), NAN)), c(torch.zeros(0, 3)), c(torch.zeros(2, 2, 3)),
                           c(torch.zeros(4, 2)), c("a")], ("patched",)),
              natural=Arg([c(torch.zeros(5, 3)), c(torch.full((30, 3), NAN))], ("natural",)),
              blur=Arg([c(0), c(NAN), c(-1)], ("blur",)),
              max_samples=Arg([c(0), c(2.5)], ("max_samples",))),
         same=lambda a, b: a == b, examples=8),
    Case("NaturalScorer", lambda ctx, **kw: D.NaturalScorer(kw.pop("natural"), **kw),
         lambda k: dict(natural=torch.randn(60, 3, generator=torch.Generator().manual_seed(0)),
                        k=5),
         # a constant natural set is one point (accepted with any size); a varying one needs k + 1
         # vectors in each half
         dict(natural=Arg([c(torch.randn(5, 3, generator=torch.Generator().manual_seed(1))),
                           c(torch.full((60, 3), NAN))], ("natural",)),
              k=Arg([c(0), c(2.5)], ("k",)), var=Arg([c(0), c(1.5), c(NAN)], ("var",))),
         same=lambda a, b: True, examples=6),
    Case("dormant_units", lambda k, **kw: D.dormant_units(kw["acts"], kw["natural_max"]),
         lambda k: dict(acts=torch.ones(3, 4), natural_max=torch.zeros(4)),
         dict(natural_max=Arg([c(torch.zeros(5)), c(torch.zeros(2, 4))], ("natural_max",)),
              acts=Arg([c(torch.zeros(3, 5))], ("acts",))), same=lambda a, b: torch.equal(a, b),
         examples=4),
    Case("AttributionMap", lambda k, **kw: pl.AttributionMap(kw["values"], "m", kw["target"]),
         lambda k: dict(values=k.maps, target=[0, 1]),
         dict(values=Arg([c(torch.zeros(4, 4)), c("a")], ("values",)),
              target=Arg([c(1.5), c("a"), c([0, 1, 2])], ("target",))),
         same=lambda a, b: torch.equal(a.values, b.values), examples=6),
    Case("TokenLayout", lambda k, **kw: k.model.layout_for(kw["image_size"]).token(*kw["rc"]),
         lambda k: dict(image_size=(16, 16), rc=(1, 0)),
         dict(image_size=Arg([c((0, 0)), c("a"), c((16,)), c((16.0, 16))], ("image_size",)),
              rc=Arg([c((1.5, 0)), c((2, 0)), c((0, 1.0))], ("row", "patch"))),
         same=lambda a, b: a == b, examples=6),
]


CASES += CIRCUIT_CASES + DAS_CASES + SAE_CASES + ROTARY_CASES


# ---- the property ------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and a busy machine does not stall a second one."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ctx() -> Ctx:
    torch.manual_seed(0)
    model = pl.HookedViT(pl.ViTConfig(**CFG)).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, :8, 4:12] = True
    return Ctx(model, x, y, torch.randn(2, 2, 2, generator=g, dtype=torch.float64), masks)


def _state(model, x):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: getattr(model.cfg, k) for k in ("use_attn_result", "use_split_qkv_input")},
            model.training, model(x).detach(), sorted(model.hook_dict))


def _check_untouched(model, x, before) -> None:
    assert not any(h.fwd_hooks or h.bwd_hooks or h._forward_hooks or h._backward_hooks
                   for h in model.hook_dict.values()), "stray hooks"
    assert all(p.grad is None for p in model.parameters()), ".grad left on a parameter"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad switched off"
    params, flags, training, out, hooks = before
    now = _state(model, x)
    assert all(torch.equal(params[k], now[0][k]) for k in params), "parameters changed"
    assert now[1] == flags and now[2] == training, "config flags or mode changed"
    assert now[4] == hooks and not model.acts_to_saes, "hook points added (a stray SAE splice)"
    assert torch.equal(now[3], out), "model outputs changed"


_REFERENCE: dict[str, Any] = {}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_arguments(ctx, case):
    model = case.model(ctx)
    before = _state(model, ctx.x)

    @settings(max_examples=case.examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        arg = data.draw(st.sampled_from(sorted(case.args)), label="argument")
        spec = case.args[arg]
        valid = spec.ok is not None and data.draw(st.booleans(), label="valid")
        value = data.draw(spec.ok if valid else st.sampled_from(spec.bad), label="value")(ctx)
        kwargs = {**case.good(ctx), arg: value}
        try:
            out = case.call(ctx, **kwargs)
        except PatchlensError as e:
            msg = str(e).lower()
            assert not valid, f"{case.name}({arg}={value!r}) is valid but raised: {e}"
            assert any(n.lower() in msg for n in spec.needles), (
                f"{case.name}({arg}={value!r}): the message does not name the argument "
                f"({spec.needles}): {e}")
        else:
            assert valid, f"{case.name}({arg}={value!r}) was accepted"
            if case.name not in _REFERENCE:
                _REFERENCE[case.name] = case.call(ctx, **case.good(ctx))
            assert case.same(out, _REFERENCE[case.name]), f"{case.name}({arg}={value!r})"
        finally:
            _check_untouched(model, ctx.x, before)

    run()


def test_every_case_refuses_its_good_call_never(ctx):
    """The default calls themselves run (so each refusal above is caused by the drawn value)."""
    for case in CASES:
        case.call(ctx, **case.good(ctx))
    assert math.isfinite(float(pl.activation_patching(
        ctx.model, ctx.x, ctx.y, pl.metrics.logit(0), per="layer").values.sum()))


def test_named_refusals_of_the_merged_packages(ctx):
    """The refusals the property test found in the later packages, one by one (each was accepted
    or raised a raw Python error): a named argument in every message, nothing left behind."""
    k, metric = ctx, pl.metrics.logit(1)
    refused = [
        (lambda: pl.activation_patching(k.model, k.x, k.y, metric, site=""), "site must be"),
        (lambda: C.edge_scores(k.model, k.x, k.y, metric, memory_budget=0), "memory_budget"),
        (lambda: C.evaluate(k.model, circuit(k), k.x, k.y, metric, memory_budget="0GB"),
         "memory budget"),
        (lambda: C.evaluate(k.model, circuit(k), k.x, k.y, metric, batch_size=2.5), "batch_size"),
        (lambda: das.train_intervention(k.model, DAS_SITE, das.RotatedSubspace(2), _das_pairs(k),
                                        torch.tensor([1, 2, 3, 0]), seed=1.5), "seed"),
        (lambda: das.train_intervention(k.model, DAS_SITE, das.RotatedSubspace(2), _das_pairs(k),
                                        torch.tensor([1, 2, 3, 0]), eval_batch_size=0),
         "eval_batch_size"),
        (lambda: das.interchange_accuracy(k.model, DAS_SITE, trained(k), _das_pairs(k),
                                          torch.tensor([1, 2, 3, 0]), batch_size=2.5), "batch_size"),
        (lambda: k.model.add_sae(sae64(k), use_error_term="yes"), "use_error_term"),
        (lambda: k.model.add_sae(sae64(k), hook=3), "hook must be a hook name"),
        (lambda: k.model.add_sae("sae"), "str lacks decode"),
        (lambda: S.load(_sae_state(k), dtype="float64"), "dtype must be"),
        # found in older cases once the draws changed
        (lambda: pl.caap(k.model, k.x, blur_sigma="a"), "blur_sigma"),
        (lambda: pl.Recipe(Site("resid_pre", layers=0)), "list of \\(Site, intervention\\)"),
    ]
    before = _state(k.model, k.x)
    for call, match in refused:
        with pytest.raises(PatchlensError, match=match):
            call()
        _check_untouched(k.model, k.x, before)
    # the same calls with valid values run (float64 results)
    assert S.load(_sae_state(k), dtype=torch.float64).W_enc.dtype == torch.float64
    assert das.interchange_accuracy(k.model, DAS_SITE, trained(k), _das_pairs(k),
                                    torch.tensor([1, 2, 3, 0]), batch_size=3) in (0, .25, .5, .75, 1)
