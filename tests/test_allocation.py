"""Sensitivity-based bit allocation: the exact allocation (quant/allocation.py) on examples whose
optimum is known, the proxy of quant/sensitivity.py against its definition, and
studies/scripts/allocate_bits.py on tiny counts with the real digits teacher."""

import itertools
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_script
from dpq_lightning.quant.allocation import AllocationError, Option, allocate

ROOT = Path(__file__).parents[1]


@pytest.fixture
def one_thread():
    """One torch thread for the tests that quantize the real teacher: many small k-means and matmuls,
    whose two-thread barriers stall for 4x the time on a machine busy with other jobs (measured:
    the script on tiny counts took 62 s with 2 threads next to other runs, 16 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def brute_force(options: dict[str, dict[str, Option]], budget: int) -> tuple[float, int]:
    """Least summed error (and its cost) over every combination within the budget."""
    best = (float("inf"), 0)
    for combo in itertools.product(*(list(o.values()) for o in options.values())):
        cost = sum(o.cost_bits for o in combo)
        if cost <= budget:
            best = min(best, (sum(o.error for o in combo), cost))
    return best


def test_allocation_takes_the_optimum_that_a_greedy_walk_by_error_per_bit_misses():
    # From the cheapest choice (cost 3, error 21), b's step saves 6 per bit and a's 5 per bit, so a
    # greedy walk takes b's step (cost 4) and then cannot afford a's (cost 6 > 5): error 15.
    # The optimum spends both spare bits on a: cost 5, error 11.
    options = {
        "a": {"lo": Option(1, 10.0), "hi": Option(3, 0.0)},
        "b": {"lo": Option(1, 10.0), "mid": Option(2, 4.0)},
        "c": {"only": Option(1, 1.0)},
    }
    alloc = allocate(options, budget_bits=5)
    assert alloc.choice == {"a": "hi", "b": "lo", "c": "only"}
    assert (alloc.total_bits, alloc.total_error, alloc.unit_bits) == (5, 11.0, 1)
    assert list(alloc.choice) == ["a", "b", "c"]  # the layers' order is kept
    # one bit more buys b's step too; one bit less leaves only b's step
    assert allocate(options, 6).choice == {"a": "hi", "b": "mid", "c": "only"}
    assert allocate(options, 4).choice == {"a": "lo", "b": "mid", "c": "only"}
    assert allocate(options, 3).total_error == 21.0


def test_allocation_equals_brute_force_and_never_exceeds_the_budget():
    rng = random.Random(0)
    for trial in range(60):
        options = {}
        for layer in range(rng.randint(1, 5)):
            costs = sorted(rng.sample(range(1, 40), rng.randint(1, 4)))
            options[f"l{layer}"] = {f"s{j}": Option(c, round(rng.uniform(0, 100), 3)) for j, c in enumerate(costs)}
        cheapest = sum(min(o.cost_bits for o in opts.values()) for opts in options.values())
        budget = cheapest + rng.randint(0, 60)
        alloc = allocate(options, budget)  # exact: budget <= DEFAULT_UNITS bits
        assert alloc.unit_bits == 1
        assert alloc.total_bits <= budget, trial
        assert alloc.total_error == pytest.approx(brute_force(options, budget)[0]), trial
        # a coarse grid (the spare bits cut into 3 steps, extra costs rounded up) may lose
        # optimality, never the budget, and the cheapest allocation always stays reachable
        coarse = allocate(options, budget, units=3)
        assert coarse.total_bits <= budget, trial
        assert coarse.total_error >= alloc.total_error - 1e-9, trial


def test_an_impossible_budget_is_an_error_that_names_it():
    options = {"a": {"lo": Option(2, 1.0), "hi": Option(5, 0.0)}, "b": {"lo": Option(3, 1.0)}}
    with pytest.raises(AllocationError, match=r"bit budget of 4 bits cannot be met: the cheapest allocation "
                                              r"\(every layer at its cheapest setting\) costs 5 bits"):
        allocate(options, 4)
    with pytest.raises(AllocationError, match=r"layer 'b', setting 'lo': error must be finite and >= 0, got nan"):
        allocate({"b": {"lo": Option(3, float("nan"))}}, 4)
    with pytest.raises(AllocationError, match=r"layer 'b' has no setting to choose from"):
        allocate({"b": {}}, 4)


def test_proxy_is_the_sum_over_sub_vectors_of_the_weighted_error():
    from dpq_lightning.quant.sensitivity import LayerInputs, block_moments, proxy_error, row_of
    from dpq_lightning.quant.config import QuantConfig
    from dpq_lightning.quant.geometry import make_geometry
    from dpq_lightning.quant.sensitivity import Setting, quantize_layer

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(8, 12)
    x = torch.randn(200, 8, generator=g) * torch.linspace(0.1, 3, 8)  # (200, 8): unequal input energies
    H = x.T @ x / 200  # (8, 8)
    cfg = QuantConfig(d=2, K=4, group_rows=6, kmeans_iters=3)
    q = quantize_layer(lin, "lin.weight", Setting(2, 4), cfg, None, seed=0)
    diff = (lin.weight - q.weight).detach().reshape(12, 4, 2)  # (R, M, d)
    expect = torch.einsum("rmd,mde,rme->", diff, block_moments(H, 2), diff)
    assert proxy_error(lin.weight, q, LayerInputs(H=H)) == pytest.approx(float(expect), rel=1e-5)
    assert torch.equal(block_moments(H, 2)[1], H[2:4, 2:4])
    # Embedding: rows weighted by how often they are looked up
    emb = torch.nn.Embedding(6, 8)
    qe = quantize_layer(emb, "emb.weight", Setting(2, 4), QuantConfig(d=2, K=4, granularity="layer"), None, seed=0)
    p = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    expect = ((emb.weight - qe.weight).detach().pow(2).sum(1) * p).sum()
    assert proxy_error(emb.weight, qe, LayerInputs(row_freq=p)) == pytest.approx(float(expect), rel=1e-5)
    geo = make_geometry("e", (6, 8), 2, "rows", 3, 1)
    assert row_of(geo).tolist() == [[0] * 4 + [1] * 4 + [2] * 4, [3] * 4 + [4] * 4 + [5] * 4]


@pytest.mark.slow
def test_a_layer_measured_alone_is_quantized_exactly_as_stage_1_does(one_thread):
    import copy

    from dpq_lightning.config import load_config
    from dpq_lightning.models import build_model
    from dpq_lightning.quant import quantize_
    from dpq_lightning.quant.plan import make_plan
    from dpq_lightning.quant.sensitivity import Setting, pool_size_for, quantize_layer

    cfg = load_config(ROOT / "studies" / "configs" / "dpq_1bit.yaml")
    teacher = build_model(cfg.model.name, cfg.model.arch, str(ROOT / cfg.model.checkpoint))
    q = replace(cfg.quant, kmeans_iters=2)
    student = copy.deepcopy(teacher)
    quantize_(student, q)  # the budget search gives P = 64 (6-bit pointers), as in dpq plan
    layers = make_plan(teacher, q).layers
    for i in (0, 8, 24):  # x_embedder (no pool, group_cols 1), an adaLN (pool), final_layer.linear (layer)
        lp = layers[i]
        alone = quantize_layer(teacher.get_submodule(lp.module_name), lp.param_name, Setting(4, 16), q,
                               pool_size_for(lp.geo, 16, 6), q.seed + i)
        assert torch.equal(alone.weight, student.get_submodule(lp.module_name).weight), lp.param_name


def allocate_bits_script():
    return load_script("studies/scripts/allocate_bits.py")


@pytest.mark.slow
def test_script_writes_a_recipe_that_loads_and_plans_within_the_uniform_size(tmp_path, monkeypatch, capsys, one_thread):
    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.stage1 import predict_size

    monkeypatch.chdir(ROOT)  # the cell names its teacher relative to the repository
    script = allocate_bits_script()
    out = tmp_path / "recipes" / "dpq_1bit_alloc.yaml"
    assert script.main(["--config", "studies/configs/dpq_1bit.yaml", "--out", str(out), "--batches", "1",
                        "--timesteps", "2", "--kmeans-iters", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[26/26] final_layer.adaLN_modulation.1.weight" in printed and "summed proxy error" in printed

    cell = load_config("studies/configs/dpq_1bit.yaml")
    uniform = predict_size(load_config("studies/configs/dpq_1bit.yaml", ["stage1_only=true"]))  # the cell's stage-1 file
    assert uniform.effective_bits < predict_size(cell).effective_bits  # (its calibration adds a correction)
    cfg = load_config(out)
    planned = predict_size(cfg)
    assert planned.total_bits <= uniform.total_bits and planned.budget_met
    assert planned.effective_bits <= 1.2051  # the uniform cell's 1.205
    assert cfg.name == "mini_dpq_1bit_alloc" and cfg.quant.pool.max_pointer_bits == 6
    assert cfg.quant.budget == cell.quant.budget and cfg.model == cell.model and cfg.trainer == cell.trainer
    raw = yaml.safe_load(out.read_text())
    winner = yaml.safe_load((ROOT / "studies/configs/recipes/dpq_1bit_soft_anneal.yaml").read_text())
    assert raw["calib"] == winner["calib"]
    assert [Path(b).name for b in raw["base"]] == ["dpq_1bit.yaml", "_baseline.yaml"]
    # the allocation moved bits: some layer's (d, K) differs from the cell's d=4, K=16
    assert {(r.d, r.K) for r in cfg.quant.overrides if r.d is not None} - {(4, 16)}
    # the cell's layer-granularity rule for the class table is kept (in its own or a new rule)
    assert any(r.granularity == "layer" and r.pattern in ("y_embedder.*", "y_embedder.embedding_table.weight")
               for r in cfg.quant.overrides)



@pytest.mark.slow
def test_script_makes_room_for_a_low_rank_correction_at_the_uniform_size(tmp_path, monkeypatch, capsys, one_thread):
    """--lowrank 1: the recipe trains a rank-1 correction and the codes give up its bytes, so the
    whole file (factors and their header entries included) is no larger than the uniform cell's."""
    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.stage1 import predict_size

    monkeypatch.chdir(ROOT)
    script = allocate_bits_script()
    out = tmp_path / "recipes" / "dpq_1bit_alloc_lowrank.yaml"
    quick = ["--batches", "1", "--timesteps", "2", "--kmeans-iters", "2"]
    assert script.main(["--config", "studies/configs/dpq_1bit.yaml", "--out", str(out), "--lowrank", "1",
                        "--name", "alloc_lowrank", *quick]) == 0
    cfg = load_config(out)
    assert cfg.name == "mini_dpq_1bit_alloc_lowrank" and cfg.calib.lowrank_rank == 1
    # the uniform cell's size: its stage-1 file (its own calibration adds a correction of its own)
    planned, uniform = predict_size(cfg), predict_size(load_config("studies/configs/dpq_1bit.yaml", ["stage1_only=true"]))
    lowrank = planned.breakdown_bytes()["lowrank"]
    assert lowrank == predict_size(load_config("studies/configs/recipes/dpq_1bit_lowrank.yaml")).breakdown_bytes()["lowrank"]
    assert lowrank > 50_000 and planned.total_bits <= uniform.total_bits
    # the codes paid for it: fewer code bits per quantized weight than the uniform cell's 1.0
    assert planned.nominal_bits < uniform.nominal_bits - 0.05
    assert f"whose {lowrank:.0f}" in " ".join(w for w in out.read_text().split() if w != "#")  # across a wrapped comment line
    # a calibration that has a correction of another rank is refused, by name
    with pytest.raises(SystemExit):
        script.main(["--config", "studies/configs/dpq_1bit.yaml", "--out", str(tmp_path / "x.yaml"), "--lowrank", "2",
                     "--calib-from", "studies/configs/recipes/dpq_1bit_lowrank.yaml", *quick])
    assert "dpq_1bit_lowrank.yaml sets calib.lowrank_rank 1; pass the same or none" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.slow
