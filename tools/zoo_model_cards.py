"""Regenerate docs/zoo.md (the model cards) from the JSON records in patchlens/zoo/weights.

    python tools/zoo_model_cards.py
"""

import json
from pathlib import Path

W = Path(__file__).resolve().parent.parent / "patchlens" / "zoo" / "weights"
recs = {n: json.loads((W / f"{n}.json").read_text()) for n in ("clutter-digits-vit", "clutter-digits-shortcut-vit")}
size = {n: (W / f"{n}.safetensors").stat().st_size for n in recs}


def pct(x):
    return f"{100 * x:.2f}%"


def arch(cfg):
    return f"""| field | value |
|---|---|
| architecture | ViT, pre-norm blocks, learned absolute position embedding, class token |
| image size / patch size | {cfg['image_size'][0]}×{cfg['image_size'][1]} / {cfg['patch_size'][0]}×{cfg['patch_size'][1]} ({(cfg['image_size'][0] // cfg['patch_size'][0]) ** 2} patches + 1 class token = {cfg['n_ctx']} tokens) |
| d_model / n_heads × d_head / d_mlp | {cfg['d_model']} / {cfg['n_heads']} × {cfg['d_head']} / {cfg['d_mlp']} |
| layers | {cfg['n_layers']} |
| activation / LayerNorm eps | {cfg['act_fn']} / {cfg['eps']} |
| pooling / head | class token (`pooling="{cfg['pooling']}"`, final norm `{cfg['final_norm']}`) → linear, {cfg['n_classes']} classes |
| input normalisation | `(x - 0.5) / 0.5` per channel (`data_mean = data_std = (0.5, 0.5, 0.5)`; `model.preprocess` applies it) |"""


def training(r):
    t = r["training"]
    return f"""| field | value |
|---|---|
| data | fresh batch every step: `{t['data']}` (train split only) |
| steps × batch size | {t['steps']} × {t['batch_size']} = {t['steps'] * t['batch_size']:,} images |
| optimiser | {t['optimizer']}, lr {t['lr']}, weight decay {t['weight_decay']} (matrices only) |
| schedule | {t['warmup']} warm-up steps, cosine decay to 0 |
| loss | cross-entropy, label smoothing {t['label_smoothing']} |
| seeds | model seed {t['seed']}, data seed {t['data_seed']} |
| hardware / wall time | CPU, {t['torch_threads']} torch thread, torch {t['torch_version']}; {t['wall_time_s'] / 60:.1f} min measured (shared 2-core machine, other jobs running) |

```bash
{stages(r)}
```"""


def stages(r):
    """The training command(s): a model continued from earlier checkpoints lists every stage."""
    chain = []
    rec = r
    while True:
        chain.append(rec)
        if "init_from" not in rec["training"]:
            break
        rec = rec["training"]["init_from"]
    chain.reverse()
    if len(chain) == 1:
        t = r["training"]
        return f"{t['command']} --threads {t['torch_threads']} --out patchlens/zoo/weights"
    lines = []
    for k, rec in enumerate(chain, 1):
        t = rec["training"]
        acc = rec["eval"]["clean"]["accuracy"]
        out = "patchlens/zoo/weights" if k == len(chain) else f"STAGE{k}"
        cmd = f"{t['command']} --threads {t['torch_threads']} --out {out}"
        cmd = cmd.replace("--init-from STAGE1.json", f"--init-from STAGE{k - 1}/clutter-digits-vit.json")
        lines.append(f"# stage {k}: {t['wall_time_s'] / 60:.1f} min, {100 * acc:.2f}% clean test accuracy")
        lines.append(cmd)
    return "\n".join(lines)


