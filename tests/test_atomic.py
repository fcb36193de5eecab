"""The one atomic-write module: every kind of file round-trips, a failed write keeps the old file
and leaves no temp file, and files get the user's usual mode (not mkstemp's 0600)."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from dpq_lightning import atomic


@pytest.mark.parametrize("unique", [False, True])
def test_every_writer_round_trips_and_leaves_no_temp_file(tmp_path, unique):
    atomic.write_json_atomic({"a": [1, 2]}, tmp_path / "x.json", indent=2, newline=True, unique=unique)
    assert (tmp_path / "x.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ]\n}\n'
    atomic.write_text_atomic("hello", tmp_path / "x.txt", unique=unique)
    atomic.save_torch_atomic({"w": torch.arange(3)}, tmp_path / "x.pt", unique=unique)
    assert torch.equal(torch.load(tmp_path / "x.pt")["w"], torch.arange(3))
    atomic.save_npz_atomic({"arr_0": np.ones((2, 2))}, tmp_path / "x.npz", unique=unique)
    assert np.load(tmp_path / "x.npz")["arr_0"].sum() == 4  # no ".npz" appended to the name
    atomic.save_npy_atomic([1, 2, 3], tmp_path / "x.npy")
    atomic.save_png_atomic(np.zeros((4, 5), dtype=np.uint8), tmp_path / "x.png")
    from PIL import Image

    assert Image.open(tmp_path / "x.png").size == (5, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.npy", "x.npz", "x.png", "x.pt", "x.txt"]
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name


@pytest.mark.parametrize("unique", [False, True])
def test_a_failed_write_keeps_the_old_file(tmp_path, unique):
    path = tmp_path / "summary.json"
    atomic.write_json_atomic({"v": 1}, path)

    def broken(f):
        f.write(b'{"v": 2')  # half written, then the writer fails
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_with(path, broken, unique=unique)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
