"""Circuit discovery: the graph, exact edge scores against a naive per-edge loop, EAP against
plain autograd, EAP-IG's limits, circuit runs against hand-written hooks, bad inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import timm_vit

import patchlens as pl
from patchlens import InputError, Rect
from patchlens.circuits import Circuit, EdgeScores, Graph, edge_scores, evaluate

# ---- naive references (plain hooks, written from the definitions) --------------------------------


def sender_outputs_naive(model, x):
    """{node base name: [B, pos, d]} each component's contribution to the residual stream,
    from hook_z @ W_O (times LayerScale), hook_mlp_out and resid_pre 0."""
    n, h = model.cfg.n_layers, model.cfg.n_heads
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.attn.hook_z" for l in range(n)] + \
        [f"blocks.{l}.hook_mlp_out" for l in range(n)]
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=names)
    out = {"embed": cache["blocks.0.hook_resid_pre"]}
    for l in range(n):
        z = cache[f"blocks.{l}.attn.hook_z"]
        w_o = model.blocks[l].attn.W_O
        ls = model.blocks[l].ls1
        for j in range(h):
            r = z[:, :, j] @ w_o[j]
            out[f"a{l}.h{j}"] = r * ls.gamma if ls is not None else r
        out[f"m{l}"] = cache[f"blocks.{l}.hook_mlp_out"]
    return out


def receiver_hook(r, n_layers):
    if r.input in ("q", "k", "v"):
        return f"blocks.{r.layer}.hook_{r.input}_input"
    if r.input == "mlp":
        return f"blocks.{r.layer}.hook_mlp_in"
    return f"blocks.{n_layers - 1}.hook_resid_post"


def naive_exact(model, graph, clean, corrupted, metric, edges=None):
    """One run_with_hooks per edge: the receiver's split input gets the sender's corrupted
    output in place of its clean output (at the sender's tokens)."""
    a_clean = sender_outputs_naive(model, clean)
    a_corr = sender_outputs_naive(model, corrupted)
    out = []
    ids = range(graph.n_edges) if edges is None else edges
    with torch.no_grad(), model.options(use_split_qkv_input=True, use_hook_mlp_in=True):
        base = metric(model(clean))
        for i in ids:
            e = graph.edges[i]
            s, r = graph.nodes[e.sender], graph.receivers[e.receiver]
            delta = a_corr[s.base] - a_clean[s.base]
            toks = graph.parts[s.part] if s.part else torch.arange(delta.shape[1])

            def hook(act, hook, r=r, delta=delta, toks=toks):
                act = act.clone()
                if r.head is not None:
                    act[:, toks, r.head] += delta[:, toks]
                else:
                    act[:, toks] += delta[:, toks]
                return act

            logits = model.run_with_hooks(clean, fwd_hooks=[(receiver_hook(r, model.cfg.n_layers),
                                                             hook)])
            out.append(metric(logits) - base)
    return torch.stack(out)


def naive_eap(model, graph, clean, corrupted, metric):
    """(a_corrupted - a_clean) . d metric / d receiver input, by plain autograd on the clean run."""
    a_clean = sender_outputs_naive(model, clean)
    a_corr = sender_outputs_naive(model, corrupted)
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept[hook.name] = act
        return act

    hooks = sorted({receiver_hook(r, model.cfg.n_layers) for r in graph.receivers})
    x = clean.clone().requires_grad_(True)
    with model.options(use_split_qkv_input=True, use_hook_mlp_in=True):
        logits = model.run_with_hooks(x, fwd_hooks=[(h, keep) for h in hooks])
    metric(logits).sum().backward()
    out = []
    for e in graph.edges:
        s, r = graph.nodes[e.sender], graph.receivers[e.receiver]
        g = kept[receiver_hook(r, model.cfg.n_layers)].grad
        g = g[:, :, r.head] if r.head is not None else g
        mask = graph.masks[e.sender].to(g.dtype)[None, :, None]
        out.append(((a_corr[s.base] - a_clean[s.base]) * g * mask).sum((1, 2)))
    return torch.stack(out).detach()


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """3 layers x 4 heads, LayerScale, float64 (timm's ViT)."""
    return pl.HookedViT.from_timm(timm_vit(seed=4, init_values=0.5).double())


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64),
            torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64))


def no_stray_hooks(model):
    assert not any(h.fwd_hooks or h.bwd_hooks for h in model.hook_dict.values())
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_attn_result
    assert not model.cfg.use_hook_mlp_in


