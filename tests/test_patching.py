"""The patching engine and activation patching, against naive run_with_hooks loops."""

from __future__ import annotations

import pytest
import torch
from conftest import timm_vit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patchlens as pl
from patchlens import InputError, UnknownHookError
from patchlens.patching import (
    Add,
    Interchange,
    Mean,
    Noise,
    Recipe,
    Rect,
    Resample,
    Scale,
    Site,
    Variant,
    Zero,
    patch,
    run_variants,
)


@pytest.fixture(scope="module")
def model():
    return pl.HookedViT.from_timm(timm_vit(reg_tokens=1))


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)


def no_hooks(model) -> bool:
    return not any(h.fwd_hooks or h.bwd_hooks for h in model.hook_dict.values())


def naive(model, x, hook_name, edit):
    """Reference: one run_with_hooks call with a hand-written edit of one hook."""
    def fn(act, hook):
        act = act.clone()
        edit(act)
        return act
    with torch.no_grad():
        return model.run_with_hooks(x, fwd_hooks=[(hook_name, fn)])


# ---- the engine equals a naive loop ---------------------------------------------------------
@pytest.mark.parametrize("batch_size", [None, 2, 5])
def test_token_sweep_equals_naive_loop(model, pair, batch_size):
    clean, corr = pair
    iv = Interchange(clean)
    variants = [Variant([(Site("resid_pre", layers=l, tokens=t), iv)], (l, t))
                for l in range(3) for t in (0, 1, 5, 17)]
    res = run_variants(model, corr, variants, batch_size=batch_size, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    for i, v in enumerate(variants):
        l, t = v.label
        name = f"blocks.{l}.hook_resid_pre"
        ref = naive(model, corr, name, lambda a, t=t, name=name: a.__setitem__((slice(None), t), cache[name][:, t]))
        assert torch.allclose(res.outputs[i], ref, atol=1e-5), v.label
    assert no_hooks(model)


def test_prefix_reuse_matches_full_recompute(model, pair):
    clean, corr = pair
    iv = Interchange(clean)
    variants = [Variant([(Site("attn_out", layers=l, tokens="patches"), iv)], l) for l in range(3)]
    a = run_variants(model, corr, variants, progress=False)
    b = run_variants(model, corr, variants, progress=False, prefix_reuse=False)
    assert a.start_layers == [0, 1, 2] and b.start_layers == [-1, -1, -1]
    assert torch.allclose(a.outputs, b.outputs, atol=1e-5)


@pytest.mark.parametrize("name,site,edit", [
    ("zero_head", Site("z", layers=1, heads=2), lambda a: a.__setitem__((slice(None), slice(None), 2), 0)),
    ("scale_mlp", Site("mlp_post", layers=2, tokens=[3, 4]), lambda a: a.__setitem__((slice(None), [3, 4]), a[:, [3, 4]] * 0.5)),
    ("pattern_cls_query", Site("pattern", layers=0, heads=[1, 3], tokens="cls"),
     lambda a: a.__setitem__((slice(None), [1, 3], 0), 0.0)),
    ("rect", Site("resid_mid", layers=1, tokens=Rect(0, 2, 1, 3)), None),
])
def test_interventions_touch_only_their_selection(model, pair, name, site, edit):
    clean, corr = pair
    iv = {"zero_head": Zero(), "scale_mlp": Scale(0.5), "pattern_cls_query": Zero(),
          "rect": Zero()}[name]
    rs = site.resolve(model)[0]
    if edit is None:
        toks = rs.tokens.tolist()
        assert toks == [model.layout.token(r, c) for r in (0, 1) for c in (1, 2)]
        edit = lambda a: a.__setitem__((slice(None), toks), 0)  # noqa: E731
    out = patch(model, corr, [(site, iv)])
    ref = naive(model, corr, rs.hook, edit)
    assert torch.allclose(out, ref, atol=1e-5)
    # and the captured activation differs from the unpatched one only inside the selection
    res = run_variants(model, corr, [Variant([(site, iv)])], capture=[rs.hook], progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(corr, names_filter=rs.hook)
    diff = (res.captured[rs.hook][0] != cache[rs.hook])
    expected = torch.zeros_like(diff)
    edit_mask = torch.zeros_like(cache[rs.hook])
    edit(edit_mask)  # marks nothing for zero edits: use the selection instead
    sel = torch.zeros_like(diff)
    idx = [slice(None)] * sel.ndim
    if rs.tokens is not None:
        idx[rs.token_dim] = rs.tokens
    sel_t = sel.clone()
    if rs.heads is not None:
        hidx = [slice(None)] * sel.ndim
        hidx[rs.head_dim] = rs.heads
        tmp = torch.zeros_like(sel)
        tmp[tuple(hidx)] = True
        sel_t = tmp
    else:
        sel_t = torch.ones_like(sel)
    tmp2 = torch.zeros_like(sel)
    tmp2[tuple(idx)] = True
    expected = sel_t & tmp2
    assert not diff[~expected].any()


def test_mean_resample_noise_add(model, pair):
    clean, corr = pair
    ref_set = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, rc = model.run_with_cache(ref_set, names_filter="blocks.1.hook_resid_pre")
    mean = rc["blocks.1.hook_resid_pre"].mean(0)
    out = patch(model, corr, [(Site("resid_pre", layers=1, tokens=[2, 3]), Mean(ref_set))])
    ref = naive(model, corr, "blocks.1.hook_resid_pre", lambda a: a.__setitem__((slice(None), [2, 3]), mean[[2, 3]]))
    assert torch.allclose(out, ref, atol=1e-5)
    pooled = mean.mean(0)
    out = patch(model, corr, [(Site("resid_pre", layers=1, tokens="cls"), Mean(ref_set, per_token=False))])
    ref = naive(model, corr, "blocks.1.hook_resid_pre", lambda a: a.__setitem__((slice(None), 0), pooled))
    assert torch.allclose(out, ref, atol=1e-5)
    # resample: each target row takes some reference image's activation
    res = run_variants(model, corr, [Variant([(Site("resid_pre", layers=1, tokens=4), Resample(ref_set, seed=1))])],
                       capture=["blocks.1.hook_resid_pre"], progress=False)
    got = res.captured["blocks.1.hook_resid_pre"][0][:, 4]
    refs = rc["blocks.1.hook_resid_pre"][:, 4]
    assert all(any(torch.allclose(g, r) for r in refs) for g in got)
    # noise and add
    d = torch.randn(64)
    out = patch(model, corr, [(Site("resid_post", layers=0), Add(d, 2.0))])
    ref = naive(model, corr, "blocks.0.hook_resid_post", lambda a: a.add_(2.0 * d))
    assert torch.allclose(out, ref, atol=1e-5)
    n1 = patch(model, corr, [(Site("resid_post", layers=0), Noise(0.1, seed=4))])
    n2 = patch(model, corr, [(Site("resid_post", layers=0), Noise(0.1, seed=4))])
    assert torch.equal(n1, n2)


def test_custom_callable_and_recipe(model, pair):
    clean, corr = pair
    seen = []

    def flip(act, hook, site):
        seen.append((tuple(act.shape), hook.name, site.hook))
        return -act

    out = patch(model, corr, [(Site("resid_pre", layers=2, tokens=[1, 2, 3]), flip)])
    ref = naive(model, corr, "blocks.2.hook_resid_pre", lambda a: a.__setitem__((slice(None), [1, 2, 3]), -a[:, [1, 2, 3]]))
    assert torch.allclose(out, ref, atol=1e-5)
    assert seen == [((2, 3, 64), "blocks.2.hook_resid_pre", "resid_pre")]
    # a recipe of two pairs, swept over layers
    recipe = Recipe([(Site("resid_pre", tokens="cls"), Interchange(clean)),
                     (Site("mlp_out", tokens="cls"), Zero())], "cls swap + mlp ablation")
    res = recipe.sweep(model, corr, pl.metrics.logit(0), layers=[0, 2], progress=False)
    assert res.axes == ("layer",) and res.values.shape == (2,)
    with torch.no_grad():
        _, cc = model.run_with_cache(clean)
    for i, layer in enumerate([0, 2]):
        def both(act, hook, layer=layer):
            act = act.clone()
            if hook.name.endswith("resid_pre"):
                act[:, 0] = cc[hook.name][:, 0]
            else:
                act[:, 0] = 0
            return act
        with torch.no_grad():
            logits = model.run_with_hooks(corr, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", both),
                                                           (f"blocks.{layer}.hook_mlp_out", both)])
        assert torch.allclose(res.per_example[:, i], logits[:, 0], atol=1e-5)


def test_user_callable_that_raises_leaves_no_hooks(model, pair):
    _, corr = pair

    def boom(act, hook, site):
        raise ValueError("user bug")

    with pytest.raises(ValueError, match="user bug"):
        patch(model, corr, [(Site("resid_pre", layers=1), boom)])
    assert no_hooks(model)


def test_callable_wrong_shape(model, pair):
    with pytest.raises(InputError, match="shape it was given"):
        patch(model, pair[1], [(Site("resid_pre", layers=1, tokens=0), lambda a, h, s: a[:, :, :3])])
    assert no_hooks(model)


def test_patch_takes_engine_options(model, pair):
    """pl.patch(..., progress=False / batch_size=...) are passed to the engine (progress used
    to be passed twice)."""
    pairs = [(Site("resid_pre", layers=1, tokens=0), pl.Zero())]
    ref = patch(model, pair[1], pairs)
    assert torch.equal(patch(model, pair[1], pairs, progress=False), ref)
    assert torch.allclose(patch(model, pair[1], pairs, progress=False, batch_size=1), ref,
                          atol=1e-6)


def test_float64(pair):
    m64 = pl.HookedViT.from_timm(timm_vit().double())
    clean, corr = (t.double() for t in pair)
    r = pl.activation_patching(m64, clean, corr, pl.metrics.logit(1), layers=[1], tokens=[0, 3],
                               progress=False)
    assert r.values.dtype == torch.float64
    with torch.no_grad():
        _, cc = m64.run_with_cache(clean)
        ref = naive(m64, corr, "blocks.1.hook_resid_pre",
                    lambda a: a.__setitem__((slice(None), 3), cc["blocks.1.hook_resid_pre"][:, 3]))
    assert torch.allclose(r.per_example[:, 0, 1], ref[:, 1], atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda(model, pair):
    mc = pl.HookedViT.from_state_dict(model.cfg, model.state_dict()).cuda()
    clean, corr = (t.cuda() for t in pair)
    r = pl.activation_patching(mc, clean, corr, pl.metrics.logit(0), layers=[1], progress=False)
    r_cpu = pl.activation_patching(model, *pair, pl.metrics.logit(0), layers=[1], progress=False)
    assert torch.allclose(r.values.cpu(), r_cpu.values, atol=1e-4)


# ---- activation patching ------------------------------------------------------------------
def test_activation_patching_token_and_noising(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit_diff(0, 1)
    r = pl.activation_patching(model, clean, corr, metric, progress=False)
    assert r.axes == ("layer", "token") and r.values.shape == (3, 18)
    assert r.labels["token"][:3] == ["cls", "reg0", "r0c0"]
    # patching every token of resid_pre at layer 0 restores the clean metric exactly
    full = pl.activation_patching(model, clean, corr, metric, per="layer", progress=False)
    assert torch.allclose(full.per_example[:, 0], r.clean, atol=1e-5)
    noise = pl.activation_patching(model, clean, corr, metric, per="layer", direction="noising",
                                   progress=False)
    assert torch.allclose(noise.per_example[:, 0], r.corrupted, atol=1e-5)
    rec = pl.activation_patching(model, clean, corr, pl.metrics.recovery(metric), per="layer",
                                 progress=False)
    assert torch.allclose(rec.values[0], torch.tensor(1.0), atol=1e-4)


def test_activation_patching_heads_and_regions(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit(2)
    r = pl.activation_patching(model, clean, corr, metric, per="head", progress=False)
    assert r.axes == ("layer", "head") and r.values.shape == (3, 4)
    with torch.no_grad():
        _, cc = model.run_with_cache(clean)
    ref = naive(model, corr, "blocks.2.attn.hook_z",
                lambda a: a.__setitem__((slice(None), slice(None), 1), cc["blocks.2.attn.hook_z"][:, :, 1]))
    assert torch.allclose(r.per_example[:, 2, 1], ref[:, 2], atol=1e-5)
    ht = pl.activation_patching(model, clean, corr, metric, per="head_token", layers=[1],
                                tokens=[0, 5], progress=False)
    assert ht.values.shape == (1, 4, 2)
    top = torch.zeros(4, 4, dtype=torch.bool)
    top[:2] = True
    reg = pl.activation_patching(model, clean, corr, metric, per="region",
                                 regions={"top": top, "bottom": ~top}, progress=False)
    assert reg.axes == ("layer", "region") and reg.labels["region"] == ["top", "bottom"]
    toks = model.layout.mask_tokens(top)
    ref = naive(model, corr, "blocks.1.hook_resid_pre",
                lambda a: a.__setitem__((slice(None), toks), cc["blocks.1.hook_resid_pre"][:, toks]))
    assert torch.allclose(reg.per_example[:, 1, 0], ref[:, 2], atol=1e-5)


def test_patch_result_api(model, pair):
    r = pl.activation_patching(model, *pair, pl.metrics.logit(0), progress=False)
    df = r.to_pandas()
    assert len(df) == 3 * 18
    assert set(df.columns) == {"layer", "token", "value", "effect", "normalized_effect"}
    # values: patched metric; baseline: the unpatched (corrupted) run; effects the difference
    assert torch.allclose(r.baseline, r.corrupted)
    assert torch.allclose(r.effects, (r.per_example - r.corrupted[:, None, None]).mean(0))
    assert r.per_example.shape == (2, 3, 18)
    top = r.top(3)
    assert len(top) == 3 and abs(top.effect.iloc[0]) == pytest.approx(r.effects.abs().max().item())
    assert r.top(3, of="values").value.abs().iloc[0] == pytest.approx(r.values.abs().max().item())
    g = r.grid(1)
    assert g.shape == (4, 4) and g[0, 0] == r.sel(layer=1, token="r0c0")
    assert r.sel(layer=1, token="r0c0", of="values") == r.values[1, 2]
    assert torch.allclose(r.grid(1, image=1), r.effects_per_example[1, 1, 2:].reshape(4, 4))
    denom = r.clean - r.corrupted
    assert torch.allclose(r.normalized_effects,
                          (r.effects_per_example / denom[:, None, None]).mean(0))
    text = repr(r)
    assert "PatchResult[layer(3) x token(18)]" in text and "max |effect|" in text
    assert "patched − unpatched" not in text or "effects = values − baseline" in text
    fig = r.plot()
    assert len(fig.data) == 2  # prefix panel + patch panel
    fig = r.plot(kind="grid")  # one panel per layer (image + map), one slider step per image
    assert len(fig.data) == 6 and len(fig.layout.sliders[0].steps) == 2
    with pytest.raises(InputError):
        r.sel(layer=7)


def test_attribution_patching_is_exact_on_linear_model():
    cfg = pl.ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=2, d_mlp=64, image_size=32,
                       patch_size=8, n_classes=5, act_fn="identity", final_norm="none")
    torch.manual_seed(0)
    model = pl.HookedViT(cfg).double().eval()
    n = cfg.n_ctx
    linearise = [(lambda name: name.endswith("hook_pattern"),
                  lambda a, hook: torch.eye(n, dtype=a.dtype).expand_as(a).clone()),
                 (lambda name: name.endswith("hook_scale"), lambda a, hook: torch.ones_like(a))]
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    corr = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    metric = pl.metrics.logit_diff(1, 3)
    with model.hooks(fwd_hooks=linearise):
        for per, site in [("token", "resid_pre"), ("head", "z"), ("token", "mlp_out")]:
            exact = pl.activation_patching(model, clean, corr, metric, site=site, per=per, progress=False)
            approx = pl.activation_patching(model, clean, corr, metric, site=site, per=per,
                                            method="attribution")
            assert approx.values.shape == exact.values.shape
            assert torch.allclose(approx.per_example, exact.per_example, atol=1e-9)


# ---- property: patching the target with itself changes nothing ------------------------------
SITES = st.sampled_from(["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q",
                         "k", "v", "pattern", "mlp_post"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hook=SITES, layers=st.lists(st.integers(0, 2), min_size=1, max_size=3),
       tokens=st.one_of(st.just("all"), st.just("cls"), st.just("patches"),
                        st.lists(st.integers(0, 17), min_size=1, max_size=5),
                        st.tuples(st.integers(0, 3), st.integers(0, 3))),
       heads=st.one_of(st.none(), st.lists(st.integers(0, 3), min_size=1, max_size=4)))
def test_self_patch_is_identity(model, pair, hook, layers, tokens, heads):
    _, corr = pair
    if hook in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_post"):
        heads = None
    out = patch(model, corr, [(Site(hook, layers=layers, tokens=tokens, heads=heads), Interchange(corr))])
    with torch.no_grad():
        ref = model(corr)
    assert torch.allclose(out, ref, atol=1e-5)
    assert no_hooks(model)


# ---- bad input ---------------------------------------------------------------------------
def test_bad_inputs(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit(0)
    with pytest.raises(InputError, match="same shape"):
        pl.activation_patching(model, clean, corr[:1], metric)
    with pytest.raises(InputError, match="out of range"):
        pl.activation_patching(model, clean, corr, metric, layers=[5])
    with pytest.raises(InputError, match="out of range"):
        pl.activation_patching(model, clean, corr, metric, per="head", heads=[9])
    with pytest.raises(InputError, match="selects no token"):
        pl.activation_patching(model, clean, corr, metric, tokens=[])
    with pytest.raises(InputError, match="selects no token"):
        pl.activation_patching(model, clean, corr, metric,
                               tokens=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="one value per"):
        pl.activation_patching(model, clean, corr, lambda lg: lg)
    with pytest.raises(InputError, match="non-finite|not finite"):
        pl.activation_patching(model, clean, corr, lambda lg: lg[:, 0] / 0 * 0)
    with pytest.raises(UnknownHookError, match="resid_pre"):
        patch(model, corr, [(Site("resid_pr"), Zero())])
    with pytest.raises(InputError, match="no head axis"):
        Site("resid_pre", heads=1).resolve(model)
    with pytest.raises(InputError, match="memory budget"):
        run_variants(model, corr, [Variant([(Site("resid_pre", layers=0), Zero())])], memory_budget="lots")
    with pytest.raises(InputError, match="empty"):
        run_variants(model, corr, [])
    with pytest.raises(InputError, match="NaN"):
        patch(model, torch.full_like(corr, float("nan")), [(Site("resid_pre", layers=0), Zero())])
    with pytest.raises(InputError, match="source has batch"):
        patch(model, corr, [(Site("resid_pre", layers=0), Interchange(torch.randn(3, 3, 64, 64)))])
    with pytest.raises(InputError, match="Class index out of range"):
        pl.metrics.logit(99)(torch.randn(2, 7))
    assert no_hooks(model)


def test_metric_non_finite_during_sweep(model, pair):
    clean, corr = pair
    calls = {"n": 0}

    def flaky(logits):
        calls["n"] += 1
        out = logits[:, 0].clone()
        if calls["n"] > 2:
            out[0] = float("nan")
        return out

    with pytest.raises(InputError, match="non-finite"):
        pl.activation_patching(model, clean, corr, flaky, layers=[0], tokens=[0, 1], progress=False)
    assert no_hooks(model)


def test_memory_budget_sets_chunks(model, pair):
    from patchlens.patching.engine import bytes_per_row, parse_bytes

    assert parse_bytes("4GB") == 4 * 1024**3 and parse_bytes("512MB") == 512 * 1024**2
    per_row = bytes_per_row(model, 18, False)
    variants = [Variant([(Site("resid_pre", layers=1, tokens=t), Zero())], t) for t in range(10)]
    small = run_variants(model, pair[1], variants, memory_budget=per_row * 4, progress=False)
    big = run_variants(model, pair[1], variants, progress=False)
    assert torch.allclose(small.outputs, big.outputs, atol=1e-6)
