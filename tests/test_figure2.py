"""Figure 2 (block error along the sampling trajectory, absolute and relative): the trajectory
functions against a hand computation on the small trained DiT, and ``studies/scripts/figure2.py`` end to end
on tiny counts (teacher checkpoint + two packed students written here)."""

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BITS, SMALL_ARCH, SMALL_OVERRIDES, load_script
from PIL import Image

from dpq_lightning.evaluation.trajectory import (absolute_block_errors, block_error_trajectories,
                                                 block_error_trajectory, relative_block_errors)
from dpq_lightning.models.hooks import BlockOutputRecorder
from dpq_lightning.quant import QuantConfig, quantize_
from dpq_lightning.sampling import spaced_steps

ROOT = Path(__file__).parents[1]
DEPTH = SMALL_ARCH["depth"]
SHAPE = (1, 8, 8)


def _script():
    return load_script("studies/scripts/figure2.py")


def quantized(teacher, bits: int):
    student = copy.deepcopy(teacher)
    quantize_(student, QuantConfig(**BITS[bits], overrides=SMALL_OVERRIDES, kmeans_backend="torch"))
    return student.eval()


@pytest.fixture(scope="module")
def pair(trained_small_dit):
    teacher = copy.deepcopy(trained_small_dit).eval()
    return teacher, quantized(teacher, 1)


def block_outputs(model, x, t, y) -> list[torch.Tensor]:
    with BlockOutputRecorder(model, detach=True) as rec:
        model(x, t, y)
    return rec.outputs  # DEPTH tensors (B, tokens, hidden)


@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_one_step_matches_hand_computation(pair, cfg_scale):
    """Row 0 = the first sampling step: one model call at t = 999 on x_T drawn from the seed; under
    guidance the model batch is [conditional rows; unconditional rows] and both halves count."""
    teacher, student = pair
    labels, seed = torch.tensor([3, 7, 1]), 5
    assert spaced_steps(1000, 2) == [0, 999]  # 2 steps: t = 999 first (steps=1 would be t = 0 alone)
    got = block_error_trajectories(teacher, student, labels, SHAPE, steps=2, method="ddim", seed=seed,
                                   follow="teacher", cfg_scale=cfg_scale)
    x = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(seed))  # (3, 1, 8, 8): x_T
    y, t = labels, torch.full((3,), 999)
    if cfg_scale != 1.0:
        x, y, t = torch.cat([x, x]), torch.cat([y, torch.full_like(y, teacher.null_class)]), torch.cat([t, t])  # (6, ...)
    with torch.no_grad():
        h_t, h_s = block_outputs(teacher, x, t, y), block_outputs(student, x, t, y)
    for b in range(DEPTH):
        diff = (h_s[b].double() - h_t[b].double()).pow(2).sum()
        ref = h_t[b].double().pow(2).sum()
        assert got["relative"][0, b].item() == pytest.approx((diff / ref).item(), rel=1e-9)
        assert got["absolute"][0, b].item() == pytest.approx((diff / h_t[b].numel()).item(), rel=1e-9)
        # the two kinds differ exactly by the teacher's mean square per element
        assert got["absolute"][0, b].item() == pytest.approx(
            got["relative"][0, b].item() * ref.item() / h_t[b].numel(), rel=1e-9)
    assert got["absolute"].dtype == got["relative"].dtype == torch.float64
    assert (got["relative"] > 0).all() and (got["absolute"] > 0).all()


