"""Independent reference maths for the architectural features of train_gpt.py (tests only).

Everything here is written from the specs (shared/reference/seed_features.md sections 1-3 and the
Config help strings), reading the model's parameters by name but none of its code paths: window
masks, GQA attention, value embeddings, value residual, output gates, XSA, partial RoPE, shared
head dims, LN scale, LeakyReLU^2, SmearGate v1/v2, BigramHash, depth recurrence, parallel lanes,
U-Net skips and the logit softcap.
"""
from __future__ import annotations

import math
import zlib

import torch

import train_gpt as tg

# A tiny config with every optional feature explicitly OFF (head_dim 8, 4 query heads, 2 KV heads).
BASE = {
    "VOCAB_SIZE": "64", "NUM_LAYERS": "4", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "MLP_MULT": "2", "ROPE_DIMS": "0", "XSA_LAST_N": "0", "LN_SCALE": "0", "SMEAR_GATE": "0",
    "SPARSE_ATTN_GATE": "0", "NUM_LOOPS": "0", "PARALLEL_START_LAYER": "0", "UNET_SKIPS": "0",
    "LOGIT_SOFTCAP": "0", "WINDOW_PATTERN": "L", "VE_ENABLED": "0", "VALUE_RESIDUAL": "0",
    "GATED_ATTENTION": "0", "ATTN_OUT_GATE": "0", "BIGRAM_HASH": "0", "SHARED_HEAD_DIM": "0",
    "DOC_ATTENTION": "0", "TRAIN_SEQ_LEN": "16", "TRAIN_BATCH_TOKENS": "32", "EVAL_SEQ_LEN": "16",
    "EVAL_STRIDE": "8", "COMPILE": "0",
}
BOS = 1
V = 64


def make_cfg(**kw) -> "tg.Config":
    env = dict(BASE)
    for k, v in kw.items():  # None removes a BASE key (e.g. to set it through an alias)
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    warnings: list[str] = []
    cfg = tg.Config.from_env(env, warn=warnings.append)
    assert not warnings, warnings
    return cfg


def build(seed: int = 0, **kw):
    cfg = make_cfg(**kw)
    torch.manual_seed(seed)
    return cfg, tg.GPT(cfg, bos_id=BOS)


@torch.no_grad()
def perturb(model, seed: int = 1, scale: float = 0.3, only=None):
    """Add name-seeded noise to every parameter (so zero-init features become active). The noise of a
    parameter depends only on (seed, name), so two models share it on their common parameters."""
    for name, p in model.named_parameters():
        if only is not None and name not in only:
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return model


def token_ids(B=2, T=16, seed=0, bos_positions=(0, 7)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, T), generator=g)
    for p in bos_positions:
        if p < T:
            ids[:, p] = BOS
    return ids


# ------------------------------------------------------------------------------------------------
# spec-level helpers
# ------------------------------------------------------------------------------------------------

def spec_windows(cfg) -> list[int]:
    """S/L tiled over physical layers, last forced L; S = WINDOW_SHORT or TRAIN_SEQ_LEN // 2; 0 = full."""
    pat = cfg.window_pattern.upper()
    short = cfg.window_short if cfg.window_short > 0 else cfg.train_seq_len // 2
    out = []
    for layer in range(cfg.num_layers):
        ch = pat[layer % len(pat)]
        out.append(short if ch == "S" and layer != cfg.num_layers - 1 else 0)
    return out


def spec_ve_layers(cfg) -> list[int]:
    if not cfg.ve_enabled:
        return []
    spec, L = cfg.ve_layers.strip().lower(), cfg.num_layers
    if spec == "alternating":  # alternating, last layer always included
        return [l for l in range(L) if (L - 1 - l) % 2 == 0]
    if spec == "all":
        return list(range(L))
    if spec in ("none", ""):
        return []
    return sorted(int(s) for s in spec.split(","))


