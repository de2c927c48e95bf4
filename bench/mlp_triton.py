"""The forward half of an MLP with LeakyReLU(slope)^2 in Triton GEMM epilogues (Hopper, TMA, persistent,
autotuned), as the `up` of train_gpt.MLPFusedGrad: bench_mlp.py's triton_fused case. Not used by train_gpt.py:
its GEMM mainloop is slower than cuBLAS at K = 512 and its speed depends on the autotuner's pick (BENCHMARKS.md,
"The MFU gap").

  forward   pre, act = x @ W1^T, leaky_relu(pre, slope)^2   one kernel (here); pre is kept for the backward
            y = act @ W2^T                                   cuBLAS
  backward  dpre = (dy @ W2) * f'(pre)                       train_gpt.mlp_dgrad_op (MLP_KERNEL=triton)
            dx, dW1, dW2 = dpre @ W1, dpre^T @ x, dy^T @ act cuBLAS
f(u) = leaky_relu(u, s)^2, f'(u) = 2u (u > 0) or 2 s^2 u.
"""
from __future__ import annotations

import torch


def load():
    """(fused_up, None), or (None, why) where the kernel cannot run. fused_up(x, w1, slope) -> (pre, act), the
    `up` of train_gpt.MLPFusedGrad."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return None, "needs CUDA sm90+ (TMA)"
    try:
        import triton
        import triton.language as tl
        from triton.tools.tensor_descriptor import TensorDescriptor
    except Exception as e:  # noqa: BLE001 - any import failure: not usable here
        return None, f"triton not importable ({type(e).__name__}: {str(e)[:120]})"

    def configs():
        out = []
        for bm, bn, bk, warps, stages in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
                                          (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3)]:
            def set_blocks(nargs, bm=bm, bn=bn, bk=bk):  # TMA block shapes follow the tile config
                nargs["a_desc"].block_shape = [bm, bk]
                nargs["b_desc"].block_shape = [bn, bk]
                nargs["c_desc"].block_shape = [bm, bn]
                nargs["d_desc"].block_shape = [bm, bn]
            out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps,
                                     num_stages=stages, pre_hook=set_blocks))
        return out

    @triton.jit
    def tile_origin(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        # grouped order: GROUP_M row-blocks share their B columns while they are in L2
        grid_n = tl.cdiv(N, BN)
        per_group = GROUP_M * grid_n
        first_m = (tile // per_group) * GROUP_M
        size_m = min(tl.cdiv(M, BM) - first_m, GROUP_M)
        return (first_m + (tile % per_group) % size_m) * BM, ((tile % per_group) // size_m) * BN

    @triton.jit
    def up_act_kernel(a_desc, b_desc, c_desc, d_desc, M, N, K: tl.constexpr, slope, NUM_SMS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        # c = pre = a @ b^T (a [M, K], b [N, K]); d = leaky_relu(pre, slope)^2 from the rounded pre
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tl.cdiv(N, BN), NUM_SMS, flatten=True):
            om, on = tile_origin(tile, M, N, BM, BN, GROUP_M)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k in range(0, K, BK):
                acc = tl.dot(a_desc.load([om, k]), b_desc.load([on, k]).T, acc)
            pre = acc.to(tl.bfloat16)
            u = pre.to(tl.float32)
            lr = tl.where(u > 0, u, u * slope)
            c_desc.store([om, on], pre)
            d_desc.store([om, on], (lr * lr).to(tl.bfloat16))

    tuned = triton.autotune(configs=configs(), key=["M", "N", "K"])(up_act_kernel)

    def up_act(x, w1, slope):
        (M, K), N = x.shape, w1.size(0)
        pre, act = x.new_empty(M, N), x.new_empty(M, N)
        descs = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (x, w1, pre, act)]  # block shapes: set per config
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        grid = lambda meta: (min(sms, triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"])),)  # noqa: E731
        tuned[grid](*descs, M, N, K, float(slope), sms)
        return pre, act

    def fused_up(x, w1, slope):
        assert x.dtype == w1.dtype == torch.bfloat16 and x.is_contiguous(), "bf16, contiguous x"
        return up_act(x, w1, slope)

    fused_up.chosen_configs = lambda: {key[:3]: str(cfg) for key, cfg in tuned.cache.items()}  # (M, N, K) -> pick
    return fused_up, None