def test_trajectories_shapes_zero_and_compat(pair):
    teacher, student = pair
    labels = torch.arange(4)
    same = block_error_trajectories(teacher, copy.deepcopy(teacher), labels, SHAPE, steps=3, method="ddpm", seed=1)
    for kind in ("relative", "absolute"):  # identical models: exactly zero at every step and block
        assert same[kind].shape == (3, DEPTH) and torch.equal(same[kind], torch.zeros(3, DEPTH, dtype=torch.float64))
    for method in ("ddim", "ddpm"):
        for follow in ("teacher", "student"):
            both = block_error_trajectories(teacher, student, labels, SHAPE, steps=4, method=method, seed=2,
                                            follow=follow, cfg_scale=1.5)
            old = block_error_trajectory(teacher, student, labels, SHAPE, steps=4, method=method, seed=2,
                                         follow=follow, cfg_scale=1.5)
            assert both["absolute"].shape == both["relative"].shape == (4, DEPTH)
            assert torch.equal(old, both["relative"])  # existing callers get exactly what they got before
    with pytest.raises(ValueError, match="follow"):
        block_error_trajectories(teacher, student, labels, SHAPE, steps=2, follow="both")


def test_block_error_helpers_by_hand():
    h_t = [torch.tensor([[1.0, 2.0], [2.0, 0.0]])]  # ||h_t||^2 = 9, numel 4
    h_s = [torch.tensor([[1.0, 1.0], [2.0, 2.0]])]  # ||h_s - h_t||^2 = 1 + 4 = 5
    assert relative_block_errors(h_s, h_t).tolist() == [5 / 9]
    assert absolute_block_errors(h_s, h_t).tolist() == [5 / 4]
    with pytest.raises(ValueError, match="same non-zero number"):
        absolute_block_errors(h_s, [])
    with pytest.raises(ValueError, match="block 0"):
        absolute_block_errors([torch.zeros(3)], [torch.zeros(4)])


@pytest.fixture(scope="module")
def files(trained_small_dit, tmp_path_factory):
    """A teacher checkpoint, its architecture config and two packed students (1 and 2 bits)."""
    from dpq_lightning.export.packed import save_packed

    tmp = tmp_path_factory.mktemp("fig2")
    teacher = copy.deepcopy(trained_small_dit).eval()
    torch.save(teacher.state_dict(), tmp / "teacher.pt")
    (tmp / "arch.yaml").write_text(yaml.safe_dump({"model": {"name": "DiT-T/2", "arch": SMALL_ARCH}}))
    save_packed(quantized(teacher, 1), tmp / "one.dpq")
    save_packed(quantized(teacher, 2), tmp / "two.dpq")
    return tmp


def base_args(tmp: Path, out: Path) -> list[str]:
    return ["--teacher", str(tmp / "teacher.pt"), "--arch", str(tmp / "arch.yaml"), "--out", str(out),
            "--settings", "ddim:3", "ddpm:4", "--samples", "2", "--threads", "2"]