# ---- the graph ------------------------------------------------------------------------------------


def test_graph_counts_repr_and_table(model):
    g = Graph.from_model(model)
    n, h = 3, 4
    # q/k/v at layer l: 3h receivers x (1 + (h + 1) l) senders; MLP l: 1 + h (l + 1) + l; output
    expected = sum(3 * h * (1 + (h + 1) * l) + 1 + h * (l + 1) + l for l in range(n)) + \
        1 + n * (h + 1)
    assert g.n_edges == expected == 262
    assert g.counts["nodes"] == 1 + n * h + n + 1 and len(g.receivers) == n * (3 * h + 1) + 1
    assert "262 edges" in repr(g) and "12 heads" in repr(g)
    df = g.to_pandas()
    assert len(df) == 262 and df.edge.iloc[0] == "embed->a0.h0<q>"
    assert df.edge.iloc[-1] == "m2->logits"
    # senders are upstream of their receivers; the MLP reads its own layer's heads
    assert "a1.h2->m1" in set(df.edge) and "m1->m1" not in set(df.edge)
    assert "a1.h2->a1.h3<q>" not in set(df.edge) and "m0->a1.h3<k>" in set(df.edge)
    assert all(r.sender_layer < r.receiver_layer or r.input == "mlp" for r in df.itertuples())


def test_token_parts(model):
    g = Graph.from_model(model, tokens={"cls": "cls", "corner": Rect(0, 2, 0, 2)})
    assert [n.name for n in g.nodes[:3]] == ["embed@cls", "embed@corner", "embed@rest"]
    assert g.masks[:3].sum(0).tolist() == [1] * 17  # the parts partition the tokens
    assert g.masks[1].sum() == 4
    base = Graph.from_model(model)
    assert g.n_edges == base.n_edges + 2 * len(g.receivers)
    each = Graph.from_model(model, tokens="each", split=["embed", "a0.h1"])
    assert sum(n.part is not None for n in each.nodes) == 2 * 17
    assert "a0.h1@r1c2->a2.h0<v>" in each._edge_index
    assert "split by 17 token groups" in repr(each)


def test_graph_bad_inputs(model):
    with pytest.raises(InputError, match="outside the 4x4 patch grid"):
        Graph.from_model(model, tokens={"big": Rect(0, 5, 0, 1)})
    with pytest.raises(InputError, match="Unknown node 'a9.h1'.*Closest"):
        Graph.from_model(model, tokens={"cls": "cls"}, split=["a9.h1"])
    with pytest.raises(InputError, match="overlaps"):
        Graph.from_model(model, tokens={"a": [1, 2], "b": [2, 3]})
    with pytest.raises(InputError, match="needs token groups"):
        Graph.from_model(model, split=["embed"])
    g = Graph.from_model(model)
    with pytest.raises(InputError, match="Unknown edge 'a0.h1->a2.h3<x>'.*Closest"):
        g.edge_index("a0.h1->a2.h3<x>")
    with pytest.raises(InputError, match="Unknown node"):
        g.node_index("attn0")


# ---- exact, EAP, EAP-IG ---------------------------------------------------------------------------