def test_script_keeps_float_layers_at_the_uniform_size(tmp_path, monkeypatch, capsys, one_thread):
    """--floats: the named weights stay in fp16 (quant.exclude), the other layers give up their
    bytes, and a calibration that brings its own correction has it counted (issue 26's lever a)."""
    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.stage1 import predict_size

    monkeypatch.chdir(ROOT)
    script = allocate_bits_script()
    out = tmp_path / "levers" / "dpq_1bit_float_layers.yaml"
    floats = ["x_embedder.*", "y_embedder.*", "final_layer.linear.*"]
    winner = "studies/configs/recipes/dpq_1bit_lowrank_same_size_ddpm_only.yaml"
    assert script.main(["--config", "studies/configs/dpq_1bit.yaml", "--out", str(out), "--name", "lever_float_layers",
                        "--calib-from", winner, "--floats", *floats,
                        "--batches", "1", "--timesteps", "2", "--kmeans-iters", "2"]) == 0
    assert "[23/23] final_layer.adaLN_modulation.1.weight" in capsys.readouterr().out  # 26 less the 3 floats
    cfg = load_config(out)
    planned, uniform = predict_size(cfg), predict_size(load_config("studies/configs/dpq_1bit.yaml", ["stage1_only=true"]))
    assert cfg.quant.exclude == floats and cfg.calib == load_config(winner).calib
    kept = {r.name for r in planned.rows if r.kind == "excluded"}
    assert kept == {"x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight"}
    assert planned.total_bits <= uniform.total_bits and planned.budget_met
    assert planned.breakdown_bytes()["lowrank"] > 50_000  # the winner's rank-1 correction, counted
    assert yaml.safe_load(out.read_text())["calib"]["lowrank_rank"] == 1  # once, as the winner states it


