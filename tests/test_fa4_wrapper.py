"""FlashAttention 4 wrapper (ATTN_BACKEND=fa4): the custom-op plumbing, checked on the CPU with a stand-in
for `flash_attn.cute.interface` whose forward/backward are exact math attention. What it checks is our side:
the window mapping, the LSE/grad wiring through `register_autograd`, and that torch.compile traces the op
as one graph. The real FA4 kernels need a Hopper/Blackwell GPU (bench/bench_features.py compares them)."""
import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import graph_counter


def _math_attention(q, k, v, left, dout=None):
    """q [B,T,H,D], k/v [B,T,Hkv,D] -> (out [B,T,H,D], lse [B,H,T]), or with dout the gradients (dq, dk, dv),
    written out by hand (a custom op's kernel runs below autograd); causal, keys q-left..q when left is set."""
    B, T, H, D = q.shape
    r = H // k.size(2)
    qh, kh, vh = q.transpose(1, 2).float(), k.transpose(1, 2).repeat_interleave(r, 1).float(), v.transpose(1, 2).repeat_interleave(r, 1).float()
    i = torch.arange(T)
    mask = i[:, None] >= i[None, :]
    if left is not None:
        mask = mask & (i[:, None] - i[None, :] <= left)
    scale = D ** -0.5
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1)
    out = p @ vh
    if dout is None:
        return out.transpose(1, 2).to(q.dtype), torch.logsumexp(s, -1)
    do = dout.transpose(1, 2).float()
    dv = p.transpose(-1, -2) @ do
    dp = do @ vh.transpose(-1, -2)
    ds = p * (dp - (do * out).sum(-1, keepdim=True))
    dq = (ds @ kh) * scale
    dk = (ds.transpose(-1, -2) @ qh) * scale
    group = lambda g: g.view(B, H // r, r, T, D).sum(2).transpose(1, 2)  # GQA: sum each KV head's query group
    return dq.transpose(1, 2).to(q.dtype), group(dk).to(k.dtype), group(dv).to(v.dtype)


def _segments(cu, max_seqlen):
    """(start, end) of every non-empty segment of padded cu_seqlens; checks FA's varlen contract."""
    cu = cu.tolist()
    assert cu[0] == 0 and all(a <= b for a, b in zip(cu, cu[1:]))
    segs = [(a, b) for a, b in zip(cu, cu[1:]) if b > a]
    assert max(b - a for a, b in segs) <= max_seqlen
    return segs


def _fake_fa4_module():
    mod = types.ModuleType("flash_attn.cute.interface")
    calls = {"fwd": [], "bwd": [], "varlen": 0}

    def _flash_attn_fwd(q, k, v, causal=False, window_size_left=None, window_size_right=None, return_lse=False,
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, **kw):
        assert causal and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        calls["fwd"].append((window_size_left, window_size_right))
        if cu_seqlens_q is None:
            out, lse = _math_attention(q, k, v, window_size_left)
            return out, lse, None, None, None
        assert cu_seqlens_k is cu_seqlens_q and cu_seqlens_q.dtype == torch.int32 and max_seqlen_q == max_seqlen_k
        calls["varlen"] += 1
        out, lse = torch.zeros_like(q), torch.zeros(q.size(1), q.size(0))
        for a, b in _segments(cu_seqlens_q, max_seqlen_q):  # each segment alone, as a batch of one
            o, l = _math_attention(q[None, a:b], k[None, a:b], v[None, a:b], window_size_left)
            out[a:b], lse[:, a:b] = o[0], l[0]
        return out, lse, None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, causal=False, window_size_left=None, window_size_right=None,
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, **kw):
        calls["bwd"].append((window_size_left, window_size_right))
        if cu_seqlens_q is None:
            return _math_attention(q, k, v, window_size_left, dout)
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        for a, b in _segments(cu_seqlens_q, max_seqlen_q):
            for g, part in zip(grads, _math_attention(q[None, a:b], k[None, a:b], v[None, a:b], window_size_left, dout[None, a:b])):
                g[a:b] = part[0]
        return tuple(grads)

    mod._flash_attn_fwd, mod._flash_attn_bwd, mod.calls = _flash_attn_fwd, _flash_attn_bwd, calls
    return mod