def test_exact_equals_naive_loop(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit_diff(0, 3)
    g = Graph.from_model(model, tokens={"cls": "cls", "corner": Rect(0, 2, 0, 2)})
    scores = edge_scores(model, clean, corr, metric, method="exact", graph=g, progress=False)
    every_other = list(range(0, g.n_edges, 2))   # every receiver kind, layer and token part
    ref = naive_exact(model, g, clean, corr, metric, edges=every_other)
    assert scores.per_example.dtype == torch.float64
    assert torch.allclose(scores.per_example[every_other], ref, atol=1e-10, rtol=0)
    assert scores.values.abs().max() > 1e-3  # not trivially zero
    no_stray_hooks(model)


def test_exact_denoising_and_recovery(model, pair):
    clean, corr = pair
    base = pl.metrics.logit(2)
    g = Graph.from_model(model)
    den = edge_scores(model, clean, corr, pl.metrics.recovery(base), method="exact",
                      direction="denoising", graph=g, progress=False)
    ref = naive_exact(model, g, corr, clean, base, edges=range(0, 262, 13))
    gap = base(model(clean)) - base(model(corr))
    assert torch.allclose(den.per_example[0:262:13], ref / gap, atol=1e-10, rtol=0)
    assert den.meta["normalized"] and den.meta["direction"] == "denoising"


def test_exact_on_a_pre_norm_model():
    """CLIP-style models: the embedding node is the stream after ln_pre (resid_pre 0)."""
    torch.manual_seed(0)
    cfg = pl.ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=2, d_mlp=64,
                       image_size=(32, 32), patch_size=(8, 8), n_classes=5, pre_norm=True,
                       final_norm="post_pool")
    m = pl.HookedViT(cfg).double().eval()
    from conftest import perturb_
    perturb_(m, std=0.05)
    g = torch.Generator().manual_seed(1)
    clean, corr = (torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
    metric = pl.metrics.logit(1)
    graph = Graph.from_model(m)
    sc = edge_scores(m, clean, corr, metric, method="exact", graph=graph, progress=False)
    assert torch.allclose(sc.per_example, naive_exact(m, graph, clean, corr, metric),
                          atol=1e-10, rtol=0)
    eap = edge_scores(m, clean, corr, metric, method="eap", graph=graph)
    assert torch.allclose(eap.per_example, naive_eap(m, graph, clean, corr, metric), atol=1e-10,
                          rtol=0)


def test_eap_equals_plain_autograd(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit_diff(1, 4)
    g = Graph.from_model(model, tokens={"cls": "cls"})
    eap = edge_scores(model, clean, corr, metric, method="eap", graph=g)
    ref = naive_eap(model, g, clean, corr, metric)
    assert torch.allclose(eap.per_example, ref, atol=1e-10, rtol=0)
    no_stray_hooks(model)


@pytest.mark.parametrize("ig", ["inputs", "activations"])
def test_eap_ig_with_one_step_is_eap(model, pair, ig):
    clean, corr = pair
    metric = pl.metrics.log_prob(2)
    g = Graph.from_model(model)
    eap = edge_scores(model, clean, corr, metric, method="eap", graph=g)
    one = edge_scores(model, clean, corr, metric, method="eap-ig", ig_steps=1, ig=ig, graph=g)
    assert torch.allclose(one.per_example, eap.per_example, atol=1e-10, rtol=0)
    five = edge_scores(model, clean, corr, metric, method="eap-ig", ig_steps=5, ig=ig, graph=g,
                       batch_size=4)  # 2 steps per engine call: the average spans calls
    assert not torch.allclose(five.values, eap.values, atol=1e-6)
    assert five.name == ("eap-ig" if ig == "inputs" else "eap-ig (activations)")


def zeroed_model(cfg) -> pl.HookedViT:
    """A float64 model whose weights are all zero except the LayerNorm scales (1): the
    hand-built models below set only the weights their circuit uses."""
    m = pl.HookedViT(cfg).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for mod in m.modules():
            if isinstance(mod, pl.model.components.LayerNorm):
                mod.w.fill_(1.0)
    return m


def linear_path_model():
    """A model made linear (identity activation, LayerNorms replaced by their affine part,
    uniform attention) in which one path carries the whole clean-corrupted difference: the
    patches' content (dims 0..3) -> head a0.h0's value input -> its output (dims 4..7) -> the
    logits. Edges on the path change the logits by the full difference, so with a nonlinear
    metric EAP is off and integrated gradients converge to the exact score."""
    torch.manual_seed(3)
    cfg = pl.ViTConfig(d_model=8, d_head=4, n_heads=2, n_layers=1, d_mlp=8, image_size=(16, 16),
                       patch_size=(8, 8), n_classes=3, act_fn="identity")
    m = zeroed_model(cfg)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, pl.model.components.LayerNorm):
                mod.forward = lambda x, mod=mod: x * mod.w + mod.b
        m.embed.proj.weight[:4] = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 0.05
        attn = m.blocks[0].attn
        qkv = attn.qkv.weight  # [3 * h * dh, d]: q rows, k rows, v rows
        qkv[2 * 8: 2 * 8 + 4, :4] = torch.randn(4, 4, dtype=torch.float64)   # head 0 values
        attn.proj.weight[4:, :4] = torch.randn(4, 4, dtype=torch.float64)     # head 0 -> dims 4..7
        m.head.weight[:, 4:] = torch.randn(3, 4, dtype=torch.float64) * 2
    return m


def test_eap_ig_converges_to_exact_on_a_linear_path():
    m = linear_path_model()
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    corr = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    metric = pl.metrics.log_prob(0)
    graph = Graph.from_model(m)
    exact = edge_scores(m, clean, corr, metric, method="exact", graph=graph)
    on_path = [graph.edge_index("embed->a0.h0<v>"), graph.edge_index("a0.h0->logits")]
    with torch.no_grad():
        total = metric(m(corr)) - metric(m(clean))
    for i in on_path:
        assert torch.allclose(exact.per_example[i], total, atol=1e-12)
    scale = float(total.abs().max())
    assert float(total.abs().min()) > 0.05
    for ig in ("inputs", "activations"):
        errs = []
        for steps in (1, 10, 100):
            sc = edge_scores(m, clean, corr, metric, method="eap-ig", ig_steps=steps, ig=ig,
                             graph=graph)
            errs.append(float((sc.per_example[on_path] - exact.per_example[on_path]).abs().max()))
        # EAP (one step) is off by a large fraction; right Riemann sums converge like 1 / steps
        assert errs[0] > 0.3 * scale, (ig, errs)
        for a, b in zip(errs[1:], errs[2:]):
            assert 7 < a / b < 13, (ig, errs)
        assert errs[2] < 1e-2 * scale, (ig, errs)


# ---- circuits -------------------------------------------------------------------------------------


def naive_circuit_metric(model, graph, keep, clean, corrupted, metric):
    """The clean run with every edge outside ``keep`` taking the sender's corrupted output:
    sender outputs of this same run are recorded as the forward pass reaches them."""
    a_corr = sender_outputs_naive(model, corrupted)
    n = model.cfg.n_layers
    live = {}

    def record_z(act, hook):
        l = int(hook.name.split(".")[1])
        w_o, ls = model.blocks[l].attn.W_O, model.blocks[l].ls1
        for j in range(model.cfg.n_heads):
            r = act[:, :, j] @ w_o[j]
            live[f"a{l}.h{j}"] = r * ls.gamma if ls is not None else r
        return act

    def record(name):
        def fn(act, hook):
            live[name] = act
            return act
        return fn

    def receive(r):
        def fn(act, hook):
            act = act.clone()
            for i, e in enumerate(graph.edges):
                if graph.receivers[e.receiver].name != r.name or keep[i]:
                    continue
                s = graph.nodes[e.sender]
                d = (a_corr[s.base] - live[s.base]) * graph.masks[e.sender].to(act.dtype)[None, :, None]
                if r.head is not None:
                    act[:, :, r.head] += d
                else:
                    act += d
            return act
        return fn

    hooks = [("blocks.0.hook_resid_pre", record("embed"))]
    for l in range(n):
        hooks += [(f"blocks.{l}.attn.hook_z", record_z), (f"blocks.{l}.hook_mlp_out", record(f"m{l}"))]
    hooks += [(receiver_hook(r, n), receive(r)) for r in graph.receivers]
    # receivers sharing a hook (the heads of a layer) are applied one after the other
    with torch.no_grad(), model.options(use_split_qkv_input=True, use_hook_mlp_in=True):
        return metric(model.run_with_hooks(clean, fwd_hooks=hooks))


def test_circuit_run_equals_naive_hooks(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit(3)
    g = Graph.from_model(model, tokens={"cls": "cls"})
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(g.n_edges, generator=gen) < p for p in (0.2, 0.6, 0.95)]
    from patchlens.circuits.ablate import ablated_values, circuit_metrics

    new, draws = ablated_values(model, g, "corrupted", clean, corr)
    got = circuit_metrics(model, g, torch.stack(masks), clean, new, draws, metric,
                          dict(progress=False))
    for i, keep in enumerate(masks):
        ref = naive_circuit_metric(model, g, keep, clean, corr, metric)
        assert torch.allclose(got[i], ref, atol=1e-10, rtol=0)
    no_stray_hooks(model)


def test_evaluate_limits_and_ablations(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit_diff(0, 3)
    g = Graph.from_model(model)
    full = Circuit(g, torch.ones(g.n_edges, dtype=torch.bool))
    ev = evaluate(model, full, clean, corr, metric)
    assert abs(ev.faithfulness - 1) < 1e-10
    # every edge ablated with the corrupted values is exactly the corrupted run
    assert torch.allclose(ev.ablated, metric(model(corr)), atol=1e-10, rtol=0)
    assert torch.allclose(ev.clean, metric(model(clean)), atol=1e-12)
    scores = edge_scores(model, clean, corr, metric, method="eap", graph=g)
    top = Circuit.top_k(scores, 30)
    for ablation in ("corrupted", "mean", "zero", "resample"):
        e = evaluate(model, top, clean, corr, metric, ablation=ablation, reference=corr)
        assert 0 < e.n_edges == 30 and torch.isfinite(e.circuit).all(), ablation
        assert ablation in repr(e)
    no_stray_hooks(model)


def test_bad_inputs_raise_and_leave_no_hooks(model, pair):
    clean, corr = pair
    metric = pl.metrics.logit(0)
    g = Graph.from_model(model)

    def not_per_image(logits):
        return logits  # [N, classes]

    with pytest.raises(InputError, match="one value per"):
        edge_scores(model, clean, corr, not_per_image, graph=g)
    with pytest.raises(InputError, match="one value per image"):
        evaluate(model, Circuit.from_edges(g, ["embed->logits"]), clean, corr, not_per_image)
    with pytest.raises(InputError, match="empty"):
        Circuit(g, torch.zeros(g.n_edges, dtype=torch.bool))
    with pytest.raises(InputError, match="Unknown edge"):
        Circuit.from_edges(g, ["embed->logit"])
    scores = edge_scores(model, clean, corr, metric, graph=g)
    with pytest.raises(InputError, match="k must be"):
        Circuit.top_k(scores, 0)
    with pytest.raises(InputError, match="would be empty"):
        Circuit.threshold(scores, 1e9)
    with pytest.raises(InputError, match="method must be one of"):
        edge_scores(model, clean, corr, metric, method="acdc")
    with pytest.raises(InputError, match="ig_steps"):
        edge_scores(model, clean, corr, metric, method="eap-ig", ig_steps=0)
    with pytest.raises(InputError, match="ablation must be one of"):
        evaluate(model, Circuit.top_k(scores, 5), clean, corr, metric, ablation="noise")
    other = Graph.from_model(pl.HookedViT.from_timm(timm_vit(seed=1, depth=2).double()))
    with pytest.raises(InputError, match="built for 2 layers"):
        edge_scores(model, clean, corr, metric, graph=other)
    with pytest.raises(InputError, match="same shape"):
        edge_scores(model, clean, corr[:1], metric)

    def nan_metric(logits):
        return logits[:, 0] * float("nan")

    with pytest.raises(InputError, match="finite"):
        edge_scores(model, clean, corr, nan_metric, graph=g)
    no_stray_hooks(model)


def test_scores_views(model, pair):
    clean, corr = pair
    g = Graph.from_model(model, tokens={"corner": Rect(0, 2, 0, 2)})
    sc = edge_scores(model, clean, corr, pl.metrics.logit(1), method="eap", graph=g)
    assert isinstance(sc, EdgeScores) and sc.values.shape == (g.n_edges,)
    top = sc.top(5)
    assert list(top.columns[:3]) == ["edge", "sender", "receiver"] and len(top) == 5
    assert top.value.abs().is_monotonic_decreasing
    assert sc[top.edge[0]] == pytest.approx(top.value[0])
    assert sc.rank(top.edge[0]) == 0
    assert "EdgeScores[" in repr(sc) and "largest:" in repr(sc)
    fig = sc.plot(k=12)
    assert len(fig.data) == 12 + 2
    grid = sc.plot_tokens("embed")
    assert grid.data[-1].z.shape == (4, 4)
    c = Circuit.top_k(sc, 20)
    assert len(c) == 20 and c.edges[0] in set(sc.top(20).edge)
    assert c.plot().data and "20 of" in repr(c)
    conn = c.connected()
    assert conn.n_edges <= c.n_edges
    assert sc.rank_correlation(sc) == pytest.approx(1.0)


# ---- a known circuit ------------------------------------------------------------------------------


def known_circuit_model():
    """Head a1.h1 reads the label from the patch at (1, 1) (its value input) and writes it where
    the class token's readout looks; MLP m1 copies it again. Every other weight is zero, so the
    circuit is embed@label -> a1.h1<v>, a1.h1 -> logits, a1.h1 -> m1, m1 -> logits."""
    cfg = pl.ViTConfig(d_model=16, d_head=8, n_heads=2, n_layers=2, d_mlp=4, image_size=(16, 16),
                       patch_size=(8, 8), n_classes=2, act_fn="relu")
    m = zeroed_model(cfg)
    with torch.no_grad():
        # content: dims 0/1 = +-mean pixel value of each patch
        m.embed.proj.weight[0] = 1.0 / 192
        m.embed.proj.weight[1] = -1.0 / 192
        # position codes: the labelled patch (token 4) on dims 4/5, the class token on 6/7, and
        # +-1 on dims 14/15 for every token (keeps LayerNorm's scale away from zero)
        pe = m.embed.pos_embed
        pe[:, 14], pe[:, 15] = 1.0, -1.0
        pe[4, 4], pe[4, 5] = 3.0, -3.0
        pe[0, 6], pe[0, 7] = 3.0, -3.0
        attn = m.blocks[1].attn
        w = attn.qkv.weight                        # rows: q (2 heads x 8), k, v
        q1, k1, v1 = 8, 16 + 8, 32 + 8             # head 1's first rows
        w[q1, 6], w[k1, 4] = 8.0, 8.0              # the class token queries the labelled patch
        w[v1, 0], w[v1 + 1, 1] = 1.0, 1.0          # its value: the content
        attn.proj.weight[8, 8], attn.proj.weight[9, 9] = 4.0, 4.0   # written to dims 8/9
        mlp = m.blocks[1].mlp                      # m1: relu(+-dim 8) -> dims 8/9 again
        mlp.fc1.weight[0, 8], mlp.fc1.weight[1, 8] = 1.0, -1.0
        mlp.fc2.weight[8, 0], mlp.fc2.weight[8, 1] = 2.0, -2.0
        mlp.fc2.weight[9, 0], mlp.fc2.weight[9, 1] = -2.0, 2.0
        m.head.weight[0, 8], m.head.weight[0, 9] = 1.0, -1.0
        m.head.weight[1] = -m.head.weight[0]
    return m


def test_known_circuit_is_found_by_every_method():
    m = known_circuit_model()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g, dtype=torch.float64) - 0.5
    clean, corr = x.clone(), x.clone()
    clean[:, :, 8:, 8:], corr[:, :, 8:, 8:] = 1.0, -1.0     # the label lives in patch (1, 1)
    metric = pl.metrics.logit_diff(0, 1)
    graph = Graph.from_model(m, tokens={"label": (1, 1)})
    named = "embed@label->a1.h1<v>"
    truth = {named, "a1.h1->logits", "a1.h1->m1", "m1->logits"}
    for method, kw in [("exact", {}), ("eap", {}), ("eap-ig", {}), ("eap-ig", {"ig": "activations"})]:
        sc = edge_scores(m, clean, corr, metric, method=method, graph=graph, progress=False, **kw)
        assert sc.rank(named) == 0, (sc.name, sc.top(3))
        circuit = Circuit.top_k(sc, 4)
        assert set(circuit.edges) == truth, sc.name
        assert evaluate(m, circuit, clean, corr, metric).faithfulness >= 0.99
    from patchlens.circuits import greedy_circuit

    found = greedy_circuit(m, clean, corr, metric, graph=graph, tau=0.01)
    assert set(found.edges) == truth
    assert evaluate(m, found, clean, corr, metric).faithfulness >= 0.99
    assert found.meta["faithfulness"] >= 0.99


def test_faithfulness_curve_and_report(model, pair):
    from patchlens.circuits import faithfulness_curve
    from patchlens.report import HtmlReport

    clean, corr = pair
    metric = pl.metrics.logit_diff(0, 3)
    g = Graph.from_model(model)
    eap = edge_scores(model, clean, corr, metric, method="eap", graph=g)
    ig = edge_scores(model, clean, corr, metric, method="eap-ig", ig_steps=3, graph=g)
    curve = faithfulness_curve(model, [eap, ig], clean, corr, metric, ks=[5, 26, 131, 262],
                               n_random=2, progress=False)
    assert list(curve.values) == ["eap", "eap-ig"] and curve.random_all.shape == (2, 4)
    for name in ("eap", "eap-ig"):
        assert curve.values[name][-1] == pytest.approx(1.0, abs=1e-10)  # every edge: the model
        top = Circuit.top_k(eap if name == "eap" else ig, 26)
        ev = evaluate(model, top, clean, corr, metric)
        assert curve.values[name][1] == pytest.approx(ev.faithfulness, abs=1e-10)
    assert set(curve.area) == {"eap", "eap-ig", "random"}
    assert len(curve.plot().data) == 3 and len(curve.to_pandas()) == 12
    with pytest.raises(InputError, match="ks must be"):
        faithfulness_curve(model, eap, clean, corr, metric, ks=[0, 5])
    report = HtmlReport("circuits").circuit(Circuit.top_k(ig, 20), ev, curve)
    html = report.to_html()
    assert html.count('class="plotly-graph-div"') == 2 and "Faithfulness" in html


def test_headless_model_scores_the_pooled_output():
    torch.manual_seed(0)
    cfg = pl.ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=2, d_mlp=64,
                       image_size=(32, 32), patch_size=(8, 8), n_classes=0, n_registers=2)
    m = pl.HookedViT(cfg).double().eval()
    g = torch.Generator().manual_seed(2)
    clean, corr = (torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))

    def feature(pooled):
        return pooled[:, 3]

    graph = Graph.from_model(m, tokens={"registers": "registers"})
    assert graph.output.name == "output" and "embed@registers->output" in graph._edge_index
    sc = edge_scores(m, clean, corr, feature, method="exact", graph=graph, progress=False)
    ref = naive_exact(m, graph, clean, corr, feature, edges=range(0, graph.n_edges, 5))
    assert torch.allclose(sc.per_example[::5], ref, atol=1e-10, rtol=0)


