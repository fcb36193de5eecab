"""Group rectangles of column granularity (group_rows x group_cols) and list-valued config bases."""

from __future__ import annotations

import pytest
import torch

from dpq_lightning.quant.geometry import GeometryError, column_block_of, from_groups, make_geometry, to_groups
from dpq_lightning.quant.state import is_quantized


def test_column_groups_of_several_blocks_and_fewer_rows_round_trip():
    w = torch.randn(12, 16)  # 12 rows, 16 columns
    geo = make_geometry("w", (12, 16), d=2, granularity="column", group_rows=4, group_cols=2)
    assert (geo.num_groups, geo.group_size) == ((12 // 4) * (8 // 2), 4 * 2)
    g = to_groups(w, geo)  # (G, N, d)
    assert g.shape == (12, 8, 2)
    assert torch.equal(from_groups(g, geo), w)
    # group 0 = rows 0-3 x column blocks 0-1; its sub-vector n = r * 2 + j
    assert torch.equal(g[0, 3], w[1, 2:4])
    assert column_block_of(geo)[0].tolist() == [0, 1] * 4


def test_default_column_groups_are_classic_pq():
    geo = make_geometry("w", (12, 16), d=4, granularity="column")
    assert (geo.group_rows, geo.group_cols, geo.num_groups) == (12, 1, 4)


@pytest.mark.parametrize("kw,msg", [
    (dict(group_cols=3), "group_cols=3 must be a positive divisor of the 8 column blocks"),
    (dict(group_rows=5), "group_rows=5 must divide the 12 rows"),
])
def test_bad_group_shapes_name_the_layer(kw, msg):
    with pytest.raises(GeometryError, match=msg) as e:
        make_geometry("blocks.0.mlp.fc1.weight", (12, 16), d=2, granularity="column", **kw)
    assert "blocks.0.mlp.fc1.weight" in str(e.value)


def test_config_base_may_be_a_list_merged_in_order(tmp_path):
    from dpq_lightning.config import load_config

    (tmp_path / "a.yaml").write_text("name: a\nquant: {d: 4, K: 16}\n")
    (tmp_path / "b.yaml").write_text("quant: {K: 64}\ntrainer: {max_steps: 7}\n")
    (tmp_path / "c.yaml").write_text("base: [a.yaml, b.yaml]\nquant: {group_cols: 2}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.name, cfg.quant.d, cfg.quant.K, cfg.quant.group_cols, cfg.trainer.max_steps) == ("a", 4, 64, 2, 7)


def test_group_cols_must_be_positive():
    from dpq_lightning.quant import QuantConfig, QuantConfigError

    with pytest.raises(QuantConfigError, match="quant.group_cols must be a positive integer"):
        QuantConfig(group_cols=0)
    with pytest.raises(QuantConfigError, match=r"quant.overrides\[0\].group_rows must be an integer >= 0"):
        QuantConfig(overrides=[{"pattern": "x", "group_rows": -1}])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_non_finite_weight_is_named_before_any_kmeans_and_the_model_is_untouched(backend):
    import copy

    from dpq_lightning.models import build_dit
    from dpq_lightning.quant import QuantConfig, quantize_

    model = build_dit("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[3, 5] = float("nan")
        model.blocks[1].mlp.fc2.weight[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    cfg = QuantConfig(d=4, K=16, kmeans_backend=backend, granularity="layer")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.weight: 2 of 16384 values are NaN or infinite"):
        quantize_(model, cfg)
    after = model.state_dict()
    assert after.keys() == before.keys() and not is_quantized(model)
    assert all(torch.equal(after[k].nan_to_num(), before[k].nan_to_num()) for k in before)
    assert type(model.blocks[1].mlp.fc2) is torch.nn.Linear


def test_an_error_part_way_leaves_the_model_unchanged():
    from dpq_lightning.models import build_dit
    from dpq_lightning.quant import QuantConfig, quantize_
    from dpq_lightning.quant import quantize as Q

    model = build_dit("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    calls = []

    def failing(X, K, cfg, seed):
        calls.append(seed)
        if len(calls) == 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the fifth layer's k-means
        return real(X, K, cfg, seed)

    real = Q.run_kmeans
    with pytest.raises(KeyboardInterrupt):
        quantize_(model, QuantConfig(d=4, K=16, kmeans_backend="torch", granularity="layer"),
                  ops=Q.Stage1Ops(kmeans=failing))
    assert len(calls) == 5 and not is_quantized(model)
    assert all(type(m).__name__ in ("Linear", "Conv2d", "Embedding") for m in model.modules()
               if hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.nn.Parameter))


def test_save_packed_leaves_one_temp_name_and_ordinary_permissions(tmp_path):
    import os

    from dpq_lightning.models import build_dit
    from dpq_lightning.export.packed import load_packed, save_packed
    from dpq_lightning.quant import QuantConfig, quantize_

    model = build_dit("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    quantize_(model, QuantConfig(d=4, K=16, kmeans_backend="torch", granularity="layer", kmeans_iters=2))
    stale = tmp_path / ".m.dpq.tmp"
    stale.write_bytes(b"half a file from a killed save")  # what an interrupted save leaves
    path = save_packed(model, tmp_path / "m.dpq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.dpq"]  # the stale temp file was replaced
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    assert torch.equal(load_packed(path).eval()(x, t, y), model.eval()(x, t, y))
