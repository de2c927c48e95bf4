"""MLP_KERNEL: the Triton dgrad GEMM with the LeakyReLU^2 derivative in its epilogue (train_gpt.mlp_dgrad_op).
On the CPU the real kernel runs in Triton's interpreter (TRITON_INTERPRET=1, fp32); the GPU path (bf16, the
autotuned H200 tile) is timed and checked by bench/bench_mlp.py and by the op's on-device check."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import interpreted_triton_op, needs_triton
from test_core import assert_default_stack_is_one_graph, tiny_cfg


@pytest.fixture
def op(monkeypatch):
    return interpreted_triton_op(monkeypatch, tg.mlp_dgrad_op)


@needs_triton
@pytest.mark.parametrize("slope", [0.5, 0.0])
@pytest.mark.parametrize("shape", [(70, 48, 96), (33, 16, 40)])  # ragged: tiles hang over every edge
def test_dgrad_kernel_matches_autograd(op, slope, shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(M)
    dy, w2, pre = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g), torch.randn(M, N, generator=g)
    u = pre.clone().requires_grad_()
    F.leaky_relu(u, slope).square().backward(dy @ w2)
    got = op(dy, w2, pre, slope)
    assert got.shape == (M, N) and torch.allclose(got, u.grad, rtol=1e-5, atol=1e-5)


@needs_triton
def test_probe_passes_the_kernel_and_check_remembers(op, monkeypatch):
    monkeypatch.setattr(tg, "MLP_DGRAD_CHECK", {})
    cpu = torch.device("cpu")
    assert tg._mlp_dgrad_probe(op, cpu) is None
    assert tg.checked_kernel(tg.MLP_DGRAD_CHECK, cpu, op, tg._mlp_dgrad_probe, "-") is None and tg.MLP_DGRAD_CHECK == {0: None}
    wrong = lambda dy, w2, pre, slope: op(dy, w2, pre, slope) * 1.5  # noqa: E731 - e.g. a wrong derivative constant
    assert tg._mlp_dgrad_probe(wrong, cpu).startswith("differs from fp32")


def _model_grads(cfg, ids, dgrad=None, monkeypatch=None):
    torch.manual_seed(0)
    model = tg.GPT(cfg)
    model.looping_active = True
    if dgrad is not None:
        monkeypatch.setattr(tg, "mlp_dgrad_kernel", lambda cfg, device: dgrad)
        model.set_kernels(tg.resolve_kernels(cfg, "cpu"))
    loss = model(ids, ids)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@needs_triton
def test_model_with_the_fused_backward_matches_the_torch_path(op, monkeypatch):
    """Whole model, looping and parallel lanes on: loss and every parameter's gradient agree with MLP_KERNEL=torch."""
    cfg = tiny_cfg()
    ids = torch.randint(2, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    loss_ref, ref = _model_grads(cfg, ids)
    calls = []

    def counted(*a):
        calls.append(1)
        return op(*a)

    loss, got = _model_grads(cfg, ids, counted, monkeypatch)
    assert len(calls) == len(tg.layer_order(cfg, True))  # one per MLP visit
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    assert set(got) == set(ref)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6), n


