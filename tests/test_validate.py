"""Every run-config value is checked when the config loads, paths before the run builds anything."""

from __future__ import annotations

import time

import pytest

from dpq_lightning.config import ConfigError, load_config

QS = "configs/quickstart.yaml"


@pytest.mark.parametrize("override,message", [
    ("data.global_batch_size=0", "data.global_batch_size must be an integer >= 1; got 0"),
    ("trainer.max_steps=-5", "trainer.max_steps must be an integer >= 1; got -5"),
    ("calib.lr=-1", "calib.lr must be a finite number in (0.0, inf]; got -1.0"),
    ("calib.w_rec=nan", "calib.w_rec must be a finite number in [0.0, inf]; got nan"),
    ("trainer.precision=bogus", "trainer.precision must be one of 32-true, 32, 16-mixed"),
    ("wandb.mode=bogus", "wandb.mode must be one of online, offline, disabled; got 'bogus'"),
    ("data.kind=bogus", "data.kind must be one of digits, latents, teacher; got 'bogus'"),
    ("trainer.accelerator=gpux", "trainer.accelerator must be one of auto, cpu, gpu"),
    ("calib.min_lr_ratio=2", "calib.min_lr_ratio must be a finite number in [0.0, 1.0]; got 2.0"),
])
def test_bad_values_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(QS, [override])
    assert message in str(e.value) and QS in str(e.value)


def test_all_loss_weights_zero_is_rejected():
    with pytest.raises(ConfigError, match="nothing to train on"):
        load_config(QS, ["calib.w_rec=0", "calib.w_ddpm=0", "calib.w_out=0"])


@pytest.mark.parametrize("overrides,message", [
    (["trainer.resume=/nope/last.ckpt"], "trainer.resume: checkpoint /nope/last.ckpt not found"),
    (["data.kind=latents"], "data.path is required for data.kind=latents"),
    (["data.kind=latents", "data.path=/nope/latents"], "data.path: folder /nope/latents not found"),
])
def test_missing_paths_fail_before_anything_is_built(overrides, message, tmp_path):
    from dpq_lightning.data import DataError
    from dpq_lightning.jobs.run import run

    cfg = load_config(QS, [f"output_dir={tmp_path / 'r'}", *overrides])
    t0 = time.time()
    with pytest.raises((FileNotFoundError, DataError), match=message.replace("(", r"\(")):
        run(cfg)
    assert time.time() - t0 < 5  # no teacher, no k-means
    assert not (tmp_path / "r").exists()  # nothing written


def test_random_bytes_as_checkpoint_say_so(tmp_path):
    from dpq_lightning.jobs.run import run

    bad = tmp_path / "teacher.ckpt"
    bad.write_bytes(bytes(range(256)) * 64)
    cfg = load_config(QS, [f"output_dir={tmp_path / 'r'}", f"model.checkpoint={bad}"])
    with pytest.raises(ValueError, match=r"teacher\.ckpt: the DiT checkpoint cannot be read \(.*\); it is damaged "
                                         r"or not a torch file: replace it") as info:
        run(cfg)
    # one line, and no advice to load the file unsafely: not in the message, not in the chain
    assert "\n" not in str(info.value) and "weights_only=False" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_every_reader_of_a_torch_file_says_which_file(tmp_path):
    """The digits classifier, a calibration checkpoint, a DiT checkpoint: random bytes give the
    one-line error naming the file, truncated files too."""
    from dpq_lightning.metrics.digits import load_digits_classifier
    from dpq_lightning.torch_files import UnreadableFileError, read_torch_file

    bad = tmp_path / "clf.pt"
    bad.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UnreadableFileError, match=r"clf\.pt: the digits classifier \(regenerate it with"):
        load_digits_classifier(str(bad))
    import torch

    good = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(1000)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(UnreadableFileError, match=r"cut\.pt: the cache cannot be read"):
        read_torch_file(cut, "the cache")
    assert torch.equal(read_torch_file(good, "the cache")["w"], torch.ones(1000))
