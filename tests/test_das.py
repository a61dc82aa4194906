"""Trainable interventions and distributed alignment search: checked against a model whose
residual stream carries one variable in a known 2-D subspace, against the formulas computed by
hand in float64, and for their use everywhere an intervention goes (patch, sweeps, dataset
runs, files)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import torch_threads

import patchlens as pl
from patchlens import HookedViT, InputError, Rect, Site, ViTConfig, das, run
from patchlens.das.experiment import das_sweep, divergence_figures
from patchlens.das.recipe import interchange_recipe
from patchlens.diagnostics import Reference, counterfactual_latent_loss
from patchlens.patching.engine import Variant, run_variants

K, D = 8, 32  # classes of the toy variable, residual width of the toy model


# ---- a model whose residual stream carries one variable in a known 2-D subspace ---------------
def toy_model(seed: int = 100, dtype=torch.float32) -> tuple[HookedViT, torch.Tensor]:
    """One 8x8 patch; the embedding writes ``r (cos t, sin t)`` (pixels 0 and 1 of the first
    row, channels 0 and 1) into ``U[:, :2]`` of a random orthogonal ``U``, and nothing else; the
    blocks add nothing (zero output projections); the head reads the angle (class ``c`` at
    ``t = 2 pi c / K``). Returns the model and ``U[:, :2]``."""
    g = torch.Generator().manual_seed(seed)
    cfg = ViTConfig(d_model=D, d_head=8, n_heads=4, n_layers=2, d_mlp=32, image_size=(8, 8),
                    patch_size=(8, 8), n_classes=K, pooling="avg", final_norm="none")
    model = HookedViT(cfg).eval()
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    u = q[:, :2]
    ang = 2 * math.pi * torch.arange(K, dtype=torch.float64) / K
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for blk in model.blocks:
            blk.ln1.w.fill_(1)
            blk.ln2.w.fill_(1)
            blk.attn.qkv.weight.copy_(0.1 * torch.randn(3 * D, D, generator=g))
            blk.mlp.fc1.weight.copy_(0.1 * torch.randn(32, D, generator=g))
        model.embed.proj.weight[:, 0, 0, 0] = u[:, 0].float()
        model.embed.proj.weight[:, 1, 0, 0] = u[:, 1].float()
        model.head.weight.copy_((3.0 * torch.stack([ang.cos(), ang.sin()], 1) @ u.T).float())
    return model.to(dtype), u


def toy_images(labels: torch.Tensor, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(len(labels), 3, 8, 8, generator=g, dtype=dtype)
    ang = 2 * math.pi * labels.to(dtype) / K
    x[:, 0, 0, 0], x[:, 1, 0, 0] = 2 * ang.cos(), 2 * ang.sin()
    return x


def toy_pairs(n: int, seed: int, dtype=torch.float32) -> das.CounterfactualPairs:
    g = torch.Generator().manual_seed(seed)
    yb, ys = torch.randint(0, K, (n,), generator=g), torch.randint(0, K, (n,), generator=g)
    base, source = toy_images(yb, g, dtype), toy_images(ys, g, dtype)
    cf = base.clone()
    cf[:, :2, 0, 0] = source[:, :2, 0, 0]   # the base input with the source's variable
    return das.CounterfactualPairs(base, source, ys, cf, "angle")


TOY_SITE = Site("resid_pre", layers=1, tokens="patches")


def principal_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(a.double().T @ b.double())
    return torch.rad2deg(torch.arccos(s.clamp(max=1.0)))


def no_stray_hooks(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (a shared machine's thread pool costs more than the
    arithmetic), and runs comparable bit for bit (the determinism test)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def toy():
    return toy_model()


@pytest.mark.parametrize("make", [lambda: das.RotatedSubspace(2, seed=3),
                                  lambda: das.LowRankRotatedSubspace(2, seed=3),
                                  lambda: das.BoundlessRotatedSubspace(8, seed=3)],
                         ids=["rotated", "low-rank", "boundless"])
def test_das_recovers_the_known_subspace(toy, make):
    model, u = toy
    train, test = toy_pairs(384, seed=1), toy_pairs(256, seed=2)
    iv = make()
    res = das.train_intervention(model, TOY_SITE, iv, train, steps=300, eval_every=50, lr=2e-2,
                                 patience=None, target_iia=None, progress=False)
    assert res.stopped == "steps" and res.steps == 300
    assert iv.n_interchanged() == 2       # the boundless variant learns the width too
    angles = principal_angles_deg(iv.basis(), u)
    assert angles.max() < 1.0, angles
    assert das.interchange_accuracy(model, TOY_SITE, iv, test) >= 0.99
    assert no_stray_hooks(model)


def test_a_random_rotation_stays_near_chance(toy):
    model, u = toy
    test = toy_pairs(512, seed=2)
    accs = [das.interchange_accuracy(model, TOY_SITE, das.RotatedSubspace(2, D, seed=s), test)
            for s in range(3)]
    assert max(accs) < 0.3, accs   # chance: 1/8 (the base's class is kept)
    assert all(principal_angles_deg(das.RotatedSubspace(2, D, seed=s).basis(), u).min() > 20
               for s in range(3))


def test_early_stopping_and_result(toy):
    model, _ = toy
    res = das.train_intervention(model, TOY_SITE, das.RotatedSubspace(2, seed=3),
                                 toy_pairs(256, seed=1), steps=400, eval_every=10,
                                 progress=False)
    assert res.stopped == "target" and res.iia == 1.0 and res.steps < 400
    assert res.history[0]["step"] == 0 and res.history[-1]["iia"] == 1.0
    assert res.n_train + res.n_held_out == 256
    assert {"step", "loss", "ce", "iia"} <= set(res.to_pandas().columns)
    assert res.plot().data
    assert "IIA 1.000" in repr(res)
    assert res.intervention.site is TOY_SITE and res.intervention.meta["iia"] == 1.0


def test_training_is_deterministic(toy):
    model, _ = toy
    assert torch.get_num_threads() == 1   # pinned by the `one_thread` fixture
    runs = [das.train_intervention(model, TOY_SITE, das.RotatedSubspace(2, seed=3),
                                   toy_pairs(128, seed=1), steps=30, eval_every=10,
                                   progress=False, target_iia=None, seed=s)
            for s in (7, 7, 8)]
    a, b, c = (r.intervention.rotation for r in runs)
    assert torch.equal(a, b)
    assert [h["loss"] for h in runs[0].history[1:]] == [h["loss"] for h in runs[1].history[1:]]
    assert not torch.equal(a, c)   # another seed, another order of the pairs


# ---- the forward pass, by hand, in float64 --------------------------------------------------
@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    cfg = ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=3, d_mlp=64, image_size=(32, 32),
                    patch_size=(8, 8), n_classes=5, n_registers=2)
    return HookedViT(cfg).eval().to(torch.float64)


def _hand_patch(model, base, source, hook, tokens, fn, heads=None):
    """Plain TransformerLens hooks: cache the source, replace the selected vectors by
    ``fn(base_vectors, source_vectors)``."""
    _, cache = model.run_with_cache(source, names_filter=[hook])
    src = cache[hook]

    def edit(act, hook):
        act = act.clone()
        sel = (slice(None), tokens) if heads is None else (slice(None), tokens[:, None], heads)
        act[sel] = fn(act[sel], src[sel])
        return act

    return model.run_with_hooks(base, fwd_hooks=[(hook, edit)])


@pytest.mark.parametrize("tokens,idx", [(Rect(0, 2, 1, 3), [4, 5, 8, 9]), ("cls", [0]),
                                        ("registers", [1, 2]), ("patches", list(range(3, 19)))])
def test_forward_is_rotate_interchange_rotate_back(model64, tokens, idx):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    source = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    site = Site("resid_mid", layers=1, tokens=tokens)
    idx = torch.tensor(idx)
    k = 5
    f64 = torch.float64
    rot = das.RotatedSubspace(k, 32, seed=4, dtype=f64)
    low = das.LowRankRotatedSubspace(k, 32, seed=4, dtype=f64)
    bnd = das.BoundlessRotatedSubspace(k, 32, seed=4, temperature=(2.0, 0.5), dtype=f64)
    with torch.no_grad():
        bnd.boundary.fill_(-0.3)
    R, Q, W = rot.rotation.detach(), low.rotate().detach(), bnd.rotation.detach()
    M = torch.tensor([1.0] * k + [0.0] * (32 - k), dtype=torch.float64)
    w = 32 / (1 + math.exp(0.3))
    m = torch.tensor([1 / (1 + math.exp(-(w - i - 0.5) / 2.0)) for i in range(32)],
                     dtype=torch.float64)
    hand = {
        "rot": lambda hb, hs: ((1 - M) * (hb @ R.T) + M * (hs @ R.T)) @ R,
        "low": lambda hb, hs: hb + (hs - hb) @ Q @ Q.T,
        "bnd": lambda hb, hs: ((1 - m) * (hb @ W.T) + m * (hs @ W.T)) @ W,
    }
    with torch.no_grad():
        for name, iv in (("rot", rot), ("low", low), ("bnd", bnd)):
            want = _hand_patch(model64, base, source, "blocks.1.hook_resid_mid", idx, hand[name])
            got = pl.patch(model64, base, [(site, iv.with_source(source))])
            assert got.dtype == torch.float64
            assert torch.allclose(got, want, atol=1e-10, rtol=0), name
            # the same with the source's activations given instead of its images
            _, cache = model64.run_with_cache(source, names_filter=["blocks.1.hook_resid_mid"])
            stored = pl.patch(model64, base, [(site, iv.with_source(dict(cache.items())))])
            assert torch.allclose(stored, want, atol=1e-10, rtol=0), name
    assert torch.allclose(R @ R.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q.T @ Q, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert no_stray_hooks(model64)


def test_trained_forward_is_rotate_interchange_rotate_back(model64):
    """After training (parameters moved away from their initialisation) the forward still equals
    the map written out by hand from the learned parameters, and `basis()` (what the
    principal-angle check measures) is the span of the interchanged rotated coordinates."""
    g = torch.Generator().manual_seed(6)
    f64 = torch.float64
    base, source = (torch.randn(24, 3, 32, 32, generator=g, dtype=f64) for _ in range(2))
    labels = torch.randint(0, 5, (24,), generator=g)
    hook, idx = "blocks.1.hook_resid_post", torch.tensor([0, 3, 4, 10])
    site = Site("resid_post", layers=1, tokens=[0, 3, 4, 10])
    k = 3
    ivs = {"rot": das.RotatedSubspace(k, seed=2, dtype=f64),
           "low": das.LowRankRotatedSubspace(k, seed=2, dtype=f64),
           "bnd": das.BoundlessRotatedSubspace(k, seed=2, dtype=f64, temperature=(4.0, 1.0))}
    for name, iv in ivs.items():
        init = {n: v.detach().clone() for n, v in iv.build(32).state_dict().items()}
        res = das.train_intervention(model64, site, iv, (base, source), labels, steps=6,
                                     batch_size=8, eval_every=3, lr=5e-2, patience=None,
                                     target_iia=None, progress=False)
        assert res.steps == 6
        moved = {n: float((v - init[n]).abs().max()) for n, v in iv.state_dict().items()
                 if n in init and v.is_floating_point() and n != "temperature"}
        assert max(moved.values()) > 1e-4, moved   # trained: not the initialisation any more
        with torch.no_grad():
            if name == "low":
                Q = iv.rotate().detach()
                assert torch.allclose(Q.T @ Q, torch.eye(k, dtype=f64), atol=1e-12)
                assert torch.equal(iv.basis(), Q)

                def hand(hb, hs, Q=Q):
                    return hb + (hs - hb) @ Q @ Q.T
            else:
                R = iv.rotation.detach()
                assert torch.allclose(R @ R.T, torch.eye(32, dtype=f64), atol=1e-12)
                if name == "rot":
                    M = torch.tensor([1.0] * k + [0.0] * (32 - k), dtype=f64)
                else:
                    w = 32 * float(torch.sigmoid(iv.boundary))
                    T = float(iv.temperature)
                    M = torch.tensor([1 / (1 + math.exp(-(w - i - 0.5) / T)) for i in range(32)],
                                     dtype=f64)
                assert torch.equal(iv.basis(), R[: iv.n_interchanged()].T)
                assert iv.n_interchanged() == int((M > 0.5).sum())

                def hand(hb, hs, R=R, M=M):
                    return ((1 - M) * (hb @ R.T) + M * (hs @ R.T)) @ R
            want = _hand_patch(model64, base[:4], source[:4], hook, idx, hand)
            got = pl.patch(model64, base[:4], [(site, iv.with_source(source[:4]))])
        assert torch.allclose(got, want, atol=1e-10, rtol=0), name
    assert no_stray_hooks(model64)
    assert all(p.grad is None for p in model64.parameters())


def test_forward_per_head_at_z(model64):
    """At a per-head hook the rotation acts on each selected head's d_head vector."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    source = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    iv = das.LowRankRotatedSubspace(3, 8, seed=1, dtype=torch.float64)
    Q = iv.rotate().detach()
    site = Site("z", layers=2, tokens=[0, 5], heads=[1, 3])
    with torch.no_grad():
        want = _hand_patch(model64, base, source, "blocks.2.attn.hook_z", torch.tensor([0, 5]),
                           lambda hb, hs: hb + (hs - hb) @ Q @ Q.T, heads=torch.tensor([1, 3]))
        got = pl.patch(model64, base, [(site, iv.with_source(source))])
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