@pytest.fixture(scope="module")
def fa4():
    """tg.fa4_attention() bound to the stand-in module (registered once per process: custom op names are global)."""
    interface = _fake_fa4_module()
    pkgs = {"flash_attn": types.ModuleType("flash_attn"), "flash_attn.cute": types.ModuleType("flash_attn.cute")}
    for name, m in pkgs.items():
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        m.__path__ = []
    pkgs["flash_attn.cute"].interface = interface
    interface.__spec__ = importlib.machinery.ModuleSpec("flash_attn.cute.interface", None)
    saved = {n: sys.modules.get(n) for n in (*pkgs, "flash_attn.cute.interface")}
    sys.modules.update(pkgs)
    sys.modules["flash_attn.cute.interface"] = interface
    saved_fa4 = list(tg._FA4)
    tg._FA4.clear()
    try:
        fn = tg.fa4_attention()
        assert fn is not None
        yield fn, interface
    finally:
        tg._FA4[:] = saved_fa4
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _inputs(seed=0, B=2, T=16, H=4, Hkv=2, D=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, Hkv, Hkv))
    return q, k, v, torch.randn(B, T, H, D, generator=g)


def _sdpa_reference(q, k, v, window):
    T = q.size(1)
    i = torch.arange(T)
    m = i[:, None] >= i[None, :]
    if window:
        m = m & (i[:, None] - i[None, :] <= window)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, enable_gqa=True)
    return y.transpose(1, 2)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("compiled", [False, True])
def test_fa4_wrapper_matches_sdpa_forward_and_backward(fa4, window, compiled):
    fn, interface = fa4
    ws = (window, 0) if window else (-1, -1)
    call = lambda q, k, v: fn(q, k, v, causal=True, window_size=ws)
    if compiled:  # fullgraph: the custom op must not break the graph; aot_eager runs its fake + autograd registration
        torch._dynamo.reset()
        call = torch.compile(call, backend="aot_eager", fullgraph=True)
    q, k, v, go = _inputs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    n_fwd, n_bwd = len(interface.calls["fwd"]), len(interface.calls["bwd"])
    out = call(*leaves)
    out.backward(go)
    ref = _sdpa_reference(*ref_leaves, window)
    ref.backward(go)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    expect = (window, 0) if window else (None, None)
    assert interface.calls["fwd"][n_fwd:] == [expect] and interface.calls["bwd"][n_bwd:] == [expect]


def test_fa4_backend_config_checks(monkeypatch):
    env = {"ATTN_BACKEND": "fa4"}
    monkeypatch.setattr(tg, "module_available", lambda name: False)
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND=fa4: flash-attn-4 is not importable"):
        tg.Config.from_env(env)
    monkeypatch.setattr(tg, "module_available", lambda name: True)
    assert tg.Config.from_env(env).attn_backend == "fa4"
    assert tg.Config.from_env({**env, "DOC_ATTENTION": "1"}).doc_attention  # through FA4's varlen entry point


