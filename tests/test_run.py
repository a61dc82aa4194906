"""Dataset-scale runs (patchlens.run): multi-process equality, kill + resume, corrupt shards,
bad inputs. Subprocess tests launch real processes (accelerate launch / python) on this CPU."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import patchlens
from patchlens import HookedViT, ViTConfig
from patchlens.errors import InputError
from patchlens.run import (
    ShardError,
    accelerate_command,
    cli_main,
    dataset,
    load_results,
    per_batch,
    per_example,
    values,
)
from patchlens.run import shards as S

N, SHARD, BATCH = 22, 5, 4  # 5 shards, the last one short; batches do not divide shards
ROOT = Path(__file__).resolve().parent.parent
CLI_ARGS = ["--batch-size", str(BATCH), "--shard-size", str(SHARD), "--layers", "0:2",
            "--no-progress"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def one_thread():
    """Every process computes with one thread, so results are comparable bit for bit (the
    fused CPU attention kernel gives other bits with 1 and 2 threads at these shapes)."""
    with _threads(1):
        yield


@pytest.fixture(scope="module")
def model_json(tmp_path_factory) -> str:
    """A small random model saved as a zoo-format record (loadable in subprocesses)."""
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    cfg = ViTConfig(d_model=32, d_head=8, n_layers=2, image_size=64, patch_size=16, n_classes=10,
                    data_mean=(0.5,) * 3, data_std=(0.5,) * 3)
    m = HookedViT(cfg)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "tiny.safetensors"))
    sha = hashlib.sha256((d / "tiny.safetensors").read_bytes()).hexdigest()
    (d / "tiny.json").write_text(json.dumps({"config": cfg.to_json_dict(), "sha256": sha}))
    return str(d / "tiny.json")


@pytest.fixture(scope="module")
def reference(model_json, tmp_path_factory) -> Path:
    """The CAAP run over the zoo data in this process (one process, no launcher)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    # module-scoped fixtures run before the function-scoped `one_thread`: pin the thread count
    # here too, or the reference is computed with another thread count than the runs it checks
    with _threads(1):
        assert cli_main(["caap", f"zoo:clutter-digits:{N}", "--out", str(out), "--model", model_json,
                         *CLI_ARGS]) == 0
    return out


def _shard_bytes(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((out / S.SHARDS).glob("*.safetensors"))]


def _assert_same(out: Path, ref: Path) -> None:
    assert _shard_bytes(out) == _shard_bytes(ref)
    a, b = load_results(out), load_results(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tiny_model(seed: int = 0, image_size: int = 32) -> HookedViT:
    torch.manual_seed(seed)
    return HookedViT(ViTConfig(d_model=32, d_head=8, n_layers=2, image_size=image_size,
                               patch_size=8, n_classes=10)).eval()


def _logits(model, batch):
    return {"logits": model(batch["images"]), "argmax": model(batch["images"]).argmax(-1)}


# ---- multi-process ------------------------------------------------------------------------------
def test_reference_layout(reference):
    res = load_results(reference)
    assert res["values"].shape == (N, 4, 4) and res["target"].shape == (N,)
    m = S.read_manifest(reference)
    assert (m["n_items"], m["shard_size"], m["n_shards"]) == (N, SHARD, 5)
    index = S.read_index(reference)
    assert [r["shard"] for r in index] == list(range(5))
    assert index[-1]["start"] == 20 and index[-1]["stop"] == 22
    for r in index:
        assert S.sha256_file(reference / r["file"]) == r["sha256"]


def test_two_processes_match_one(reference, model_json, tmp_path):
    """accelerate launch with 2 CPU processes (gloo) writes byte-identical shards."""
    out = tmp_path / "run2"
    cmd = accelerate_command(["caap", f"zoo:clutter-digits:{N}", "--out", str(out), "--model",
                              model_json, *CLI_ARGS], num_processes=2)
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=110)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 process(es)" in p.stdout and p.stdout.count("items in 5 shards") == 1
    ranks = [r["rank"] for r in S.read_index(out)]
    assert ranks == [0, 1, 0, 1, 0]
    _assert_same(out, reference)


def test_killed_run_resumes_identically(reference, model_json, tmp_path):
    """A process killed (os._exit) after 2 shards; the re-run skips them and completes."""
    out = tmp_path / "killed"
    p = subprocess.run([sys.executable, __file__, str(out), model_json, "2"], env=_env(),
                       capture_output=True, text=True, timeout=110)
    assert p.returncode == 3, p.stderr[-3000:]
    assert sorted(x.name for x in (out / S.SHARDS).iterdir()) == [
        "000000.json", "000000.safetensors", "000001.json", "000001.safetensors"]
    with pytest.raises(ShardError, match="3 of 5 shards"):
        load_results(out)
    summary = _run_worker_recipe(out, model_json, die_at=None)
    assert (summary.skipped_shards, summary.computed_shards, summary.computed_items) == (2, 3, 12)
    _assert_same(out, reference)