@pytest.mark.slow
def test_script_buys_a_larger_pool_with_code_bits_at_the_uniform_size(tmp_path, monkeypatch, capsys, one_thread):
    """--pointer-bits: pools of up to 2^B codewords per layer instead of the cell's 2^6, paid for by
    the codes, the whole file within the uniform cell's size (issue 26's lever c)."""
    from dpq_lightning.config import load_config
    from dpq_lightning.jobs.stage1 import predict_size

    monkeypatch.chdir(ROOT)
    script = allocate_bits_script()
    out = tmp_path / "levers" / "dpq_1bit_pool_8bit.yaml"
    quick = ["--batches", "1", "--timesteps", "2", "--kmeans-iters", "2"]
    assert script.main(["--config", "studies/configs/dpq_1bit.yaml", "--out", str(out), "--name", "lever_pool_8bit",
                        "--pointer-bits", "8", "--calib-from",
                        "studies/configs/recipes/dpq_1bit_lowrank_same_size_ddpm_only.yaml", *quick]) == 0
    assert "pool pointers 8 bits" in capsys.readouterr().out
    cfg = load_config(out)
    planned, uniform = predict_size(cfg), predict_size(load_config("studies/configs/dpq_1bit.yaml", ["stage1_only=true"]))
    assert cfg.quant.pool.max_pointer_bits == 8
    assert any("pool pointers of 8 bits (P <= 256" in n for n in planned.notes)  # the budget search keeps 8
    assert planned.total_bits <= uniform.total_bits and planned.budget_met
    pool = lambda r: r.breakdown_bytes()["pool"]  # noqa: E731
    assert pool(planned) > 3 * pool(uniform)  # more capacity (up to 4x the pooled codewords) ...
    assert planned.nominal_bits < uniform.nominal_bits - 0.05  # ... paid for by the codes
    assert "Pool pointers at 8 bits" in out.read_text() and "the cell's: 6" in " ".join(out.read_text().split())
    with pytest.raises(SystemExit):
        script.main(["--config", "studies/configs/pq_1bit.yaml", "--out", str(tmp_path / "x.yaml"), "--pointer-bits", "8",
                     "--calib-from", "studies/configs/recipes/dpq_1bit_floats.yaml", *quick])
    assert "has no codebook pool" in capsys.readouterr().err