def test_auto_attention_policy(monkeypatch):
    """auto: FA3 if importable, else FA4 on Hopper or newer, else SDPA; FA2 only when ATTN_BACKEND=flash."""
    cuda = torch.device("cuda", 0)
    f3, f2, f4 = (lambda *a, **k: None), (lambda *a, **k: None), (lambda *a, **k: None)
    cfg = lambda **env: tg.Config.from_env({k: str(v) for k, v in env.items()})

    monkeypatch.setitem(tg.FA4_CHECK, 0, None)  # the GPU probe passed (test_fa4_check_* cover the probe itself)
    monkeypatch.setattr(tg, "mlp_dgrad_kernel", lambda cfg, device: None)  # the MLP policy has its own test
    name = lambda c, device=cuda: tg.resolve_kernels(c, device).attention  # noqa: E731

    def setup(flash, fa4, major):
        monkeypatch.setattr(tg, "FLASH_ATTN", flash)
        monkeypatch.setattr(tg, "_flash_attn_func", {"fa3": f3, "fa2": f2, None: None}[flash])
        monkeypatch.setattr(tg, "fa4_attention", lambda: f4 if fa4 else None)
        monkeypatch.setattr(tg, "_cuda_major", lambda index: major)

    setup("fa3", True, 9)
    assert tg.flash_kernel(cfg(), cuda) is f3 and name(cfg(), cuda) == "fa3"
    setup("fa2", True, 9)
    assert tg.flash_kernel(cfg(), cuda) is f4 and name(cfg(), cuda) == "fa4"
    assert tg.flash_kernel(cfg(ATTN_BACKEND="flash"), cuda) is f2 and name(cfg(ATTN_BACKEND="flash"), cuda) == "fa2"
    setup("fa2", False, 9)
    assert tg.flash_kernel(cfg(), cuda) is None and name(cfg(), cuda) == "sdpa"
    setup(None, True, 8)  # Ampere: FA4 is not taken by auto
    assert tg.flash_kernel(cfg(), cuda) is None
    monkeypatch.setattr(tg, "module_available", lambda name: True)
    assert tg.flash_kernel(cfg(ATTN_BACKEND="fa4"), cuda) is f4  # asked for explicitly
    setup("fa3", True, 9)
    for env in (dict(ATTN_BACKEND="sdpa"), dict(ATTN_BACKEND="flex")):
        assert tg.flash_kernel(cfg(**env), cuda) is None and tg.varlen_kernel(cfg(**env), cuda) is None, env
    # DOC_ATTENTION attends with the same flash kernel's varlen entry point; without one, SDPA per segment in eager
    # runs (the CPU, COMPILE=0) and document masks in compiled CUDA runs
    assert tg.flash_kernel(cfg(DOC_ATTENTION=1), cuda) is f3 and tg.varlen_kernel(cfg(DOC_ATTENTION=1), cuda) is tg._flash_varlen
    assert tg.varlen_kernel(cfg(DOC_ATTENTION=1), torch.device("cpu")) is tg.sdpa_varlen
    assert tg.varlen_kernel(cfg(ATTN_BACKEND="sdpa", COMPILE=0), cuda) is tg.sdpa_varlen
    assert name(cfg(ATTN_BACKEND="flex"), cuda) == "flex"
    assert name(cfg(), torch.device("cpu")) == "sdpa"
    k = tg.resolve_kernels(cfg(DOC_ATTENTION=1), cuda)  # the resolved object carries the same choices
    assert k.flash is f3 and k.varlen is tg._flash_varlen and not k.flex and k.attention == "fa3"
    assert tg.resolve_kernels(cfg(ATTN_BACKEND="flex"), cuda).flex and not tg.resolve_kernels(cfg(ATTN_BACKEND="sdpa"), cuda).flex


def test_auto_fa4_choice_traces_without_graph_break(fa4, monkeypatch):
    """The kernels are resolved once, before compile; the compiled step calls the resolved FA4 custom op and
    traces as one graph."""
    fn, _ = fa4
    monkeypatch.setattr(tg, "FLASH_ATTN", None)
    monkeypatch.setattr(tg, "_flash_attn_func", None)
    monkeypatch.setattr(tg, "_cuda_major", lambda index: 9)
    monkeypatch.setitem(tg.FA4_CHECK, 0, None)
    monkeypatch.setattr(tg, "mlp_dgrad_kernel", lambda cfg, device: None)
    cfg, cuda = tg.Config.from_env({}), torch.device("cuda", 0)
    kernels = tg.resolve_kernels(cfg, cuda)
    assert kernels.flash is fn and kernels.attention == "fa4"

    def attend(q, k, v):
        return kernels.flash(q, k, v, causal=True, window_size=(-1, -1)) * 2

    torch._dynamo.reset()
    q, k, v, _ = _inputs()
    explanation = torch._dynamo.explain(attend)(q, k, v)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_fa4_check_accepts_a_correct_kernel_and_rejects_broken_ones(fa4, monkeypatch):
    """The probe (fwd + bwd of one small GQA call vs fp32 SDPA) passes the exact stand-in, and turns a kernel that
    raises or computes something else into a reason; auto then attends with SDPA, ATTN_BACKEND=fa4 fails loudly."""
    fn, interface = fa4
    cpu = torch.device("cpu")  # the probe runs where it is asked to; on a GPU box that is the training device
    monkeypatch.setattr(tg, "FA4_CHECK", {})
    assert tg.fa4_check(cpu) is None and tg.FA4_CHECK == {0: None}

    good_fwd = interface._flash_attn_fwd

    def broken(*a, **k):
        raise RuntimeError("cuModuleLoadData failed\nmore lines")

    def wrong_scale(q, k, v, **kw):  # e.g. a softmax scale mix-up
        return good_fwd(q * 2, k, v, **kw)

    for fwd, expect in ((broken, "RuntimeError: cuModuleLoadData failed"), (wrong_scale, "differs from SDPA")):
        monkeypatch.setattr(interface, "_flash_attn_fwd", fwd)
        monkeypatch.setattr(tg, "FA4_CHECK", {})
        why = tg.fa4_check(cpu)
        assert why is not None and why.startswith(expect), why
        assert tg.fa4_check(cpu) == why  # remembered: one probe per process and device

    # policy with a failed check on cuda:0 (no GPU needed: the verdict is already recorded)
    monkeypatch.setattr(tg, "FA4_CHECK", {0: "RuntimeError: cuModuleLoadData failed"})
    monkeypatch.setattr(tg, "FLASH_ATTN", None)
    monkeypatch.setattr(tg, "_flash_attn_func", None)
    monkeypatch.setattr(tg, "_cuda_major", lambda index: 9)
    monkeypatch.setattr(tg, "module_available", lambda name: True)
    cuda = torch.device("cuda", 0)
    assert tg.flash_kernel(tg.Config.from_env({}), cuda) is None
    with pytest.raises(RuntimeError, match="ATTN_BACKEND=fa4: flash-attn-4 failed its check on cuda:0: RuntimeError: cuModuleLoadData"):
        tg.flash_kernel(tg.Config.from_env({"ATTN_BACKEND": "fa4"}), cuda)