def spec_xsa(cfg, layer: int) -> bool:
    n = cfg.xsa_last_n
    if n < 0:
        return True
    return n > 0 and layer >= cfg.num_layers - n


def spec_order(cfg, looping: bool, grown: bool = True) -> list[int]:
    L = cfg.num_layers
    if cfg.grow_layers_from and not grown:  # progressive growing: the first N layers only
        return list(range(cfg.grow_layers_from))
    if not looping or cfg.num_loops == 0:
        return list(range(L))
    out = [l for l in range(L) if l < cfg.loop_start]
    for _ in range(cfg.num_loops + 1):
        out += [l for l in range(cfg.loop_start, cfg.loop_end + 1)]
    return out + [l for l in range(L) if l > cfg.loop_end]


def bigram_bucket(cur: int, prev: int | None, buckets: int, bos: int | None = None) -> int:
    if prev is None or cur == bos:  # BOS never hashes the previous document (BOS fix)
        return buckets - 1
    return ((36313 * cur) ^ (27191 * prev)) % (buckets - 1)


# ------------------------------------------------------------------------------------------------
# reference maths
# ------------------------------------------------------------------------------------------------

def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def shift1(x):
    """x_{t-1} with x_{-1} = 0 along dim 1."""
    out = torch.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out


def ref_tie(w, heads: int, d: int, s: int):
    """SHD: last s rows of every head replaced by their cross-head mean (V untouched)."""
    w3 = w.reshape(heads, d, -1).clone()
    mean = w3[:, d - s:].mean(0)
    for h in range(heads):
        w3[h, d - s:] = mean
    return w3.reshape(heads * d, -1)


def ref_rope(x, r: int, base: float):
    """Rotate dims [0, r) of every head: pairs (i, i + r/2), angle t * base^(-2i/r); rest untouched."""
    T, half = x.shape[1], r // 2
    out = x.clone()
    for i in range(half):
        theta = base ** (-2.0 * i / r)
        ang = torch.arange(T, dtype=torch.float64) * theta
        c = torch.cos(ang).to(x.dtype)[None, :, None]
        s = torch.sin(ang).to(x.dtype)[None, :, None]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * c + b * s
        out[..., i + half] = b * c - a * s
    return out


