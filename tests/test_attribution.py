"""Error attribution by swapping parts between a compressed student and its teacher
(``studies/harness/attribution.py``, ``studies/scripts/attribute_error.py``)."""

import copy

import pytest
import torch
from conftest import BITS, SMALL_OVERRIDES

from studies.harness.attribution import PARTS, attribute, expand, gap_shares, part_params, render, swapped
from dpq_lightning.quant import PQ_MODULES, QuantConfig, quantize_

pytestmark = pytest.mark.slow  # every test here calibrates models (the fixture alone takes minutes): pytest -m "not slow" skips them


@pytest.fixture
def pair(trained_small_dit):
    teacher = copy.deepcopy(trained_small_dit).eval()
    student = copy.deepcopy(trained_small_dit)
    quantize_(student, QuantConfig(**BITS[1], overrides=SMALL_OVERRIDES, kmeans_backend="torch"))
    return student.eval(), teacher


def _probe():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g), torch.arange(8) % 10


def test_expand_and_swap(pair):
    student, teacher = pair
    depth = len(teacher.blocks)
    assert expand(("blocks.{b}.mlp", "final_layer"), depth) == [f"blocks.{b}.mlp" for b in range(depth)] + ["final_layer"]
    assert expand(("blocks.{last}",), depth) == [f"blocks.{depth - 1}"]
    hybrid = swapped(student, teacher, ["blocks.0.mlp", "final_layer"])
    assert not any(isinstance(m, PQ_MODULES) for m in hybrid.blocks[0].mlp.modules())
    assert any(isinstance(m, PQ_MODULES) for m in hybrid.blocks[0].attn.modules())  # the rest is the student's
    assert any(isinstance(m, PQ_MODULES) for m in student.blocks[0].mlp.modules())  # the student is unchanged
    assert torch.equal(hybrid.final_layer.linear.weight, teacher.final_layer.linear.weight)
    with pytest.raises(ValueError, match="part 'blocks.9': no such module in both models"):
        swapped(student, teacher, ["blocks.9"])
    assert part_params(teacher, ["final_layer"]) == sum(p.numel() for p in teacher.final_layer.parameters())


def test_swapping_everything_gives_the_other_model_and_the_shares_follow(pair):
    """Restoring every part is the teacher (gap removed 100%); inserting every part is the student
    (gap added 100%); one part lies in between. The 'metric' is the output error on a fixed probe."""
    student, teacher = pair
    x, t, y = _probe()
    with torch.no_grad():
        ref = teacher(x, t, y)

    def evaluate(model):
        with torch.no_grad():
            return {"fid_proxy": float((model(x, t, y) - ref).pow(2).mean()), "agreement": 1.0}

    everything = ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer")
    lines = []
    res = attribute(student, teacher, evaluate, {"all": everything, "mlp": PARTS["MLP (fc1, fc2), every block"]},
                    log=lines.append)
    assert len(lines) == 2 + 2 * 2 and lines[0].startswith("[1/6] student: FID-proxy")
    assert res["models"]["teacher"]["fid_proxy"] == 0.0 < res["models"]["student"]["fid_proxy"]
    shares = gap_shares(res)
    assert shares["all"] == (1.0, 1.0)
    assert res["parts"]["all"]["restore"]["fid_proxy"] == 0.0
    assert res["parts"]["mlp"]["modules"] == [f"blocks.{b}.mlp" for b in range(len(teacher.blocks))]
    assert 0.0 < res["parts"]["mlp"]["insert"]["fid_proxy"] < res["models"]["student"]["fid_proxy"] * 10
    md = render({"L": {**res, "run": "runs/x", "protocol": "probe", "machine": "m", "date": "d"}}, ["# H"])
    assert "| all | " in md and "| +100% |" in md and "## L" in md
