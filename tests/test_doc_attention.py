"""In-document attention (DOC_ATTENTION / EVAL_DOC_ATTENTION): the records' varlen training layout. Segment
boundaries against a naive reference, the loader's packed rows, document isolation and the cut of long documents
in the training layout, and which masks each path gets. The varlen kernel wiring is in test_fa4_wrapper.py."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from feature_ref import BOS, build, make_cfg, perturb, token_ids


def naive_cu(ids: np.ndarray, bos: int, max_len: int) -> list[int]:
    """Walk the flat batch token by token: a new segment at each row start, each BOS, and after max_len tokens."""
    B, T = ids.shape
    cu, run = [], 0
    for i, t in enumerate(ids.reshape(-1)):
        if i % T == 0 or t == bos or run == max_len:
            cu.append(i)
            run = 0
        run += 1
    return cu + [B * T]


@pytest.mark.parametrize("seed", range(40))
def test_doc_cu_seqlens_matches_naive_walk(seed):
    rng = np.random.default_rng(seed)
    B, T = int(rng.integers(1, 4)), int(rng.integers(1, 40))
    ids = rng.integers(0, 6, size=(B, T))  # BOS = 1 appears often, runs of no BOS too
    if seed % 5 == 0:
        ids[ids == 1] = 2  # no BOS at all
    max_len = int(rng.integers(1, 2 * T + 1))
    got = tg.doc_cu_seqlens(ids, 1, max_len)
    ref = naive_cu(ids, 1, max_len)
    assert got.dtype == np.int32 and len(got) >= 64 and len(got) & (len(got) - 1) == 0  # power of two >= 64
    assert got[:len(ref)].tolist() == ref and (got[len(ref):] == B * T).all()


def test_doc_cu_seqlens_record_layout_and_bucket_growth():
    # one packed row: a document continuing from the previous batch, then two BOS-started ones; cut every 4 tokens
    ids = np.array([[5, 5, 5, 5, 5, 5, 1, 5, 5, 1, 5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert tg.doc_cu_seqlens(ids, 1, 4)[:8].tolist() == [0, 4, 6, 9, 13, 17, 19, 19]
    many = np.ones((1, 200), dtype=np.int64)  # 200 one-token segments -> 201 entries -> 256
    assert len(tg.doc_cu_seqlens(many, 1, 8)) == 256
    seg = tg.segment_ids(torch.from_numpy(tg.doc_cu_seqlens(ids, 1, 4)), (1, 19))
    assert seg.tolist() == [[0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5]]


def test_loader_doc_mode_packs_one_row_with_segments(tmp_path):
    toks = np.tile(np.array([1, 7, 8, 9, 1, 4, 4, 4, 4, 4, 4, 4]), 40)
    tg.write_shard(tmp_path / "fineweb_train_000000.bin", toks)
    files = [str(tmp_path / "fineweb_train_000000.bin")]
    cpu = torch.device("cpu")
    rows = tg.DistributedLoader(files, 0, 1, 32, 8, cpu, prefetch=0)
    packed = tg.DistributedLoader(files, 0, 1, 32, 8, cpu, prefetch=0, doc=(1, 8))
    for _ in range(3):
        (xr, yr, cur), (xp, yp, cup) = rows.next(), packed.next()
        assert cur is None and xr.shape == (4, 8) and xp.shape == (1, 32)
        assert torch.equal(xr.reshape(1, -1), xp) and torch.equal(yr.reshape(1, -1), yp)  # same tokens, same order
        assert cup.dtype == torch.int32 and cup.tolist() == tg.doc_cu_seqlens(xp.numpy(), 1, 8).tolist()


def test_training_layout_isolates_documents_and_cuts_long_ones():
    """One packed row (DOC_ATTENTION training): no position sees another document, and inside a document longer than
    TRAIN_SEQ_LEN a position sees only its own TRAIN_SEQ_LEN piece (the records' cut from the document's start)."""
    cfg, m = build(DOC_ATTENTION=1, TRAIN_SEQ_LEN=8, SMEAR_GATE=1, XSA_LAST_N=-1, UNET_SKIPS=1, WINDOW_PATTERN="SL",
                   WINDOW_SHORT=3)
    perturb(m)
    ids = token_ids(B=1, T=40, seed=2, bos_positions=(0, 6, 30))  # docs [0,6) [6,30) [30,40); [6,30) cut at 14, 22
    with torch.no_grad():
        ref = m.forward_logits(ids, tg.resolve_kernels(cfg, "cpu").masks(ids, BOS, train=True))
        for t, first_unchanged in ((3, 6), (8, 14), (20, 22), (26, 30)):
            ids2 = ids.clone()
            ids2[0, t] = 3 if ids[0, t] != 3 else 4
            out = m.forward_logits(ids2, tg.resolve_kernels(cfg, "cpu").masks(ids2, BOS, train=True))
            assert torch.equal(out[:, first_unchanged:], ref[:, first_unchanged:]), t
            assert not torch.allclose(out[:, t:first_unchanged], ref[:, t:first_unchanged]), t
        # smear crosses the cut (same document), attention does not: the token right after a cut still changes
        # through SmearGate when its predecessor changes -- exactly as in the records' packed rows
        ids2 = ids.clone()
        ids2[0, 13] = 3 if ids[0, 13] != 3 else 4
        out = m.forward_logits(ids2, tg.resolve_kernels(cfg, "cpu").masks(ids2, BOS, train=True))
        assert not torch.allclose(out[:, 14], ref[:, 14])


def test_masks_follow_train_and_eval_settings():
    ids = token_ids(B=2, T=16, seed=1, bos_positions=(0, 9))
    doc_train = build(DOC_ATTENTION=1, EVAL_DOC_ATTENTION="off")[0]
    assert tg.resolve_kernels(doc_train, "cpu").masks(ids.reshape(1, -1), BOS, train=True)  # document masks in training
    assert tg.resolve_kernels(doc_train, "cpu").masks(ids, BOS) == {}  # plain causal eval windows (as the records' sliding eval)
    doc_eval = build(DOC_ATTENTION=0, EVAL_DOC_ATTENTION="on")[0]
    assert tg.resolve_kernels(doc_eval, "cpu").masks(ids, BOS, train=True) == {}
    eval_masks = tg.resolve_kernels(doc_eval, "cpu").masks(ids, BOS)  # the CPU: segments for sdpa_varlen
    cu, max_len = eval_masks["varlen"]
    assert max_len == 16 and cu[:5].tolist() == [0, 9, 16, 25, 32] and (cu[5:] == 32).all()  # BOS at 9; rows separate
    # the dense document masks (compiled CUDA with ATTN_BACKEND=sdpa; FlexAttention's block masks are the same rule)
    dense = tg.build_masks(doc_eval, 16, "cpu", tg.segment_ids(cu, ids.shape), False)
    assert dense[0].shape == (2, 1, 16, 16)
    assert not dense[0][1, 0, 9, 8] and dense[0][1, 0, 8, 0] and dense[0][1, 0, 10, 9]
    assert build(DOC_ATTENTION=1)[0].eval_doc_attention_on and not build(DOC_ATTENTION=0)[0].eval_doc_attention_on
    with pytest.raises(tg.ConfigError, match="EVAL_DOC_ATTENTION"):
        build(EVAL_DOC_ATTENTION="yes")


@pytest.mark.parametrize("window,Hkv", [(0, 2), (3, 2), (5, 4), (40, 1)])
def test_sdpa_varlen_matches_document_masks_and_stays_per_segment(monkeypatch, window, Hkv):
    """The CPU's varlen attention (no flash kernel): outputs and gradients equal dense SDPA under the document mask
    over the packed row; up to SDPA_VARLEN_DENSE_MAX tokens that one mask is what runs, above it no attention call is
    larger than the longest segment (memory: the sum of squared segment lengths, not (B*T)^2)."""
    g = torch.Generator().manual_seed(window + Hkv)
    N, H, D = 60, 4, 8
    q, k, v = (torch.randn(N, h, D, generator=g, requires_grad=True) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0, 7, 8, 30, 41, 60] + [60] * 58, dtype=torch.int32)  # padded to 64 as doc_cu_seqlens pads
    pos = torch.arange(N)
    seg = torch.searchsorted(cu, pos.to(torch.int32), right=True)
    mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    if window:
        mask &= pos[:, None] - pos[None, :] <= window
    qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=Hkv != H)[0].transpose(0, 1)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    sizes, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: (sizes.append(a[0].size(-2)), sdpa(*a, **kw))[1])
    assert torch.allclose(tg.sdpa_varlen(q, k, v, cu, 22, window), ref, atol=1e-5) and sizes == [N]  # small: one dense mask
    sizes.clear()
    monkeypatch.setattr(tg, "SDPA_VARLEN_DENSE_MAX", 16)
    out = tg.sdpa_varlen(q, k, v, cu, 22, window)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert out.shape == (N, H, D) and torch.allclose(out, ref, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))
    assert sizes == [7, 1, 22, 11, 19]
    # traced (fullgraph: no host loop), the same mask over the packed row: one graph, the same output
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    torch._dynamo.reset()
    traced = torch.compile(tg.sdpa_varlen, backend="eager", fullgraph=True)(q, k, v, cu, 22, window)
    assert torch.allclose(traced, ref, atol=1e-5)


def test_cpu_and_eager_cuda_document_attention_take_sdpa_varlen():
    cfg = build(DOC_ATTENTION=1)[0]
    assert tg.varlen_kernel(cfg, "cpu") is tg.sdpa_varlen and tg.resolve_kernels(cfg, "cpu").varlen is tg.sdpa_varlen
    ids = token_ids(B=1, T=40, seed=3, bos_positions=(0, 12, 31))
    masks = tg.resolve_kernels(cfg, "cpu").masks(ids, BOS, train=True)
    assert set(masks) == {"varlen"} and masks["varlen"][0][:5].tolist() == [0, 12, 12 + cfg.train_seq_len, 31, 40]


def _block_sets(bm):
    """{(row, query block): (partial kv blocks, full kv blocks)} of a BlockMask."""
    n, idx, fn, fidx = bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices
    return {(b, i): (set(idx[b, 0, i, :n[b, 0, i]].tolist()), set(fidx[b, 0, i, :fn[b, 0, i]].tolist()))
            for b in range(n.size(0)) for i in range(n.size(2))}


@pytest.mark.parametrize("T,window,bos_positions", [(512, 0, (0, 100, 130, 300)), (512, 40, (0, 5, 200)),
                                                    (640, 300, (0,)), (500, 0, (0, 129, 257)), (512, 200, None)])
def test_flex_block_mask_matches_create_block_mask_and_dense_attention(T, window, bos_positions):
    """The block-level BlockMask (compiled CUDA without a flash kernel) classifies every block pair as
    create_block_mask does (which evaluates all T x T pairs), and FlexAttention under it equals dense SDPA under the
    token-level document / window mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, seg = 2, None
    if bos_positions is not None:
        ids = token_ids(B=B, T=T, seed=T + window, bos_positions=bos_positions)
        seg = tg.segment_ids(torch.from_numpy(tg.doc_cu_seqlens(ids.numpy(), BOS, T)), (B, T))
    ours = tg.flex_block_mask(T, window, seg, "cpu")

    def mask_mod(b, h, q, kv):
        m = q >= kv
        if window:
            m = m & (q - kv <= window)
        return m & (seg[b, q] == seg[b, kv]) if seg is not None else m
    ref = create_block_mask(mask_mod, B if seg is not None else None, None, T, T, device="cpu")
    pos = torch.arange(T)
    dense = (pos[:, None] >= pos[None, :]) & ((pos[:, None] - pos[None, :] <= window) if window else True)
    dense = dense[None, None] & (seg[:, None, :, None] == seg[:, None, None, :] if seg is not None else True)
    dense = dense.expand(B, 1, T, T)
    assert ours.kv_num_blocks.shape[2:] == ref.kv_num_blocks.shape[2:]
    mine, theirs = _block_sets(ours), _block_sets(ref)
    n = tg.FLEX_BLOCK
    for (b, i), (partial, full) in theirs.items():
        my_partial, my_full = mine[(min(b, ours.kv_num_blocks.size(0) - 1), i)]
        # full blocks are exact; a partial block is kept whenever the causal/window bounds and the segment bounds each
        # allow a pair (their conjunction may still be empty, e.g. window + a document edge): extra partial blocks
        # must then hold no attending pair, so they cost compute, never correctness.
        assert my_full == full and partial <= my_partial
        for j in my_partial - partial:
            assert not dense[b, 0, i * n:(i + 1) * n, j * n:(j + 1) * n].any()
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, 2, T, 8, generator=g) for _ in range(3))
    with warnings.catch_warnings():  # eager flex on the CPU warns (once) that it is unfused: fine at 512 tokens
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=ours)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=dense), atol=1e-5)


