"""The low-rank correction of calibration (``calib.lowrank_rank``): initialised by truncated SVD
of stage 1's error, trained with the codebooks, stored in fp16 and counted in the size."""

import copy
import os

import pytest
import torch
from conftest import BITS, SMALL_OVERRIDES

from dpq_lightning.calibration import CalibConfig
from dpq_lightning.calibration import DPQCalibration
from dpq_lightning.export.packed import inspect, load_packed, read_metadata, save_packed
from dpq_lightning.quant import PQ_MODULES, QuantConfig, quantize_
from dpq_lightning.quant.accounting import in_memory_bytes
from dpq_lightning.quant.quantize import report_of


def _module(trained, rank: int, bits: int = 1) -> DPQCalibration:
    teacher = copy.deepcopy(trained)  # the calibration freezes its teacher in place: not the session's model
    student = copy.deepcopy(trained)
    quantize_(student, QuantConfig(**BITS[bits], overrides=SMALL_OVERRIDES, kmeans_backend="torch"))
    module = DPQCalibration(student, teacher, CalibConfig(assignment="frozen", lowrank_rank=rank))
    module.setup("fit")
    return module


def _errors(module: DPQCalibration) -> dict[str, tuple[float, torch.Tensor]]:
    """Per PQ layer: |W_teacher - decoded|_F^2 and the singular values of that error."""
    out = {}
    for name, mod in module.pq_layers.items():
        w = mod.weight_pq
        rows, cols = w.matrix_shape()
        resid = (module._teacher_w[f"{name}.weight"].detach() - w().detach()).reshape(rows, cols)
        out[name] = (float(resid.pow(2).sum()), torch.linalg.svdvals(resid.double()))
    return out


def test_svd_init_removes_the_top_singular_directions_of_the_error(trained_small_dit):
    """Eckart-Young: after the rank-r init, each layer's squared error is the sum of the squared
    singular values of stage 1's error beyond the r-th; the factors are trainable."""
    plain = _module(trained_small_dit, rank=0)
    before = _errors(plain)
    module = _module(trained_small_dit, rank=2)
    after = _errors(module)
    assert set(before) == set(after) and len(after) >= 10
    for name, (err, _) in after.items():
        w = module.pq_layers[name].weight_pq
        rows, cols = w.matrix_shape()
        assert w.lowrank_rank == min(2, rows, cols)
        assert w.lowrank_u.shape == (rows, w.lowrank_rank) and w.lowrank_v.shape == (w.lowrank_rank, cols)
        s = before[name][1]
        want = float(s[w.lowrank_rank:].pow(2).sum())
        assert err == pytest.approx(want, rel=1e-3, abs=1e-6), name
        assert err < before[name][0] * 0.999, name  # strictly smaller: the error has rank > 2
    names = module.trainable_names()
    assert sum(n.endswith(("lowrank_u", "lowrank_v")) for n in names) == 2 * len(after)


def test_gradients_reach_the_factors_and_resume_keeps_them(trained_small_dit):
    """One loss backward gives the factors a gradient; a module built again for a resumed run has
    the same parameter names, so its checkpoint state loads (setup adds them before restore)."""
    module = _module(trained_small_dit, rank=2)
    g = torch.Generator().manual_seed(0)
    loss = module.compute_losses(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
    loss["loss"].backward()
    grads = [m.weight_pq.lowrank_u.grad for m in module.pq_layers.values()]
    assert all(gr is not None and float(gr.abs().sum()) > 0 for gr in grads)
    again = _module(trained_small_dit, rank=2)
    state = {k: v + 0.5 if k.endswith("lowrank_v") else v for k, v in module.state_dict().items()}
    again.load_state_dict(state)
    name = next(iter(module.pq_layers))
    assert torch.equal(again.pq_layers[name].weight_pq.lowrank_v, module.pq_layers[name].weight_pq.lowrank_v + 0.5)


def test_packed_file_holds_the_correction_and_the_size_counts_it(trained_small_dit, tmp_path):
    """The factors are stored in fp16 (`lowrank_u`/`lowrank_v`), the size report counts exactly
    (rows + cols) * r * 2 bytes per layer, the file's size matches the report, and the loaded
    model computes what the calibrated one computes (factors rounded to fp16 first)."""
    module = _module(trained_small_dit, rank=2)
    student = module.export_student()
    with torch.no_grad():  # the file stores fp16: round here so the comparison can be exact
        for m in student.modules():
            if isinstance(m, PQ_MODULES):
                m.weight_pq.lowrank_u.copy_(m.weight_pq.lowrank_u.half().float())
                m.weight_pq.lowrank_v.copy_(m.weight_pq.lowrank_v.half().float())
    path = save_packed(student, tmp_path / "lr.dpq")
    report = report_of(student)
    want = sum(2 * sum(m.weight_pq.matrix_shape()) * m.weight_pq.lowrank_rank
               for m in student.modules() if isinstance(m, PQ_MODULES))
    assert report.breakdown_bytes()["lowrank"] == want > 0
    assert abs(os.path.getsize(path) / report.total_bytes - 1) < 0.03
    plain = _module(trained_small_dit, rank=0).export_student()
    assert report.effective_bits > report_of(plain).effective_bits  # the correction costs bits
    meta = read_metadata(path)
    assert all(e["lowrank"] == 2 for e in meta["structure"]["pq"].values() if e["geo"]["rows"] > 2)
    loaded = load_packed(path)
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g), torch.arange(4)
    with torch.no_grad():
        assert torch.equal(student.eval()(x, t, y), loaded.eval()(x, t, y))
    mem = in_memory_bytes(loaded)
    assert mem["lowrank"] == 2 * want  # fp32 in memory
    assert "low-rank" in inspect(path)
    # the planner predicts this file from shapes alone (what dpq plan and the bit allocation count)
    from dpq_lightning.quant import predict_report

    q = QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES, kmeans_backend="torch")
    predicted = predict_report(copy.deepcopy(trained_small_dit), q, lowrank=2)
    assert predicted.breakdown_bytes() == report.breakdown_bytes() and predicted.total_bits == report.total_bits
    assert predict_report(copy.deepcopy(trained_small_dit), q).total_bits == report_of(plain).total_bits


def test_bad_rank_is_named():
    with pytest.raises(ValueError, match="calib.lowrank_rank must be >= 0"):
        CalibConfig(lowrank_rank=-1)
