"""COMPRESSOR=pergroup (record #1855's per-group container): exact roundtrip of every tensor and the meta, the greedy
L1 row order, the smallest codec chosen per group, lrzip used only when installed (a clear error when an artifact
needs it and it is missing), and a whole artifact that loads to the same weights as the brotli one."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import train_gpt as tg


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = lambda r, c: torch.randint(-31, 32, (r, c), generator=g, dtype=torch.int8)  # noqa: E731
    t = {"tok_emb.weight.q": q(64, 16), "tok_emb.weight.scale": torch.rand(64, generator=g).half()}
    for i in range(3):
        for role, shape in (("attn.c_q", (16, 16)), ("attn.c_k", (8, 16)), ("attn.c_v", (8, 16)), ("attn.proj", (16, 16)),
                            ("mlp.fc", (32, 16)), ("mlp.proj", (16, 32))):
            t[f"blocks.{i}.{role}.weight.q"] = q(*shape)
            t[f"blocks.{i}.{role}.weight.scale"] = torch.rand(shape[0], generator=g).half()
        t[f"blocks.{i}.attn_scale"] = torch.rand(16, generator=g)
    t["blocks.0.attn.attn_gate_w.q"] = q(4, 12)  # an int8 tensor outside the roles: stays in the brotli part
    return t


def test_pergroup_roundtrip_is_exact():
    t = _tensors()
    meta = {"format": "pgq-state-v1", "tensors": {"x": {"scheme": "fp16"}}, "model_config": {"A": 1}}
    blob = tg.serialize_state(t, meta, "pergroup")
    assert blob[:4] == tg.PGRP_MAGIC
    t2, meta2 = tg.deserialize_state(blob)
    assert meta2 == meta and set(t2) == set(t)
    for name in t:
        assert t2[name].dtype == t[name].dtype and torch.equal(t2[name], t[name]), name


@pytest.mark.parametrize("seed", range(5))
def test_l1_row_order_is_the_greedy_nearest_neighbour_permutation(seed):
    rows = torch.randint(-5, 6, (30, 7), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    order = tg.l1_row_order(rows)
    assert sorted(order) == list(range(30)) and order[0] == 0
    r = rows.long()
    for a, b in zip(order, order[1:]):  # each next row is a closest unused one
        rest = [i for i in range(30) if i not in order[:order.index(b)]]
        assert (r[b] - r[a]).abs().sum() == min((r[i] - r[a]).abs().sum() for i in rest)


def test_each_group_takes_its_smallest_codec_and_respects_the_codec_list():
    t = _tensors(1)
    blob = tg.serialize_pergroup(t, {}, codecs=["brotli", "lzma", "zstd"])
    import json
    import struct
    (hlen,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8:8 + hlen])
    assert [g["role"] for g in header["groups"]] == list(tg.PERGROUP_ROLES)
    for g in header["groups"]:
        assert g["codec"] == min(g["bytes_by_codec"], key=g["bytes_by_codec"].get) and g["nbytes"] == g["bytes_by_codec"][g["codec"]]
    only = tg.serialize_pergroup(t, {}, codecs=["lzma"])
    (hlen,) = struct.unpack("<I", only[4:8])
    assert {g["codec"] for g in json.loads(only[8:8 + hlen])["groups"]} == {"lzma"}
    assert torch.equal(tg.deserialize_state(only)[0]["blocks.2.mlp.fc.weight.q"], t["blocks.2.mlp.fc.weight.q"])


@pytest.mark.skipif(shutil.which("lrzip") is None, reason="lrzip is not installed (optional: apt-get install lrzip)")
def test_lrzip_streams_roundtrip():
    t = _tensors(2)
    blob = tg.serialize_pergroup(t, {}, codecs=["lrzip"])
    assert all(torch.equal(a, t[n]) for n, a in tg.deserialize_state(blob)[0].items())


def test_lrzip_is_optional(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "lrzip" not in tg.pergroup_codecs() and "brotli" in tg.pergroup_codecs()
    with pytest.raises(RuntimeError, match="install lrzip"):
        tg._stream_decompress(b"whatever", "lrzip")


def test_pergroup_artifact_loads_to_the_same_model_as_brotli():
    from feature_ref import make_cfg
    cfg = make_cfg(QUANT="rtn", NUM_LAYERS=2, MLP_MULT=4)
    torch.manual_seed(0)
    model = tg.GPT(cfg, 1)
    tensors, qmeta = tg.quantize_model(model, cfg, {})
    loaded = {}
    for comp in ("brotli", "pergroup"):
        blob = tg.build_artifact(tensors, qmeta, cfg.replace(COMPRESSOR=comp), 1)
        m, _ = tg.load_artifact(blob, torch.device("cpu"))
        loaded[comp] = (len(blob), m.state_dict())
    a, b = loaded["brotli"][1], loaded["pergroup"][1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
