"""Data: shard format and checks, DataModules (digits, latents, teacher samples), per-device batch
math, exact mid-epoch resume under Lightning, 2-rank DDP sharding, and latent extraction end to end
with a tiny AutoencoderKL built from its config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import load_script
from dpq_lightning.data import (
    DataError,
    DigitsDataModule,
    LatentDataModule,
    TeacherSamplesDataModule,
    balanced_labels,
    per_device_batch_size,
    validate_shards,
    write_shards,
    write_teacher_samples,
)
from dpq_lightning.diffusion import VAE_SCALE
from dpq_lightning.data.digits import load_digits_tensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """One digits shard cache for the module (written once by prepare_data)."""
    cache = tmp_path_factory.mktemp("cache")
    DigitsDataModule(64, cache_dir=str(cache)).prepare_data()
    return str(cache)


def _small_shards(path, n=40, shape=(2, 3, 3), num_classes=4, **kw):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % num_classes
    meta = write_shards((x, y), path, num_classes=num_classes, **kw)
    return x, y, meta


def _all_samples(path):
    from litdata import StreamingDataset

    ds = StreamingDataset(str(path), shuffle=False)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["x"] for it in items]), torch.tensor([it["y"] for it in items])


# ------------------------------------------------------------------------------ shard format


def test_write_shards_roundtrip_meta_and_overwrite(tmp_path):
    out = tmp_path / "s"
    x, y, meta = _small_shards(out, vae="ema", scale=VAE_SCALE, source="unit", chunk_bytes=300)
    assert meta == validate_shards(out, expect_shape=[2, 3, 3], expect_vae="ema", expect_num_classes=4)
    on_disk = json.loads((out / "dpq_meta.json").read_text())
    assert on_disk["format"] == "dpq-latents/1" and on_disk["dtype"] == "float16" and on_disk["count"] == 40
    assert on_disk["scale"] == VAE_SCALE and on_disk["shape"] == [2, 3, 3] and on_disk["source"] == "unit"
    assert len(json.loads((out / "index.json").read_text())["chunks"]) > 1  # several chunks
    xs, ys = _all_samples(out)
    assert xs.dtype == torch.float16 and torch.equal(xs, x.half()) and torch.equal(ys, y)
    with pytest.raises(DataError, match="not empty.*overwrite"):
        _small_shards(out)
    _small_shards(out, n=8, overwrite=True)
    assert validate_shards(out)["count"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp or old directories left


def test_write_shards_crash_leaves_nothing(tmp_path):
    def broken():
        yield {"x": torch.zeros(1, 2, 2), "y": 0}
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        write_shards(broken(), tmp_path / "s", num_classes=2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="label 5"):
        write_shards([{"x": torch.zeros(1, 2, 2), "y": 5}], tmp_path / "s", num_classes=2)
    with pytest.raises(DataError, match=r"shape \[1, 3, 3\].*\[1, 2, 2\]"):
        write_shards([(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 3, 3), 0)], tmp_path / "s", num_classes=2)
    with pytest.raises(DataError, match="not finite"):
        write_shards([(torch.full((1, 2, 2), 1e6), 0)], tmp_path / "s", num_classes=2)  # fp16 overflow
    assert list(tmp_path.iterdir()) == []


def test_validate_shards_errors(tmp_path):
    with pytest.raises(DataError, match=f"data.path.*{tmp_path / 'nope'}.*does not exist"):
        validate_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        validate_shards(tmp_path / "empty")

    good = tmp_path / "good"
    _small_shards(good, chunk_bytes=300)
    with pytest.raises(DataError, match=r"shape \[2, 3, 3\].*expects \[4, 32, 32\]") as err:
        validate_shards(good, expect_shape=(4, 32, 32))
    assert "data.path" in str(err.value)
    with pytest.raises(DataError, match="vae=None.*vae='ema'"):
        validate_shards(good, expect_vae="ema")
    with pytest.raises(DataError, match="num_classes=4.*num_classes=1000"):
        validate_shards(good, expect_num_classes=1000)

    index = json.loads((good / "index.json").read_text())
    chunk = good / index["chunks"][1]["filename"]
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-7])  # truncated
    with pytest.raises(DataError, match=f"{chunk}.*truncated"):
        validate_shards(good)
    chunk.unlink()
    with pytest.raises(DataError, match=f"chunk file {chunk} is missing"):
        validate_shards(good)
    chunk.write_bytes(data)
    validate_shards(good)

    (good / "index.json").rename(tmp_path / "index.json")
    with pytest.raises(DataError, match=f"{good / 'index.json'} is missing"):
        validate_shards(good)
    (tmp_path / "index.json").rename(good / "index.json")
    meta = json.loads((good / "dpq_meta.json").read_text())
    (good / "dpq_meta.json").unlink()
    with pytest.raises(DataError, match="dpq_meta.json is missing"):
        validate_shards(good)
    (good / "dpq_meta.json").write_text(json.dumps({**meta, "count": 41}))
    with pytest.raises(DataError, match="lists 40 samples.*count=41"):
        validate_shards(good)

    # meta and index agree, but the stored tensors are not what the meta says: found by reading
    wrong = tmp_path / "wrong"
    _small_shards(wrong, shape=(1, 4, 4))
    meta = json.loads((wrong / "dpq_meta.json").read_text())
    (wrong / "dpq_meta.json").write_text(json.dumps({**meta, "shape": [1, 8, 8]}))
    first_chunk = json.loads((wrong / "index.json").read_text())["chunks"][0]["filename"]
    with pytest.raises(DataError, match=rf"chunk file {wrong / first_chunk} holds x of \[1, 4, 4\].*\[1, 8, 8\]"):
        validate_shards(wrong)


# ------------------------------------------------------------------------------ DataModules


def test_digits_datamodule_batches_and_full_epoch(digits_cache):
    x_all, y_all = load_digits_tensors()
    dm = DigitsDataModule(64, cache_dir=digits_cache, seed=3, drop_last=False)
    dm.setup("fit")
    assert dm.meta["count"] == 1797 and dm.meta["shape"] == [1, 8, 8] and dm.meta["vae"] is None
    assert dm.meta["scale"] == 1.0 and dm.meta["num_classes"] == 10
    batches = list(dm.train_dataloader())
    b = batches[0]
    assert set(b) == {"x", "y"} and b["x"].shape == (64, 1, 8, 8) and b["y"].shape == (64,)
    assert b["x"].dtype == torch.float32 and b["y"].dtype == torch.int64
    assert b["x"].min() >= -1 and b["x"].max() <= 1 and 0 <= b["y"].min() and b["y"].max() <= 9
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["y"] for b in batches])
    assert len(x) == 1797  # one epoch = every digit once, exactly (fp16 storage is exact for k/8-1)
    got = sorted(zip(y.tolist(), map(tuple, x.flatten(1).tolist())))
    want = sorted(zip(y_all.tolist(), map(tuple, x_all.flatten(1).tolist())))
    assert got == want


def test_digits_epochs_full_batches_reshuffled_deterministic(digits_cache):
    def epochs(seed, n=2):
        dm = DigitsDataModule(64, cache_dir=digits_cache, seed=seed)
        dm.setup("fit")
        dl = dm.train_dataloader()
        return [[b["x"].sum().item() for b in dl] for _ in range(n)], len(dl)

    (e1, e2), n = epochs(0)
    assert n == 28 == len(e1) == len(e2)  # 1797 // 64 full batches, last partial batch dropped
    assert e1 != e2  # every epoch reshuffles
    assert epochs(0)[0] == [e1, e2]  # ... deterministically from the seed
    assert epochs(1)[0][0] != e1


def test_per_device_batch_math(digits_cache):
    assert per_device_batch_size(64, 2) == 32 and per_device_batch_size(256, 8) == 32
    with pytest.raises(ValueError, match="data.global_batch_size=33.*world size 2") as err:
        per_device_batch_size(33, 2)
    assert "33" in str(err.value) and "2" in str(err.value)

    dm = DigitsDataModule(64, cache_dir=digits_cache)
    dm.trainer = SimpleNamespace(world_size=2)  # devices x nodes, as Trainer reports it
    dm.setup("fit")
    assert dm.batch_size == 32
    dm = DigitsDataModule(33, cache_dir=digits_cache)
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="33.*2"):
        dm.setup("fit")


def test_latent_datamodule_checks_expectations(tmp_path):
    _small_shards(tmp_path / "s", vae="mse", scale=VAE_SCALE)
    dm = LatentDataModule(str(tmp_path / "s"), 8, expect_shape=[4, 32, 32])
    with pytest.raises(DataError, match=r"\[2, 3, 3\].*\[4, 32, 32\]"):
        dm.setup("fit")
    dm = LatentDataModule(str(tmp_path / "s"), 8, expect_shape=[2, 3, 3], expect_vae="mse", expect_num_classes=4)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["x"].shape == (8, 2, 3, 3) and b["x"].dtype == torch.float32 and b["y"].dtype == torch.int64
    with pytest.raises(DataError, match="fewer than one global batch"):
        LatentDataModule(str(tmp_path / "s"), 64).setup("fit")


def test_shuffle_mixes_whole_chunk(tmp_path):
    # 512 samples stored class by class in one chunk: a batch must still mix the classes (LitData's
    # default shuffles blocks of 256 neighbours, which would give single-class batches here)
    x = torch.zeros(512, 1, 2, 2)
    write_shards((x, torch.arange(512) // 256), tmp_path / "sorted", num_classes=2)
    dm = LatentDataModule(str(tmp_path / "sorted"), 32, seed=0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 16 and all(0 < b["y"].sum() < 32 for b in batches)


def test_teacher_samples(tmp_path):
    calls = []

    def sample_fn(labels, generator):  # stand-in for the teacher's sampler: x0 = label + small noise
        calls.append(len(labels))
        noise = torch.randn(len(labels), 1, 4, 4, generator=generator)
        return labels.float().view(-1, 1, 1, 1) + 0.01 * noise

    meta = write_teacher_samples(sample_fn, 25, 10, tmp_path / "t", batch_size=8, seed=5)
    assert calls == [8, 8, 8, 1]
    assert meta["source"] == "teacher" and meta["count"] == 25 and meta["shape"] == [1, 4, 4]
    x, y = _all_samples(tmp_path / "t")
    counts = torch.bincount(y, minlength=10)
    assert counts.sum() == 25 and counts.min() == 2 and counts.max() == 3  # balanced
    assert torch.equal(y, balanced_labels(25, 10, 5))
    assert (x.float().mean((1, 2, 3)) - y.float()).abs().max() < 0.05  # x0 belongs to its label
    write_teacher_samples(sample_fn, 25, 10, tmp_path / "t2", batch_size=8, seed=5)
    assert torch.equal(_all_samples(tmp_path / "t2")[0], x)  # deterministic given the seed

    dm = TeacherSamplesDataModule(sample_fn, 25, 10, str(tmp_path / "t3"), global_batch_size=5, sample_batch_size=8,
                                  seed=5)
    dm.prepare_data()
    dm.prepare_data()  # already there: reused, not redrawn
    assert len(calls) == 12
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(b["x"].shape == (5, 1, 4, 4) for b in batches)
    assert sorted(torch.cat([b["y"] for b in batches]).tolist()) == sorted(y.tolist())


# ------------------------------------------------------------------------------ Lightning: resume


class _Recorder:
    """A tiny LightningModule (Linear on flattened x) that records each step's batch sums."""

    @staticmethod
    def make():
        import lightning as L

        class Tiny(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(64, 1)
                self.seen = []

            def training_step(self, batch, batch_idx):
                self.seen.append((self.global_step, batch["x"].double().sum().item(), batch["y"].sum().item()))
                return self.lin(batch["x"].flatten(1)).pow(2).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.01)

        return Tiny()