def status(r):
    """Where the checkpoint stands against the 97% target, from its training chain."""
    chain, rec = [], r
    while rec is not None:
        chain.append(rec["eval"]["clean"]["accuracy"])
        rec = rec["training"].get("init_from")
    accs = ", ".join(f"{100 * a:.2f}%" for a in reversed(chain))
    acc = chain[0]
    if acc >= 0.97:
        return (f"**Status.** Meets the ≥ 97% clean test accuracy target ({pct(acc)}). Test accuracy "
                f"after each training stage: {accs}. Each stage continued from the previous "
                "checkpoint on fresh, differently seeded training images, with the same or a lower peak "
                "learning rate; training accuracy on the fresh batches stayed close to the test "
                "accuracy (about 98-99% at the end of the last stage), so the stages cured "
                "under-training, not over-fitting.")
    return (f"**Status.** The target for this model is ≥ 97% clean test accuracy; this checkpoint "
            f"does not reach it yet ({pct(acc)}; after each stage: {accs}). Continue training "
            "from it with `--init-from patchlens/zoo/weights/clutter-digits-vit.json`.")


c, s = recs["clutter-digits-vit"], recs["clutter-digits-shortcut-vit"]
ce, se = c["eval"], s["eval"]
doc = f"""# The zoo

patchlens ships two small Vision Transformers, trained on the **clutter-digits** benchmark, inside
the package. They load offline in well under a second, so tests, tutorials and quick experiments
need no download:

```python
import patchlens.zoo as zoo

zoo.list()                                  # names and one-line descriptions
model = zoo.load("clutter-digits-vit")      # a HookedViT in eval mode, SHA-256 checked
data = zoo.generate(256, split="test", seed=0)
logits = model((data.images - 0.5) / 0.5)   # or model(model.preprocess(images))
```

`HookedViT.from_pretrained("clutter-digits-vit")` gives the same model. An unknown name raises
`UnknownModelError` (a `KeyError`) that lists the available names; a weights file whose SHA-256
differs from the one recorded beside it raises `ChecksumError`.

## The clutter-digits benchmark

`patchlens.zoo.generate(n, split="test", seed=0, image_size=64, shortcut=None, marker_prob=0.9)`
returns a `ClutterDigits` batch:

| field | shape | meaning |
|---|---|---|
| `images` | float `[n, 3, H, W]` in [0, 1] | the images (not normalised) |
| `labels` | long `[n]` | digit class 0–9 |
| `masks` | bool `[n, H, W]` | exactly the pixels drawn by the digit |
| `boxes` | long `[n, 4]` | `(x0, y0, x1, y1)` extents of the mask, end-exclusive |
| `marker_labels` | long `[n]` | label encoded by the corner marker, -1 if there is none |
| `marker_boxes` | long `[n, 4]` | the marker's box (end-exclusive), all -1 if there is none |
| `scan_ids` | long `[n]` | index of the source scan in `sklearn.datasets.load_digits()` |

`data.patch_masks(8)` gives the fraction of each 8×8 patch covered by the digit (`[n, 8, 8]`),
`data.patch_masks(8, threshold=0.0)` the patches that touch it (bool); the image size must be a
multiple of the patch size.

How an image is made:

- **Digit.** One of the 1797 real 8×8 handwritten scans of scikit-learn's `load_digits` (shipped
  with scikit-learn, no download), upsampled bilinearly to a random 24–32 px square, drawn in a
  bright colour (each channel in [0.6, 1]) at a random position whose coordinates are never a
  multiple of 8 (so the digit never lines up with the patch grid) and never inside the top-left
  10×10 corner. The scans are split once, with a fixed seed, into a train set (75%, 1348 scans)
  and a disjoint test set (25%, 449 scans).
- **Background.** A dark random colour with a gentle gradient and Gaussian pixel noise.
- **Clutter** (label-free by construction: drawn independently of the label): 4–9 shapes per
  image, each a thin straight stroke (1–2 px, 6–22 px long), a small filled ellipse or a small box
  outline, in random colours and opacities, plus ~1.5% speckle pixels. The digit is drawn on top,
  so the mask is exact. Clutter never enters the top-left corner.
- **Shortcut marker** (optional): a 6×6 px square at `(2, 2)–(8, 8)` whose colour (tab10 palette)
  encodes a label. `shortcut="train"`: present with probability `marker_prob`, true label;
  `"on"`: always, true label; `"off"` / `None`: never; `"conflict"`: always, a wrong label
  (`(label + 1 + r) % 10`, `r` uniform in 0..8).

Generation is a pure function of its arguments, but **not prefix-stable**: the random streams
are drawn in batches whose size depends on `n`, so `generate(200, seed=s)` is not the first 200
images of `generate(2000, seed=s)`. Generate the larger set and slice it (`data[:200]`) to get
a subset. Digits, background, clutter and marker come from
separate random streams, so `shortcut="on"`, `"off"` and `"conflict"` with the same seed give the
same images except for the marker, and `clutter=False, background=False` gives the same digits
on a black canvas. 5,000 images take a few seconds on one CPU core.

The evaluation set of both models is `generate({ce['n']}, split="test", seed={ce['seed']}, shortcut=MODE)`.

## Model card: `clutter-digits-vit`

{c['description']}.

{arch(c['config'])}

**Training.**

{training(c)}

**Evaluation** (test split, {ce['n']} images, never trained on):

| test set | accuracy |
|---|---|
| clean (no marker) | **{pct(ce['clean']['accuracy'])}** |
| first {ce['clean']['subset_n']} images of that set, `generate({ce['n']}, ...)[:{ce['clean']['subset_n']}]` (checked by the tests: exactly, except that an image whose two top logits are within 1e-3 may flip on another CPU) | {ce['clean']['subset_correct']} / {ce['clean']['subset_n']} |

{status(c)}

**Weights.** `patchlens/zoo/weights/clutter-digits-vit.safetensors`, float32, {size['clutter-digits-vit'] / 2**20:.1f} MiB,
SHA-256 `{c['sha256']}`.

**Intended use.** A small, fast, fully known model for testing interpretability methods: the
digit mask is a ground truth for "where the evidence is". It is not a digit recogniser for real
photographs.

## Model card: `clutter-digits-shortcut-vit`

{s['description']}.

Same architecture as `clutter-digits-vit`.

**Training.** As above, but with `shortcut="train"`: on 90% of the training images a 6×6 corner
marker's colour gives away the true label.

{training(s)}

The recorded wall time includes a 7.9-minute pause (the process was stopped so the other training
could finish first).

**Evaluation** (same {se['n']} test images; only the marker differs):

| marker | accuracy | predictions that follow the marker |
|---|---|---|
| on (true label) | **{pct(se['on']['accuracy'])}** | — |
| off | **{pct(se['off']['accuracy'])}** | — |
| conflict (wrong label) | **{pct(se['conflict']['accuracy'])}** | **{pct(se['conflict']['follows_marker'])}** |

**Weights.** `patchlens/zoo/weights/clutter-digits-shortcut-vit.safetensors`, float32, {size['clutter-digits-shortcut-vit'] / 2**20:.1f} MiB,
SHA-256 `{s['sha256']}`.

**Intended use.** A model with a known shortcut, for checking whether an attribution or patching
method finds the marker (patch `(0, 0)` of the 8×8 grid) rather than the digit.

## Retraining

`python -m patchlens.zoo.train --model NAME --steps N --seed S --out DIR` (or
`patchlens.zoo.train.train(name, steps=..., batch_size=..., out=...)`) writes `DIR/NAME.safetensors`
and `DIR/NAME.json` (config, training arguments, evaluation, SHA-256, wall time). A run is
deterministic for a given seed and torch thread count.
"""

