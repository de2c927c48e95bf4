"""Every row of every experiments/*.toml grid: the merged env (base + row) is a valid config with no
unknown knobs, and the row's architecture (layers, width, heads, features unchanged; only the data-side
sizes shrunk) builds and trains two optimizer steps in-process on random tokens."""
from __future__ import annotations

import math
import tomllib

import pytest
import torch

import train_gpt as tg
from conftest import ROOT

GRID_FILES = sorted((ROOT / "experiments").glob("*.toml"))
KNOWN = {f.name for f in tg.FIELDS} | set(tg.ALIASES)  # the grids use the current names, not LEGACY_GATE_FLAGS
# Data-side sizes only: the architecture of the row is kept as is.
SHRINK = dict(VOCAB_SIZE="256", TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="64", EVAL_SEQ_LEN="32", EVAL_STRIDE="16",
              COMPILE="0", TRAIN_SEQ_SCHEDULE="")  # a length schedule is a training-loop setting (test_progressive_context)


def env_str(value) -> str:
    """TOML scalar -> env string, as tools/sweep.py writes it (bools become 1/0)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def grid_rows():
    rows = []
    for path in GRID_FILES:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        base = {k: env_str(v) for k, v in data.get("base", {}).items()}
        for row in data["row"]:
            env = dict(base)
            env.update({k: env_str(v) for k, v in row.get("env", {}).items()})
            rows.append(pytest.param(env, id=f"{path.stem}:{row['id']}"))
    return rows


ROWS = grid_rows()


def test_all_grids_found():
    assert len(GRID_FILES) >= 5 and len(ROWS) >= 60


@pytest.mark.parametrize("env", ROWS)
def test_row_config_is_valid(env):
    assert not sorted(set(env) - KNOWN), "unknown env names"
    warnings: list[str] = []
    cfg = tg.Config.from_env(env, warn=warnings.append)
    assert not warnings and not tg.unknown_knob_warnings(env)
    for name, raw in env.items():  # every value reaches the config (no alias or typo silently dropped)
        field = tg.ALIASES.get(name, name)
        assert field in cfg.to_dict()


def _cheap_ns(G, steps, coeffs):
    """Stand-in for Newton-Schulz: on 2 CPU cores the real one costs seconds per 512x2048 matrix and
    step. The real orthogonalization is covered by tests/test_features.py (same Optimizers class)."""
    return G / (G.norm() + 1e-7)


@pytest.mark.parametrize("env", ROWS)
def test_row_trains(env):
    cfg = tg.Config.from_env({**env, **SHRINK})
    full = tg.Config.from_env(env)
    for name in ("num_layers", "model_dim", "n_heads", "num_kv_heads", "d_head", "mlp_mult", "shared_head_dim",
                 "rope_dims", "xsa_last_n", "num_loops", "parallel_start_layer", "smear_gate", "bigram_hash",
                 "ve_enabled", "ve_dim", "value_residual", "attn_gate",
                 "window_pattern", "leaky_slope", "logit_softcap", "ln_scale", "ln_scale_mode", "tie_embeddings"):
        assert getattr(cfg, name) == getattr(full, name), name
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg)
    opts = tg.Optimizers(model, cfg, ns_fn=_cheap_ns)
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    got_grad = {n: False for n in params}
    g = torch.Generator().manual_seed(0)
    B = cfg.train_batch_tokens // cfg.train_seq_len
    for step in range(3):  # 3: an untied head starts at zero, so the trunk's zero-init gates see a gradient only at step 3
        model.looping_active = cfg.num_loops > 0 and step >= 1  # both loop modes, as the training loop switches
        x = torch.randint(0, cfg.vocab_size, (B, cfg.train_seq_len), generator=g)
        y = torch.randint(0, cfg.vocab_size, (B, cfg.train_seq_len), generator=g)
        loss = model(x, y, tg.resolve_kernels(cfg, "cpu").masks(x, model.bos_id))
        assert torch.isfinite(loss), (step, loss.item())
        if step == 0:  # near-uniform predictions at init
            assert abs(loss.item() - math.log(cfg.vocab_size)) < 1.0, loss.item()
        loss.backward()
        for n, p in params.items():
            assert p.grad is not None, f"{n} is not in the graph (DDP would fail)"
            got_grad[n] |= bool(p.grad.abs().max() > 0)
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
        opts.step(1.0, step)
        opts.zero_grad()
    assert not [n for n, seen in got_grad.items() if not seen], "parameters that never got a gradient"
    assert not [n for n, p in params.items() if torch.equal(p, start[n])], "parameters that did not change"
    assert all(torch.isfinite(p).all() for p in params.values())


@pytest.mark.parametrize("coeffs", ["polar", "stock"])
def test_newton_schulz_orthogonalizes(coeffs):
    c = tg.POLAR_EXPRESS if coeffs == "polar" else tg.STOCK_NS
    G = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    for M in (G, G.T):
        s = torch.linalg.svdvals(tg.newton_schulz(M, 5, c))
        assert s.min() > 0.3 and s.max() < 1.3, s


def test_newton_schulz_batched_matches_per_matrix():
    """Muon stacks same-shape matrices into one batched call: each result must equal its own call."""
    g = torch.Generator().manual_seed(1)
    for shape in ((3, 16, 40), (2, 40, 16)):
        G = torch.randn(*shape, generator=g) * torch.tensor([1.0, 30.0, 0.01][:shape[0]])[:, None, None]  # per-matrix norms
        batched = tg.newton_schulz(G, 5, tg.POLAR_EXPRESS)
        for k in range(shape[0]):
            torch.testing.assert_close(batched[k], tg.newton_schulz(G[k], 5, tg.POLAR_EXPRESS), rtol=1e-5, atol=1e-6)