def _fit(cache, max_steps, ckpt_dir=None, every=None, resume=None):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = _Recorder.make()
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=bool(every),
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=DigitsDataModule(64, cache_dir=cache, seed=7), ckpt_path=resume)
    return model.seen


@pytest.fixture(scope="module")
def uninterrupted(digits_cache):
    return _fit(digits_cache, 34)  # 28 steps per epoch: 34 steps cross one epoch boundary


@pytest.mark.parametrize("stop", [3, 28, 30])  # mid-epoch, at the epoch end, in the second epoch
def test_resume_mid_epoch_is_exact(digits_cache, uninterrupted, tmp_path, stop):
    assert len(uninterrupted) == 34
    first = _fit(digits_cache, stop, ckpt_dir=tmp_path, every=stop)
    assert first == uninterrupted[:stop]
    (ckpt,) = tmp_path.glob("*.ckpt")
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state[0]["num_samples_yielded"] == 64 * (stop - 28 * (stop > 28))  # LitData's loader state
    resumed = _fit(digits_cache, 34, resume=str(ckpt))
    assert resumed == uninterrupted[stop:]  # steps stop+1..34: identical batches, bit for bit


# ------------------------------------------------------------------------------ Lightning: DDP

_DDP_SCRIPT = """
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
torch.set_num_threads(1)
import lightning as L
from dpq_lightning.data import LatentDataModule

class Ids(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.seen = []
    def training_step(self, batch, batch_idx):
        ids = batch["x"][:, 0, 0, 0].long()  # x encodes the sample id
        both = self.all_gather(batch["x"].sum())  # the two ranks' batch sums of this step
        self.seen.append({"ids": ids.tolist(), "sums": both.tolist()})
        return self.lin(batch["x"].flatten(1)).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

def fit(data, max_steps, ckpt_dir=None, resume=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    m = Ids()
    dm = LatentDataModule(data, global_batch_size=20, seed=1)
    cbs = [ModelCheckpoint(dirpath=ckpt_dir, filename="stop", every_n_train_steps=max_steps)] if ckpt_dir else []
    tr = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps, logger=False,
                   enable_checkpointing=bool(ckpt_dir), callbacks=cbs, enable_progress_bar=False,
                   enable_model_summary=False)
    tr.fit(m, datamodule=dm, ckpt_path=resume)
    return tr.global_rank, dm.batch_size, m.seen

if __name__ == "__main__":
    data, out = sys.argv[1], sys.argv[2]
    rank, batch_size, full = fit(data, 60)
    _, _, first = fit(data, 25, ckpt_dir=out)  # stop in the middle of the second epoch ...
    _, _, resumed = fit(data, 60, resume=os.path.join(out, "stop.ckpt"))  # ... and resume on both ranks
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"batch_size": batch_size, "seen": full, "first": first, "resumed": resumed}, f)
    if torch.distributed.is_initialized():  # as jobs/run.py does: gloo can abort at exit otherwise (seen: SIGABRT)
        torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_two_ranks_disjoint_samples_and_resume(tmp_path):
    n = 400
    x = torch.zeros(n, 1, 2, 2)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)  # sample id, exact in float32 storage
    write_shards((x, torch.arange(n) % 3), tmp_path / "ids", num_classes=3, dtype="float32", chunk_bytes=2000)
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ids"), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["batch_size"] == r1["batch_size"] == 10  # global 20 over 2 devices
    assert len(r0["seen"]) == len(r1["seen"]) == 60  # 20 steps per epoch: three epochs
    for a, b in zip(r0["seen"], r1["seen"]):
        assert len(a["ids"]) == len(b["ids"]) == 10
        assert not set(a["ids"]) & set(b["ids"])  # disjoint within a step
        assert a["sums"] == b["sums"]  # gathered across ranks: the same pair on both
        assert a["sums"][0] == pytest.approx(sum(a["ids"])) and a["sums"][1] == pytest.approx(sum(b["ids"]))
    for epoch in range(3):
        ids = [i for r in (r0, r1) for s in r["seen"][20 * epoch : 20 * epoch + 20] for i in s["ids"]]
        assert sorted(ids) == list(range(n))  # each epoch: every sample once over both ranks
    assert r0["seen"][0]["ids"] != r0["seen"][20]["ids"]  # reshuffled per epoch
    for r in (r0, r1):  # DDP resume: each rank continues exactly where the uninterrupted run went
        assert r["first"] == r["seen"][:25] and r["resumed"] == r["seen"][25:]


# ------------------------------------------------------------------------------ extraction


def _load_script():
    return load_script("data/extract_latents.py", "extract_latents_script")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 small PNGs (odd sizes, so the crop matters) in 3 class folders, and a tiny VAE dir."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    base = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    for c in ["n02", "n01", "n03"]:
        (base / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 256, (18 + 5 * i, 23, 3), dtype=np.uint8)
            Image.fromarray(arr).save(base / "imgs" / c / f"img{i}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), latent_channels=4,
        norm_num_groups=32, sample_size=32,
    )
    vae.save_pretrained(base / "vae")
    return base, vae.eval()


def _run(script, *args):
    return script.main([*map(str, args), "--image-size", "16", "--device", "cpu", "--workers", "0", "--no-progress"])


def test_extract_latents_single_rank(image_folder, tmp_path):
    from dpq_lightning.data.extract import extraction_order, image_seed, list_image_folder, load_image

    base, vae = image_folder
    script = _load_script()
    out = tmp_path / "lat"
    assert _run(script, "--root", base / "imgs", "--out", out, "--vae-path", base / "vae", "--vae", "ema",
                "--batch-size", "5", "--seed", "3") == 0
    meta = validate_shards(out, expect_shape=[4, 8, 8], expect_vae="ema", expect_num_classes=3)
    assert meta["count"] == 12 and meta["scale"] == VAE_SCALE and meta["latent"] == "sample"
    assert json.loads((out / "classes.json").read_text()) == ["n01", "n02", "n03"]  # sorted dir order

    x, y = _all_samples(out)  # stored order: a seeded permutation of the files
    files, _ = list_image_folder(base / "imgs")
    assert [lab for _, lab in files] == [0] * 4 + [1] * 4 + [2] * 4
    order = extraction_order(12, 3)
    assert sorted(order) == list(range(12)) and order != list(range(12))
    assert y.tolist() == [files[i][1] for i in order]  # classes mixed inside the chunk
    for pos in (0, 7):  # one in the first batch of 5, one in the second
        i = order[pos]
        img = load_image(files[i][0], 16)[None]
        with torch.no_grad():
            dist = vae.encode(img).latent_dist
        want = dist.sample(generator=torch.Generator().manual_seed(image_seed(3, i, False))) * VAE_SCALE
        torch.testing.assert_close(x[pos].float(), want[0], atol=2e-3, rtol=2e-3)
        assert not torch.allclose(x[pos].float(), dist.mode()[0] * VAE_SCALE, atol=1e-3)  # sampled, not the mode

    dm = LatentDataModule(str(out), 4, expect_shape=[4, 8, 8], expect_vae="ema", expect_num_classes=3)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["x"].shape == (4, 4, 8, 8) and b["x"].dtype == torch.float32 and b["y"].shape == (4,)
    assert b["y"].min() >= 0 and b["y"].max() <= 2

    assert _run(script, "--root", base / "imgs", "--out", out, "--vae-path", base / "vae") == 2  # exists


def test_extract_flip_and_two_ranks_merge(image_folder, tmp_path):
    base, _ = image_folder
    script = _load_script()
    common = ["--root", base / "imgs", "--vae-path", base / "vae", "--flip", "--batch-size", "4"]
    assert _run(script, *common, "--out", tmp_path / "one") == 0
    for rank in (0, 1):  # two ranks, one after the other
        assert _run(script, *common, "--out", tmp_path / "two", "--rank", rank, "--world-size", 2) == 0
    parts = tmp_path / "two.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000", "part-00001"]
    assert validate_shards(parts / "part-00001")["count"] == 12  # 6 images x 2
    assert script.main(["--merge", "--out", str(tmp_path / "two")]) == 0
    assert not parts.exists()
    one = validate_shards(tmp_path / "one", expect_shape=[4, 8, 8], expect_vae="custom")
    two = validate_shards(tmp_path / "two", expect_shape=[4, 8, 8])
    assert one["count"] == two["count"] == 24 and one["flip"] is True
    assert json.loads((tmp_path / "two" / "classes.json").read_text()) == ["n01", "n02", "n03"]

    x1, y1 = _all_samples(tmp_path / "one")  # image at position 0 of the order, its mirror, position 1, ...
    x2, y2 = _all_samples(tmp_path / "two")  # rank 0's positions 0,2,4,.. (with mirrors), then rank 1's
    order = [2 * i + f for r in (0, 1) for i in range(r, 12, 2) for f in (0, 1)]
    assert torch.equal(y2, y1[order])
    torch.testing.assert_close(x2.float(), x1[order].float(), atol=2e-3, rtol=2e-3)  # rank-independent
    assert not torch.allclose(x1[0].float(), x1[1].float(), atol=1e-2)  # the mirror is its own latent

    dm = LatentDataModule(str(tmp_path / "two"), 8, expect_num_classes=3)
    dm.trainer = SimpleNamespace(world_size=2)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["x"].shape == (4, 4, 8, 8)


def test_extract_errors_and_rank_detection(image_folder, tmp_path, capsys, monkeypatch):
    from dpq_lightning.data.extract import center_crop_arr, detect_rank, limit_files, list_image_folder, merge_parts

    base, _ = image_folder
    script = _load_script()
    # offline, no local VAE: one line saying what to download and which flag to set
    assert _run(script, "--root", base / "imgs", "--out", tmp_path / "x", "--vae", "mse") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "huggingface-cli download stabilityai/sd-vae-ft-mse" in err and "--vae-path" in err
    assert _run(script, "--root", base / "imgs", "--out", tmp_path / "x", "--vae-path", tmp_path) == 2
    assert "no config.json" in capsys.readouterr().err
    assert _run(script, "--root", tmp_path / "none", "--out", tmp_path / "x", "--vae-path", base / "vae") == 2
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    # a rank missing at merge time
    assert _run(script, "--root", base / "imgs", "--out", tmp_path / "m", "--vae-path", base / "vae",
                "--rank", 1, "--world-size", 3) == 0
    with pytest.raises(DataError, match=r"missing \[0, 2\]"):
        merge_parts(tmp_path / "m")

    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    assert detect_rank() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert detect_rank() == (0, 1)  # a batch script is one process, whatever the allocation's task count
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert detect_rank() == (1, 4)  # an srun step's task
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert detect_rank() == (2, 3) and detect_rank(0, 2) == (0, 2)
    with pytest.raises(DataError, match="rank 3"):
        detect_rank(3, 2)

    files, _ = list_image_folder(base / "imgs")
    assert limit_files(files, 4) == [files[0], files[1], files[4], files[8]]  # round-robin over classes

    import numpy as np
    from PIL import Image

    arr = np.zeros((40, 100, 3), dtype=np.uint8)
    arr[:, 50:] = 255  # left half black, right half white
    crop = np.asarray(center_crop_arr(Image.fromarray(arr), 16))
    assert crop.shape == (16, 16, 3)  # short side -> 16, centre square of the 16x40 resize
    assert crop[:, :6].max() < 20 and crop[:, -6:].min() > 235


def test_script_is_thin_and_documented():
    text = (REPO / "data" / "extract_latents.py").read_text()
    assert "0.18215" not in text and "0.18215" not in (REPO / "dpq_lightning" / "data" / "extract.py").read_text()
    readme = (REPO / "data" / "README.md").read_text()
    for flag in ("--vae", "--vae-path", "--flip", "--merge", "--world-size", "--image-size", "--limit"):
        assert flag in readme
    assert text.count("def ") <= 4  # parsing only; the work is in dpq_lightning.data.extract