# ---- the counterfactual latent loss ----------------------------------------------------------
def test_cl_loss_gradient_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, 16, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(counterfactual_latent_loss(h, c), h)
    hd = h.detach()
    nh, nc = hd.norm(dim=-1, keepdim=True), c.norm(dim=-1, keepdim=True)
    dot = (hd * c).sum(-1, keepdim=True)
    rows = hd.shape[0] * hd.shape[1]
    want = 2 * (hd - c) / hd.numel() - (c / (nh * nc) - dot * hd / (nh**3 * nc)) / rows
    assert torch.allclose(grad, want, atol=1e-13, rtol=0)


def test_cl_gradient_through_the_engine_matches_autograd_by_hand(model64):
    """The training path (a differentiable engine run, patched vectors captured on the graph)
    gives the same CL loss and gradient w.r.t. the rotation as the formula composed by hand."""
    g = torch.Generator().manual_seed(3)
    base, source, cf = (torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
                        for _ in range(3))
    hook, toks = "blocks.2.hook_resid_pre", torch.tensor([0, 7, 8])
    site = Site("resid_pre", layers=2, tokens=[0, 7, 8])
    iv = das.RotatedSubspace(4, 32, seed=5, dtype=torch.float64)
    res = run_variants(model64, base, [Variant([(site, iv.with_source(source))])], grad=True,
                       capture=[hook], progress=False)
    h_int = res.captured[hook][0][:, toks]
    nat = pl.patching.engine.natural_activations(model64, torch.cat([base, source, cf]), [hook])
    hb, hs, hc = nat[hook][:, toks].split(3)
    loss = counterfactual_latent_loss(h_int, hc)
    params = [p for p in iv.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    R = iv.rotation
    M = torch.tensor([1.0] * 4 + [0.0] * 28, dtype=torch.float64)
    by_hand = ((1 - M) * (hb @ R.T) + M * (hs @ R.T)) @ R
    mse = ((by_hand - hc) ** 2).mean()
    cos = (by_hand * hc).sum(-1) / (by_hand.norm(dim=-1) * hc.norm(dim=-1))
    want_loss = mse + 1 - cos.mean()
    want = torch.autograd.grad(want_loss, params)
    assert abs(float(loss.detach()) - float(want_loss.detach())) < 1e-12
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    assert all(p.grad is None for p in model64.parameters())


def test_cl_training_runs_and_lowers_the_cl_loss(toy):
    model, _ = toy
    train = toy_pairs(256, seed=1)
    res = das.train_intervention(model, TOY_SITE, das.RotatedSubspace(4, seed=2), train,
                                 cl_weight=1.0, steps=60, eval_every=20, target_iia=None,
                                 patience=None, progress=False)
    cls = [h["cl"] for h in res.history[1:]]
    assert cls[-1] < cls[0] and all(math.isfinite(v) for v in cls)


# ---- everywhere an intervention goes ---------------------------------------------------------
def test_save_load_sweep_and_dataset_run(toy, tmp_path):
    model, _ = toy
    iv = das.RotatedSubspace(2, seed=3)
    das.train_intervention(model, TOY_SITE, iv, toy_pairs(256, seed=1), steps=100,
                           eval_every=25, progress=False)
    path = tmp_path / "angle.safetensors"
    iv.save(path)
    back = das.load_intervention(path)
    assert type(back) is das.RotatedSubspace and torch.equal(back.rotation, iv.rotation)
    assert repr(back.site) == repr(TOY_SITE)
    assert back.meta["iia"] == iv.meta["iia"]
    test = toy_pairs(64, seed=4)
    with torch.no_grad():
        a = pl.patch(model, test.base, [(TOY_SITE, iv.with_source(test.source))])
        b = pl.patch(model, test.base, [(back.site, back.with_source(test.source))])
    assert torch.equal(a, b)
    # a sweep (layers x tokens) runs it like any other intervention
    recipe = pl.Recipe([(Site("resid_pre", layers=1), back.with_source(test.source))])
    metric = pl.metrics.logit(test.labels)
    swept = recipe.sweep(model, test.base, metric, layers=[0, 1], tokens=["patches", "cls"],
                         progress=False)
    assert swept.values.shape == (2, 2)
    assert torch.allclose(swept.per_example[:, 1, 0], metric(a), atol=1e-5)  # [batch, *axes]
    # a dataset run, the intervention loaded from its file by the recipe
    items = [{"base": test.base[i], "source": test.source[i], "labels": int(test.labels[i])}
             for i in range(len(test))]
    run.dataset(interchange_recipe(path), items, tmp_path / "run", model=model,
                batch_size=16, shard_size=32, verbose=False, progress=False)
    out = run.load_results(tmp_path / "run")
    assert torch.allclose(out["logits"], a, atol=1e-5)
    assert float(out["correct"].float().mean()) == das.interchange_accuracy(model, TOY_SITE, iv, test)
    # resuming that directory with other parameters would mix two runs: refused
    other = interchange_recipe(das.RotatedSubspace(2, D, seed=9), site=TOY_SITE)
    with pytest.raises(InputError, match="different run"):
        run.dataset(other, items, tmp_path / "run", model=model, batch_size=16, shard_size=32,
                    verbose=False, progress=False)


# ---- bad inputs ----------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(toy, model64, tmp_path):
    model, _ = toy
    p = toy_pairs(16, seed=1)
    train = das.train_intervention

    def fails(match, fn, *a, **kw):
        with pytest.raises(InputError, match=match):
            fn(*a, **kw)
        assert no_stray_hooks(model)

    fails("wider than the site", das.RotatedSubspace, 40, D)
    fails("wider than the site", train, model, TOY_SITE, das.RotatedSubspace(33), p, progress=False)
    fails("different sizes", train, model, TOY_SITE, das.RotatedSubspace(2),
          (p.base, p.source[:8]), p.labels, progress=False)
    fails("outside the model's classes", train, model, TOY_SITE, das.RotatedSubspace(2),
          p.pairs, p.labels + K, progress=False)
    fails("outside the model's classes", train, model, TOY_SITE, das.RotatedSubspace(2),
          p.pairs, p.labels - K, progress=False)
    fails("one per pair", train, model, TOY_SITE, das.RotatedSubspace(2), p.pairs,
          p.labels[:3], progress=False)
    fails("integer class", train, model, TOY_SITE, das.RotatedSubspace(2), p.pairs,
          p.labels.float(), progress=False)
    fails("no token axis", train, model, Site("pooled", tokens="cls"), das.RotatedSubspace(2),
          p, progress=False)
    fails("2 hook points", train, model, Site("resid_pre", layers=[0, 1]),
          das.RotatedSubspace(2), p, progress=False)
    fails("counterfactual inputs", train, model, TOY_SITE, das.RotatedSubspace(2), p.pairs,
          p.labels, cl_weight=1.0, progress=False)
    fails("cl_weight", train, model, TOY_SITE, das.RotatedSubspace(2), p, cl_weight=-1,
          progress=False)
    fails("d_subspace", das.RotatedSubspace, 0)
    fails("no parameters yet", pl.patch, model, p.base,
          [(TOY_SITE, das.RotatedSubspace(2, source=p.source))])
    fails("no source", pl.patch, model, p.base, [(TOY_SITE, das.RotatedSubspace(2, D))])
    fails("width 32", pl.patch, model64, torch.zeros(1, 3, 32, 32, dtype=torch.float64),
          [(Site("z", layers=0), das.RotatedSubspace(2, D, dtype=torch.float64).with_source(
              torch.zeros(1, 3, 32, 32, dtype=torch.float64)))])
    fails("attention scores or patterns", pl.patch, model, p.base,
          [(Site("pattern", layers=1), das.RotatedSubspace(1, 2, source=p.source))])
    fails("source has batch 3", pl.patch, model, p.base,
          [(TOY_SITE, das.RotatedSubspace(2, D, source=p.source[:3]))])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    fails("not a patchlens intervention", das.load_intervention, tmp_path / "plain.safetensors")
    fails("No intervention file", das.load_intervention, tmp_path / "missing.safetensors")
    fails("no site", interchange_recipe, das.RotatedSubspace(2, D))


# ---- the experiment --------------------------------------------------------------------------
def test_das_sweep_table_and_figure(toy):
    model, _ = toy
    natural = toy_pairs(200, seed=9).base
    ref = Reference.fit(model, natural, sites=[("resid_pre", 1)], progress=False)
    sweep = das_sweep(model, toy_pairs(192, seed=1), toy_pairs(96, seed=2), layers=[1],
                      tokens={"patches": "patches"}, cl_weights=[0.0, 1.0], reference=ref,
                      intervention=lambda: das.RotatedSubspace(2, seed=3), steps=60,
                      eval_every=20, progress=False)
    df = sweep.to_pandas()
    assert list(df["cl_weight"]) == [0.0, 1.0]
    assert (df["iia"] > 0.9).all()
    assert df["sinkhorn_ratio"].notna().all() and df["verdict"].str.len().gt(0).all()
    md = sweep.to_markdown()
    assert md.startswith("| layer | tokens | cl_weight | iia |") and md.count("\n") == 3
    assert len(sweep.plot().data) >= 2
    assert set(divergence_figures(object())) >= {"sinkhorn_ratio", "verdict"}


# ---- the zoo's variables -------------------------------------------------------------------
def test_zoo_counterfactual_pairs():
    model = pl.HookedViT.from_pretrained("clutter-digits-vit")
    d = das.digit_pairs(model, 6, seed=0)
    assert len(d) == 6 and d.variable == "digit"
    assert (d.meta["base_values"] != d.labels).all()
    with torch.inference_mode():
        assert (model(d.counterfactual).argmax(-1) == d.labels).all()
        assert (model(d.base).argmax(-1) == d.meta["base_values"]).all()
    shortcut = pl.HookedViT.from_pretrained("clutter-digits-shortcut-vit")
    mk = das.marker_pairs(shortcut, 6, seed=0)
    diff = (mk.counterfactual - mk.base).abs().sum(1) > 0
    assert diff[:, 8:, :].sum() == 0 and diff[:, :, 8:].sum() == 0   # only the marker changed
    with torch.inference_mode():
        assert (shortcut(mk.counterfactual).argmax(-1) == mk.labels).all()
    sub = mk[:2]
    assert len(sub) == 2 and sub.meta["base_values"].shape == (2,)
    with pytest.raises(InputError, match="passed the filters"):
        das.digit_pairs(model, 5, seed=0, max_rounds=0)


def test_generate_with_other_scans_changes_only_the_digit():
    from patchlens.zoo.clutter_digits import generate

    a, b = generate(6, seed=1), generate(6, seed=2)
    c = generate(6, seed=1, scan_ids=b.scan_ids)
    assert torch.equal(c.labels, b.labels) and torch.equal(c.scan_ids, b.scan_ids)
    outside = ~(a.masks | c.masks)
    assert torch.equal((a.images - c.images).abs().sum(1)[outside], torch.zeros(int(outside.sum())))
    with pytest.raises(ValueError, match="scan_ids"):
        generate(6, seed=1, scan_ids=[0, 1])
    with pytest.raises(ValueError, match="scan_ids"):
        generate(2, seed=1, scan_ids=[0, 5000])


def test_engine_prefix_and_captures_on_the_graph(model64):
    """What training relies on: ``run_variants(prefix=...)`` equals recomputing the prefix;
    with ``grad=True`` the captured site carries the graph; `natural_activations` equals the
    plain cache."""
    from patchlens.patching.engine import natural_activations

    g = torch.Generator().manual_seed(5)
    base, source = (torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
    hook = "blocks.2.hook_resid_pre"
    nat = natural_activations(model64, base, [hook, "blocks.1.attn.hook_z"], batch_size=1)
    _, cache = model64.run_with_cache(base, names_filter=[hook, "blocks.1.attn.hook_z"])
    assert all(torch.allclose(nat[h], cache[h], atol=1e-12, rtol=0) for h in nat)
    iv = das.RotatedSubspace(3, 32, seed=1, dtype=torch.float64).with_source(source)
    variant = [Variant([(Site("resid_pre", layers=2, tokens="cls"), iv)])]
    plain = run_variants(model64, base, variant, progress=False)
    reused = run_variants(model64, base, variant, progress=False, prefix={2: nat[hook]},
                          grad=True, capture=[hook])
    assert torch.allclose(plain.outputs, reused.outputs, atol=1e-12, rtol=0)
    assert reused.captured[hook].grad_fn is not None and reused.outputs.grad_fn is not None
    with pytest.raises(InputError, match="residual stream entering block 2"):
        run_variants(model64, base, variant, progress=False, prefix={2: nat[hook][:1]})
    with pytest.raises(InputError, match="block indices"):
        run_variants(model64, base, variant, progress=False, prefix={7: nat[hook]})
    assert no_stray_hooks(model64)
