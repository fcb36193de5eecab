"""Per-block output error of a compressed DiT along a sampling trajectory (the paper's Figure 2,
right): at every step of one sampling run, teacher and student see the SAME ``x_t, t, y`` and, for
each block ``b``, two errors are recorded over the whole model batch (under guidance: the
conditional and the unconditional rows):

* relative ``||h_s^b - h_t^b||^2 / ||h_t^b||^2`` (exactly the per-block term of the calibration's
  reconstruction loss): :func:`block_error_trajectory`, and ``"relative"`` of
  :func:`block_error_trajectories`;
* absolute ``||h_s^b - h_t^b||^2 / numel(h_t^b)``, the mean squared difference per element: the
  error itself, not divided by the teacher's activation energy, which changes along the
  trajectory (so a relative error can rise while the absolute one falls): ``"absolute"`` of
  :func:`block_error_trajectories`.

The trajectory is driven by the one sampling loop (:func:`dpq_lightning.sampling.sample`): a
wrapper model runs both networks on each input and hands the loop the output of the model being
followed. Following the teacher isolates the per-step error; following the student shows how it
accumulates along the student's own trajectory.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.hooks import BlockOutputRecorder
from ..sampling import sample

__all__ = ["absolute_block_errors", "block_error_trajectories", "block_error_trajectory", "relative_block_errors"]


def relative_block_errors(h_s: list[torch.Tensor], h_t: list[torch.Tensor]) -> torch.Tensor:
    """``[blocks]``: ``||h_s - h_t||^2 / ||h_t||^2`` per block, over the whole batch (float64)."""
    if len(h_s) != len(h_t) or not h_t:
        raise ValueError(f"need the same non-zero number of block outputs, got {len(h_s)} and {len(h_t)}")
    return torch.stack([
        (s.double() - t.double()).pow(2).sum() / t.double().pow(2).sum().clamp_min(1e-30) for s, t in zip(h_s, h_t)
    ])


def absolute_block_errors(h_s: list[torch.Tensor], h_t: list[torch.Tensor]) -> torch.Tensor:
    """``[blocks]``: ``||h_s - h_t||^2 / numel(h_t)`` per block (the mean squared difference per
    element over the whole batch, float64)."""
    if len(h_s) != len(h_t) or not h_t:
        raise ValueError(f"need the same non-zero number of block outputs, got {len(h_s)} and {len(h_t)}")
    for b, (s, t) in enumerate(zip(h_s, h_t)):
        if s.shape != t.shape:
            raise ValueError(f"block {b}: student output {tuple(s.shape)} and teacher output {tuple(t.shape)} differ")
    return torch.stack([(s.double() - t.double()).pow(2).mean() for s, t in zip(h_s, h_t)])


class _PairedModel(nn.Module):
    """Runs teacher and student on the same inputs, records their per-block error, returns the
    followed model's output to the sampling loop."""

    def __init__(self, teacher: nn.Module, student: nn.Module, follow: str):
        super().__init__()
        self.__dict__.update(teacher=teacher, student=student)  # not submodules: nothing to register
        self.follow = follow
        self.errors: list[torch.Tensor] = []  # one [blocks] relative error per model call (= per step)
        self.absolute: list[torch.Tensor] = []  # one [blocks] absolute error per model call

    @property
    def null_class(self) -> int:
        return (self.student if self.follow == "student" else self.teacher).null_class

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with BlockOutputRecorder(self.teacher, detach=True) as rec_t:
            out_t = self.teacher(x, t, y)
        with BlockOutputRecorder(self.student, detach=True) as rec_s:
            out_s = self.student(x, t, y)
        self.errors.append(relative_block_errors(rec_s.outputs, rec_t.outputs).cpu())
        self.absolute.append(absolute_block_errors(rec_s.outputs, rec_t.outputs).cpu())
        return out_s if self.follow == "student" else out_t


@torch.no_grad()
def block_error_trajectories(
    teacher: nn.Module,
    student: nn.Module,
    labels: torch.Tensor,
    shape: tuple[int, int, int],
    steps: int = 50,
    method: str = "ddim",
    seed: int = 0,
    follow: str = "teacher",
    cfg_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """``{"relative": [steps, blocks], "absolute": [steps, blocks]}`` float64 from ONE sampling run:
    row ``i`` is sampling step ``i`` (row 0 = the first, noisiest step, ``x_T`` drawn from
    ``seed``), column ``b`` block ``b``'s relative (``||h_s-h_t||^2 / ||h_t||^2``) and absolute
    (``||h_s-h_t||^2 / numel``) error. ``"relative"`` equals :func:`block_error_trajectory`'s
    result for the same arguments.

    ``follow="teacher"``: both models see the teacher's trajectory; ``"student"``: the student's
    own. Noise (``x_T`` and, for DDPM, every step's draw) is the same for both choices. Models are
    used as given (call ``.eval()`` first); inputs are placed on the labels' device.
    """
    if follow not in ("teacher", "student"):
        raise ValueError(f"follow must be 'teacher' or 'student', got {follow!r}")
    paired = _PairedModel(teacher, student, follow)
    gen = torch.Generator(device=labels.device).manual_seed(int(seed))
    sample(paired, labels, tuple(shape), steps=steps, cfg_scale=cfg_scale, method=method, generator=gen)
    return {"relative": torch.stack(paired.errors), "absolute": torch.stack(paired.absolute)}  # each (steps, blocks)


@torch.no_grad()
def block_error_trajectory(
    teacher: nn.Module,
    student: nn.Module,
    labels: torch.Tensor,
    shape: tuple[int, int, int],
    steps: int = 50,
    method: str = "ddim",
    seed: int = 0,
    follow: str = "teacher",
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """``[steps, blocks]`` float64: row ``i`` is sampling step ``i`` (row 0 = the first, noisiest
    step, ``x_T`` drawn from ``seed``), column ``b`` the relative error of block ``b``.

    ``follow="teacher"``: both models see the teacher's trajectory; ``"student"``: the student's
    own. Noise (``x_T`` and, for DDPM, every step's draw) is the same for both choices. Models are
    used as given (call ``.eval()`` first); inputs are placed on the labels' device.
    """
    return block_error_trajectories(teacher, student, labels, shape, steps=steps, method=method, seed=seed,
                                    follow=follow, cfg_scale=cfg_scale)["relative"]  # (steps, blocks)