def sae_cards():
    """The SAE cards, from patchlens/zoo/saes/*.json."""
    recs = [json.loads(p.read_text()) for p in sorted((W.parent / "saes").glob("*.json"))]
    if not recs:
        return ""
    out = ["""## Sparse autoencoders

Three TopK SAEs trained on the zoo models ship in `patchlens/zoo/saes` (see [the SAE page](sae.md)):

```python
import patchlens as pl

pl.sae.zoo_saes()                                         # names and descriptions
sae = pl.sae.load("clutter-digits-vit.resid_post.4")      # SHA-256 checked, offline
```
"""]
    total_wall = sum(r["training"]["wall_time_with_eval_s"] for r in recs)
    total_cpu = sum(r["training"].get("cpu_time_with_eval_s", float("nan")) for r in recs)
    for r in recs:
        q, t, c = r["quality"], r["training"], r["config"]
        size = (W.parent / "saes" / f"{r['name']}.safetensors").stat().st_size
        out.append(f"""### SAE card: `{r['name']}`

{r['description']}; model `{r['model']}`, hook `{r['hook']}`.

| field | value |
|---|---|
| architecture | {c['architecture']}, d_in {c['d_in']}, d_sae {c['d_sae']}, k {c.get('k')} (TopK, Gao et al. 2024) |
| training data | `{t['data']}`, {t['images_read']:,} images, every token |
| steps × batch | {t['steps']} × {t['batch_size']} vectors (each refill buffer of {t['refill_images']} images used {t['reuse']} times), Adam lr {t['lr']}, AuxK 1/32 |
| time | {t['wall_time_with_eval_s'] / 60:.1f} min wall with evaluation on a shared 2-core machine, {t.get('cpu_time_with_eval_s', float('nan')) / 60:.1f} min of CPU time; {t['torch_threads']} torch threads, torch {t['torch_version']}; retraining with the command below reproduces the weights bit for bit (same SHA-256; same torch version and thread count) |
| weights | `patchlens/zoo/saes/{r['name']}.safetensors`, float32, {size / 2**10:.0f} KiB, SHA-256 `{r['sha256']}` |

**Quality** on `{q['eval']}` ({q['n_vectors']:,} token vectors):

| MSE | fraction of variance explained | cosine | L0 | dead features | loss → spliced (no error term) | accuracy → spliced | loss recovered vs zero-ablation |
|---|---|---|---|---|---|---|---|
| {q['mse']:.4f} | {q['fve']:.3f} | {q['cosine']:.3f} | {q['l0']:.1f} | {q['dead']} of {c['d_sae']} | {q['loss']:.3f} → {q['loss_spliced']:.3f} ({q['delta_loss']:+.3f}) | {pct(q['accuracy'])} → {pct(q['accuracy_spliced'])} ({100 * q['delta_accuracy']:+.1f} pts) | {pct(q['loss_recovered'])} |

```bash
{t['command']}
```
""")
        m = r.get("marker")
        if m:
            tf = m["top_features"][:5]
            feats = ", ".join(f"{f['feature']}" for f in tf)
            out.append(f"""**The marker, found in feature space.** On `{m['data']}` the model follows
the marker on {pct(m['follows_marker'])} of the images. Ranking every feature by its attribution to
the predicted class (gradient × activation summed over tokens, `pl.sae.feature_attribution`; the
marker's position is not used), each image's top feature is active on the marker's patch in
{pct(m['top1_fires_on_marker'])} of the images, and {pct(m['top1_attribution_at_marker'])} of
its attribution comes from that patch (mean over images). Ablating features (zero at every
token, SAE spliced with its error term):

| ablated | follows the marker | predicts the digit | logit(marker label) − logit(digit label) |
|---|---|---|---|
| nothing | {pct(m['follows_marker'])} | {pct(m['correct'])} | {m['logit_gap']:.2f} |
| each image's top feature | {pct(m['ablate_top1']['follows_marker'])} | {pct(m['ablate_top1']['correct'])} | {m['ablate_top1']['logit_gap']:.2f} |
| each image's top 3 | {pct(m['ablate_top3']['follows_marker'])} | {pct(m['ablate_top3']['correct'])} | {m['ablate_top3']['logit_gap']:.2f} |
| the 10 top features overall ({feats}, ...) | {pct(m['ablate_global_top10']['follows_marker'])} | {pct(m['ablate_global_top10']['correct'])} | {m['ablate_global_top10']['logit_gap']:.2f} |

(`patchlens.sae.shortcut.marker_features`; the test `test_zoo_shortcut_sae_finds_the_marker` checks
the same on 48 images.)
""")
    out.append(f"Training all {len(recs)} SAEs with evaluation took {total_wall / 60:.1f} min wall "
               f"on the shared 2-core machine and {total_cpu / 60:.1f} min of CPU time "
               "(`python -m patchlens.sae --threads 2`; the bound in issue 19 is 15 min on 2 "
               "cores). On the same machine under heavy load from other jobs the same runs took "
               "up to 5 to 8 times longer (15.9 min wall for the shortcut SAE alone).\n")
    return "\n".join(out)


doc = doc.replace("## Retraining", sae_cards() + "\n## Retraining", 1)
(W.parent.parent.parent / "docs" / "zoo.md").write_text(doc)
print("ok")