def test_killed_two_process_run_resumes_on_one(reference, model_json, tmp_path):
    """Rank 1 of 2 dies at its second shard (the launcher stops rank 0); one process resumes."""
    out = tmp_path / "killed2"
    cmd = accelerate_command([str(out), model_json, "3", "1"], num_processes=2, script=__file__)
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=110)
    assert p.returncode != 0
    assert S.shard_problem(out, 1, 5, 10) is None and S.shard_problem(out, 3, 15, 20) is not None
    summary = _run_worker_recipe(out, model_json, die_at=None)
    assert summary.computed_shards >= 1 and summary.skipped_shards >= 1
    _assert_same(out, reference)


def test_recipe_error_then_resume(reference, model_json, tmp_path):
    """An exception in shard 3 leaves shards 0-2 finished; the re-run computes only 3 and 4."""
    out = tmp_path / "raised"
    with pytest.raises(RuntimeError, match="boom"):
        _run_worker_recipe(out, model_json, die_at=3, how="raise")
    assert [r["shard"] for r in S.read_index(out)] == []  # the index is written on success only
    summary = _run_worker_recipe(out, model_json, die_at=None)
    assert (summary.skipped_shards, summary.computed_shards) == (3, 2)
    _assert_same(out, reference)


# ---- corruption ---------------------------------------------------------------------------------
def test_corrupt_shards_detected_and_recomputed(reference, model_json, tmp_path):
    out = tmp_path / "corrupt"
    _run_worker_recipe(out, model_json, die_at=None)
    f1, f2 = S.shard_file(out, 1), S.shard_file(out, 2)
    f1.write_bytes(f1.read_bytes()[:-7])  # truncated
    data = bytearray(f2.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped bit pattern: only the checksum sees it
    f2.write_bytes(bytes(data))
    S.sidecar_file(out, 3).unlink()  # crashed between the shard and its record
    (out / S.SHARDS / ".000004.safetensors.123.abcd.tmp").write_bytes(b"partial")
    with pytest.raises(ShardError) as e:
        load_results(out)
    msg = str(e.value)
    assert "shard 1" in msg and "truncated" in msg and "shard 2" in msg and "sha256" in msg
    assert "shard 3" in msg and "sidecar" in msg and "shard 0" not in msg
    summary = _run_worker_recipe(out, model_json, die_at=None)
    assert (summary.computed_shards, summary.skipped_shards) == (3, 2)
    assert not list((out / S.SHARDS).glob(".*.tmp"))
    _assert_same(out, reference)


def test_load_results_checks_item_ids(tmp_path):
    m = _tiny_model()
    x = torch.randn(6, 3, 32, 32)
    dataset(_logits, x, tmp_path / "r", model=m, batch_size=2, shard_size=3, verbose=False)
    t = S.load_shard(tmp_path / "r", 1)
    t[S.ITEM_KEY] = torch.tensor([0, 1, 2])  # a shard that claims the items of shard 0
    S.write_shard(tmp_path / "r", 1, 3, 6, t)
    with pytest.raises(ShardError, match="exactly once"):
        load_results(tmp_path / "r")


# ---- inputs -------------------------------------------------------------------------------------
def test_input_kinds(tmp_path):
    from PIL import Image

    m = _tiny_model()
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(5, 3, 32, 32, generator=g)
    for i, im in enumerate(imgs):
        Image.fromarray((im.permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
    x = m.preprocess([str(tmp_path / f"{i}.png") for i in range(5)])
    want = m(x)

    def check(data, key="logits", **kw):
        out = tmp_path / f"out{check.n}"
        check.n += 1
        dataset(_logits, data, out, model=m, batch_size=2, shard_size=3, verbose=False, **kw)
        torch.testing.assert_close(load_results(out)[key], want, rtol=1e-5, atol=1e-5)

    check.n = 0
    check(str(tmp_path))  # a directory of images
    check(str(tmp_path / "*.png"))  # a glob
    check(list(x))  # tensors
    check(x)  # one batch tensor
    check(iter(list(x)))  # a plain iterable
    check([{"images": t, "labels": i} for i, t in enumerate(x)])  # dicts

    seen = []

    def labelled(model, batch):
        seen.append((batch["labels"].tolist(), batch["index"].tolist()))
        return {"logits": model(batch["images"])}

    dataset(labelled, [(t, 7 + i) for i, t in enumerate(x)], tmp_path / "tuples", model=m,
            batch_size=2, shard_size=3, verbose=False)
    assert seen == [([7, 8], [0, 1]), ([9], [2]), ([10, 11], [3, 4])]


def test_adapters(tmp_path):
    m = _tiny_model()
    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    metric = per_batch(lambda b: patchlens.metrics.logit(b["index"] % 10))
    dataset(per_example(patchlens.activation_patching, metric=metric, per="layer", progress=False),
            list(zip(clean, corrupted)), tmp_path / "act", model=m, batch_size=2, shard_size=4,
            verbose=False)
    res = load_results(tmp_path / "act")
    direct = patchlens.activation_patching(m, clean[:2], corrupted[:2],
                                           patchlens.metrics.logit(torch.arange(2)), per="layer")
    assert res["per_example"].shape == (4, 2)
    torch.testing.assert_close(res["per_example"][:2], direct.per_example)
    torch.testing.assert_close(res["baseline"][:2], direct.baseline)
    dataset(values(patchlens.caap, layers=(0, 2), progress=False), clean, tmp_path / "caap",
            model=m, batch_size=4, shard_size=4, verbose=False)
    torch.testing.assert_close(load_results(tmp_path / "caap")["values"],
                               patchlens.caap(m, clean, layers=(0, 2)).values)


def test_bad_inputs(tmp_path):
    m = _tiny_model()
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(InputError, match="empty"):
        dataset(_logits, [], tmp_path / "e", model=m)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        dataset(_logits, x, tmp_path / "file", model=m)
    with pytest.raises(InputError, match="shard_size"):
        dataset(_logits, x, tmp_path / "z", model=m, shard_size=0)
    dataset(_logits, x, tmp_path / "r", model=m, shard_size=2, verbose=False)
    with pytest.raises(InputError, match="shard_size=2.*shard_size=3"):
        dataset(_logits, x, tmp_path / "r", model=m, shard_size=3)
    with pytest.raises(InputError, match="4 items"):
        dataset(_logits, x[:3], tmp_path / "r", model=m, shard_size=2)
    s = dataset(_logits, x, tmp_path / "r", model=m, shard_size=3, resume=False, verbose=False)
    assert s.computed_shards == 2 and len(list((tmp_path / "r" / S.SHARDS).iterdir())) == 4
    with pytest.raises(InputError, match="dict"):
        dataset(lambda model, b: model(b["images"]), x, tmp_path / "a", model=m)
    with pytest.raises(InputError, match=r"batch=2"):
        dataset(lambda model, b: {"y": torch.zeros(3)}, x, tmp_path / "b", model=m, batch_size=2)
    with pytest.raises(InputError, match="preprocess"):
        dataset(_logits, ["a.png"], tmp_path / "c")
    with pytest.raises(InputError, match="No image files"):
        dataset(_logits, str(tmp_path / "nothing-*.png"), tmp_path / "d", model=m)
    with pytest.raises(ShardError, match="no run.json"):
        load_results(tmp_path / "e")


def test_cli_errors(model_json, tmp_path, capsys):
    assert cli_main(["caap", "zoo:clutter-digits:0", "--out", str(tmp_path / "o"),
                     "--model", model_json]) == 2
    assert "N > 0" in capsys.readouterr().err
    assert cli_main(["caap", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                     "--model", model_json]) == 2
    assert "no image files" in capsys.readouterr().err
    assert cli_main(["activation", f"zoo:clutter-digits:{N}", "--out", str(tmp_path / "a"),
                     "--model", model_json, "--batch-size", "8", "--shard-size", "11",
                     "--layers", "1:2", "--no-progress"]) == 0
    res = load_results(tmp_path / "a")
    assert res["per_example"].shape == (N, 1, 17) and res["clean"].shape == (N,)


# ---- the worker run in a subprocess (and in-process for resumes) ---------------------------------
def _run_worker_recipe(out, model_json, die_at, how="exit", die_rank=None):
    from patchlens.run.launch import _zoo_data, cli_recipe
    from patchlens.zoo.registry import load_from

    model = load_from(model_json)
    inner = cli_recipe("caap", model, (0, 2), None)

    def recipe(model, batch):
        k = int(batch["index"][0]) // SHARD
        if die_at is not None and k >= die_at and (die_rank is None or k % 2 == die_rank):
            if how == "exit":
                os._exit(3)
            raise RuntimeError("boom")
        return inner(model, batch)

    return dataset(recipe, _zoo_data(f"zoo:clutter-digits:{N}", model, False), out,
                   model=model, batch_size=BATCH, shard_size=SHARD, progress=False,
                   recipe_name="caap", verbose=False)


if __name__ == "__main__":  # python tests/test_run.py OUT MODEL_JSON DIE_AT [DIE_RANK]
    torch.set_num_threads(1)
    _run_worker_recipe(sys.argv[1], sys.argv[2], int(sys.argv[3]),
                       die_rank=int(sys.argv[4]) if len(sys.argv) > 4 else None)
    from patchlens.run.launch import get_state, shutdown

    shutdown(get_state())
