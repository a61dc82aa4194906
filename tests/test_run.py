"""Dataset-scale runs (patchlens.run): multi-process equality, kill + resume, corrupt shards,
bad inputs. Subprocess tests launch real processes (accelerate launch / python) on this CPU."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import torch_threads
from safetensors.torch import save_file

import patchlens
from patchlens import HookedViT, ViTConfig
from patchlens.errors import InputError
from patchlens.run import (
    RunEnvironmentWarning,
    RunLock,
    RunLockedError,
    ShardError,
    accelerate_command,
    cli_main,
    dataset,
    load_results,
    per_batch,
    per_example,
    values,
)
from patchlens.run import lock as L
from patchlens.run import shards as S

N, SHARD, BATCH = 22, 5, 4  # 5 shards, the last one short; batches do not divide shards
ROOT = Path(__file__).resolve().parent.parent
CLI_ARGS = ["--batch-size", str(BATCH), "--shard-size", str(SHARD), "--layers", "0:2",
            "--no-progress"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(autouse=True)
def one_thread():
    """Every process computes with one thread, so results are comparable bit for bit (the
    fused CPU attention kernel gives other bits with 1 and 2 threads at these shapes)."""
    with torch_threads(1):
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
    with torch_threads(1):
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
        assert r["environment"] == m["environment"]
    # what bitwise reproducibility depends on is recorded (the fixture pins one thread)
    env = m["environment"]
    assert env["torch"] == torch.__version__ and env["device"].startswith("cpu")
    assert (env["dtype"], env["threads"], env["batch_size"]) == ("float32", 1, BATCH)
    assert env["attention"].startswith("sdpa:")
    fp = m["fingerprint"]
    assert fp["recipe"]["name"] == "caap" and fp["recipe"]["args"]["layers"] == [0, 2]
    assert fp["data"] == {"zoo": "clutter-digits", "n": N, "split": "test", "seed": 0,
                          "pairs": False}
    assert len(fp["model"]["weights"]) == 64
    assert not (reference / L.LOCK).exists()  # released at the end


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
    assert res["per_example"].shape == (4, 2)  # batch-first: [item, layer]
    for i in range(4):  # row i is pair i's own sweep
        single = patchlens.activation_patching(m, clean[i:i + 1], corrupted[i:i + 1],
                                               patchlens.metrics.logit(torch.tensor([i])),
                                               per="layer", progress=False)
        torch.testing.assert_close(res["per_example"][i], single.values)
        torch.testing.assert_close(res["baseline"][i], single.baseline[0])
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


# ---- resume safety: fingerprint, environment, lock -----------------------------------------------
def _counting(calls: list):
    def rec(model, batch):
        calls.append(len(batch["index"]))
        return {"logits": model(batch["images"])}

    return rec


def test_resume_refuses_another_model_recipe_or_dataset(tmp_path):
    """Each mismatch is refused before anything is computed; the finished shards stay as they
    were. A model with the same weights (another object) resumes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 32, 32, generator=g)
    out, calls = tmp_path / "r", []
    kw = {"batch_size": 2, "shard_size": 2, "verbose": False}
    dataset(_counting(calls), x, out, model=_tiny_model(0), **kw)
    shards = _shard_bytes(out)
    calls.clear()
    with pytest.raises(InputError, match="another model"):
        dataset(_counting(calls), x, out, model=_tiny_model(1), **kw)
    with pytest.raises(InputError, match="another dataset"):
        dataset(_counting(calls), x + 1, out, model=_tiny_model(0), **kw)  # as many items
    with pytest.raises(InputError, match="another task"):
        dataset(_counting(calls), x, out, model=_tiny_model(0), task_args={"v": 2}, **kw)
    assert calls == [] and _shard_bytes(out) == shards
    s = dataset(_counting(calls), x, out, model=_tiny_model(0), **kw)  # same weights: resumes
    assert (s.skipped_shards, s.computed_shards, calls) == (2, 0, [])

    # adapters record the method and its arguments; image paths identify a dataset by path
    m = _tiny_model(0)
    caap = values(patchlens.caap, layers=(0, 2), progress=False)
    dataset(caap, x, tmp_path / "c", model=m, **kw)
    with pytest.raises(InputError, match="another task or other task arguments"):
        dataset(values(patchlens.caap, layers=(0, 1)), x, tmp_path / "c", model=m, **kw)
    dataset(values(patchlens.caap, layers=(0, 2)), x, tmp_path / "c", model=m, **kw)  # progress is neutral
    from PIL import Image

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(tmp_path / d / f"{i}.png")
    dataset(_logits, str(tmp_path / "a"), tmp_path / "p", model=m, **kw)
    with pytest.raises(InputError, match="another dataset"):
        dataset(_logits, str(tmp_path / "b"), tmp_path / "p", model=m, **kw)


