"""calib.ema_decay: the run exports a moving average of the trained numbers."""

import contextlib
import copy

import lightning as L
import pytest
import torch
from conftest import BITS, SMALL_OVERRIDES

from dpq_lightning.calibration import CalibConfig, DPQCalibration
from dpq_lightning.calibration.averaging import ParameterEMA, ema_beta
from dpq_lightning.callbacks._util import PeriodicCallback
from dpq_lightning.data import DigitsDataModule
from dpq_lightning.quant import QuantConfig, quantize_


def test_the_average_follows_the_warmed_up_formula_and_swaps_back():
    p = torch.nn.Parameter(torch.tensor([0.0, 4.0]))
    ema = ParameterEMA([p], decay=0.5)
    assert [ema_beta(0.5, n) for n in (0, 1, 8, 9, 100)] == [0.1, 2 / 11, 0.5, 0.5, 0.5]
    expect = p.detach().clone()
    for n, value in enumerate(([1.0, 1.0], [2.0, 0.0], [3.0, -1.0])):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        ema.update()
        beta = min(0.5, (1 + n) / (10 + n))
        expect = beta * expect + (1 - beta) * torch.tensor(value)
    assert int(ema.n) == 3
    torch.testing.assert_close(ema.avg_0, expect, rtol=0, atol=1e-6)
    with ema.swapped_in():
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-6)
    assert p.tolist() == [3.0, -1.0]  # the trained values are back
    assert set(ema.state_dict()) == {"avg_0", "n"}


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_a_decay_outside_0_1_is_refused_naming_the_key(decay):
    with pytest.raises(ValueError, match=r"calib\.ema_decay must be in"):
        ParameterEMA([torch.nn.Parameter(torch.zeros(1))], decay)
    if decay == 0.0:
        assert CalibConfig(ema_decay=decay).ema_decay == 0.0  # the config's "off"; the class averages or refuses
    else:
        with pytest.raises(ValueError, match=r"calib\.ema_decay must be in \[0, 1\)"):
            CalibConfig(ema_decay=decay)


class _Record(PeriodicCallback):
    """Records the trained values after every optimizer step, and what an evaluation sees."""

    def __init__(self, name):
        super().__init__(every_n_steps=3, at_start=False)
        self.name, self.raw, self.seen = name, [], {}

    def _param(self, pl_module):
        return dict(pl_module.student.named_parameters())[self.name].detach().clone()

    def on_train_start(self, trainer, pl_module):
        self.raw.append(self._param(pl_module))  # the stage-1 value: where the average starts
        super().on_train_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.raw.append(self._param(pl_module))
        super().on_train_batch_end(trainer, pl_module, *args)

    def evaluate(self, trainer, pl_module, tag):
        self.seen[trainer.global_step] = self._param(pl_module)


def test_calibration_exports_the_average_and_evaluations_see_it(trained_small_dit, tmp_path):
    teacher = copy.deepcopy(trained_small_dit)
    student = copy.deepcopy(teacher)
    quantize_(student, QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES, kmeans_backend="torch"))
    decay, steps = 0.7, 7
    module = DPQCalibration(student, teacher, CalibConfig(assignment="frozen", train_floats=True, lr=1e-2,
                                                          ema_decay=decay))
    name = next(n for n, p in student.named_parameters() if n.endswith("weight_pq.codebooks"))
    rec = _Record(name)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec])
    trainer.fit(module, datamodule=DigitsDataModule(32, cache_dir=str(tmp_path), seed=0))
    assert len(rec.raw) == steps + 1 and int(module.ema.n) == steps
    expect, at = rec.raw[0], {}
    for n, value in enumerate(rec.raw[1:]):
        beta = min(decay, (1 + n) / (10 + n))
        expect = beta * expect + (1 - beta) * value
        at[n + 1] = expect
    exported = dict(module.export_student().named_parameters())[name].detach()
    torch.testing.assert_close(exported, at[steps], rtol=0, atol=1e-6)
    assert (exported - rec.raw[-1]).abs().max() > 1e-4  # the average, not the last step
    # the periodic evaluations (steps 3, 6 and the end) measured the average of their step
    assert sorted(rec.seen) == [3, 6, 7]
    for step, value in rec.seen.items():
        torch.testing.assert_close(value, at[step], rtol=0, atol=1e-6)
    # every trained tensor of the student is averaged; the codes are not
    trained = [n for n, p in student.named_parameters() if p.requires_grad]
    assert len(module.ema.averages()) == len(trained) > 16


def test_without_ema_nothing_is_added_to_the_state(trained_small_dit):
    teacher = copy.deepcopy(trained_small_dit)
    student = copy.deepcopy(teacher)
    quantize_(student, QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES, kmeans_backend="torch"))
    module = DPQCalibration(student, teacher, CalibConfig(assignment="frozen"))
    module.setup("fit")
    assert module.ema is None and not any(k.startswith("ema.") for k in module.state_dict())
    assert isinstance(module.exported_weights(), contextlib.nullcontext)
