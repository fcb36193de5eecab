"""Packed files carry a payload checksum and a schema-checked header: damage is an error that
names the file, never a silently different model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dpq_lightning.cli import main as dpq_main
from dpq_lightning.export.packed import PackedFileError, load_packed, save_packed


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from dpq_lightning.models import build_dit
    from dpq_lightning.quant import QuantConfig, quantize_

    model = build_dit("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    quantize_(model, QuantConfig(d=4, K=16, kmeans_backend="torch", granularity="layer", kmeans_iters=2,
                                 overrides=[{"pattern": "blocks.*", "granularity": "column"}]))
    return save_packed(model, tmp_path_factory.mktemp("p") / "m.dpq")


def test_a_flipped_bit_is_caught_and_can_be_overridden(packed, tmp_path):
    raw = bytearray(packed.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + 5] ^= 0x10  # one bit in the first tensor's data
    bad = tmp_path / "flipped.dpq"
    bad.write_bytes(bytes(raw))
    with pytest.raises(PackedFileError, match=r"flipped\.dpq: checksum mismatch"):
        load_packed(bad)
    model = load_packed(bad, verify=False)  # the documented opt-out still loads it
    assert sum(p.numel() for p in model.parameters()) > 0
    assert dpq_main(["verify", str(bad)]) == 2


def test_verify_command_on_a_good_file(packed, capsys):
    assert dpq_main(["verify", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "m.dpq: OK (" in out and "tensors" in out


def _rewrite(src, dst, edit):
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    meta = edit(dict(meta))
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _doc_edit(fn):
    """A document edited and re-hashed: what a writer with a bug would save (the schema check's
    case); an edit without the new hash is a damaged header (the metadata checksum's case)."""
    from dpq_lightning.quant.layout import METADATA_HASH_KEY, metadata_sha256

    def edit(meta):
        doc = json.loads(meta["dpq"])
        fn(doc)
        meta["dpq"] = json.dumps(doc)
        meta[METADATA_HASH_KEY] = metadata_sha256(meta["dpq"])
        return meta
    return edit


def test_every_flipped_byte_is_named_error(packed, tmp_path):
    """A byte flipped anywhere, header (safetensors' JSON, the dpq document, its hash) or payload,
    gives PackedFileError naming the file: never a bare KeyError, an unknown-key error without the
    file, or a silently different model. Every 7th header byte and 40 payload bytes."""
    raw = packed.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    spots = list(range(0, 8 + header, 7)) + [8 + header + k * (len(raw) - 8 - header) // 40 for k in range(40)]
    bad = tmp_path / "flip.dpq"
    outcomes = {}
    for i in spots:
        data = bytearray(raw)
        data[i] ^= 0x04
        bad.write_bytes(bytes(data))
        try:
            load_packed(bad)
            outcomes[i] = "loaded"
        except PackedFileError as err:
            outcomes[i] = "named" if "flip.dpq" in str(err) else f"unnamed: {err}"
        except Exception as err:  # noqa: BLE001 - the point: no other kind of error
            outcomes[i] = f"{type(err).__name__}: {err}"
    wrong = {i: o for i, o in outcomes.items() if o != "named"}
    assert len(spots) > 300 and wrong == {}, list(wrong.items())[:5]


def test_editing_the_document_without_its_hash_is_caught(packed, tmp_path):
    def edit(meta):
        meta["dpq"] = meta["dpq"].replace('"kmeans_iters":2', '"kmeans_iters":3')
        return meta

    bad = _rewrite(packed, tmp_path / "edited.dpq", edit)
    with pytest.raises(PackedFileError, match=r"edited\.dpq: metadata checksum mismatch"):
        load_packed(bad)
    nohash = _rewrite(packed, tmp_path / "nohash.dpq", lambda m: {"dpq": m["dpq"]})
    with pytest.raises(PackedFileError, match=r"nohash\.dpq: the metadata's checksum is missing"):
        load_packed(nohash)


@pytest.mark.parametrize("name,edit,message", [
    ("nojson", lambda m: {"dpq": "{not json"}, "the dpq metadata is not valid JSON"),  # an older file, no hash
    ("nostructure", _doc_edit(lambda d: d.pop("structure")), "damaged metadata: 'structure' missing"),
    ("noclass", _doc_edit(lambda d: d["model"].pop("class")), "damaged metadata: 'model.class' missing"),
    ("badkind", _doc_edit(lambda d: next(iter(d["structure"]["pq"].values())).update(kind="bogus")),
     "kind must be one of"),
    ("badgeo", _doc_edit(lambda d: next(iter(d["structure"]["pq"].values()))["geo"].update(d=0)),
     "geo is incomplete"),
    ("badK", _doc_edit(lambda d: next(iter(d["structure"]["pq"].values())).update(K="16")),
     "K must be a positive integer"),
])
def test_damaged_headers_name_the_file_and_the_fault(packed, tmp_path, name, edit, message, capsys):
    bad = _rewrite(packed, tmp_path / f"{name}.dpq", edit)
    with pytest.raises(PackedFileError, match=message) as e:
        load_packed(bad)
    assert f"{name}.dpq" in str(e.value)
    assert dpq_main(["inspect", str(bad)]) == 2  # a message, not a traceback
    assert message.split("(")[0] in capsys.readouterr().err


def test_a_file_without_checksum_needs_the_opt_out(packed, tmp_path):
    from dpq_lightning.quant.layout import NO_CHECKSUM

    old = _rewrite(packed, tmp_path / "old.dpq", _doc_edit(lambda d: d.update(payload_sha256=NO_CHECKSUM)))
    with pytest.raises(PackedFileError, match="no payload checksum"):
        load_packed(old)
    x, t, y = torch.randn(1, 1, 8, 8), torch.tensor([10]), torch.tensor([3])
    assert torch.equal(load_packed(old, verify=False).eval()(x, t, y), load_packed(packed).eval()(x, t, y))


def test_loaded_codes_are_uint8_and_memory_is_reported(tmp_path):
    """K <= 256: codes and pointers are held as uint8 (the narrowest type), and the in-memory
    bytes of a loaded model add up part by part next to its dense FP32/FP16 size."""
    import math

    from dpq_lightning.models import build_dit
    from dpq_lightning.export.packed import inspect, load_packed, save_packed
    from dpq_lightning.quant import PQ_MODULES, QuantConfig, quantize_
    from dpq_lightning.quant.accounting import in_memory_bytes

    torch.manual_seed(0)
    model = build_dit("DiT-T/2", input_size=8, in_channels=1, num_classes=10)
    dense = sum(p.numel() for p in model.parameters())
    quantize_(model, QuantConfig(d=4, K=16, kmeans_iters=2, kmeans_backend="torch",
                                 overrides=[{"pattern": "final_layer.linear.weight", "granularity": "layer"},
                                            {"pattern": "y_embedder.*", "granularity": "layer"}],
                                 pool={"enabled": True, "iters": 2, "size": 32}))
    path = save_packed(model, tmp_path / "m.dpq")
    loaded = load_packed(path)
    pq = [m.weight_pq for m in loaded.modules() if isinstance(m, PQ_MODULES)]
    assert pq and all(w.codes.dtype == torch.uint8 and w.pointers.dtype == torch.uint8 for w in pq)
    b = in_memory_bytes(loaded)
    assert b["codes"] == sum(w.codes.numel() for w in pq)  # one byte per code
    assert b["codebooks"] == sum(w.pool.numel() * 4 for w in pq)  # fp32 pools
    assert b["total"] == b["codes"] + b["pointers"] + b["codebooks"] + b["float"]
    assert b["fp32"] == 4 * dense and b["fp16"] == 2 * dense
    assert b["total"] < b["fp16"] / 4
    assert sum(math.prod(w.geo.shape) for w in pq) < dense
    line = inspect(path).splitlines()[-1]
    assert line.startswith("in memory (loaded)") and "(uint8)" in line and f"{b['fp16'] / b['total']:.1f}x" in line
