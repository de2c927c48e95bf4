"""CE_KERNEL=triton: the fused softcapped cross-entropy (train_gpt.softcap_ce_op). On the CPU the real kernels run
in Triton's interpreter (TRITON_INTERPRET=1, fp32) against torch's softcap + F.cross_entropy; the GPU path (bf16) is
checked by the op's on-device probe before a run uses it, and timed by bench/bench_vs_record.py / bench_speed.py."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import interpreted_triton_op, needs_triton
from test_core import assert_default_stack_is_one_graph, tiny_cfg


@pytest.fixture
def op(monkeypatch):
    return interpreted_triton_op(monkeypatch, tg.softcap_ce_op)


def reference(x, t, c):
    return F.cross_entropy(c * torch.tanh(x / c), t, reduction="none")


@needs_triton
@pytest.mark.parametrize("N,V,c", [(9, 1500, 30.0), (4, 64, 15.0), (3, 2048, 5.0)])  # a ragged last block; one block; tight cap
def test_softcap_ce_matches_torch_loss_and_gradient(op, N, V, c):
    g = torch.Generator().manual_seed(V)
    x = (torch.randn(N, V, generator=g) * 3 * c).requires_grad_()  # well into the cap's saturation
    t = torch.randint(0, V, (N,), generator=g)
    gl = torch.rand(N, generator=g)
    loss, lse = op(x, t, c)
    (dx,) = torch.autograd.grad(loss, x, gl)
    xr = x.detach().clone().requires_grad_()
    ref = reference(xr, t, c)
    (dref,) = torch.autograd.grad(ref, xr, gl)
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(lse, torch.logsumexp(c * torch.tanh(xr.detach() / c), -1), rtol=1e-5, atol=1e-5)
    assert dx.shape == x.shape and torch.allclose(dx, dref, rtol=1e-4, atol=1e-6)


@needs_triton
def test_probe_passes_the_kernel_and_rejects_a_wrong_one(op, monkeypatch):
    cpu = torch.device("cpu")
    assert tg._softcap_ce_probe(op, cpu) is None
    wrong = lambda x, t, c: tuple(o * 1.05 for o in op(x, t, c))  # noqa: E731 - e.g. a wrong softcap constant
    assert tg._softcap_ce_probe(wrong, cpu).startswith("differs from fp32")


@needs_triton
def test_model_with_the_fused_ce_matches_the_torch_path(op):
    """Whole model: loss and every parameter's gradient agree with CE_KERNEL=torch; eval (reduction none), TTT's
    LoRA and the n-gram hint keep the torch path."""
    cfg = tiny_cfg()
    ids = torch.randint(2, 64, (2, 32), generator=torch.Generator().manual_seed(1))

    def run(ce):
        torch.manual_seed(0)
        model = tg.GPT(cfg)
        model.looping_active = True
        if ce is not None:
            model.set_kernels(dataclasses.replace(model.kernels, ce=ce))
        loss = model(ids, ids)
        loss.backward()
        return model, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    _, loss_ref, ref = run(None)
    model, loss, got = run(lambda *a: (calls.append(1), op(*a))[1])
    assert calls == [1] and loss == pytest.approx(loss_ref, rel=1e-6) and set(got) == set(ref)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6), n
    with torch.no_grad():
        model(ids, ids, reduction="none")
        model(ids, ids, hint=ids)
    assert calls == [1]


def test_fused_ce_traces_as_one_graph(monkeypatch):
    """The op is opaque to dynamo (custom op + fake): the default-shaped stack stays one graph with it."""
    stand_in = torch.library.custom_op("test_ce_kernel::ce", mutates_args=())(_exact_ce)
    stand_in.register_fake(lambda x, t, c: (x.new_empty(x.size(0), dtype=torch.float32), x.new_empty(x.size(0), dtype=torch.float32)))
    monkeypatch.setattr(tg, "ce_kernel", lambda cfg, device: stand_in)
    assert_default_stack_is_one_graph(looping=True)


def _exact_ce(x: torch.Tensor, t: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    z = c * torch.tanh(x.float() / c)
    return F.cross_entropy(z, t, reduction="none"), torch.logsumexp(z, -1)


def test_ce_kernel_policy(monkeypatch):
    """auto (default): the kernel on CUDA once its check passed, torch where the check failed, without a plain softcap
    (LOGIT_SOFTCAP=0, ASYM_LOGIT_RESCALE=1) or without triton; never on the CPU. CE_KERNEL=triton: loudly refused when
    the check fails and, up front, without a plain softcap. CE_KERNEL=torch: never."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    fake = object()
    cfg = lambda **env: tg.Config.from_env({k: str(v) for k, v in env.items()})  # noqa: E731
    monkeypatch.setattr(tg, "softcap_ce_op", lambda: fake)
    monkeypatch.setattr(tg, "module_available", lambda name: True)
    monkeypatch.setattr(tg, "SOFTCAP_CE_CHECK", {0: None})
    assert cfg().ce_kernel == "auto"
    assert tg.ce_kernel(cfg(), cuda) is fake and tg.ce_kernel(cfg(CE_KERNEL="triton"), cuda) is fake
    assert tg.ce_kernel(cfg(), cpu) is None and tg.ce_kernel(cfg(CE_KERNEL="triton"), cpu) is None
    assert tg.ce_kernel(cfg(CE_KERNEL="torch"), cuda) is None
    for plain_softcap_off in (dict(LOGIT_SOFTCAP=0), dict(ASYM_LOGIT_RESCALE=1)):
        assert tg.ce_kernel(cfg(**plain_softcap_off), cuda) is None
    monkeypatch.setattr(tg, "SOFTCAP_CE_CHECK", {0: "RuntimeError: PTX not supported"})
    assert tg.ce_kernel(cfg(), cuda) is None
    with pytest.raises(RuntimeError, match="CE_KERNEL=triton: the fused CE kernel failed its check on cuda:0: RuntimeError: PTX"):
        tg.ce_kernel(cfg(CE_KERNEL="triton"), cuda)
    monkeypatch.setattr(tg, "SOFTCAP_CE_CHECK", {0: None})
    monkeypatch.setattr(tg, "softcap_ce_op", lambda: None)  # triton does not import
    assert tg.ce_kernel(cfg(), cuda) is None
    for bad in (dict(LOGIT_SOFTCAP=0), dict(ASYM_LOGIT_RESCALE=1)):
        with pytest.raises(tg.ConfigError, match="CE_KERNEL=triton"):
            cfg(CE_KERNEL="triton", **bad)