@needs_triton
def test_frozen_weights_skip_their_gemms(op):
    """TTT trains LoRA adapters with the base weights frozen: no weight gradients, the input's gradient exact."""
    g = torch.Generator().manual_seed(3)
    x, w1, w2 = torch.randn(40, 16, generator=g, requires_grad=True), torch.randn(64, 16, generator=g), torch.randn(16, 64, generator=g)
    gy = torch.randn(40, 16, generator=g)
    tg.MLPFusedGrad.apply(x, w1, w2, 0.5, op, None).backward(gy)
    xr = x.detach().clone().requires_grad_()
    F.linear(F.leaky_relu(F.linear(xr, w1), 0.5).square(), w2).backward(gy)
    assert w1.grad is None and w2.grad is None and torch.allclose(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_fused_path_traces_as_one_graph(monkeypatch):
    """The op is opaque to dynamo (custom op + fake): the default-shaped stack stays one graph with it."""
    stand_in = torch.library.custom_op("test_mlp_kernel::dgrad", mutates_args=())(_exact_dgrad)
    stand_in.register_fake(lambda g, w2, pre, slope: torch.empty_like(pre))
    monkeypatch.setattr(tg, "mlp_dgrad_kernel", lambda cfg, device: stand_in)
    assert_default_stack_is_one_graph(looping=True)


def _exact_dgrad(g: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, slope: float) -> torch.Tensor:
    return (g @ w2) * torch.where(pre > 0, 2 * pre, 2 * slope * slope * pre)


def test_mlp_kernel_policy(monkeypatch):
    """auto: the op on CUDA sm90+ once its check passed, else torch; MLP_KERNEL=triton fails loudly on a failed
    check; torch and the CPU never use it; LoRA'd MLPs (TTT) take the torch path."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    fake = object()
    cfg = lambda **env: tg.Config.from_env({k: str(v) for k, v in env.items()})  # noqa: E731
    monkeypatch.setattr(tg, "mlp_dgrad_op", lambda: fake)
    monkeypatch.setattr(tg, "_cuda_major", lambda index: 9)
    monkeypatch.setattr(tg, "MLP_DGRAD_CHECK", {0: None})
    assert tg.mlp_dgrad_kernel(cfg(), cuda) is fake and tg.mlp_dgrad_kernel(cfg(MLP_KERNEL="triton"), cuda) is fake
    monkeypatch.setattr(tg, "flash_kernel", lambda cfg, device=None: None)  # the attention policy has its own test
    assert tg.resolve_kernels(cfg(), cuda).mlp == "triton" and tg.resolve_kernels(cfg(), cpu).mlp == "torch"
    assert tg.mlp_dgrad_kernel(cfg(MLP_KERNEL="torch"), cuda) is None and tg.mlp_dgrad_kernel(cfg(), cpu) is None
    assert tg.mlp_dgrad_kernel(tiny_cfg(MODEL_DIM=36, NUM_HEADS=2, NUM_KV_HEADS=2), cuda) is None  # rows not 16-byte aligned
    monkeypatch.setattr(tg, "_cuda_major", lambda index: 8)  # Ampere: no TMA, auto keeps torch
    assert tg.mlp_dgrad_kernel(cfg(), cuda) is None
    monkeypatch.setattr(tg, "_cuda_major", lambda index: 9)
    monkeypatch.setattr(tg, "MLP_DGRAD_CHECK", {0: "RuntimeError: PTX not supported"})
    assert tg.mlp_dgrad_kernel(cfg(), cuda) is None
    monkeypatch.setattr(tg, "module_available", lambda name: True)
    with pytest.raises(RuntimeError, match="MLP_KERNEL=triton: the Triton MLP kernel failed its check on cuda:0: RuntimeError: PTX"):
        tg.mlp_dgrad_kernel(cfg(MLP_KERNEL="triton"), cuda)
    monkeypatch.setattr(tg, "mlp_dgrad_op", lambda: None)  # triton missing: the check says so
    monkeypatch.setattr(tg, "MLP_DGRAD_CHECK", {})
    assert tg.checked_kernel(tg.MLP_DGRAD_CHECK, cpu, None, tg._mlp_dgrad_probe, "triton does not import") == "ImportError: triton does not import"

    mlp = tg.MLP(tiny_cfg())  # TTT's LoRA on the MLP: the op is not called
    mlp.kernels = dataclasses.replace(mlp.kernels, mlp_dgrad=lambda *a: pytest.fail("called the op"))
    x = torch.randn(2, 4, 32)
    ctx = {"vi": 0, "lora": {"scale": 1.0, "w": {"0.up": (torch.zeros(1, 2, 32), torch.zeros(1, 128, 2))}}}
    assert mlp(x, ctx).shape == x.shape


def test_mlp_kernel_config_errors(monkeypatch):
    with pytest.raises(tg.ConfigError, match="MLP_KERNEL"):
        tg.Config.from_env({"MLP_KERNEL": "cutlass"})
    monkeypatch.setattr(tg, "module_available", lambda name: name != "triton")
    with pytest.raises(tg.ConfigError, match="MLP_KERNEL=triton: triton is not importable"):
        tg.Config.from_env({"MLP_KERNEL": "triton"})
    monkeypatch.setattr(tg, "module_available", lambda name: True)
    with pytest.raises(tg.ConfigError, match="multiples of 8"):
        tg.Config.from_env({"MLP_KERNEL": "triton", "MODEL_DIM": "500", "NUM_HEADS": "5", "NUM_KV_HEADS": "5"})