# ---- rotary / gated / sub-norm models -------------------------------------------------------------


def rotary_model(**extra):
    """2 layers x 4 heads: rotary q/k (DINOv3 tables), q/k norms, registers, LayerScale, a
    SwiGLU MLP with its sub-LayerNorm; float64, perturbed away from the init."""
    from conftest import perturb_

    torch.manual_seed(5)
    cfg = pl.ViTConfig(d_model=32, d_head=8, n_heads=4, n_layers=2, d_mlp=48,
                       image_size=(32, 32), patch_size=(8, 8), n_classes=5, n_registers=1,
                       pos_embed=False, rope="timm_dinov3", qk_norm=True, layer_scale=True,
                       mlp_kind="swiglu", mlp_norm=True, **extra)
    return perturb_(pl.HookedViT(cfg).double().eval(), std=0.2)


def test_exact_and_eap_on_a_rotary_gated_model():
    """Split q/k inputs sit before the rotation (and the q/k norms): patching them is exact;
    gated MLPs with a sub-norm and LayerScale keep every node's output additive."""
    m = rotary_model()
    g = torch.Generator().manual_seed(3)
    clean, corr = (torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
    metric = pl.metrics.logit_diff(1, 2)
    graph = Graph.from_model(m, tokens={"corner": (0, 0)})
    sc = edge_scores(m, clean, corr, metric, method="exact", graph=graph, progress=False)
    ref = naive_exact(m, graph, clean, corr, metric)      # every edge
    assert torch.allclose(sc.per_example, ref, atol=1e-10, rtol=0)
    assert ref.abs().max() > 1e-3
    q_k = [i for i, e in enumerate(graph.edges) if graph.receivers[e.receiver].input in "qk"]
    assert ref[q_k].abs().max() > 1e-4   # rotary q / k receivers carry effects
    eap = edge_scores(m, clean, corr, metric, method="eap", graph=graph)
    assert torch.allclose(eap.per_example, naive_eap(m, graph, clean, corr, metric), atol=1e-10,
                          rtol=0)
    no_stray_hooks(m)


def test_attention_sub_norm_is_refused():
    """With a LayerNorm over the concatenated heads (cfg.attn_norm) a head has no output of its
    own: the graph is refused, naming the feature, and nothing is left hooked."""
    m = rotary_model(attn_norm=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(InputError, match="attn_norm.*mixes the heads"):
        Graph.from_model(m)
    with pytest.raises(InputError, match="attn_norm"):
        edge_scores(m, x, x.flip(0), pl.metrics.logit(0))
    other = Graph.from_model(rotary_model())   # a graph of the same shape, another model
    with pytest.raises(InputError, match="attn_norm"):
        edge_scores(m, x, x.flip(0), pl.metrics.logit(0), graph=other)
    with pytest.raises(InputError, match="attn_norm"):
        evaluate(m, Circuit.from_edges(other, ["embed->logits"]), x, x.flip(0),
                 pl.metrics.logit(0))
    no_stray_hooks(m)
