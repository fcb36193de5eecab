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
    with pytest.raises(ValueError, match=r"teacher\.ckpt: cannot be read with torch\.load"):
        run(cfg)
