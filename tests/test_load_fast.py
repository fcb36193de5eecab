"""The fast loader (issue 13): a packed file is rebuilt without drawing random weights and without
a float weight for any PQ layer, yet into exactly the model that was saved; and the inference
mode that decodes every weight once gives bit-identical outputs. Load times and memory are
measured by ``scripts/bench_load.py`` (docs/benchmarks.md), not here."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from dpq_lightning.export import packed
from dpq_lightning.models import build_dit, get_2d_sincos_pos_embed
from dpq_lightning.models.interface import FAMILIES
from dpq_lightning.export.packed import PackedFileError, _unpack, build_skeleton, load_packed, save_packed
from dpq_lightning.quant import PQ_MODULES, QuantConfig, quantize_, round_to_storage_
from dpq_lightning.quant.accounting import in_memory_bytes, unique_bytes
from dpq_lightning.quant.bitpack import pack, unpack
from dpq_lightning.quant.layers import decode_for_inference

OVERRIDES = [{"pattern": "final_layer.linear.weight", "granularity": "layer"},
             {"pattern": "y_embedder.*", "granularity": "layer"},
             {"pattern": "x_embedder.proj.weight", "granularity": "layer"}]


def _saved(tmp_path, K: int, pool: int, name: str):
    """A DiT built from its config, quantized (pool on), saved; returns (model, path, inputs)."""
    torch.manual_seed(0)
    model = build_dit("DiT-T/2", input_size=8, in_channels=4, num_classes=10, hidden_size=256, depth=1)
    with torch.no_grad():  # non-zero adaLN / final layer, so every layer matters to the output
        for mod in model.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(mod.weight.view(mod.weight.shape[0], -1))
                if mod.bias is not None:
                    nn.init.normal_(mod.bias, std=0.1)
    d = 8 if K == 256 else 4
    quantize_(model, QuantConfig(d=d, K=K, kmeans_iters=1, kmeans_init="random", kmeans_backend="torch",
                                 overrides=OVERRIDES, pool={"enabled": True, "iters": 1, "size": pool}))
    path = save_packed(model, tmp_path / f"{name}.dpq")
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    return model.eval(), path, (x, t, y)


def test_unpack_equals_bitpack_unpack():
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 26):
        for n in (0, 1, 7, 8, 9, 63, 1000, 4099):
            codes = torch.randint(0, 1 << bits, (n,), generator=g)
            data = pack(codes, bits)
            got = _unpack(data, bits, n)
            assert torch.equal(got.long(), codes) and torch.equal(got.long(), unpack(data, bits, n)), (bits, n)
    data = pack(torch.arange(10), 4)
    assert _unpack(data, 8, 5).data_ptr() == data.data_ptr()  # 8 bits: the stored bytes themselves
    with pytest.raises(ValueError, match="need"):
        _unpack(data, 4, 11)


@pytest.mark.parametrize("K,pool", [(256, 512), (16, 32)])  # 8-bit codes + 9-bit pointers; 4 + 5 bits
def test_loaded_model_is_the_saved_model_without_random_draws(tmp_path, K, pool):
    model, path, (x, t, y) = _saved(tmp_path, K, pool, f"k{K}")
    inits = {name: getattr(nn.init, name) for name in packed._INIT_FUNCS if hasattr(nn.init, name)}
    rng = torch.get_rng_state()
    loaded = load_packed(path).eval()
    assert torch.equal(torch.get_rng_state(), rng)  # not one random number drawn
    assert all(getattr(nn.init, name) is fn for name, fn in inits.items())  # initialisers restored
    # every tensor as saved: PQ tensors exactly, the stored floats rounded to fp16 as the file holds
    # them, the computed position table exactly
    with torch.no_grad():
        round_to_storage_(model)  # codebooks/pool and floats at the file's fp16 precision
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].to(want[k].dtype), want[k]), k
    assert torch.equal(loaded.pos_embed, get_2d_sincos_pos_embed(256, 4).float().unsqueeze(0))  # computed
    assert sum(isinstance(m, PQ_MODULES) for m in loaded.modules()) == sum(isinstance(m, PQ_MODULES)
                                                                           for m in model.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    # memory: the codes are the narrowest type, and nothing beyond the model's own tensors is held
    codes = [m.weight_pq.codes for m in loaded.modules() if isinstance(m, PQ_MODULES)]
    assert all(c.dtype == torch.uint8 for c in codes)
    assert unique_bytes(loaded) == in_memory_bytes(loaded)["total"]
    # the model owns its memory: no tensor lies in a mapping of the file (a later in-place write
    # to the file could otherwise change the verified model, or truncating it crash it)
    mapped = [tuple(int(a, 16) for a in ln.split()[0].split("-")) for ln in open("/proc/self/maps")
              if ln.rstrip().endswith(str(path))]
    for name, x in [*loaded.named_parameters(), *loaded.named_buffers()]:
        ptr = x.untyped_storage().data_ptr()
        assert not any(a <= ptr < b for a, b in mapped), name


def test_skeleton_without_init_and_unknown_tensors(tmp_path, monkeypatch):
    _, path, _ = _saved(tmp_path, 16, 32, "m")
    doc = packed.read_metadata(path)
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    skel = build_skeleton(doc["model"], init=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(skel.pos_embed, get_2d_sincos_pos_embed(256, 4).float().unsqueeze(0))
    # a tensor that is neither in the file nor computed by the constructor is an error, not garbage
    monkeypatch.setitem(FAMILIES, "DiT", dataclasses.replace(FAMILIES["DiT"], computed=()))
    with pytest.raises(PackedFileError, match="'pos_embed', which the file does not hold"):
        load_packed(path)


def test_decode_for_inference_is_bit_identical_and_follows_changes(tmp_path):
    _, path, (x, t, y) = _saved(tmp_path, 256, 512, "m")
    plain = load_packed(path).eval()
    fast = load_packed(path, decode=True).eval()
    pq = [m.weight_pq for m in fast.modules() if isinstance(m, PQ_MODULES)]
    dense = sum(math.prod(w.geo.shape) for w in pq)
    assert all(w.decoded is not None for w in pq)
    assert unique_bytes(fast) - unique_bytes(plain) == 4 * dense  # the cost: fp32 dense weights
    with torch.no_grad():
        before = fast(x, t, y)
        assert torch.equal(before, plain(x, t, y))
        # codes changed in place (a reassignment): the kept weights follow
        for model in (fast, plain):
            w = next(m.weight_pq for n, m in model.named_modules() if n == "blocks.0.mlp.fc1")
            w.codes[:, :7] = 255 - w.codes[:, :7]
        after = fast(x, t, y)
        assert not torch.equal(after, before) and torch.equal(after, plain(x, t, y))
    # a forward that trains the codebooks decodes as usual: gradients reach the pool
    pool = pq[0].pool
    pool.requires_grad_(True)
    fast.train()
    fast(x, t, y).sum().backward()
    assert pool.grad is not None and pool.grad.abs().sum() > 0
    assert decode_for_inference(fast, False) == 0 and all(w.decoded is None for w in pq)
    assert unique_bytes(fast) == unique_bytes(plain)
