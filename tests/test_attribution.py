"""Baselines (shapes, hand computations) and metrics on hand-computed tiny cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import perturb_

from patchlens import AttributionMap, HookedViT, InputError
from patchlens.attribution import METHODS, attention_rollout, chefer, class_attention
from patchlens.attribution import metrics as am

FAST = {"rise": dict(n_masks=24, batch_size=8), "integrated_gradients": dict(n_steps=4)}


@pytest.fixture(scope="module")
def model(tiny_cfg) -> HookedViT:
    torch.manual_seed(0)
    return perturb_(HookedViT(tiny_cfg).eval(), std=0.2)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _no_hooks(model):
    return all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_shape_and_finite(model, images, name):
    amap = METHODS[name](model, images, **FAST.get(name, {}))
    assert isinstance(amap, AttributionMap) and amap.method in (name, "caap")
    assert amap.values.shape == (2, 4, 4)
    assert torch.isfinite(amap.values).all()
    assert amap.images.shape == (2, 3, 32, 32) and amap.target.shape == (2,)
    assert _no_hooks(model)
    assert all(p.grad is None for p in model.parameters())
    explicit = METHODS[name](model, images, target=[1, 2], **FAST.get(name, {}))
    assert explicit.target.tolist() == [1, 2]


def _patterns(model, x):
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(x, names_filter=names)
    return [cache[n] for n in names]


def test_rollout_by_hand(model, images):
    pats = _patterns(model, images)
    want = torch.zeros(2, 16)
    for b in range(2):
        v = torch.zeros(17)
        v[0] = 1.0  # class-token row, propagated from the top layer down
        for a in reversed(pats):
            m = 0.5 * a[b].mean(0) + 0.5 * torch.eye(17)
            v = v @ (m / m.sum(-1, keepdim=True))
        want[b] = v[1:]
    got = attention_rollout(model, images).values
    torch.testing.assert_close(got, want.view(2, 4, 4), atol=1e-6, rtol=1e-5)


def test_class_attention_by_hand(model, images):
    last = _patterns(model, images)[-1]
    torch.testing.assert_close(class_attention(model, images).values,
                               last.mean(1)[:, 0, 1:].reshape(2, 4, 4))


def test_chefer_by_hand(model, images):
    tgt = torch.tensor([3, 1])
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    kept = {}

    def keep(a, hook):
        kept[hook.name] = a
        return a

    logits = model.run_with_hooks(images, fwd_hooks=[(n, keep) for n in names])
    score = logits[0, 3] + logits[1, 1]
    grads = torch.autograd.grad(score, [kept[n] for n in names])
    model.zero_grad(set_to_none=True)
    want = torch.zeros(2, 16)
    for b in range(2):
        r = torch.eye(17)
        for a, g in zip([kept[n] for n in names], grads):
            r = r + (g[b] * a[b].detach()).clamp(min=0).mean(0) @ r
        want[b] = r[0, 1:]
    torch.testing.assert_close(chefer(model, images, target=tgt).values, want.view(2, 4, 4),
                               atol=1e-6, rtol=1e-5)


def test_errors_leave_no_hooks(model, images):
    for name in ("chefer", "gradcam", "rollout"):
        with pytest.raises(InputError):
            METHODS[name](model, images, target=9)
        assert _no_hooks(model)
    with pytest.raises(InputError, match="layer"):
        METHODS["gradcam"](model, images, layer=7)
    assert _no_hooks(model)


# ---- metrics on a fake model whose probability is a known function of the visible patches ----
W = torch.tensor([0.4, 0.3, 0.2, 0.1])  # weight of each patch of a 2x2 grid (raster order)


class Fake(torch.nn.Module):
    """p(class 0) = 0.1 + 0.8 * (weight of the patches that are not all zero)."""

    cfg = SimpleNamespace(patch_size=(4, 4), data_mean=(0.5,) * 3, data_std=(0.5,) * 3)

    def forward(self, x):
        visible = (x.abs().sum(1).unfold(1, 4, 4).unfold(2, 4, 4).sum((-1, -2)) > 0).float()
        q = 0.1 + 0.8 * (visible.flatten(1) * W).sum(1)
        return torch.stack([q.log(), (1 - q).log()], 1)


def q(frac):
    return 0.1 + 0.8 * frac


def test_deletion_insertion_hand():
    x = torch.ones(1, 3, 8, 8)
    maps = W.view(1, 2, 2)  # true relevance: perfect ranking
    auc, curve = am.deletion(Fake(), x, maps, target=0, return_curve=True)
    vis = [1.0, 0.6, 0.3, 0.1, 0.0]
    torch.testing.assert_close(curve[0], torch.tensor([q(v) for v in vis]))
    want = sum(0.25 * (q(a) + q(b)) / 2 for a, b in zip(vis, vis[1:]))
    assert math.isclose(auc.item(), want, rel_tol=1e-5)
    auc_i, curve_i = am.insertion(Fake(), x, maps, target=0, start=torch.zeros_like(x),
                                  return_curve=True)
    shown = [0.0, 0.4, 0.7, 0.9, 1.0]
    torch.testing.assert_close(curve_i[0], torch.tensor([q(v) for v in shown]))
    # the reversed ranking is worse on both
    assert am.deletion(Fake(), x, -maps, target=0) > auc
    assert am.insertion(Fake(), x, -maps, target=0, start=torch.zeros_like(x)) < auc_i
    # step=2: counts 0, 2, 4
    _, c2 = am.deletion(Fake(), x, maps, target=0, step=2, return_curve=True)
    torch.testing.assert_close(c2[0], torch.tensor([q(1.0), q(0.3), q(0.0)]))


def test_insertion_blurred_start_and_batching():
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(3, 2, 2, generator=torch.Generator().manual_seed(1))
    a = am.insertion(Fake(), x, maps, target=[0, 0, 1], batch_size=2)
    b = torch.stack([am.insertion(Fake(), x[i:i + 1], maps[i:i + 1], target=t, batch_size=64)[0]
                     for i, t in enumerate([0, 0, 1])])
    torch.testing.assert_close(a, b)


def test_perturbation_hand():
    x = torch.ones(1, 3, 8, 8)
    maps = W.view(1, 2, 2)
    pos = am.perturbation(Fake(), x, maps, target=0, fractions=(0.0, 0.5))
    neg = am.perturbation(Fake(), x, maps, target=0, mode="negative", fractions=(0.0, 0.5))
    assert math.isclose(pos.item(), 0.5 * (q(1.0) + q(0.3)) / 2, rel_tol=1e-5)
    assert math.isclose(neg.item(), 0.5 * (q(1.0) + q(0.7)) / 2, rel_tol=1e-5)
    with pytest.raises(InputError, match="mode"):
        am.perturbation(Fake(), x, maps, target=0, mode="both")


def test_pointing_game_hand():
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.2]]])  # max at patch (0, 1): centre (y, x) = (4, 12)
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 2, 10] = True  # pixel square [2, 3) x [10, 11): sqrt(2) px away
    assert am.pointing_game(maps, mask, tolerance=1.5).item() == 1.0
    assert am.pointing_game(maps, mask, tolerance=1.0).item() == 0.0
    far = torch.zeros(1, 16, 16, dtype=torch.bool)
    far[0, 0, 0] = True  # sqrt(3^2 + 11^2) = 11.40 px away
    assert am.pointing_game(maps, far, tolerance=11.3).item() == 0.0
    assert am.pointing_game(maps, far, tolerance=11.5).item() == 1.0
    mask[0, 3, 11] = True  # touches the centre
    # default tolerance: 15 px at 224 -> 15 * 16 / 224 = 1.07 px
    assert am.pointing_game(maps, mask).item() == 1.0
    box = torch.tensor([[8, 0, 16, 8]])  # x0, y0, x1, y1 covering patch (0, 1)
    assert am.pointing_game(maps, box, image_size=(16, 16), tolerance=0).item() == 1.0


def test_energy_pointing_game_hand():
    maps = torch.tensor([[[1.0, -1.0], [2.0, 1.0]]])
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 2:, :2] = True  # patch (1, 0): 8 of the 16 units of positive mass
    assert math.isclose(am.energy_pointing_game(maps, mask).item(), 0.5)
    box = torch.tensor([[0, 0, 1, 1]])  # one pixel of patch (0, 0): 1 / 16
    assert math.isclose(am.energy_pointing_game(maps, box, image_size=(4, 4)).item(), 1 / 16)
    assert am.energy_pointing_game(-maps.abs(), mask).item() == 0.0


def test_metric_input_errors():
    x = torch.ones(1, 3, 8, 8)
    with pytest.raises(InputError, match="grid"):
        am.deletion(Fake(), x, torch.zeros(1, 3, 3), target=0)
    with pytest.raises(InputError, match="target"):
        am.deletion(Fake(), x, torch.zeros(1, 2, 2))
    with pytest.raises(InputError, match="masks"):
        am.energy_pointing_game(torch.zeros(1, 2, 2), torch.zeros(1, 5, 5), image_size=(4, 4))


def test_occlusion_is_the_logit_drop_of_each_patch(model, images):
    """Occlusion values are logit units: the drop of the target logit when one patch is set to
    zero (the mean colour in normalised space), computed by hand for every patch."""
    from patchlens.attribution.baselines import occlusion

    amap = occlusion(model, images, target=[1, 3])
    ph, pw = model.cfg.patch_size
    with torch.no_grad():
        base = model(images)
        for b, t in enumerate([1, 3]):
            for r in range(4):
                for c in range(4):
                    x = images[b : b + 1].clone()
                    x[..., r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = 0
                    drop = base[b, t] - model(x)[0, t]
                    assert float(amap.values[b, r, c]) == pytest.approx(float(drop), abs=1e-4)
    # a window of half a patch: each patch holds 4 windows, its value is their mean drop
    half = occlusion(model, images[:1], target=[1], window=ph // 2)
    with torch.no_grad():
        drops = []
        for dr in range(2):
            for dc in range(2):
                x = images[:1].clone()
                r0, c0 = dr * ph // 2, dc * pw // 2
                x[..., r0 : r0 + ph // 2, c0 : c0 + pw // 2] = 0
                drops.append(float(base[0, 1] - model(x)[0, 1]))
    assert float(half.values[0, 0, 0]) == pytest.approx(sum(drops) / 4, abs=1e-4)
