"""Stand-in for FlashAttention 3's `flash_attn_interface`, so that the record scripts in ../shared/reference/records
(which import flash_attn_func and flash_attn_varlen_func from it) run on a GPU without FA3, on the SAME attention
kernel as train_gpt.py. Only bench/bench_vs_record.py puts this folder on the record process's PYTHONPATH.

  flash_attn_func(q, k, v, causal=True, window_size=(-1, -1))                         q [B, T, H, D], k/v [B, T, Hkv, D]
  flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, window_size=...)
                                                                                      q [N, H, D]; segments of cu_seqlens
Both return the attention output only (as the records use it). Causal attention only, default softmax scale.

Kernel, env STANDIN_ATTN:
  fa4   FlashAttention 4 through train_gpt.fa4_attention() (the custom ops our training uses; they keep the
        records' fullgraph torch.compile one graph); refused with the reason if flash-attn-4 fails train_gpt's check.
  sdpa  exact reference: PyTorch SDPA, varlen through an explicit same-segment causal mask (O(N^2) memory: a CPU /
        correctness path, not for timing; the records switch off SDPA's masked kernels on CUDA).
  auto  (default) fa4 when importable on a Hopper-or-newer GPU, else sdpa.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def _check_args(causal, softmax_scale, kw):
    if not causal:
        raise NotImplementedError("flash_attn_interface stand-in: causal attention only")
    if softmax_scale is not None:
        raise NotImplementedError("flash_attn_interface stand-in: only the default softmax scale (1/sqrt(D))")
    unknown = {k: v for k, v in kw.items() if v not in (None, False, 0, 0.0)}
    if unknown:
        raise NotImplementedError(f"flash_attn_interface stand-in: unsupported arguments {sorted(unknown)}")


def _window(window_size) -> int:
    """FA's (left, right) -> our window w (keys q-w..q), 0 = unlimited."""
    left, right = (int(w) for w in window_size)
    if right not in (-1, 0):
        raise NotImplementedError("flash_attn_interface stand-in: causal attention only (window right must be 0 or -1)")
    return max(left, 0)


def sdpa_dense(q, k, v, window: int = 0):
    T = q.size(1)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window:
        i = torch.arange(T, device=q.device)
        mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window)
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=k.size(2) != q.size(2))
    else:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def sdpa_varlen(q, k, v, cu_seqlens, window: int = 0):
    N = q.size(0)
    pos = torch.arange(N, device=q.device, dtype=cu_seqlens.dtype)
    seg = torch.searchsorted(cu_seqlens, pos, right=True)
    mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    if window:
        mask = mask & (pos[:, None] - pos[None, :] <= window)
    y = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask,
                                       enable_gqa=k.size(1) != q.size(1))
    return y[0].transpose(0, 1)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
    _check_args(causal, softmax_scale, kw)
    w = _window(window_size)
    if KERNEL == "fa4":
        return _FA4(q, k, v, causal=True, window_size=(w, 0) if w else (-1, -1))
    return sdpa_dense(q, k, v, w)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, window_size=(-1, -1), **kw):
    _check_args(causal, softmax_scale, kw)
    if max_seqlen_q != max_seqlen_k:
        raise NotImplementedError("flash_attn_interface stand-in: self-attention only (max_seqlen_q == max_seqlen_k)")
    w = _window(window_size)
    if KERNEL == "fa4":
        return _FA4.varlen(q, k, v, cu_seqlens_q, max_seqlen_q, w)
    return sdpa_varlen(q, k, v, cu_seqlens_q, w)


def _resolve_kernel() -> tuple[str, object]:
    want = os.environ.get("STANDIN_ATTN", "auto")
    if want not in ("auto", "fa4", "sdpa"):
        raise ValueError(f"STANDIN_ATTN={want!r}: expected auto, fa4 or sdpa")
    if want == "sdpa" or (want == "auto" and not torch.cuda.is_available()):
        return "sdpa", None
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: train_gpt.py's FA4 wrapper
    import train_gpt  # noqa: E402  (imports this module back: both functions above already exist)
    why = "no CUDA device" if not torch.cuda.is_available() else None
    if why is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if torch.cuda.get_device_capability(device)[0] < 9:
            why = "FA4 needs Hopper or newer"
        else:
            why = train_gpt.fa4_check(device)
    if why is None:
        return "fa4", train_gpt.fa4_attention()
    if want == "fa4":
        raise RuntimeError(f"STANDIN_ATTN=fa4: flash-attn-4 is not usable here: {why}")
    print(f"flash_attn_interface stand-in: using SDPA ({why})", file=sys.stderr)
    return "sdpa", None


KERNEL, _FA4 = _resolve_kernel()
print(f"flash_attn_interface stand-in: kernel={KERNEL}", file=sys.stderr)