def test_fingerprint_describes_values_not_identities():
    from patchlens.run.fingerprint import describe

    logit = patchlens.metrics.logit
    assert describe(logit(torch.tensor([1, 2]))) == describe(logit(torch.tensor([1, 2])))
    assert describe(logit(torch.tensor([1, 2]))) != describe(logit(torch.tensor([1, 3])))
    assert describe(per_batch(lambda b: b)) == describe(per_batch(lambda b: b))
    a, b = values(patchlens.caap, layers=(0, 2)), values(patchlens.caap, layers=(0, 2), progress=False)
    assert describe(a) == describe(b) != describe(values(patchlens.caap, layers=(1, 2)))
    assert "0x" not in json.dumps(describe({"m": torch.nn, "f": describe}))


def test_resume_in_another_environment_warns(tmp_path):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    m, out = _tiny_model(), tmp_path / "r"
    dataset(_logits, x, out, model=m, batch_size=2, shard_size=2, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same environment: no warning
        dataset(_logits, x, out, model=m, batch_size=2, shard_size=2, verbose=False)
    with torch_threads(2), pytest.warns(RunEnvironmentWarning, match=r"threads: 1 -> 2"):
        dataset(_logits, x, out, model=m, batch_size=2, shard_size=2, verbose=False)
    with pytest.warns(RunEnvironmentWarning, match=r"batch_size: 2 -> 3"):
        dataset(_logits, x, out, model=m, batch_size=3, shard_size=2, verbose=False)
    # the model's dtype is part of its identity (its weights' bytes): another model, refused
    with pytest.raises(InputError, match="another model"):
        dataset(_logits, x.double(), out, model=_tiny_model().double(), batch_size=2,
                shard_size=2, verbose=False)


@pytest.mark.parametrize("use_flock", [True, False], ids=["flock", "pidfile"])
def test_lock_refuses_a_live_second_writer(tmp_path, monkeypatch, use_flock):
    if not use_flock:
        monkeypatch.setattr(L, "fcntl", None)
    out = tmp_path / "r"
    x = torch.randn(2, 3, 32, 32)
    holder = RunLock(out).acquire()  # a live writer (this process, another open of the file)
    try:
        with pytest.raises(RunLockedError, match=f"being written by process {os.getpid()}"):
            dataset(_logits, x, out, model=_tiny_model(), verbose=False)
        assert not (out / S.MANIFEST).exists()  # refused before touching anything
    finally:
        holder.release()
    assert not (out / L.LOCK).exists()
    assert dataset(_logits, x, out, model=_tiny_model(), verbose=False).computed_shards == 1
    assert not (out / L.LOCK).exists()


@pytest.mark.parametrize("use_flock", [True, False], ids=["flock", "pidfile"])
def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch, use_flock):
    if not use_flock:
        monkeypatch.setattr(L, "fcntl", None)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not L.pid_alive(p.pid) and L.pid_alive(os.getpid())
    out = tmp_path / "r"
    out.mkdir()
    record = {"pid": p.pid, "host": socket.gethostname(), "since": "2000-01-01T00:00:00"}
    (out / L.LOCK).write_text(json.dumps(record))
    x = torch.randn(2, 3, 32, 32)
    assert dataset(_logits, x, out, model=_tiny_model(), verbose=False).computed_shards == 1
    assert not (out / L.LOCK).exists()
    if not use_flock:  # without flock, a lock of another host cannot be judged: refused
        (out / L.LOCK).write_text(json.dumps({**record, "host": "another-host"}))
        with pytest.raises(RunLockedError, match="another-host"):
            dataset(_logits, x, out, model=_tiny_model(), verbose=False)