@pytest.mark.slow
def test_script_json_png_markdown_and_report_only(files, capsys):
    fig2 = _script()
    out, md = files / "figs" / "fig", files / "notes.md"
    md.write_text("# My notes\n\nA hand-written reading that must survive.\n")
    args = [*base_args(files, out), "--model", f"ONE={files / 'one.dpq'}", "--model", f"TWO={files / 'two.dpq'}",
            "--md", str(md)]
    doc = fig2.main(args)
    printed = capsys.readouterr().out
    assert sum(line.startswith("[figure2] ONE ") or line.startswith("[figure2] TWO ") for line in printed.splitlines()) == 4

    on_disk = json.loads(Path(f"{out}.json").read_text())
    assert on_disk == json.loads(json.dumps(doc))
    assert on_disk["settings"] == ["ddim:3", "ddpm:4"] and on_disk["follow"] == ["teacher", "student"]
    assert on_disk["timesteps"] == {"ddim:3": [999, 500, 0], "ddpm:4": [999, 666, 333, 0]}
    assert len(on_disk["curves"]) == 2 * 2 * 2  # models x settings x follows
    for c in on_disk["curves"]:
        steps = int(c["setting"].split(":")[1])
        for kind in ("relative", "absolute"):
            assert len(c[kind]) == steps and all(len(row) == DEPTH for row in c[kind])
            assert all(v > 0 for row in c[kind] for v in row)
    assert [m["name"] for m in on_disk["models"]] == ["ONE", "TWO"]
    for m in on_disk["models"]:
        data = Path(m["path"]).read_bytes()
        assert m["sha256"] == hashlib.sha256(data).hexdigest() and m["file_bytes"] == len(data)
        assert m["bits_per_param"] == pytest.approx(8 * len(data) / on_disk["teacher"]["learnable_params"])
    assert on_disk["teacher"]["sha256"] == hashlib.sha256((files / "teacher.pt").read_bytes()).hexdigest()
    assert on_disk["command"].startswith("python studies/scripts/figure2.py --teacher")
    # teacher-followed step 1 is the same x_T for both samplers: the same first row
    first = {(c["model"], c["setting"]): c["relative"][0] for c in on_disk["curves"] if c["follow"] == "teacher"}
    assert first[("ONE", "ddim:3")] == first[("ONE", "ddpm:4")]

    png = Path(f"{out}.png").read_bytes()
    with Image.open(f"{out}.png") as im:
        assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 4 * 250  # 4 rows of panels

    text = md.read_text()
    assert text.startswith("# My notes\n\nA hand-written reading that must survive.\n")
    rows = [line for line in text.splitlines() if line.startswith("| ddim 3 |") or line.startswith("| ddpm 4 |")]
    assert len(rows) == 8
    c = next(x for x in on_disk["curves"] if (x["model"], x["setting"], x["follow"]) == ("TWO", "ddpm:4", "student"))
    rel_first = sum(c["relative"][0]) / DEPTH  # 4 steps: a fifth is one step
    rel_last = sum(c["relative"][-1]) / DEPTH
    cells = [r for r in rows if r.startswith("| ddpm 4 | student | TWO |")][0].split(" | ")
    assert cells[3] == f"{rel_first:.3g}" and cells[4] == f"{rel_last:.3g}" and cells[5] == f"{rel_last / rel_first:.2f}x"
    energy = [sum(a / r for a, r in zip(c["absolute"][i], c["relative"][i])) / DEPTH for i in (0, -1)]  # ||h_t||^2/numel
    assert cells[9] == f"{energy[1] / energy[0]:.2f}x |"
    assert "(figs/fig.png)" in text  # linked relative to the markdown's folder

    # --report-only: the same PNG and the same markdown from the JSON alone, hand text kept once
    Path(f"{out}.png").unlink()
    again = fig2.main(["--report-only", "--out", str(out), "--md", str(md)])
    assert again == on_disk
    assert Path(f"{out}.png").read_bytes() == png
    assert md.read_text() == text
    # --per-block draws more lines: another PNG
    fig2.main(["--report-only", "--out", str(out), "--per-block"])
    assert Path(f"{out}.png").read_bytes() != png


@pytest.mark.parametrize("extra, message", [
    (["--model", "X=nowhere.dpq"], "no such file nowhere.dpq"),
    (["--model", "nowhere.dpq"], "expected NAME=PATH"),
    (["--model", "X={one}", "--settings", "ddim:x"], "'ddim:x': STEPS must be an integer"),
    (["--model", "X={one}", "--settings", "euler:5"], "'euler:5': expected METHOD:STEPS"),
    (["--model", "X={one}", "--settings", "ddpm:0"], "in [1, 1000]"),
    (["--model", "X={one}", "--model", "X={one}"], "distinct"),
    ([], "at least one --model"),
])
def test_script_errors_name_the_argument(files, capsys, extra, message):
    fig2 = _script()
    args = [a.format(one=files / "one.dpq") for a in extra]
    # base_args' --settings comes first: a later --settings replaces it (argparse keeps the last)
    with pytest.raises(SystemExit) as exc:
        fig2.main([*base_args(files, files / "err"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not Path(f"{files / 'err'}.json").exists()


def test_script_missing_teacher_and_report(files, capsys):
    fig2 = _script()
    with pytest.raises(SystemExit):
        fig2.main(["--report-only", "--out", str(files / "absent")])
    assert "absent.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fig2.main([*base_args(files, files / "err"), "--teacher", str(files / "none.pt"),
                   "--model", f"X={files / 'one.dpq'}"])
    assert f"--teacher {files / 'none.pt'}: no such file" in capsys.readouterr().err