def ref_attention_core(q, k, v, window: int, doc=None):
    """Naive masked softmax: query i sees keys j with j <= i, i - j <= window (window > 0), same document."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    allowed = (j <= i)
    if window:
        allowed = allowed & (i - j <= window)
    allowed = allowed[None].expand(B, T, T)
    if doc is not None:
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])
    out = torch.zeros_like(q)
    for h in range(H):
        g = h // group
        s = torch.einsum("bid,bjd->bij", q[:, :, h], k[:, :, g]) / math.sqrt(D)
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, :, h] = torch.softmax(s, -1) @ v[:, :, g]
    return out


def ref_mlp(P, pre, x, slope):
    z = x @ P[pre + "fc.weight"].T
    a = torch.where(z >= 0, z, slope * z)
    return (a * a) @ P[pre + "proj.weight"].T


def ref_attention(cfg, P, layer, h, x_in, ids, state, doc):
    B, T, _ = h.shape
    H, Hkv, D = cfg.n_heads, cfg.num_kv_heads, cfg.d_head
    pre = f"blocks.{layer}.attn."
    wq, wk, wv = P[pre + "c_q.weight"], P[pre + "c_k.weight"], P[pre + "c_v.weight"]
    if cfg.shared_head_dim:
        wq, wk = ref_tie(wq, H, D, cfg.shared_head_dim), ref_tie(wk, Hkv, D, cfg.shared_head_dim)
    q = (h @ wq.T).reshape(B, T, H, D)
    k = (h @ wk.T).reshape(B, T, Hkv, D)
    v = (h @ wv.T).reshape(B, T, Hkv, D)
    if layer in spec_ve_layers(cfg):
        if cfg.ve_dim == 0:
            ve = P[pre + "ve_table.weight"][ids]
        else:
            ve = P["ve_scale"] * (P["ve_shared.weight"][ids] @ P["ve_proj.weight"].T) * P["ve_layer_scales"][layer]
        ve = ve.reshape(B, T, Hkv, D)
        if cfg.ve_gate == "learned":
            g = 2 * torch.sigmoid(h[..., :cfg.ve_gate_width] @ P[pre + "ve_gate.weight"].T)  # [B,T,Hkv]
            ve = ve * g[..., None]
        v = v + ve
    if cfg.value_residual:
        if "v0" not in state:
            state["v0"] = v
        else:
            lam = P["vr_lambdas"][layer]
            v = lam[0] * state["v0"] + lam[1] * v
    q, k = rms(q), rms(k)
    r = cfg.rope_dims or D
    q, k = ref_rope(q, r, cfg.rope_base), ref_rope(k, r, cfg.rope_base)
    q = q * P[pre + "q_gain"][None, None, :, None]
    y = ref_attention_core(q, k, v, spec_windows(cfg)[layer], doc)
    if spec_xsa(cfg, layer):
        y = y.clone()
        for hh in range(H):
            vv = v[:, :, hh // (H // Hkv)]
            vhat = vv / vv.norm(dim=-1, keepdim=True)
            strength = torch.sigmoid(P[pre + "xsa_gate"][hh]) if cfg.xsa_gate else 1.0  # PR #1125 row 41
            y[:, :, hh] = y[:, :, hh] - strength * (y[:, :, hh] * vhat).sum(-1, keepdim=True) * vhat
    if cfg.attn_gate == "gated":
        y = y * torch.sigmoid(h @ P[pre + "attn_gate.weight"].T + P[pre + "attn_gate_bias"])[..., None]
    elif cfg.attn_gate == "out":
        src = x_in if cfg.gate_attn_src == "resid" else h
        y = y * (2 * torch.sigmoid(src[..., :cfg.gate_width] @ P[pre + "attn_out_gate_w"].T))[..., None]
    elif cfg.attn_gate == "sparse":
        y = y * torch.sigmoid(cfg.sparse_attn_gate_scale * (h[..., :cfg.gate_width] @ P[pre + "attn_gate_w"].T))[..., None]
    return y.reshape(B, T, H * D) @ P[pre + "proj.weight"].T


def ref_embed(cfg, P, ids, bos=BOS):
    B, T = ids.shape
    x = P["tok_emb.weight"][ids]
    if cfg.bigram_hash:
        nb = cfg.bigram_buckets
        hb = torch.tensor([[bigram_bucket(int(row[t]), int(row[t - 1]) if t else None, nb, 1 if (cfg.smear_bos_fix or cfg.doc_attention) else None) for t in range(T)] for row in ids])
        x = x + P["bigram_scale"] * (P["bigram_table.weight"][hb] @ P["bigram_proj.weight"].T)
    keep = (ids != bos).to(x.dtype)[..., None] if cfg.smear_bos_fix else torch.ones(B, T, 1, dtype=x.dtype)
    if cfg.smear_gate and cfg.smear_gate_mode == "v2":
        # x_t + lambda * sigmoid(w . x_t[:W]) * x_{t-1}, before the embedding norm as in PR #1667 /
        # modded-nanogpt (PR #1693/#1969 apply it after the norm; the spec leaves the placement open)
        w = cfg.smear_gate_width or cfg.gate_width
        gate = torch.sigmoid(x[..., :w] @ P["smear_w"].T)  # [B,T,1]
        x = x + keep * P["smear_lambda"] * gate * shift1(x)
    x = rms(x)
    if cfg.smear_gate and cfg.smear_gate_mode == "v1":  # after the norm: x_t = (1-g) x_t + g x_{t-1}
        g = torch.sigmoid(P["smear_gamma"])
        mixed = (1 - g) * x + g * shift1(x)
        x = keep * mixed + (1 - keep) * x
    return x


def ref_loop_lora(P, pre: str, visit: int):
    """Per-loop LoRA (LOOP_LORA_RANK): the visit-th pass through a looped block uses W + B[visit] @ A[visit]."""
    out = None
    for lin in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"):
        if pre + lin + ".loop_a" in P:
            out = dict(P) if out is None else out
            out[pre + lin + ".weight"] = P[pre + lin + ".weight"] + P[pre + lin + ".loop_b"][visit] @ P[pre + lin + ".loop_a"][visit]
    return P if out is None else out


def ref_logits(model, ids, looping: bool | None = None, doc_attention: bool | None = None):
    cfg = model.cfg
    P = dict(model.named_parameters())
    bos = model.bos_id
    looping = model.looping_active if looping is None else looping
    doc = torch.cumsum((ids == bos).long(), 1) if (cfg.doc_attention if doc_attention is None else doc_attention) else None
    x = ref_embed(cfg, P, ids, bos)
    x0 = x
    order = spec_order(cfg, looping, getattr(model, "grown", True))
    n_enc = len(order) // 2
    skips, lanes, state = [], None, {}
    for vi, layer in enumerate(order):
        s = 1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        s_in, s_out = (s, 1.0) if cfg.ln_scale_mode == "input" else (1.0, s)
        pre = f"blocks.{layer}."
        rm0, rm1 = P[pre + "resid_mix"][0], P[pre + "resid_mix"][1]
        decoder = vi >= n_enc
        parallel = decoder and cfg.parallel_start_layer > 0 and layer >= cfg.parallel_start_layer
        if parallel and lanes is None and cfg.parallel_skip == "lane0":  # record #1855: skip into lane 0 only
            lanes = (x, x)
        if decoder and cfg.unet_skips and skips and (vi - n_enc) < P["skip_weights"].shape[0]:
            j = vi - n_enc
            skip = P["skip_weights"][j] * skips.pop()
            cur = lanes[0] if lanes is not None else x
            if cfg.skip_gates_enabled:
                g = torch.sigmoid(P["skip_gates"][j])
                cur = g * cur + (1 - g) * skip
            else:
                cur = cur + skip
            if lanes is not None:
                lanes = (cur, lanes[1])
            else:
                x = cur
        Pv = ref_loop_lora(P, pre, order[:vi].count(layer))
        attn = lambda xin: (P[pre + "attn_scale"] * s_out) * ref_attention(cfg, Pv, layer, rms(xin) * s_in, xin, ids, state, doc)
        mlp = lambda xin: (P[pre + "mlp_scale"] * s_out) * ref_mlp(Pv, pre + "mlp.", rms(xin) * s_in, cfg.leaky_slope)
        if parallel:
            if lanes is None:
                lanes = (x, x)
            l0, l1 = lanes
            a = attn(rm0 * l0 + rm1 * x0)  # attention reads lane 0 through resid_mix
            m = mlp(l1)                    # MLP reads lane 1 as is, in parallel (PR #1667 / #1969)
            r, p = P["parallel_resid_lambdas"][layer], P["parallel_post_lambdas"][layer]
            lanes = (r[0] * l0 + p[0, 0] * a + p[1, 0] * m, r[1] * l1 + p[0, 1] * a + p[1, 1] * m)
            continue
        if lanes is not None:
            x, lanes = 0.5 * (lanes[0] + lanes[1]), None
        xin = rm0 * x + rm1 * x0
        x = xin + attn(xin)
        x = x + mlp(x)
        if not decoder:
            skips.append(x)
    if lanes is not None:
        x = 0.5 * (lanes[0] + lanes[1])
    hfin = rms(x)
    w = P["tok_emb.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    logits = (hfin @ w.T).float()
    c = cfg.logit_softcap
    return c * torch.tanh(logits / c) if c > 0 else logits