def _alive_ranks(pids: list[int]) -> list[int]:
    return [p for p in pids if L.pid_alive(p)]


def test_watchdog_only_under_a_launcher(monkeypatch):
    from patchlens.run.launch import LAUNCHER_ENV, launched_by_launcher

    for k in (*LAUNCHER_ENV, "PATCHLENS_WATCH_LAUNCHER"):
        monkeypatch.delenv(k, raising=False)
    assert not launched_by_launcher()  # a plain process (e.g. under nohup) keeps running
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_by_launcher()
    monkeypatch.setenv("PATCHLENS_WATCH_LAUNCHER", "0")
    assert not launched_by_launcher()


def test_ranks_exit_when_the_launcher_is_killed(tmp_path):
    """SIGKILL of `accelerate launch`: both ranks (in their own sessions, idle) exit within
    a few seconds, by their launcher watchdog."""
    log = tmp_path / "log.txt"
    cmd = accelerate_command(["--hold", str(tmp_path)], num_processes=2, script=__file__)
    with open(log, "w") as f:
        launcher = subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 100
        while len(pids) < 2:
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.2)
            pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))
                    if p.read_text().strip()]
        assert _alive_ranks(pids) == pids
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 5
        while _alive_ranks(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive_ranks(pids) == [], log.read_text()[-3000:]
        time.sleep(0.2)
        assert log.read_text().count("the launcher (pid") == 2
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for p in _alive_ranks(pids):
            os.kill(p, signal.SIGKILL)


# ---- errors of `patchlens run`: one line, exit 2 ------------------------------------------------
def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _cli(model_json, out, *extra, data="zoo:clutter-digits:3", recipe="logits"):
    return cli_main([recipe, data, "--out", str(out), "--model", model_json, "--no-progress",
                     *extra])


def test_cli_unknown_zoo_split(model_json, tmp_path, capsys):
    assert _cli(model_json, tmp_path / "o", data="zoo:clutter-digits:3:validation") == 2
    line = _error_line(capsys)
    assert "'validation'" in line and "train, test" in line


def test_cli_out_under_a_file_or_unwritable(model_json, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert _cli(model_json, tmp_path / "file" / "run") == 2
    assert "is a file, not a directory" in _error_line(capsys)

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    assert _cli(model_json, tmp_path / "ro" / "run") == 2
    line = _error_line(capsys)
    assert "Permission denied" in line and "--out" in line


def test_cli_malformed_model_record(model_json, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"config": {"d_model": 32,}')
    assert _cli(str(bad), tmp_path / "o") == 2
    line = _error_line(capsys)
    assert "bad.json is not valid JSON" in line and "line 1" in line


def test_cli_model_record_without_sha256(model_json, tmp_path, capsys):
    rec = json.loads(Path(model_json).read_text())
    del rec["sha256"]
    nosha = Path(model_json).with_name("nosha.json")
    nosha.write_text(json.dumps(rec))
    assert _cli(str(nosha), tmp_path / "o") == 2
    assert "lacks ['sha256']" in _error_line(capsys)


def test_cli_manifest_missing_keys(model_json, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / S.MANIFEST).write_text(json.dumps({"format": S.FORMAT, "n_items": 3}))
    assert _cli(model_json, out) == 2
    line = _error_line(capsys)
    assert "lacks or has malformed keys" in line and "shard_size" in line and "--no-resume" in line
    assert _cli(model_json, out, "--no-resume") == 0  # what the message says to do
    assert load_results(out)["logits"].shape == (3, 10)


def test_cli_disk_full(model_json, tmp_path, capsys, monkeypatch):
    real = S.atomic_write_bytes

    def full(path, data):
        if str(path).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(S, "atomic_write_bytes", full)
    out = tmp_path / "o"
    assert _cli(model_json, out) == 2
    line = _error_line(capsys)
    assert "no space left on the device" in line and str(out) in line and "resume" in line
    assert not (out / L.LOCK).exists()
    monkeypatch.setattr(S, "atomic_write_bytes", real)
    assert _cli(model_json, out) == 0  # after freeing space, the same command completes


def test_cli_refuses_while_another_writer_runs(model_json, tmp_path, capsys):
    out = tmp_path / "o"
    with RunLock(out):
        assert _cli(model_json, out) == 2
    assert "being written by process" in _error_line(capsys)


def test_run_help_shows_its_options(capsys):
    assert cli_main(["--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--model", "--batch-size", "--shard-size", "--layers", "--corrupted",
                "--site", "--no-resume", "--no-progress", "--no-verify", "--cpu"):
        assert opt in text
    assert "caap|activation|logits" in text


def test_run_imports_go_one_way():
    """No import cycle inside patchlens.run; process glue, file format, lock and fingerprint
    import nothing of the runner, and only the package and __main__ import the CLI."""
    from import_graph import cycles, import_graph

    g = import_graph(ROOT / "patchlens" / "run", "patchlens.run")
    assert cycles(g) == []
    for base in ("launch", "shards", "lock", "fingerprint", "inputs"):
        assert g[f"patchlens.run.{base}"] == set(), base
    users = {m for m, deps in g.items() if "patchlens.run.cli" in deps}
    assert users == {"patchlens.run", "patchlens.run.__main__"}


# ---- the worker run in a subprocess (and in-process for resumes) ---------------------------------
def _run_worker_recipe(out, model_json, die_at, how="exit", die_rank=None):
    from patchlens.run.cli import cli_task, zoo_data
    from patchlens.zoo.registry import load_from

    model = load_from(model_json)
    inner = cli_task("caap", model, (0, 2), None)

    def recipe(model, batch):
        k = int(batch["index"][0]) // SHARD
        if die_at is not None and k >= die_at and (die_rank is None or k % 2 == die_rank):
            if how == "exit":
                os._exit(3)
            raise RuntimeError("boom")
        return inner(model, batch)

    # the same task arguments whether this module runs as __main__ or under pytest
    return dataset(recipe, zoo_data(f"zoo:clutter-digits:{N}", model, False), out,
                   model=model, batch_size=BATCH, shard_size=SHARD, progress=False,
                   task_name="caap", task_args=inner.run_spec, verbose=False)


def _hold(folder: str) -> None:
    """A launched rank that records its pid and idles (the launcher-death test)."""
    from patchlens.run.launch import get_state

    state = get_state()
    Path(folder, f"rank{state.process_index}.pid").write_text(str(os.getpid()))
    time.sleep(120)


if __name__ == "__main__" and sys.argv[1] == "--hold":  # python tests/test_run.py --hold DIR
    _hold(sys.argv[2])
    sys.exit(0)
if __name__ == "__main__":  # python tests/test_run.py OUT MODEL_JSON DIE_AT [DIE_RANK]
    torch.set_num_threads(1)
    _run_worker_recipe(sys.argv[1], sys.argv[2], int(sys.argv[3]),
                       die_rank=int(sys.argv[4]) if len(sys.argv) > 4 else None)
    from patchlens.run.launch import get_state, shutdown

    shutdown(get_state())