def test_fa4_check_runs_under_no_grad_and_autocast(fa4, monkeypatch):
    """The first call can come from an eval path (no_grad) or inside autocast: the probe must still judge the kernel."""
    monkeypatch.setattr(tg, "FA4_CHECK", {})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert tg.fa4_check(torch.device("cpu")) is None


# ---- varlen (DOC_ATTENTION): FA4's cu_seqlens entry point ---------------------------------------------------

def _varlen_reference(q, k, v, cu, window):
    """q [N,H,D], k/v [N,Hkv,D]: SDPA over the flat sequence with a same-segment & causal (& window) mask."""
    seg = tg.segment_ids(cu, (1, q.size(0)))[0]
    i = torch.arange(q.size(0))
    m = (i[:, None] >= i[None, :]) & (seg[:, None] == seg[None, :])
    if window:
        m = m & (i[:, None] - i[None, :] <= window)
    y = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=m, enable_gqa=True)
    return y[0].transpose(0, 1)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("compiled", [False, True])
def test_fa4_varlen_wrapper_matches_masked_sdpa(fa4, window, compiled):
    fn, interface = fa4
    ids = torch.ones(2, 16, dtype=torch.long)
    ids[0, 5] = ids[1, 0] = ids[1, 9] = 0  # BOS = 0: segments [0,5) [5,16) [16,25) [25,32), padded to 64 entries
    cu = torch.from_numpy(tg.doc_cu_seqlens(ids.numpy(), 0, 16))
    assert cu.tolist()[:6] == [0, 5, 16, 25, 32, 32] and len(cu) == 64
    q, k, v, go = (t.reshape(32, *t.shape[2:]) for t in _inputs())
    call = lambda q, k, v: fn.varlen(q, k, v, cu, 16, window)
    if compiled:
        torch._dynamo.reset()
        call = torch.compile(call, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    n = interface.calls["varlen"]
    out = call(*leaves)
    out.backward(go)
    ref = _varlen_reference(*ref_leaves, cu, window)
    ref.backward(go)
    assert interface.calls["varlen"] == n + 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_model_doc_attention_varlen_equals_document_masks(fa4, monkeypatch, train):
    """The whole model with DOC_ATTENTION through a varlen kernel -- the FA4 wrapper (stand-in kernels) and the CPU's
    own sdpa_varlen -- gives the loss and every parameter gradient of the document-mask path (SDPA over segment ids):
    training layout (one packed row, documents cut every TRAIN_SEQ_LEN from their start) and eval layout (rows = windows)."""
    from feature_ref import BOS, build, perturb, token_ids
    fn, interface = fa4
    kw = dict(DOC_ATTENTION=1, TRAIN_SEQ_LEN=8, WINDOW_PATTERN="SL", WINDOW_SHORT=3, SMEAR_GATE=1, XSA_LAST_N=-1,
              PARALLEL_START_LAYER=2, UNET_SKIPS=1, NUM_LOOPS=1, LOOP_START=1, LOOP_END=2)
    ids = token_ids(B=2, T=24, seed=3, bos_positions=(0, 5, 20))
    x = ids.reshape(1, -1) if train else ids
    y = torch.roll(x, -1, 1)

    def loss_and_grads(varlen):  # None: document masks; else the varlen kernel the model resolves
        cfg, m = build(**kw)
        perturb(m)
        m.looping_active = True
        with monkeypatch.context() as mp:
            mp.setattr(tg, "varlen_kernel", lambda cfg, device=None: varlen)
            m.set_kernels(tg.resolve_kernels(cfg, "cpu"))
            masks = m.masks(x, train=train)
            assert ("varlen" in masks) == (varlen is not None)
            loss = m(x, y, masks)
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads(None)
    for varlen in (fn.varlen, tg.sdpa_varlen):
        n = interface.calls["varlen"]
        loss, grads = loss_and_grads(varlen)
        assert (interface.calls["varlen"] > n) == (varlen is fn.varlen)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fa4_check_covers_varlen(fa4, monkeypatch):
    """A kernel whose dense path is right but whose varlen path ignores cu_seqlens fails the check."""
    fn, interface = fa4
    good_fwd = interface._flash_attn_fwd

    def varlen_ignores_segments(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, **kw):
        if cu_seqlens_q is not None:
            n = q.size(0)
            cu_seqlens_q = cu_seqlens_k = torch.tensor([0, n], dtype=torch.int32)
            kw["max_seqlen_q"] = kw["max_seqlen_k"] = n
        return good_fwd(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **kw)

    monkeypatch.setattr(interface, "_flash_attn_fwd", varlen_ignores_segments)
    monkeypatch.setattr(tg, "FA4_CHECK", {})
    why = tg.fa4_check(torch.device("cpu"))
    assert why is not None and why.startswith("varlen differs from masked SDPA"), why


@pytest.mark.parametrize("mark", [True, False])
def test_compiled_doc_attention_step_has_one_graph_for_every_cu_seqlens_bucket(fa4, monkeypatch, mark):
    """DOC_ATTENTION's cu_seqlens are padded to power-of-two buckets; a training micro-batch with more documents than
    the warmup's batches lands in a new bucket. Without a dynamic cu_seqlens length that is a recompile of the whole
    step inside the timed loop (38.6 s on the H200): Kernels.masks marks the length dynamic, so the first compile
    serves every bucket. A counting backend sees dynamo's graphs on the CPU; mark=False shows the recompile."""
    import torch._dynamo
    from feature_ref import BOS, V, build
    fn, interface = fa4
    cfg, m = build(DOC_ATTENTION=1, TRAIN_SEQ_LEN=256, TRAIN_BATCH_TOKENS=512, WINDOW_PATTERN="L")
    monkeypatch.setattr(tg, "varlen_kernel", lambda cfg, device=None: fn.varlen)
    m.set_kernels(tg.resolve_kernels(cfg, "cpu"))
    if not mark:
        monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", lambda t, dim: None)
    counting, graphs = graph_counter()

    torch._dynamo.reset()
    fwd = torch.compile(m, backend=counting)
    g = torch.Generator().manual_seed(0)
    sizes = []
    try:
        for n_docs in (10, 100, 200):  # 11 / 101 / 201 segments: buckets 64, 128, 256
            x = torch.randint(2, V, (1, 512), generator=g)
            x[0, torch.randperm(512, generator=g)[:n_docs]] = BOS
            y = torch.roll(x, -1, 1)
            masks = m.masks(x, train=True)
            sizes.append(masks["varlen"][0].numel())
            fwd(x, y, masks).backward()
    finally:
        torch._dynamo.reset()
    assert len(set(sizes)) == 3, sizes
    if mark:
        assert len(graphs) == 1, f"{len(graphs)} graphs for cu_seqlens lengths {sizes}: a new bucket recompiled"
    else:
        assert len(graphs) > 1, "without the dynamic mark a new bucket should recompile (else this test shows nothing)"