def test_flex_document_masks_at_the_default_micro_batch_stay_block_level(monkeypatch):
    """DOC_ATTENTION=1 on compiled CUDA without a flash kernel, at the 8-GPU default micro-batch (one packed row of
    98,304 tokens): create_block_mask asked for 72 GiB there (the lent H200, BENCHMARKS.md). The masks never take
    that path and hold (T/128)^2 block entries, not T^2."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "create_block_mask", lambda *a, **k: pytest.fail("dense T x T mask evaluation"))
    cfg = make_cfg(DOC_ATTENTION=1, TRAIN_SEQ_LEN=2048, TRAIN_BATCH_TOKENS=98_304)
    T = 98_304
    ids = token_ids(B=1, T=T, seed=5, bos_positions=tuple(range(0, T, 3001)))
    seg = tg.segment_ids(torch.from_numpy(tg.doc_cu_seqlens(ids.numpy(), BOS, 2048)), (1, T))
    masks = tg.build_masks(cfg, T, "cpu", seg, use_flex=True)
    nb = T // tg.FLEX_BLOCK
    for bm in masks.values():
        assert bm.kv_indices.shape == (1, 1, nb, nb) and bm.seq_lengths == (T, T)
        per_query_block = bm.kv_num_blocks + bm.full_kv_num_blocks
        assert int(per_query_block.max()) <= 2048 // tg.FLEX_BLOCK + 2  # documents are cut at 2048: a band, not a triangle
