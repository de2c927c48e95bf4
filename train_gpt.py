"""Parameter Golf training script: one file, configured only by environment variables.

Pipeline (top to bottom, as it runs): config -> data -> model -> optimizers -> training loop
-> artifact (quantization) -> evaluation -> main; then the machinery the recipe calls into, as appendices:
A. kernels (chosen once per device by resolve_kernels), B. artifact containers, C. codecs.

  torchrun --standalone --nproc_per_node=8 train_gpt.py      # the 8xH100 job (needs data/)
  PRESET=smoke python train_gpt.py                             # whole pipeline on a CPU, embedded tiny data
  python train_gpt.py --eval-only runs/<id>/final_model.ptz    # evaluate an artifact in a fresh process

Every option is an env var declared in `Config.FIELDS`; the README's env table is generated from it.
"""
from __future__ import annotations

import base64
import contextlib
import collections
import copy
import dataclasses
import difflib
import functools
import gc
import glob
import hashlib
import importlib
import importlib.util
import io
import json
import lzma
import math
import os
import queue
import random
import re
import signal
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BYTES_LIMIT = 16_000_000
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256

# ----------------------------------------------------------------------------------------------
# CONFIG: every knob is an env var declared once here (name, type, default, help, aliases).
# ----------------------------------------------------------------------------------------------

def module_available(name: str) -> bool:
    """Whether `name` can be imported, without importing it (parents are imported by find_spec)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class ConfigError(ValueError):
    """A bad env var or an impossible combination; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: type
    default: Any
    help: str
    aliases: tuple = ()
    choices: tuple = ()
    group: str = ""  # model / attention / training / optimizer / quantization / eval / ttt / systems / run


def _f(name, typ, default, help, aliases=(), choices=()):
    return Field(name, typ, default, help, tuple(aliases), tuple(choices))


def group(name: str, fields: list[Field]) -> list[Field]:
    return [dataclasses.replace(f, group=name) for f in fields]


FIELDS: list[Field] = [
    *group("run", [  # run and data
        _f("PRESET", str, "", "'' (the 8xH100 defaults) or 'smoke' (tiny CPU config, builds its own data)", choices=("", "smoke")),
        _f("RUN_ID", str, "", "run name; default <date>_<time>_seed<SEED>"),
        _f("RUN_DIR", str, "", "output folder (log, artifact, summary); default runs/<RUN_ID>; never overwritten"),
        _f("SEED", int, 1337, "seed for init and data sampling"),
        _f("DATA_PATH", str, "./data/datasets/fineweb10B_sp8192", "folder with fineweb_{train,val}_*.bin shards"),
        _f("TOKENIZER_PATH", str, "./data/tokenizers/fineweb_8192_bpe.model", "SentencePiece model used for the byte LUTs of val_bpb"),
        _f("VAL_MAX_TOKENS", int, 0, "evaluate only the first N val tokens (0 = all; debugging only, not a valid score)"),
        _f("CASEOPS", bool, False, "the data is CaseOps-transformed (data/caseops.py): val_bpb needs the byte sidecar fineweb_val_bytes_*.bin", aliases=("CASEOPS_ENABLED",)),
        _f("VAL_BYTES", str, "auto", "bytes of val_bpb: auto (the sidecar fineweb_val_bytes_*.bin when DATA_PATH has one, else LUTs) | sidecar (required) | luts (SentencePiece LUTs)", choices=("auto", "sidecar", "luts")),
    ]),
    *group("model", [  # model
        _f("VOCAB_SIZE", int, 8192, "vocabulary size (must equal the tokenizer's)"),
        _f("NUM_LAYERS", int, 11, "physical transformer blocks"),
        _f("MODEL_DIM", int, 512, "residual width"),
        _f("MLP_MULT", float, 4.0, "MLP hidden = MLP_MULT * MODEL_DIM"),
        _f("TIE_EMBEDDINGS", bool, True, "tie the output head to the token embedding"),
        _f("TIED_EMBED_INIT_STD", float, 0.005, "std of the (tied) embedding init"),
        _f("PROJ_INIT", str, "zero", "attention / MLP output projections: zero (record) | ortho_scaled (orthogonal x 1/sqrt(2 NUM_LAYERS): PR #487)", choices=("zero", "ortho_scaled")),
        _f("LOGIT_SOFTCAP", float, 30.0, "c*tanh(logits/c) before CE in every path; 0 = off"),
        _f("LN_SCALE", bool, True, "depth damping 1/sqrt(layer+1)"),
        _f("LN_SCALE_MODE", str, "input", "input: scale the normed sub-block inputs (PG standard); output: scale the residual writes (PR #1125)", choices=("input", "output")),
        _f("LEAKY_SLOPE", float, 0.5, "MLP activation leaky_relu(x, slope)^2; 0 = relu^2"),
        _f("SKIP_GATES_ENABLED", bool, True, "U-Net skips mixed by sigmoid gates (else x += w*skip)"),
        _f("UNET_SKIPS", bool, True, "U-Net encoder->decoder skip connections"),
        _f("SMEAR_GATE", bool, True, "SmearGate on the embedding stream", aliases=("SMEAR_GATE_ENABLED",)),
        _f("SMEAR_GATE_MODE", str, "v2", "v1: static per-channel blend (PR #65/#487); v2: x + l*sigmoid(w x[:W]) x_prev (PR #1667)", choices=("v1", "v2")),
        _f("SMEAR_GATE_WIDTH", int, 0, "v2 gate width; 0 = GATE_WIDTH"),
        _f("SMEAR_GATE_NORM", str, "before", "where the v2 gate acts: before the embedding RMSNorm (PR #1667/#1855) | after it (PR #1969)", choices=("before", "after")),
        _f("SMEAR_BOS_FIX", bool, True, "no smearing into a BOS position (nothing crosses a document boundary)", aliases=("SMEAR_GATE_BOS_FIX",)),
        _f("BIGRAM_HASH", bool, False, "hashed bigram embedding added before the embedding norm"),
        _f("BIGRAM_BUCKETS", int, 2048, "BigramHash buckets", aliases=("BIGRAM_VOCAB_SIZE",)),
        _f("BIGRAM_DIM", int, 128, "BigramHash table width"),
        _f("NUM_LOOPS", int, 2, "depth recurrence: extra passes over layers LOOP_START..LOOP_END; 0 = off"),
        _f("LOOP_START", int, 3, "first looped physical layer"),
        _f("LOOP_END", int, 5, "last looped physical layer (inclusive)"),
        _f("ENABLE_LOOPING_AT", float, 0.35, "training fraction at which looping switches on (stays on for eval)"),
        _f("LOOP_LORA_RANK", int, 0, "per-loop LoRA (PR #1125 row 39: recurrence 4x3 + LoRA16): each pass p of a looped layer uses W + B_p A_p on its q, k, v, attention proj, MLP fc and proj, so the passes differ; A random, B zero (equal passes at init); AdamW at SCALAR_LR, stored fp16; 0 = off"),
        _f("GROW_LAYERS_FROM", int, 0, "progressive layer growing (PR #1125 row 38: 5 -> 11 at 60%): only the first N physical layers run and train until GROW_AT_FRAC, then all NUM_LAYERS, layer i starting as a copy of small layer i*N//L (weights, optimizer state, EMA); 0 = off"),
        _f("GROW_AT_FRAC", float, 0.6, "training fraction at which the full depth switches on"),
        _f("PARALLEL_START_LAYER", int, 8, "two-lane parallel residual decoder from this physical layer; 0 = off"),
        _f("PARALLEL_MODE", str, "lanes", "lanes: two residual lanes, attention reads lane 0, MLP lane 1, learned mixes (PR #1204/#1529; decoder layers) | gptj: one stream, attention and MLP both read the block input and add into it (PR #1493/#1774; every layer from PARALLEL_START_LAYER)", choices=("lanes", "gptj")),
        _f("PARALLEL_RESID_INIT", float, 1.1, "init of the parallel-lane residual lambdas"),
        _f("PARALLEL_SKIP", str, "lane0", "U-Net skip at the first parallel layer: lane0 (into lane 0 only, after the lanes split: record #1855) | both (added before the split)", choices=("lane0", "both")),
    ]),
    *group("attention", [  # attention
        _f("NUM_HEADS", int, 8, "query heads"),
        _f("HEAD_DIM", int, 0, "if >0: num_heads = MODEL_DIM / HEAD_DIM (overrides NUM_HEADS)"),
        _f("NUM_KV_HEADS", int, 4, "key/value heads (GQA; 1 = MQA; = NUM_HEADS for MHA)"),
        _f("QK_GAIN_INIT", float, 5.0, "init of the learned per-head query gain (its fixed value with QK_GAIN_LEARNED=0)"),
        _f("QK_GAIN_LEARNED", bool, True, "learn the per-head query gain; 0 = a fixed QK_GAIN_INIT (1.0 = no gain: plain QK-norm, autoresearch)"),
        _f("ROPE_BASE", float, 10000.0, "RoPE base"),
        _f("ROPE_DIMS", int, 16, "rotate only the first ROPE_DIMS dims of each head; 0 = all", aliases=("PARTIAL_ROPE_DIMS",)),
        _f("XSA_LAST_N", int, -1, "exclusive self-attention on the last N physical layers; -1 = all, 0 = off", aliases=("XSA_LAYERS",)),
        _f("XSA_GATE", bool, False, "XSA gating (PR #1125 row 41): a learned per-head strength of the XSA subtraction, y - sigmoid(a_h) (y.v^) v^ (needs XSA_LAST_N != 0)"),
        _f("XSA_GATE_INIT", float, 0.0, "init of the XSA gate logits a_h (0: strength sigmoid(0) = 0.5; the PR gives no init, ours is a guess)"),
        _f("WINDOW_PATTERN", str, "L", "per-layer attention window, S/L string tiled over physical layers; last layer forced L"),
        _f("WINDOW_SHORT", int, 0, "S window in tokens; 0 = TRAIN_SEQ_LEN // 2"),
        _f("SHARED_HEAD_DIM", int, 0, "shared-specific Q/K: last S dims of every head tied to the cross-head mean (PR #1774); 0 = off"),
        _f("VE_ENABLED", bool, False, "value embeddings added to V"),
        _f("VE_LAYERS", str, "alternating", "alternating | all | none | comma list of layer indices", aliases=("VE128_LAYERS",)),
        _f("VE_DIM", int, 128, "0 = a full kv_dim table per VE layer (autoresearch); >0 = one shared table of this width + projection (PR #374)", aliases=("VE128_DIM",)),
        _f("VE_GATE", str, "learned", "learned: 2*sigmoid(G h[:w]) per KV head; fixed: gate 1", choices=("learned", "fixed")),
        _f("VE_GATE_WIDTH", int, 32, "input channels of the learned VE gate"),
        _f("VALUE_RESIDUAL", bool, False, "mix layer-0 V into every later layer: v = l0*v0 + l1*v (PR #487)"),
        _f("ATTN_GATE", str, "sparse", "attention output gate, one per head: sparse = SparseAttnGate sigmoid(scale * W u[:GATE_WIDTH]), zero init (PR #1787) | out = AttnOutGate 2*sigmoid(A x[:GATE_WIDTH]), zero init (PR #1667/#1969) | gated = sigmoid(W h + b), bias init 4 (PR #487) | none. The old switches GATED_ATTENTION / ATTN_OUT_GATE (GATE_ATTN_OUT) / SPARSE_ATTN_GATE (SPARSE_ATTN_GATE_ENABLED) = 1 pick one; SPARSE_ATTN_GATE=0 alone = none", choices=("sparse", "out", "gated", "none")),
        _f("GATE_ATTN_SRC", str, "resid", "AttnOutGate input: resid (x_in, #1969) | proj (normed block input, #1667)", choices=("resid", "proj")),
        _f("SPARSE_ATTN_GATE_SCALE", float, 0.5, "scale inside the SparseAttnGate sigmoid"),
        _f("GATE_WIDTH", int, 12, "input width of the attention output gates (and default SmearGate width)", aliases=("GATE_WINDOW",)),
        _f("DOC_ATTENTION", bool, True, "training attention never crosses a BOS: each micro-batch is one packed sequence, documents cut every TRAIN_SEQ_LEN tokens from their start (the records' varlen layout); a varlen flash kernel when available, else FlexAttention document masks (compiled CUDA) or SDPA per document (CPU, COMPILE=0)"),
        _f("EVAL_DOC_ATTENTION", str, "auto", "eval/TTT windows: auto (as DOC_ATTENTION) | on (attention never crosses a BOS inside a window) | off (plain causal windows, as the records' sliding eval)", choices=("auto", "on", "off")),
    ]),
    *group("training", [  # training: batch, schedule, EMA
        _f("TRAIN_SEQ_LEN", int, 2048, "training sequence length (with TRAIN_SEQ_SCHEDULE it still sets the WINDOW_SHORT default)"),
        _f("TRAIN_SEQ_SCHEDULE", str, "", "progressive context (PR #2014): LEN@FRAC,... = train at LEN from training fraction FRAC on (the LR schedule's progress: wallclock with MAX_WALLCLOCK_SECONDS>0), e.g. 1024@0,2048@0.1,3072@0.7; first FRAC 0, increasing, LEN multiples of 64; tokens per step stay TRAIN_BATCH_TOKENS; '' = TRAIN_SEQ_LEN throughout"),
        _f("SEQ_CHANGE_WARMUP_STEPS", int, 0, "TRAIN_SEQ_SCHEDULE: after each length change the LR multiplier ramps linearly from 1/N back to 1 over N steps; 0 = off"),
        _f("TRAIN_BATCH_TOKENS", int, 786432, "global tokens per optimizer step"),
        _f("GRAD_ACCUM_STEPS", int, 0, "micro-steps per optimizer step; 0 = 8 // WORLD_SIZE (at least 1)"),
        _f("ITERATIONS", int, 20000, "max optimizer steps (upper bound; the wallclock usually stops first)"),
        _f("MAX_WALLCLOCK_SECONDS", float, 600.0, "training budget in seconds (0 = step-based schedule on ITERATIONS)"),
        _f("GPTQ_RESERVE_SECONDS", float, 8.0, "seconds of the budget kept for GPTQ Hessian collection"),
        _f("WARMUP_STEPS", int, 20, "compile warmup steps, rolled back (state restored) and not counted"),
        _f("WARMDOWN_FRAC", float, 0.85, "final fraction of training with linear LR decay"),
        _f("WARMDOWN_SHAPE", str, "linear", "LR decay over the warmdown: linear | cosine (0.5 (1 - cos(pi x)) of the linear x: PR #1125 row 40)", choices=("linear", "cosine")),
        _f("WARMDOWN_ITERS", int, 0, "if >0: warmdown over the last N steps, converted to time by the measured step time (PR #1125)"),
        _f("MIN_LR", float, 0.10, "LR floor as a fraction of the base LR"),
        _f("TRAIN_LOG_EVERY", int, 100, "log a train line every N steps"),
        _f("VAL_LOSS_EVERY", int, 0, "validate every N steps (timer paused); 0 = only at the end"),
        _f("EMA_ENABLED", bool, True, "exponential moving average of the weights, used for eval and quantization"),
        _f("EMA_DECAY", float, 0.9965, "EMA decay per step"),
        _f("EMA_START_FRAC", float, 0.0, "the EMA starts (from the live weights) at this fraction of training; 0 = from step 0 (PR #1125 row 35: late-start EMA)"),
        _f("SWA_ENABLED", bool, False, "stochastic weight averaging: the mean of the weights every SWA_EVERY steps once the LR multiplier is below SWA_START_LR replaces them at the end (PR #1125 row 8; exclusive with the EMA)"),
        _f("SWA_EVERY", int, 50, "steps between SWA samples"),
        _f("SWA_START_LR", float, 0.5, "SWA samples only while the LR multiplier is below this"),
    ]),
    *group("optimizer", [  # optimizer
        _f("MATRIX_LR", float, 0.026, "Muon LR for block matrices"),
        _f("SCALAR_LR", float, 0.02, "AdamW LR for scalars / control tensors"),
        _f("TIED_EMBED_LR", float, 0.03, "AdamW LR for the tied embedding"),
        _f("EMBED_LR", float, 0.6, "AdamW LR for an untied input embedding"),
        _f("HEAD_LR", float, 0.008, "AdamW LR for an untied output head"),
        _f("MUON_MOMENTUM", float, 0.97, "Muon momentum after warmup"),
        _f("MUON_MOMENTUM_WARMUP_START", float, 0.92, "Muon momentum at step 0"),
        _f("MUON_MOMENTUM_WARMUP_STEPS", int, 1500, "linear momentum warmup steps"),
        _f("MUON_BACKEND_STEPS", int, 5, "Newton-Schulz iterations"),
        _f("MUON_NS_COEFFS", str, "polar", "polar (Polar-Express per-step coefficients) | stock (3.4445,-4.775,2.0315)", choices=("polar", "stock")),
        _f("MUON_ROW_NORMALIZE", bool, True, "MuonEq-R: normalize update rows before Newton-Schulz"),
        _f("MUON_WD", float, 0.095, "decoupled weight decay of Muon matrices", aliases=("WEIGHT_DECAY_MUON",)),
        _f("MUON_WD_SCHEDULE", str, "constant", "constant (MUON_WD throughout, times the LR schedule) | linear (MUON_WD * (1 - training progress): autoresearch)", choices=("constant", "linear")),
        _f("EMBED_WD", float, 0.085, "AdamW weight decay of embeddings"),
        _f("ADAM_WD", float, 0.02, "AdamW weight decay of scalars", aliases=("WEIGHT_DECAY_ADAM",)),
        _f("BETA1", float, 0.9, "AdamW beta1"),
        _f("BETA2", float, 0.99, "AdamW beta2"),
        _f("ADAM_EPS", float, 1e-8, "AdamW eps"),
        _f("GRAD_CLIP_NORM", float, 0.3, "global grad-norm clip; 0 = off"),
    ]),
    *group("quantization", [  # quantization and packing
        _f("QUANT", str, "gptq", "gptq | rtn (round-to-nearest on the same SDClip grid) | int8 (per-row absmax int8)", choices=("gptq", "rtn", "int8")),
        _f("INT8_CLIP_PERCENTILE", float, 100.0, "QUANT=int8: clip each row of a quantized matrix at this percentile of |w| (linear interpolation, as torch.quantile) before scale = clip/127; 100 or 0 = absmax (the baseline script: 99.99984; PR #1125 row 31: 99.5)"),
        _f("INT8_SCALE_FLOOR", float, 0.0, "QUANT=int8: lower bound of those rows' scales (the baseline script: 1/127 = 0.007874015748031496); 0 = none"),
        _f("MATRIX_BITS", int, 6, "bits of block matrices (5..8)"),
        _f("EMBED_BITS", int, 7, "bits of the token embedding (5..8)"),
        _f("MATRIX_CLIP_SIGMAS", float, 12.85, "SDClip k for other matrices (scale = k*std/qmax)"),
        _f("ATTN_CLIP_SIGMAS", float, 13.0, "SDClip k for attention matrices"),
        _f("MLP_CLIP_SIGMAS", float, 12.0, "SDClip k for MLP matrices (12 = the brotli-packed #1851/#1868 record; #1855 used 11.5 with lrzip)"),
        _f("EMBED_CLIP_SIGMAS", float, 15.0, "SDClip k for the embedding (15 with brotli as #1851/#1868; #1855 used 14 with lrzip)"),
        _f("QAT", bool, False, "quantization-aware training (PR #1125 row 37): from QAT_START_FRAC on, every quantized block matrix is used through the artifact's round trip (RTN on its grid: MATRIX_BITS and the class clip, int8 rows for QUANT=int8), gradients straight through"),
        _f("QAT_START_FRAC", float, 0.0, "training fraction at which QAT switches on (a buffer: no recompile; the PR gives no start)"),
        _f("GPTQ_CALIBRATION_BATCHES", int, 32, "training batches for the GPTQ Hessians (32: PR #2135, and -0.00012 bpb / -292 bytes vs 16 on one H200-trained model, BENCHMARKS.md)"),
        _f("GPTQ_BLOCK_SIZE", int, 128, "GPTQ column block"),
        _f("GPTQ_DAMP", float, 0.01, "GPTQ damping as a fraction of mean(diag H)"),
        _f("GPTQ_ACT_ORDER", bool, True, "GPTQ columns in descending diag(H) order"),
        _f("FP16_TENSORS", str, "", "comma-separated state tensor names stored as fp16, unquantized (PR #487's production run: tok_emb.weight and the last two layers' attn.c_k.weight)"),
        _f("GATE_QUANT_INT8", bool, True, "store small attention gate matrices as per-row int8", aliases=("GATED_ATTN_QUANT_GATE",)),
        _f("LQER_ENABLED", bool, False, "low-rank (INT2 A / INT4 B) correction of the worst quantization errors"),
        _f("LQER_RANK", int, 4, "LQER rank"),
        _f("LQER_TOP_K", int, 3, "LQER on the K tensors with the largest error"),
        _f("LQER_GROUP", int, 64, "LQER INT4 group size", aliases=("LQER_ASYM_GROUP",)),
        _f("AWQ_LITE_ENABLED", bool, False, "AWQ-lite inside GPTQ (PR #1908): in every GPTQ matrix the AWQ_LITE_GROUP_TOP_K most salient groups of AWQ_LITE_GROUP_SIZE input columns (group score = sum over its columns j of sqrt(H_jj) * mean_r |W_rj|: activation RMS x weight magnitude) are quantized at AWQ_LITE_BITS on the row's own clip range, in the same GPTQ solve"),
        _f("AWQ_LITE_BITS", int, 8, "AWQ-lite: bits of the salient column groups (> MATRIX_BITS, <= 8); a tensor already at these bits is left as is"),
        _f("AWQ_LITE_GROUP_TOP_K", int, 1, "AWQ-lite: salient column groups per matrix"),
        _f("AWQ_LITE_GROUP_SIZE", int, 64, "AWQ-lite: consecutive input columns per group"),
        _f("BROTLI_LGWIN", int, 24, "brotli window log2 (10..24; brotli's own default is 22, the seeds' #1774/#1969)"),
        _f("LZMA_PRESET", int, 9, "lzma preset 0..9 (the seeds' #1774/#1969 use 6)"),
        _f("LZMA_EXTREME", bool, True, "lzma's EXTREME flag on top of LZMA_PRESET (the seeds use 0)"),
        _f("COMPRESSOR", str, "brotli", "brotli (q11 + byte shuffle) | zstd | lzma | zlib (level 9: the baseline script and PR #1125) | pergroup (int8 weights by role, rows L1-sorted, best codec per group incl. lrzip when installed: record #1855)", choices=("brotli", "zstd", "lzma", "zlib", "pergroup")),
    ]),
    *group("eval", [  # evaluation
        _f("EVAL_SEQ_LEN", int, 2048, "eval context length"),
        _f("EVAL_STRIDE", int, 64, "sliding-window stride (scored tokens per window)"),
        _f("EVAL_BATCH_SEQS", int, 32, "windows per eval forward"),
        _f("SLIDING_EVAL", bool, True, "sliding-window eval of the roundtrip model (default: on unless TTT is on; TTT is the final metric then and the sliding pass would spend ~80 s of the eval budget)", aliases=("SLIDING_WINDOW_ENABLED",)),
        _f("MAX_EVAL_SECONDS", float, 600.0, "eval budget; exceeding it fails the run loudly"),
        _f("NGRAM_TILT_ENABLED", bool, True, "token-only n-gram tilt of every final-metric pass (roundtrip, sliding, chunked and phased TTT; PR #2135): where the longest context (<= NGRAM_TOKEN_ORDER tokens) seen among already-scored val tokens has a continuation h with share >= NGRAM_TOKEN_THRESHOLD, the score uses p'(a) = p(a) exp(B [a=h]) / (1 + p(h) (e^B - 1)), B = NGRAM_TOKEN_BOOST: a normalized distribution. Built inside the eval timer. On by default: -0.137 phased bpb on an H200-trained artifact (BENCHMARKS.md); 0 = the records' plain score"),
        _f("NGRAM_TOKEN_ORDER", int, 16, "n-gram tilt: longest context, in tokens"),
        _f("NGRAM_TOKEN_THRESHOLD", float, 0.8, "n-gram tilt: minimum share of the hinted token among the context's visible continuations, in (0.5, 1] (the hint is then the unique majority)"),
        _f("NGRAM_TOKEN_BOOST", float, 2.625, "n-gram tilt: B, added to the hinted token's logit (nats) before renormalizing; >= 0 (0 = no change)"),
    ]),
    *group("ttt", [  # test-time training (score-first: every target is scored before any update that has seen it)
        _f("TTT_ENABLED", bool, True, "score-first LoRA test-time training on the val set (the final metric when on)"),
        _f("TTT_MODE", str, "phased", "phased (record #1855: per-document LoRA in batches of documents + global SGD phases on scored prefix documents) | chunked (one LoRA over the val stream, trained on each scored chunk of TTT_CHUNK_TOKENS)", choices=("phased", "chunked")),
        _f("TTT_LORA_RANK", int, 80, "TTT LoRA rank"),
        _f("TTT_LORA_ALPHA", float, 144.0, "LoRA output scale = alpha / rank"),
        _f("TTT_LR", float, 1e-4, "TTT LoRA AdamW LR", aliases=("TTT_LORA_LR",)),
        _f("TTT_LOCAL_LR_MULT", float, 1.0, "the LoRA AdamW LR is TTT_LR times this (PR #1953: 0.75); the global SGD keeps GLOBAL_TTT_LR"),
        _f("TTT_BETA1", float, 0.0, "TTT AdamW beta1"),
        _f("TTT_BETA2", float, 0.99, "TTT AdamW beta2"),
        _f("TTT_WEIGHT_DECAY", float, 0.5, "TTT AdamW weight decay"),
        _f("TTT_TARGETS", str, "q,k,v,o,mlp,head", "LoRA adapters per virtual layer: q,k,v (on the projections), o (block's normalized input -> attention output), mlp (MLP input -> MLP output), proj / up / down (on attn.proj / mlp.fc / mlp.proj), head (on the logits)"),
        _f("TTT_MASK", str, "none", "none | no_qv: drop q and v from TTT_TARGETS (PR #1953: no Q/V LoRA)", choices=("none", "no_qv")),
        _f("TTT_WARM_START_A", bool, True, "phased: keep each document slot's A across batches (B and the AdamW state reset per batch); A is re-drawn after each global phase"),
        _f("TTT_DOCS_PER_BATCH", int, 64, "phased: documents adapted together (each with its own LoRA slice)", aliases=("TTT_BATCH_SIZE",)),
        _f("TTT_CHUNK_SIZE", int, 48, "phased: targets scored per step of a document before its LoRA trains on them"),
        _f("TTT_CHUNK_SCHEDULE", str, "", "phased, short-document chunks (PR #2014): MAXLEN:CHUNK,... = documents of at most MAXLEN tokens (BOS included) use chunk size CHUNK, longer ones TTT_CHUNK_SIZE, e.g. 256:8,2000:24; MAXLEN increasing; '' = TTT_CHUNK_SIZE for all"),
        _f("TTT_EVAL_SEQ_LEN", int, 2048, "phased: causal window (within the document) ending at each chunk"),
        _f("TTT_GRAD_STEPS", int, 1, "phased: LoRA optimizer steps per scored chunk"),
        _f("TTT_ROWS_PER_FORWARD", int, 0, "phased: at most this many documents per forward/backward of a chunk step, gradients summed before the step (the same update: every document has its own LoRA slice); 0 = all in one, and on a CUDA out-of-memory error the pass halves it and redoes the step (measured ~0.8-0.9 MB per row-token on the H200: 64 rows of 2048 tokens project to ~100-118 GiB, over an H100's 80)"),
        _f("PHASED_TTT_PREFIX_DOCS", int, 2500, "phased: the first N documents (longest first) feed the global SGD phases"),
        _f("PHASED_TTT_NUM_PHASES", int, 3, "phased: global SGD phases, at prefix*(i+1)/phases scored documents; 0 = LoRA only"),
        _f("GLOBAL_TTT_LR", float, 1e-3, "phased: SGD LR on all base weights (cosine over the phase's chunks)"),
        _f("GLOBAL_TTT_MOMENTUM", float, 0.9, "phased: global SGD momentum"),
        _f("GLOBAL_TTT_EPOCHS", int, 1, "phased: passes over the scored prefix per phase"),
        _f("GLOBAL_TTT_CHUNK_TOKENS", int, 32768, "phased: tokens per global SGD step (the last chunk is not trained on)"),
        _f("GLOBAL_TTT_BATCH_SEQS", int, 32, "phased: sequences per forward in the global SGD (per rank)"),
        _f("GLOBAL_TTT_GRAD_CLIP", float, 1.0, "phased: global SGD grad-norm clip; 0 = off"),
        _f("ASYM_LOGIT_RESCALE", bool, False, "AsymLogit (PR #1923/#1945): eval and TTT use c+ tanh(z/c+) for logits z >= 0 and c- tanh(z/c-) below, two learnable scalars made at artifact load (not stored), both = LOGIT_SOFTCAP (the plain softcap); trained only by the phased global SGD phases, never by the LoRA or the main training"),
        _f("TTT_COMPILE", bool, False, "torch.compile the TTT forward (dynamic shapes; CUDA with COMPILE=1 only), warmed up on random tokens outside the eval timer; off by default: its compile is slower than the eager pass (BENCHMARKS.md, Phased TTT)"),
        _f("TTT_CHUNK_TOKENS", int, 32768, "chunked: val tokens scored per chunk before the LoRA trains on that chunk"),
        _f("TTT_EPOCHS", int, 1, "chunked: passes over each scored chunk"),
    ]),
    *group("systems", [  # systems: kernels, compile, loader
        _f("ATTN_BACKEND", str, "auto", "auto | flash (flash-attn 3/2) | fa4 (flash-attn-4, CuTe DSL) | sdpa | flex (FlexAttention)", choices=("auto", "flash", "fa4", "sdpa", "flex")),
        _f("CE_KERNEL", str, "auto", "training loss: auto (triton on CUDA with the plain tanh softcap, once its check passes; else torch) | triton (one Triton kernel each way on the bf16 logits: softcap, logsumexp and the gradient, as record #1855's fused CE; checked against fp32 first; -0.4..0.8 % step time on an H200, BENCHMARKS.md) | torch (fp32 softcapped logits through inductor)", choices=("auto", "triton", "torch")),
        _f("MLP_KERNEL", str, "auto", "MLP backward: auto (triton on Hopper+ once its check passes) | triton (the dgrad GEMM with the LeakyReLU^2 derivative in its epilogue) | torch", choices=("auto", "triton", "torch")),
        _f("COMPILE", bool, True, "torch.compile the model and Newton-Schulz (CUDA only)"),
        _f("FUSED_GRADS", bool, True, "custom backwards (cuBLAS column sums) for the channel scales, U-Net skip mix and lane mix; 0 = the plain expressions under autograd (same math)"),
        _f("PREFETCH_BATCHES", int, 2, "batches prepared ahead by the loader thread"),
    ]),
]

ALIASES = {a: f.name for f in FIELDS for a in f.aliases}
# The three attention gates were once separate on/off switches; as env (and in older artifacts) they still pick ATTN_GATE.
LEGACY_GATE_FLAGS = {"GATED_ATTENTION": "gated", "ATTN_OUT_GATE": "out", "GATE_ATTN_OUT": "out", "SPARSE_ATTN_GATE": "sparse",
                     "SPARSE_ATTN_GATE_ENABLED": "sparse"}


def legacy_attn_gate(flags: Mapping[str, bool], default: str, explicit: str | None = None) -> str:
    """ATTN_GATE from the old switches (name -> on): the one switched on; none when only SPARSE_ATTN_GATE (the old
    default) is switched off; `default` otherwise. Two gates on, or a switch beside ATTN_GATE, is a ConfigError."""
    if explicit and flags:
        raise ConfigError(f"{explicit} and {' and '.join(flags)} set the same option ATTN_GATE; set only ATTN_GATE")
    canonical = {"GATE_ATTN_OUT": "ATTN_OUT_GATE", "SPARSE_ATTN_GATE_ENABLED": "SPARSE_ATTN_GATE"}
    on = sorted({canonical.get(k, k) for k, v in flags.items() if v}, key=list(LEGACY_GATE_FLAGS).index)
    if len(on) > 1:
        raise ConfigError(f"{' and '.join(on)} are alternative attention output gates: enable at most one (ATTN_GATE=sparse|out|gated|none)")
    if on:
        return LEGACY_GATE_FLAGS[on[0]]
    return "none" if any(LEGACY_GATE_FLAGS[k] == "sparse" for k in flags) else default
TTT_TARGET_NAMES = ("q", "k", "v", "o", "mlp", "proj", "up", "down", "head")
# Env vars that belong to the launcher / runtime, never warned about.
_RUNTIME_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES"}

# CASEOPS=1 moves the default data and tokenizer to the CaseOps variant (explicit env still wins).
CASEOPS_DEFAULTS = dict(DATA_PATH="./data/datasets/fineweb10B_sp8192_caseops",
                        TOKENIZER_PATH="./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")

# PRESET=smoke: defaults for a tiny run of the whole pipeline on a CPU; explicit env still wins.
SMOKE_PRESET = dict(
    DATA_PATH="./data/datasets/smoke_sp512", TOKENIZER_PATH="./data/datasets/smoke_sp512/smoke_sp512.model",
    VOCAB_SIZE=512, NUM_LAYERS=4, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, LOOP_START=1, LOOP_END=2,
    NUM_LOOPS=1, ENABLE_LOOPING_AT=0.5, PARALLEL_START_LAYER=3, TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=2048,
    ITERATIONS=40, MAX_WALLCLOCK_SECONDS=0.0, GPTQ_RESERVE_SECONDS=0.0, WARMUP_STEPS=2, TRAIN_LOG_EVERY=10,
    MUON_MOMENTUM_WARMUP_STEPS=10, EVAL_SEQ_LEN=128, EVAL_STRIDE=32, EVAL_BATCH_SEQS=16, VAL_MAX_TOKENS=8192,
    GPTQ_CALIBRATION_BATCHES=2, COMPILE=False, ROPE_DIMS=8, MATRIX_LR=0.02, TIED_EMBED_LR=0.05,
    EMBED_BITS=8, GRAD_ACCUM_STEPS=1, GPTQ_BLOCK_SIZE=32, TTT_ENABLED=False,
)


def _parse(field: Field, raw: str, source: str):
    raw = raw.strip()
    try:
        if field.type is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if field.type is int:
            return int(float(raw)) if re.fullmatch(r"-?\d+(\.0*)?(e\d+)?", raw) else int(raw)
        if field.type is float:
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{source}={raw!r}: expected {field.type.__name__}") from None


@functools.lru_cache(maxsize=64)
def parse_seq_schedule(spec: str) -> tuple[tuple[int, float], ...]:
    """TRAIN_SEQ_SCHEDULE "LEN@FRAC,..." -> ((seq_len, start fraction), ...); the format only (_validate checks the values)."""
    try:
        return tuple((int(a), float(b)) for a, b in (e.split("@") for e in spec.replace(" ", "").split(",")))
    except ValueError:
        raise ConfigError(f"TRAIN_SEQ_SCHEDULE={spec!r}: expected LEN@FRAC,... (e.g. 1024@0,2048@0.1,3072@0.7)") from None


@functools.lru_cache(maxsize=64)
def parse_chunk_schedule(spec: str) -> tuple[tuple[int, int], ...]:
    """TTT_CHUNK_SCHEDULE "MAXLEN:CHUNK,..." -> ((max document length, chunk size), ...); the format only."""
    try:
        return tuple((int(a), int(b)) for a, b in (e.split(":") for e in spec.replace(" ", "").split(",")))
    except ValueError:
        raise ConfigError(f"TTT_CHUNK_SCHEDULE={spec!r}: expected MAXLEN:CHUNK,... (e.g. 256:8,2000:24)") from None


# One typed, frozen attribute per Field (the lower-cased env name): a misspelt read or any write fails loudly.
ConfigValues = dataclasses.make_dataclass("ConfigValues", [(f.name.lower(), f.type) for f in FIELDS], frozen=True)


class Config(ConfigValues):
    """Typed, validated view of the env. Attribute names are the lower-cased env names."""
    FIELDS = FIELDS

    def __init__(self, values: Mapping[str, Any]):
        missing = [f.name for f in FIELDS if f.name not in values]
        if missing or len(values) != len(FIELDS):
            raise ConfigError(f"Config needs exactly the FIELDS: missing {missing[:3]}, unknown {sorted(set(values) - {f.name for f in FIELDS})[:3]}")
        super().__init__(**{f.name.lower(): values[f.name] for f in FIELDS})

    @classmethod
    def fields(cls):
        return [(f.name, f.type.__name__, f.default, f.help) for f in FIELDS]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, warn: Callable[[str], None] | None = None) -> "Config":
        env = dict(os.environ if env is None else env)
        by_name = {f.name: f for f in FIELDS}
        raw: dict[str, tuple[str, str]] = {}
        for key, val in env.items():
            name = ALIASES.get(key, key)
            if name in by_name:
                if name in raw and raw[name][1] != key:
                    raise ConfigError(f"{key} and {raw[name][1]} set the same option {name}; set only one")
                raw[name] = (val, key)
        preset = raw["PRESET"][0].strip() if "PRESET" in raw else ""
        legacy = {k: _parse(Field(k, bool, False, ""), env[k], k) for k in LEGACY_GATE_FLAGS if k in env}
        if legacy:
            raw["ATTN_GATE"] = (legacy_attn_gate(legacy, by_name["ATTN_GATE"].default, raw.get("ATTN_GATE", (0, None))[1]),
                                next(iter(legacy)))
        values = {}
        for f in FIELDS:
            if f.name in raw:
                values[f.name] = _parse(f, *raw[f.name])
            elif preset == "smoke" and f.name in SMOKE_PRESET:
                values[f.name] = SMOKE_PRESET[f.name]
            else:
                values[f.name] = f.default
            if f.choices and values[f.name] not in f.choices:
                raise ConfigError(f"{raw.get(f.name, (0, f.name))[1]}={values[f.name]!r}: expected one of {list(f.choices)}")
        if "SLIDING_EVAL" not in raw:  # a diagnostic once TTT gives the final metric: keep its time for TTT
            values["SLIDING_EVAL"] = not values["TTT_ENABLED"]
        if values["CASEOPS"]:  # CaseOps data lives apart from the plain sp8192 shards (data/README.md)
            for name, default in CASEOPS_DEFAULTS.items():
                if name not in raw:
                    values[name] = default
        cfg = cls(values)
        cfg._validate()
        for msg in unknown_knob_warnings(env):
            (warn or (lambda m: print(m, file=sys.stderr)))(msg)
        return cfg

    @classmethod
    def from_artifact(cls, stored: Any, overrides: Mapping[str, str] | None = None) -> tuple["Config", list[str]]:
        """The config an artifact stores, checked exactly like env input (types, choices, combinations), with the
        eval-side `overrides` (env) applied. Returns it and the overrides it cannot honour (the weights fix them)."""
        if not isinstance(stored, dict):
            raise ConfigError(f"artifact model_config: expected a JSON object, got {type(stored).__name__}")
        by = {f.name: f for f in FIELDS}
        vals: dict[str, Any] = {}
        legacy = {k: stored[k] for k in LEGACY_GATE_FLAGS if k in stored}
        if legacy:  # an artifact written before ATTN_GATE
            bad = [k for k, v in legacy.items() if not isinstance(v, bool)]
            if bad:
                raise ConfigError(f"artifact model_config {bad[0]}={legacy[bad[0]]!r}: expected bool")
            stored = {k: v for k, v in stored.items() if k not in legacy}
            stored["ATTN_GATE"] = legacy_attn_gate(legacy, "none")
        for key, v in stored.items():
            name = ALIASES.get(key, key)
            if name not in by:
                raise ConfigError(f"artifact model_config has unknown option {key!r}: written by another version of train_gpt.py")
            f = by[name]
            ok = isinstance(v, bool) if f.type is bool else type(v) is int if f.type is int else \
                isinstance(v, (int, float)) and not isinstance(v, bool) if f.type is float else isinstance(v, str)
            if not ok:
                raise ConfigError(f"artifact model_config {name}={v!r}: expected {f.type.__name__}")
            vals[name] = float(v) if f.type is float else v
        for f in FIELDS:  # artifacts from older versions may lack new knobs
            vals.setdefault(f.name, f.default)
        ignored = []
        for key, raw in (overrides or {}).items():
            name = ALIASES.get(key, key)
            if name not in by:
                continue
            v = _parse(by[name], raw, key)
            if name in EVAL_OVERRIDABLE:
                vals[name] = v
            elif v != vals[name]:
                ignored.append(f"{key}={raw}")
        for f in FIELDS:
            if f.choices and vals[f.name] not in f.choices:
                raise ConfigError(f"artifact model_config {f.name}={vals[f.name]!r}: expected one of {list(f.choices)}")
        cfg = cls(vals)
        cfg._validate()
        return cfg, ignored

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name.lower()) for f in FIELDS}

    def replace(self, **kw) -> "Config":
        vals = self.to_dict()
        for k, v in kw.items():
            vals[k.upper()] = v
        cfg = Config(vals)
        cfg._validate()
        return cfg

    # Derived quantities used everywhere.
    @property
    def n_heads(self) -> int:
        return self.model_dim // self.head_dim if self.head_dim > 0 else self.num_heads

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim > 0 else self.model_dim // self.num_heads

    @property
    def window_short_tokens(self) -> int:
        return self.window_short or max(1, self.train_seq_len // 2)

    def train_seq_phases(self) -> tuple[tuple[int, float], ...]:
        """((seq_len, start fraction), ...) of training: TRAIN_SEQ_SCHEDULE, or TRAIN_SEQ_LEN from 0."""
        return parse_seq_schedule(self.train_seq_schedule) if self.train_seq_schedule.strip() else ((self.train_seq_len, 0.0),)

    def train_seq_len_at(self, frac: float) -> int:
        return [L for L, start in self.train_seq_phases() if start <= frac][-1]

    @property
    def max_train_seq_len(self) -> int:
        return max(L for L, _ in self.train_seq_phases())

    @property
    def rope_table_len(self) -> int:  # every position training, eval and TTT can reach: the RoPE tables are built once
        return max(self.max_train_seq_len, self.train_seq_len, self.eval_seq_len, self.ttt_eval_seq_len)

    def ttt_chunk_for(self, doc_tokens: int) -> int:
        """Phased TTT chunk size of a document of `doc_tokens` tokens (its BOS included = its scored targets)."""
        if self.ttt_chunk_schedule.strip():
            for max_len, chunk in parse_chunk_schedule(self.ttt_chunk_schedule):
                if doc_tokens <= max_len:
                    return chunk
        return self.ttt_chunk_size

    def ttt_chunk_sizes(self) -> list[int]:
        """Every chunk size the phased TTT uses (the default last)."""
        sched = parse_chunk_schedule(self.ttt_chunk_schedule) if self.ttt_chunk_schedule.strip() else ()
        return list(dict.fromkeys([c for _, c in sched] + [self.ttt_chunk_size]))

    def batch_split_error(self, world: int, accum: int) -> str | None:
        """Why TRAIN_BATCH_TOKENS cannot be cut into equal rows on every rank for every training length, or None."""
        for L in dict.fromkeys(L for L, _ in self.train_seq_phases()):
            if self.train_batch_tokens % (world * accum * L):
                what = f"the TRAIN_SEQ_SCHEDULE length {L}" if self.train_seq_schedule.strip() else "TRAIN_SEQ_LEN"
                return f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of WORLD_SIZE*GRAD_ACCUM_STEPS*{what}={world * accum * L}"
        return None

    @property
    def eval_doc_attention_on(self) -> bool:
        return self.doc_attention if self.eval_doc_attention == "auto" else self.eval_doc_attention == "on"

    @property
    def smear_width(self) -> int:
        return self.smear_gate_width or self.gate_width

    @property
    def ttt_target_list(self) -> list[str]:
        """TTT_TARGETS as a list, less q and v with TTT_MASK=no_qv."""
        drop = {"q", "v"} if self.ttt_mask == "no_qv" else set()
        return [t for t in (t.strip() for t in self.ttt_targets.split(",")) if t and t not in drop]

    def layer_windows(self) -> list[int]:
        """Per physical layer: window in tokens, 0 = full causal context. Last layer is always L."""
        pat = self.window_pattern.upper()
        wins = [self.window_short_tokens if pat[i % len(pat)] == "S" else 0 for i in range(self.num_layers)]
        wins[-1] = 0
        return wins

    def ve_layer_ids(self) -> list[int]:
        if not self.ve_enabled:
            return []
        spec, L = self.ve_layers.strip().lower(), self.num_layers
        if spec == "alternating":
            return [i for i in range(L) if i % 2 == (L - 1) % 2]
        if spec == "all":
            return list(range(L))
        if spec in ("none", ""):
            return []
        return sorted({int(x) for x in spec.split(",") if x.strip()})

    def _validate(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)
        for f in FIELDS:  # NaN would silently switch a clip or a schedule off; inf breaks fraction-based schedules
            v = getattr(self, f.name.lower())
            if f.type is float:
                need(math.isfinite(v), f"{f.name}={v}: expected a finite number")
                if f.name.endswith(("_LR", "_WD", "WEIGHT_DECAY", "_EPS", "CLIP_NORM", "_CLIP")):
                    need(v >= 0, f"{f.name}={v}: expected >= 0")
        need(not (self.caseops and self.val_bytes == "luts"), "CASEOPS=1 with VAL_BYTES=luts: the LUTs would count the transformed text's bytes (operators included); use VAL_BYTES=auto or sidecar")
        need(self.vocab_size > 1 and self.vocab_size <= 65536, f"VOCAB_SIZE={self.vocab_size}: expected 2..65536 (uint16 shards)")
        need(self.num_layers >= 1, f"NUM_LAYERS={self.num_layers}: expected >= 1")
        need(self.model_dim >= 8, f"MODEL_DIM={self.model_dim}: expected >= 8")
        if self.head_dim > 0:
            need(self.model_dim % self.head_dim == 0, f"HEAD_DIM={self.head_dim} must divide MODEL_DIM={self.model_dim}")
        else:
            need(self.num_heads >= 1 and self.model_dim % self.num_heads == 0, f"NUM_HEADS={self.num_heads} must divide MODEL_DIM={self.model_dim}")
        H, D = self.n_heads, self.d_head
        need(D % 2 == 0, f"head dim {D} (MODEL_DIM/NUM_HEADS or HEAD_DIM) must be even for RoPE")
        need(1 <= self.num_kv_heads <= H and H % self.num_kv_heads == 0, f"NUM_KV_HEADS={self.num_kv_heads} must divide the {H} query heads")
        need(self.mlp_mult > 0, f"MLP_MULT={self.mlp_mult}: expected > 0")
        need(0 <= self.rope_dims <= D and self.rope_dims % 2 == 0, f"ROPE_DIMS={self.rope_dims}: expected an even number in [0, head_dim={D}]")
        rope = self.rope_dims or D
        need(0 <= self.shared_head_dim < D, f"SHARED_HEAD_DIM={self.shared_head_dim}: expected 0..{D - 1}")
        if self.shared_head_dim:
            need(rope + self.shared_head_dim <= D, f"ROPE_DIMS ({rope}) + SHARED_HEAD_DIM ({self.shared_head_dim}) must be <= head_dim {D}")
        need(-1 <= self.xsa_last_n <= self.num_layers, f"XSA_LAST_N={self.xsa_last_n}: expected -1 (all), 0 (off) or 1..NUM_LAYERS={self.num_layers}")
        need(not (self.xsa_gate and self.xsa_last_n == 0), "XSA_GATE=1 with XSA_LAST_N=0: there is no XSA subtraction to gate")
        need(self.logit_softcap >= 0, f"LOGIT_SOFTCAP={self.logit_softcap}: expected >= 0 (0 = off)")
        need(self.leaky_slope >= 0, f"LEAKY_SLOPE={self.leaky_slope}: expected >= 0")
        need(re.fullmatch(r"[SLsl]+", self.window_pattern) is not None, f"WINDOW_PATTERN={self.window_pattern!r}: expected a string of S and L")
        need(self.window_short >= 0, "WINDOW_SHORT must be >= 0")
        if self.attn_backend == "flash":
            need(module_available("flash_attn_interface") or module_available("flash_attn"),
                 "ATTN_BACKEND=flash: neither flash-attn 3 (flash_attn_interface) nor flash-attn 2 (flash_attn) is importable; use ATTN_BACKEND=auto")
        if self.attn_backend == "fa4":
            need(module_available("flash_attn.cute"), "ATTN_BACKEND=fa4: flash-attn-4 is not importable (pip install flash-attn-4)")
        if self.ce_kernel == "triton":
            need(module_available("triton"), "CE_KERNEL=triton: triton is not importable (it ships with CUDA builds of torch)")
            need(self.logit_softcap > 0 and not self.asym_logit_rescale, "CE_KERNEL=triton fuses the plain tanh softcap: it needs LOGIT_SOFTCAP > 0 and ASYM_LOGIT_RESCALE=0")
        if self.mlp_kernel == "triton":
            need(module_available("triton"), "MLP_KERNEL=triton: triton is not importable (it ships with CUDA builds of torch)")
            hidden = int(self.mlp_mult * self.model_dim)
            need(self.model_dim % 8 == 0 and hidden % 8 == 0, f"MLP_KERNEL=triton: MODEL_DIM ({self.model_dim}) and the MLP hidden size ({hidden}) must be multiples of 8 (TMA rows are 16-byte aligned)")
        need(1 <= self.gate_width <= self.model_dim, f"GATE_WIDTH={self.gate_width}: expected 1..MODEL_DIM")
        need(10 <= self.brotli_lgwin <= 24 and 0 <= self.lzma_preset <= 9, f"BROTLI_LGWIN={self.brotli_lgwin} / LZMA_PRESET={self.lzma_preset}: expected 10..24 / 0..9")
        need(0 <= self.smear_gate_width <= self.model_dim, f"SMEAR_GATE_WIDTH={self.smear_gate_width}: expected 0..MODEL_DIM")
        spec = self.ve_layers.strip().lower()  # checked even with VE off: a typo should not wait for VE_ENABLED=1
        if spec not in ("alternating", "all", "none", ""):
            try:
                lay = [int(x) for x in spec.split(",") if x.strip()]
            except ValueError:
                raise ConfigError(f"VE_LAYERS={spec!r}: expected alternating|all|none|comma list of ints") from None
            need(all(0 <= i < self.num_layers for i in lay), f"VE_LAYERS={spec!r}: indices must be in [0, {self.num_layers})")
        if self.ve_enabled:
            need(self.ve_dim >= 0, "VE_DIM must be >= 0")
            need(1 <= self.ve_gate_width <= self.model_dim, f"VE_GATE_WIDTH={self.ve_gate_width}: expected 1..MODEL_DIM")
        if self.bigram_hash:
            need(self.bigram_buckets >= 2 and self.bigram_dim >= 1, "BIGRAM_BUCKETS must be >= 2 and BIGRAM_DIM >= 1")
        if self.num_loops:
            need(self.num_loops >= 0, "NUM_LOOPS must be >= 0")
            need(0 <= self.loop_start <= self.loop_end < self.num_layers, f"LOOP_START={self.loop_start}..LOOP_END={self.loop_end} must lie in [0, NUM_LAYERS={self.num_layers})")
            need(0.0 <= self.enable_looping_at <= 1.0, "ENABLE_LOOPING_AT must be in [0, 1]")
        need(self.num_loops >= 0, f"NUM_LOOPS={self.num_loops}: expected >= 0")
        need(self.loop_lora_rank >= 0, f"LOOP_LORA_RANK={self.loop_lora_rank}: expected >= 0")
        need(not (self.loop_lora_rank and self.num_loops == 0), f"LOOP_LORA_RANK={self.loop_lora_rank} with NUM_LOOPS=0: no layer is looped")
        if self.grow_layers_from:
            need(0 < self.grow_layers_from < self.num_layers, f"GROW_LAYERS_FROM={self.grow_layers_from}: expected 0 (off) or 1..NUM_LAYERS-1={self.num_layers - 1}")
            need(0.0 <= self.grow_at_frac < 1.0, f"GROW_AT_FRAC={self.grow_at_frac}: expected [0, 1)")
            need(self.num_loops == 0, f"GROW_LAYERS_FROM={self.grow_layers_from} with NUM_LOOPS={self.num_loops}: growing and depth recurrence do not combine; set NUM_LOOPS=0")
        need(0 <= self.parallel_start_layer < max(self.num_layers, 1) or self.parallel_start_layer == 0, f"PARALLEL_START_LAYER={self.parallel_start_layer}: expected 0 (off) or a layer index < NUM_LAYERS")
        need(self.train_seq_len >= 2, "TRAIN_SEQ_LEN must be >= 2")
        if not self.train_seq_schedule.strip():  # with a schedule its lengths are the rows (checked below)
            need(self.train_batch_tokens >= self.train_seq_len, "TRAIN_BATCH_TOKENS must be >= TRAIN_SEQ_LEN >= 2")
            need(self.train_batch_tokens % self.train_seq_len == 0, f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len}")
        if self.train_seq_schedule.strip():
            sched, spec = parse_seq_schedule(self.train_seq_schedule), f"TRAIN_SEQ_SCHEDULE={self.train_seq_schedule!r}"
            lens, starts = [L for L, _ in sched], [f for _, f in sched]
            # whole 64-token tiles: the flash / FlexAttention kernels work in 64/128-token blocks
            need(all(L >= 64 and L % 64 == 0 for L in lens), f"{spec}: lengths must be positive multiples of 64")
            need(starts[0] == 0.0, f"{spec}: the first length must start at fraction 0")
            need(all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < 1.0, f"{spec}: start fractions must increase, from 0 to below 1")
            need(all(a != b for a, b in zip(lens, lens[1:])), f"{spec}: consecutive phases with the same length")
            bad = [L for L in lens if self.train_batch_tokens % L]
            need(not bad, f"{spec}: TRAIN_BATCH_TOKENS={self.train_batch_tokens} must be a multiple of every length (not of {bad})")
        need(self.seq_change_warmup_steps >= 0, f"SEQ_CHANGE_WARMUP_STEPS={self.seq_change_warmup_steps}: expected >= 0")
        need(self.iterations >= 1, "ITERATIONS must be >= 1")
        need(self.max_wallclock_seconds >= 0 and self.gptq_reserve_seconds >= 0, "MAX_WALLCLOCK_SECONDS and GPTQ_RESERVE_SECONDS must be >= 0")
        if self.max_wallclock_seconds > 0:
            need(self.gptq_reserve_seconds < self.max_wallclock_seconds, "GPTQ_RESERVE_SECONDS must be < MAX_WALLCLOCK_SECONDS")
        need(0.0 <= self.warmdown_frac <= 1.0 and 0.0 <= self.min_lr <= 1.0, "WARMDOWN_FRAC and MIN_LR must be in [0, 1]")
        need(0.0 <= self.ema_decay < 1.0, "EMA_DECAY must be in [0, 1)")
        need(0.0 <= self.ema_start_frac < 1.0, f"EMA_START_FRAC={self.ema_start_frac}: expected [0, 1)")
        need(not (self.swa_enabled and self.ema_enabled), "SWA_ENABLED=1 and EMA_ENABLED=1 both replace the final weights: enable one")
        need(self.swa_every >= 1, f"SWA_EVERY={self.swa_every}: expected >= 1")
        need(0.0 <= self.qat_start_frac < 1.0, f"QAT_START_FRAC={self.qat_start_frac}: expected [0, 1)")
        need(0.0 <= self.int8_clip_percentile <= 100.0, f"INT8_CLIP_PERCENTILE={self.int8_clip_percentile}: expected 0..100 (0 or 100 = absmax)")
        need(self.int8_scale_floor >= 0.0, f"INT8_SCALE_FLOOR={self.int8_scale_floor}: expected >= 0")
        if self.int8_clip_percentile not in (0.0, 100.0) or self.int8_scale_floor > 0:
            need(self.quant == "int8", f"INT8_CLIP_PERCENTILE={self.int8_clip_percentile} / INT8_SCALE_FLOOR={self.int8_scale_floor} shape the QUANT=int8 quantizer: set QUANT=int8 (QUANT={self.quant})")
        for name in ("MATRIX_BITS", "EMBED_BITS"):
            need(5 <= getattr(self, name.lower()) <= 8, f"{name}={getattr(self, name.lower())}: expected 5..8")
        if self.awq_lite_enabled:
            need(self.quant == "gptq", f"AWQ_LITE_ENABLED=1 works inside GPTQ: QUANT={self.quant} has no GPTQ solve (use QUANT=gptq)")
            need(self.matrix_bits < self.awq_lite_bits <= 8, f"AWQ_LITE_BITS={self.awq_lite_bits}: expected MATRIX_BITS={self.matrix_bits} < bits <= 8")
            need(self.awq_lite_group_top_k >= 1 and self.awq_lite_group_size >= 1,
                 f"AWQ_LITE_GROUP_TOP_K={self.awq_lite_group_top_k} / AWQ_LITE_GROUP_SIZE={self.awq_lite_group_size}: expected >= 1")
        need(not self.asym_logit_rescale or self.logit_softcap > 0, "ASYM_LOGIT_RESCALE=1 rescales the softcap: it needs LOGIT_SOFTCAP > 0")
        need(self.eval_seq_len >= 2 and 1 <= self.eval_stride <= self.eval_seq_len, f"EVAL_STRIDE={self.eval_stride} must be in [1, EVAL_SEQ_LEN={self.eval_seq_len}]")
        need(self.eval_batch_seqs >= 1 and self.gptq_calibration_batches >= 1, "EVAL_BATCH_SEQS and GPTQ_CALIBRATION_BATCHES must be >= 1")
        need(1 <= self.ngram_token_order <= 64, f"NGRAM_TOKEN_ORDER={self.ngram_token_order}: expected 1..64")
        need(0.5 < self.ngram_token_threshold <= 1.0, f"NGRAM_TOKEN_THRESHOLD={self.ngram_token_threshold}: expected (0.5, 1] (a unique majority continuation)")
        need(0.0 <= self.ngram_token_boost <= 30.0, f"NGRAM_TOKEN_BOOST={self.ngram_token_boost}: expected 0..30 (nats added to one logit)")
        bad = [t for t in self.ttt_targets.split(",") if t.strip() and t.strip() not in TTT_TARGET_NAMES]
        need(not bad, f"TTT_TARGETS has unknown targets {bad}: expected a comma list of {','.join(TTT_TARGET_NAMES)}")
        need(not self.ttt_enabled or any(t.strip() for t in self.ttt_targets.split(",")) or self.ttt_mode == "phased" and self.phased_ttt_num_phases > 0,
             "TTT_TARGETS is empty: TTT would adapt nothing (set TTT_ENABLED=0, or TTT_MODE=phased with PHASED_TTT_NUM_PHASES > 0 for global SGD only)")
        need(self.ttt_mask == "none" or self.ttt_target_list, f"TTT_MASK={self.ttt_mask} leaves no LoRA target of TTT_TARGETS={self.ttt_targets!r}")
        need(self.ttt_local_lr_mult >= 0, f"TTT_LOCAL_LR_MULT={self.ttt_local_lr_mult}: expected >= 0")
        for name in ("TTT_CHUNK_TOKENS", "TTT_LORA_RANK", "TTT_DOCS_PER_BATCH", "TTT_CHUNK_SIZE", "TTT_GRAD_STEPS", "GLOBAL_TTT_CHUNK_TOKENS", "GLOBAL_TTT_BATCH_SEQS", "TTT_EPOCHS"):
            need(getattr(self, name.lower()) >= 1, f"{name}={getattr(self, name.lower())}: expected >= 1")
        need(self.ttt_rows_per_forward >= 0, f"TTT_ROWS_PER_FORWARD={self.ttt_rows_per_forward}: expected >= 0 (0 = all rows of a step at once)")
        need(self.ttt_eval_seq_len >= self.ttt_chunk_size, f"TTT_EVAL_SEQ_LEN={self.ttt_eval_seq_len} must be >= TTT_CHUNK_SIZE={self.ttt_chunk_size} (a window holds its chunk)")
        if self.ttt_chunk_schedule.strip():
            sched, spec = parse_chunk_schedule(self.ttt_chunk_schedule), f"TTT_CHUNK_SCHEDULE={self.ttt_chunk_schedule!r}"
            need(all(m >= 1 for m, _ in sched) and all(a < b for (a, _), (b, _) in zip(sched, sched[1:])), f"{spec}: MAXLEN values must be >= 1 and increase")
            need(all(1 <= c <= self.ttt_eval_seq_len for _, c in sched), f"{spec}: chunk sizes must be in 1..TTT_EVAL_SEQ_LEN={self.ttt_eval_seq_len} (a window holds its chunk)")
            need(self.ttt_mode == "phased", f"{spec} applies to TTT_MODE=phased only (TTT_MODE={self.ttt_mode})")
        need(self.phased_ttt_num_phases >= 0 and self.phased_ttt_prefix_docs >= 0 and self.global_ttt_epochs >= 0,
             "PHASED_TTT_NUM_PHASES, PHASED_TTT_PREFIX_DOCS and GLOBAL_TTT_EPOCHS must be >= 0")
        need(0.0 <= self.ttt_beta1 < 1.0 and 0.0 <= self.ttt_beta2 < 1.0, f"TTT_BETA1={self.ttt_beta1}, TTT_BETA2={self.ttt_beta2}: expected values in [0, 1)")
        need(min(self.ttt_lr, self.global_ttt_lr, self.ttt_weight_decay, self.global_ttt_momentum, self.global_ttt_grad_clip) >= 0,
             "TTT_LR, GLOBAL_TTT_LR, TTT_WEIGHT_DECAY, GLOBAL_TTT_MOMENTUM and GLOBAL_TTT_GRAD_CLIP must be >= 0")


def unknown_knob_warnings(env: Mapping[str, str]) -> list[str]:
    """Env vars that look like our knobs but are not (typos) get a warning, never silence."""
    known = {f.name for f in FIELDS} | set(ALIASES) | set(LEGACY_GATE_FLAGS)
    prefixes = {n.split("_")[0] for n in known}
    out = []
    for key in sorted(env):
        if key in known or key in _RUNTIME_ENV or not re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+|[A-Z]{4,}", key):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if key.split("_")[0] in prefixes or close:
            hint = f"; did you mean {close[0]}?" if close else ""
            out.append(f"WARNING: env var {key} looks like a train_gpt.py option but is unknown and ignored{hint}")
    return out


def env_table_markdown() -> str:
    """The README's env table, generated from FIELDS (a test keeps the README in sync)."""
    rows = []
    for g in dict.fromkeys(f.group for f in FIELDS):
        rows += ([""] if rows else []) + [f"**{g}**", "", "| Env var | Type | Default | Meaning |", "|---|---|---|---|"]
        for f in (f for f in FIELDS if f.group == g):
            d = int(f.default) if f.type is bool else f.default
            name = f"`{f.name}`" + (" (alias " + ", ".join(f"`{a}`" for a in f.aliases) + ")" if f.aliases else "")
            rows.append(f"| {name} | {f.type.__name__} | `{d}` | {f.help.replace('|', '/')} |")
    return "\n".join(rows)

# ----------------------------------------------------------------------------------------------
# DATA: challenge shards (256 x int32 header + uint16 tokens), loaders, val_bpb byte LUTs.
# ----------------------------------------------------------------------------------------------

class DataError(RuntimeError):
    """Missing or malformed data; the message names the file and what was expected."""


def read_shard_header(path: str | Path) -> int:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < SHARD_HEADER_INTS * 4:
        raise DataError(f"{path}: {size} bytes is smaller than the 1024-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: header magic {header[0]} != {SHARD_MAGIC}; not a challenge shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: shard version {header[1]} != {SHARD_VERSION}")
    n = int(header[2])
    if n < 0 or size != SHARD_HEADER_INTS * 4 + 2 * n:
        raise DataError(f"{path}: header says {n} tokens, so the file must be {SHARD_HEADER_INTS * 4 + 2 * n} bytes, but it is {size}")
    return n


def load_shard(path: str | Path) -> np.ndarray:
    """Validated read-only memmap of a shard's uint16 tokens."""
    n = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n,))


def write_shard(path: str | Path, tokens: np.ndarray):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise DataError(f"{path}: token ids must fit uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    atomic_write_bytes(path, header.tobytes() + tokens.astype("<u2").tobytes())


def atomic_write_bytes(path: str | Path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # full disk, permissions: no temp file left behind, one clear line
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shard_files(data_path: str, split: str) -> list[str]:
    files = sorted(f for f in glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")) if "_bytes_" not in f)
    if not files:
        raise DataError(f"DATA_PATH={data_path}: no fineweb_{split}_*.bin shards found. Download them with "
                        f"`python data/cached_challenge_fineweb.py --variant sp8192`, build local ones with "
                        f"`python data/text_to_shards.py`, or run `PRESET=smoke python train_gpt.py`.")
    return files


class TokenStream:
    """Reads training shards in order (wrapping), identical for every seed (as the SOTA loader)."""

    def __init__(self, files: list[str], reverse: bool = False, vocab_size: int = 0):
        files = list(reversed(files)) if reverse else list(files)
        self.files = [f for f in files if read_shard_header(f) > 0]  # an empty shard would spin take() forever
        if not self.files:
            raise DataError(f"training shards {files[:3]}{'...' if len(files) > 3 else ''}: all {len(files)} hold 0 tokens")
        self.vocab_size = vocab_size
        self.file_idx, self.pos = 0, 0
        self.tokens = self._open(0)

    def _open(self, i: int) -> np.ndarray:
        """A shard, its largest token id checked against the model's vocab when it is opened (one pass per file)."""
        t = load_shard(self.files[i])
        if self.vocab_size and int(t.max()) >= self.vocab_size:
            raise DataError(f"{self.files[i]}: token id {int(t.max())} >= VOCAB_SIZE={self.vocab_size}: the shard was built with "
                            f"another tokenizer (vocab mismatch with the data)")
        return t

    def take(self, n: int) -> np.ndarray:
        out, need = [], n
        while need > 0:
            left = self.tokens.size - self.pos
            if left <= 0:
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = self._open(self.file_idx), 0
                continue
            k = min(left, need)
            out.append(np.asarray(self.tokens[self.pos:self.pos + k]))
            self.pos += k
            need -= k
        return np.concatenate(out) if len(out) > 1 else out[0]


def doc_cu_seqlens(ids: np.ndarray, bos_id: int, max_len: int) -> np.ndarray:
    """Segment boundaries of a [B, T] token batch read as one flat sequence of B*T tokens: a segment starts at
    every row start and at every BOS, and a document longer than `max_len` is cut every `max_len` tokens from
    its own start (the records' varlen training layout). Returns int32 cu_seqlens [0, ..., B*T], padded with
    B*T (empty segments) to a power-of-two length >= 64, so that compiled steps see few distinct shapes."""
    B, T = ids.shape
    n = B * T
    starts = np.union1d(np.flatnonzero(ids.reshape(-1) == bos_id), np.arange(0, n, T))
    lengths = np.diff(np.append(starts, n))
    pieces = -(-lengths // max_len)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)  # index of each piece's first sibling
    cu = np.append(np.repeat(starts, pieces) + (np.arange(pieces.sum()) - first) * max_len, n)
    out = np.full(max(64, 1 << (len(cu) - 1).bit_length()), n, dtype=np.int32)
    out[:len(cu)] = cu
    return out


def segment_ids(cu_seqlens: torch.Tensor, shape) -> torch.Tensor:
    """Per-token segment index [B, T] from (padded) cu_seqlens over the flattened batch: for document masks."""
    pos = torch.arange(math.prod(shape), device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return (torch.searchsorted(cu_seqlens, pos, right=True) - 1).view(shape)


class DistributedLoader:
    """Each micro-step: one contiguous global chunk of world*(local+1) tokens; rank r gets the r-th span.
    A background thread prepares pinned batches ahead so the GPU never waits on numpy. next() returns
    (x, y, cu_seqlens): with `doc=(bos_id, max_len)` (DOC_ATTENTION) x and y are ONE packed row [1, local]
    and cu_seqlens its document segments (doc_cu_seqlens); otherwise rows [local/seq_len, seq_len] and None.
    set_seq_len (TRAIN_SEQ_SCHEDULE) changes the rows (and the document cut length) from the next batch on; the
    token stream is the same whatever the lengths."""

    def __init__(self, files, rank, world, local_tokens, seq_len, device, prefetch=2, reverse=False, doc: tuple | None = None,
                 vocab_size: int = 0):
        assert local_tokens % seq_len == 0
        self.stream = TokenStream(files, reverse=reverse, vocab_size=vocab_size)
        self.rank, self.world, self.local, self.device = rank, world, local_tokens, device
        self.layout = (seq_len, doc)  # one attribute: the thread reads both in a single load
        self.pin = device.type == "cuda"
        self.q: queue.Queue | None = None
        if prefetch > 0:
            self.q = queue.Queue(maxsize=prefetch)
            self._stop = False
            self.thread = threading.Thread(target=self._work, daemon=True)
            self.thread.start()

    @property
    def seq_len(self) -> int:
        return self.layout[0]

    @property
    def doc(self) -> tuple | None:
        return self.layout[1]

    def set_seq_len(self, seq_len: int):
        assert self.local % seq_len == 0
        self.layout = (seq_len, (self.doc[0], seq_len) if self.doc else None)

    def _rows(self, x, y, layout, chunk=None):
        seq_len, doc = layout
        row = self.local if doc else seq_len
        x, y = x.reshape(-1, row), y.reshape(-1, row)
        cu = torch.from_numpy(doc_cu_seqlens((chunk if chunk is not None else x.numpy()).reshape(1, -1), *doc)) if doc else None
        return x, y, cu

    def _make(self):
        layout = self.layout
        span = self.local + 1
        chunk = self.stream.take(self.world * span)[self.rank * span:(self.rank + 1) * span]
        t = torch.from_numpy(chunk.astype(np.int64))
        x, y, cu = self._rows(t[:-1], t[1:], layout, chunk[:-1])
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
            cu = cu.pin_memory() if cu is not None else None
        return x, y, cu, layout

    def _work(self):
        while not self._stop:
            try:
                item = self._make()
            except Exception as e:  # noqa: BLE001  handed to next(): the main thread must not wait forever
                item = e
            while not self._stop:
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def next(self):
        item = self.q.get() if self.q is not None else self._make()
        if isinstance(item, Exception):
            self._stop = True
            raise item
        *item, layout = item
        if layout != self.layout:  # prepared before set_seq_len: the same tokens, cut for the new length
            item = self._rows(item[0], item[1], self.layout)
        return tuple(t.to(self.device, non_blocking=True) if t is not None else None for t in item)

    def close(self):
        if self.q is not None:
            self._stop = True
            self.thread.join(timeout=2)


def load_val_tokens(data_path: str, max_tokens: int = 0) -> np.ndarray:
    toks = np.concatenate([np.asarray(load_shard(f)) for f in shard_files(data_path, "val")])
    if max_tokens > 0:
        toks = toks[:max_tokens]
    if toks.size < 2:
        raise DataError(f"DATA_PATH={data_path}: validation split has {toks.size} tokens; need at least 2")
    return toks


def load_val_byte_sidecar(data_path: str, n_tokens: int) -> np.ndarray | None:
    """Original UTF-8 bytes per val token (fineweb_val_bytes_*.bin, same shard layout as the tokens; written by
    data/text_to_shards.py --caseops / --byte-sidecar), or None when DATA_PATH has none. `n_tokens`: the val
    shards' full token count, which the sidecar must match."""
    files = sorted(glob.glob(os.path.join(data_path, "fineweb_val_bytes_*.bin")))
    if not files:
        return None
    side = np.concatenate([np.asarray(load_shard(f)) for f in files]).astype(np.int64)
    if side.size != n_tokens:
        raise DataError(f"DATA_PATH={data_path}: byte sidecar fineweb_val_bytes_*.bin has {side.size} entries but the val shards "
                        f"hold {n_tokens} tokens: they must be written together (data/text_to_shards.py --caseops)")
    return side


def build_byte_luts(sp, vocab_size: int):
    """Per token id: UTF-8 bytes of the piece without its leading '\u2581', whether it has one, and whether
    it is a boundary (control/unknown/unused: 0 bytes, and no leading space is charged after it)."""
    n = sp.vocab_size()
    if n > vocab_size:
        raise DataError(f"tokenizer has {n} pieces but VOCAB_SIZE={vocab_size}: vocab mismatch")
    base = np.zeros(vocab_size, dtype=np.int64)
    lead = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            lead[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return base, lead, boundary


def target_bytes(prev: np.ndarray | torch.Tensor, tgt, luts):
    """Bytes charged for predicting tgt after prev (the challenge's exact rule)."""
    base, lead, boundary = luts
    return base[tgt] + (lead[tgt] & ~boundary[prev])


def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm
    if not Path(path).is_file():
        raise DataError(f"TOKENIZER_PATH={path}: SentencePiece model not found. Get the challenge data and tokenizer with "
                        f"`MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python data/cached_challenge_fineweb.py --variant sp8192`, "
                        f"build local ones with `python data/text_to_shards.py` (data/README.md), or try `PRESET=smoke python train_gpt.py`")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f"TOKENIZER_PATH={path}: not a SentencePiece model ({str(e).strip().splitlines()[-1][:120]})") from None
    if sp.vocab_size() != vocab_size:
        raise DataError(f"TOKENIZER_PATH={path} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size} (the model's vocab): they must be "
                        f"equal; use the tokenizer the data was built with and VOCAB_SIZE={sp.vocab_size()}, or the matching artifact")
    return sp, build_byte_luts(sp, vocab_size)


def bos_of(sp) -> int:
    """The document separator id: the tokenizer's BOS, or 1 (the challenge shards' convention) when it defines none."""
    return sp.bos_id() if sp.bos_id() >= 0 else 1


def _smoke_text(seed: int, n_docs: int) -> list[str]:
    """Deterministic English-like documents with some structure a tiny model can learn."""
    rng = random.Random(seed)
    subj = "the cat|a dog|my friend|the old man|a young girl|the teacher|our team|the city|this model|the river".split("|")
    verb = "sees|likes|builds|finds|wants|carries|remembers|paints|follows|opens".split("|")
    obj = "a red ball|the small house|three apples|a long road|the blue sky|an open door|the last train|some warm bread".split("|")
    tail = ["today", "at night", "in the morning", "because it rains", "with great care", "again and again", "near the sea"]
    docs = []
    for d in range(n_docs):
        sents = []
        for _ in range(rng.randint(3, 12)):
            s = f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}"
            if rng.random() < 0.6:
                s += " " + rng.choice(tail)
            if rng.random() < 0.2:
                s += f", {rng.randint(1, 999)} times"
            sents.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?"]))
        docs.append(" ".join(sents))
    return docs


def build_smoke_dataset(data_path: str, tokenizer_path: str, vocab_size: int, log=print):
    """PRESET=smoke with no data: train a tiny SentencePiece model and write train/val shards (no network). A complete
    set (train + val shards + tokenizer) is reused; anything less that already exists is the user's and is never
    replaced: the run stops with a DataError instead."""
    import sentencepiece as spm
    data_dir, tok = Path(data_path), Path(tokenizer_path)
    train, val = (glob.glob(str(data_dir / f"fineweb_{s}_*.bin")) for s in ("train", "val"))
    if train and val and tok.is_file():
        return
    present = [Path(p).name for p in train + val] + [p.name for p in (tok, tok.with_suffix(".vocab")) if p.exists()]
    if present:
        raise DataError(f"PRESET=smoke: DATA_PATH={data_path} / TOKENIZER_PATH={tokenizer_path} hold {', '.join(sorted(present)[:4])} "
                        f"but not train shards, val shards and tokenizer together; the smoke builder never overwrites files: "
                        f"point DATA_PATH and TOKENIZER_PATH at new locations, or add the missing part")
    data_dir.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = _smoke_text(1, 1500), _smoke_text(2, 120)
    tok.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_docs), model_prefix=str(tok.with_suffix("")), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1, split_digits=True,
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2, seed_sentencepiece_size=100000)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ids = [t for d in docs for t in [sp.bos_id()] + sp.encode(d)]
        write_shard(data_dir / f"fineweb_{split}_000000.bin", np.array(ids, dtype=np.uint16))
    log(f"event:smoke_data path:{data_dir} tokenizer:{tok} train_docs:{len(train_docs)} val_docs:{len(val_docs)}")

# ----------------------------------------------------------------------------------------------
# MODEL: tied-embedding GPT with U-Net skips, resid mix, QK-norm, partial RoPE, q-gain, GQA,
# LeakyReLU^2 MLP, softcap, and every seed feature behind its config switch.
# Canonical attention order (seed_features.md s1): resid_mix -> norm*s -> QKV (SHD tie) -> value
# embedding -> value residual -> QK norm -> partial RoPE -> q_gain -> attention (window) -> XSA ->
# output gate -> Wo -> *attn_scale. What each op runs on (attention kernel, MLP backward, masks,
# fused gradients) is a `Kernels` object chosen once per device by resolve_kernels (appendix A).
# ----------------------------------------------------------------------------------------------

# Parameter roles, declared where each parameter is created: "<optimizer group>/<quantization class>".
# Optimizer groups: muon (block matrices, bigram/VE projections), embed (token-indexed tables), head (an untied
# output head), scalar (vectors and control tensors). Quantization classes (quant_plan): tok_emb, head, table
# (other token-indexed tables), attn / mlp (block matrices, their clip sigmas), gate (small attention gate matrices:
# GATE_QUANT_INT8), matrix (other matrices), control (scales, lambdas, gains: passthrough).
ROLE_OPT = ("muon", "embed", "head", "scalar")
ROLE_QUANT = ("tok_emb", "head", "table", "attn", "mlp", "gate", "matrix", "control")


def declare(module: nn.Module, **roles: str) -> None:
    """Declare the roles of `module`'s own parameters (local name -> "opt/quant")."""
    for name, role in roles.items():
        opt, _, quant = role.partition("/")
        assert opt in ROLE_OPT and quant in ROLE_QUANT, f"bad role {role!r} for {name}"
    if "param_roles" not in module.__dict__:
        module.param_roles = {}
    module.param_roles.update(roles)


def param_roles(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Full parameter name -> (optimizer group, quantization class); every parameter has exactly one role."""
    roles = {}
    for mname, mod in model.named_modules():
        for local, role in mod.__dict__.get("param_roles", {}).items():
            if isinstance(getattr(mod, local, None), nn.Parameter):  # declared but absent or a buffer (feature off): no role
                roles[f"{mname}.{local}" if mname else local] = tuple(role.split("/"))
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in roles]
    if missing or len(roles) != len(names):
        raise AssertionError(f"parameters without a declared role: {missing}; roles without a parameter: {sorted(set(roles) - set(names))}")
    return roles


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def tie_shared_rows(w: torch.Tensor, heads: int, d: int, shared: int) -> torch.Tensor:
    """Shared-specific Q/K (PR #1774): the last `shared` rows of every head become their cross-head mean."""
    w3 = w.view(heads, d, w.size(-1))
    mean = w3[:, d - shared:].mean(0, keepdim=True).expand(heads, shared, w.size(-1))
    return torch.cat([w3[:, :d - shared], mean], 1).reshape(heads * d, w.size(-1))


class CastedLinear(nn.Module):
    """fp32 master weight, computed in the autocast dtype. `shared` ties head rows (SHD)."""

    def __init__(self, in_f: int, out_f: int, role: str, zero_init: bool = False, ortho_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_f, in_f))
        declare(self, weight=role)
        if zero_init:
            nn.init.zeros_(self.weight)
        elif ortho_init:
            nn.init.orthogonal_(self.weight)
        else:
            nn.init.normal_(self.weight, std=in_f ** -0.5)
        self.shared: tuple[int, int, int] | None = None  # (heads, head_dim, shared_dims)
        self.qat: tuple | None = None  # QAT: this weight's quantization spec (enable_qat)
        self.loop_rank = 0  # LOOP_LORA_RANK: per-pass deltas loop_b[p] @ loop_a[p] (add_loop_lora)

    def add_loop_lora(self, passes: int, rank: int, gen: torch.Generator):
        out_f, in_f = self.weight.shape
        self.loop_a = nn.Parameter(torch.randn(passes, rank, in_f, generator=gen) * in_f ** -0.5)
        self.loop_b = nn.Parameter(torch.zeros(passes, out_f, rank))  # zero: every pass starts as the shared weight
        declare(self, loop_a="scalar/control", loop_b="scalar/control")
        self.loop_rank = rank

    def effective_weight(self, loop_pass: int | None = None) -> torch.Tensor:
        w = tie_shared_rows(self.weight, *self.shared) if self.shared else self.weight
        if self.qat is not None:  # QAT: w + mix (Q(w) - w), the difference detached (straight-through); mix 0 -> 1 at the start
            w = w + self.qat_mix * (fake_quant(w, self.qat) - w).detach()
        if self.loop_rank and loop_pass is not None:  # per-loop LoRA of pass loop_pass (the artifact quantizes w only)
            w = w + self.loop_b[loop_pass] @ self.loop_a[loop_pass]
        return w

    def forward(self, x, loop_pass: int | None = None):
        return F.linear(x, self.effective_weight(loop_pass).to(x.dtype))


def lora_delta(ctx: dict | None, target: str, x: torch.Tensor) -> torch.Tensor | None:
    """Test-time-training LoRA term of one adapter (None when absent): scale * (x A^T) B^T for the adapter
    `target` of the virtual layer ctx["vi"] ("head" has no layer). A [R, r, in], B [R, out, r] with R = 1
    (one adapter for every row) or R = x.size(0) (one per row: a document each in phased TTT). The adapters
    ride in ctx, so TTT runs the exact training forward with the deltas added (no mirrored re-implementation)."""
    lora = ctx.get("lora") if ctx else None
    ab = lora["w"].get(target if target == "head" else f"{ctx['vi']}.{target}") if lora else None
    if ab is None:
        return None
    a, b = ab
    return torch.matmul(torch.matmul(x, a.to(x.dtype).transpose(-1, -2)), b.to(x.dtype).transpose(-1, -2)) * lora["scale"]


def plus(y: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    return y if d is None else y + d.to(y.dtype)


class Rotary(nn.Module):
    """Partial RoPE: rotate dims [0, R) as pairs (i, i + R/2) with theta_i = base^(-2i/R). The cos/sin tables for
    positions < max_len are buffers built once; a forward slices them, so a compiled forward with dynamic lengths
    (phased TTT) holds no Python cache whose guards would recompile it at every new length."""

    def __init__(self, rope_dims: int, base: float, max_len: int = 4096):
        super().__init__()
        self.r = rope_dims
        self.register_buffer("inv_freq", base ** (-torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims), persistent=False)
        f = torch.outer(torch.arange(max_len, dtype=torch.float32), self.inv_freq)
        self.register_buffer("cos_table", f.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin_table", f.sin()[None, :, None, :], persistent=False)

    def cos_sin(self, T: int, device, dtype):
        if T <= self.cos_table.size(1):
            return self.cos_table[:, :T].to(dtype), self.sin_table[:, :T].to(dtype)
        f = torch.outer(torch.arange(T, device=device, dtype=torch.float32), self.inv_freq.to(device))  # longer than planned
        return f.cos()[None, :, None, :].to(dtype), f.sin()[None, :, None, :].to(dtype)

    def forward(self, x):  # x [B, T, H, D]
        cos, sin = self.cos_sin(x.size(1), x.device, x.dtype)
        h = self.r // 2
        x1, x2, rest = x[..., :h], x[..., h:self.r], x[..., self.r:]
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest], -1)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int, kernels: Kernels | None = None):
        super().__init__()
        dim, H, Hkv, D = cfg.model_dim, cfg.n_heads, cfg.num_kv_heads, cfg.d_head
        self.cfg, self.layer, self.H, self.Hkv, self.D = cfg, layer, H, Hkv, D
        self.kernels = kernels or resolve_kernels(cfg, torch.device("cpu"))
        self.c_q = CastedLinear(dim, H * D, "muon/attn", ortho_init=True)
        self.c_k = CastedLinear(dim, Hkv * D, "muon/attn", ortho_init=True)
        self.c_v = CastedLinear(dim, Hkv * D, "muon/attn", ortho_init=True)
        self.proj = CastedLinear(H * D, dim, "muon/attn", zero_init=cfg.proj_init == "zero", ortho_init=True)
        if cfg.shared_head_dim:
            self.c_q.shared, self.c_k.shared = (H, D, cfg.shared_head_dim), (Hkv, D, cfg.shared_head_dim)
        if cfg.qk_gain_learned:
            self.q_gain = nn.Parameter(torch.full((H,), cfg.qk_gain_init))
        else:  # fixed: rebuilt from the config, not stored
            self.register_buffer("q_gain", torch.full((H,), cfg.qk_gain_init), persistent=False)
        declare(self, q_gain="scalar/control", xsa_gate="scalar/control", attn_gate_bias="scalar/control", attn_out_gate_w="scalar/gate", attn_gate_w="scalar/gate")
        self.rotary = Rotary(cfg.rope_dims or D, cfg.rope_base, cfg.rope_table_len)
        self.window = cfg.layer_windows()[layer]
        n_xsa = cfg.num_layers if cfg.xsa_last_n < 0 else cfg.xsa_last_n
        self.xsa = layer >= cfg.num_layers - n_xsa
        if self.xsa and cfg.xsa_gate:  # PR #1125 row 41: per-head strength of the subtraction, sigmoid(a_h)
            self.xsa_gate = nn.Parameter(torch.full((H,), cfg.xsa_gate_init))
        if cfg.attn_gate == "gated":  # PR #487: sigmoid(W h + b), W (Muon) zero, b = 4
            self.attn_gate = CastedLinear(dim, H, "muon/gate", zero_init=True)
            self.attn_gate_bias = nn.Parameter(torch.full((H,), 4.0))
        if cfg.attn_gate == "out":  # AttnOutGate: 2*sigmoid(A x[:W]), zero init = identity
            self.attn_out_gate_w = nn.Parameter(torch.zeros(H, cfg.gate_width))
        if cfg.attn_gate == "sparse":  # SparseAttnGate: sigmoid(scale * W u[:W]), zero init = 0.5
            self.attn_gate_w = nn.Parameter(torch.zeros(H, cfg.gate_width))
        self.has_ve = layer in cfg.ve_layer_ids()
        if self.has_ve:
            if cfg.ve_dim == 0:  # autoresearch: a full kv_dim table per VE layer
                self.ve_table = nn.Embedding(cfg.vocab_size, Hkv * D)
                declare(self.ve_table, weight="embed/table")
                nn.init.uniform_(self.ve_table.weight, -(3 ** 0.5) * dim ** -0.5, (3 ** 0.5) * dim ** -0.5)
            if cfg.ve_gate == "learned":
                self.ve_gate = CastedLinear(cfg.ve_gate_width, Hkv, "muon/attn", zero_init=True)

    def attend(self, q, k, v, masks):
        """q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D], causal within this layer's window (and, with a
        "varlen" entry (cu_seqlens, max_seqlen) in `masks`, within each segment of the flattened batch)."""
        if masks and "varlen" in masks:
            (B, T, H, D), (cu, max_seqlen) = q.shape, masks["varlen"]
            flat = (t.reshape(B * T, *t.shape[2:]) for t in (q, k, v))
            return self.kernels.varlen(*flat, cu, max_seqlen, self.window).view(B, T, H, -1)
        mask = masks.get(self.window) if masks else None
        flash = self.kernels.flash if q.is_cuda else None
        if flash is not None and mask is None:
            ws = (self.window, 0) if self.window else (-1, -1)
            out = flash(q, k, v, causal=True, window_size=ws)
            return out[0] if isinstance(out, tuple) else out
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is not None and not isinstance(mask, torch.Tensor):  # FlexAttention BlockMask
            from torch.nn.attention.flex_attention import flex_attention
            y = flex_attention(qt, kt, vt, block_mask=mask, enable_gqa=self.Hkv != self.H)
        elif mask is not None:
            y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=self.Hkv != self.H)
        elif self.window:  # no mask object given (direct call): build the dense window mask here
            m = build_masks(self.cfg, q.size(1), q.device, None, False)[self.window]
            y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=m, enable_gqa=self.Hkv != self.H)
        else:
            y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=self.Hkv != self.H)
        return y.transpose(1, 2)

    def forward(self, h, x_in, ctx):
        B, T, _ = h.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        p = ctx.get("pass")  # which pass of a looped layer (per-loop LoRA)
        q = plus(self.c_q(h, p), lora_delta(ctx, "q", h)).view(B, T, H, D)
        k = plus(self.c_k(h, p), lora_delta(ctx, "k", h)).view(B, T, Hkv, D)
        v = plus(self.c_v(h, p), lora_delta(ctx, "v", h)).view(B, T, Hkv, D)
        if self.has_ve:
            ve = self.ve_table(ctx["ids"]) if self.cfg.ve_dim == 0 else ctx["ve_shared"] * ctx["ve_layer_scales"][self.layer]
            ve = ve.view(B, T, Hkv, D).to(v.dtype)
            if self.cfg.ve_gate == "learned":
                ve = ve * (2 * torch.sigmoid(self.ve_gate(h[..., :self.cfg.ve_gate_width]))).unsqueeze(-1).to(v.dtype)
            v = v + ve
        if self.cfg.value_residual:  # the first executed block (physical layer 0) caches v0
            if "v0" not in ctx:
                ctx["v0"] = v
            else:
                lam = ctx["vr_lambdas"][self.layer].to(v.dtype)
                v = lam[0] * ctx["v0"] + lam[1] * v
        dt = v.dtype  # the compute dtype (bf16 under autocast)
        q, k = self.rotary(rms_norm(q).to(dt)), self.rotary(rms_norm(k).to(dt))
        q = q * self.q_gain.to(dt)[None, None, :, None]
        y = self.attend(q, k, v, ctx.get("masks"))
        if self.xsa:  # remove the component along the token's own value direction (GQA-broadcast)
            yg = y.view(B, T, Hkv, H // Hkv, D)
            vn = F.normalize(v.to(y.dtype), dim=-1).unsqueeze(3)
            coef = (yg * vn).sum(-1, keepdim=True)
            if self.cfg.xsa_gate:  # query head h = g * (H/Hkv) + j sits at [g, j] of the grouped view
                coef = coef * torch.sigmoid(self.xsa_gate).to(y.dtype).view(Hkv, H // Hkv, 1)
            y = (yg - coef * vn).view(B, T, H, D)
        if self.cfg.attn_gate == "gated":
            y = y * torch.sigmoid(self.attn_gate(h) + self.attn_gate_bias.to(h.dtype)).unsqueeze(-1).to(y.dtype)
        elif self.cfg.attn_gate == "out":
            src = x_in if self.cfg.gate_attn_src == "resid" else h
            g = 2 * torch.sigmoid(F.linear(src[..., :self.cfg.gate_width].contiguous(), self.attn_out_gate_w.to(src.dtype)))
            y = y * g.unsqueeze(-1).to(y.dtype)
        elif self.cfg.attn_gate == "sparse":
            g = torch.sigmoid(self.cfg.sparse_attn_gate_scale * F.linear(h[..., :self.cfg.gate_width].contiguous(), self.attn_gate_w.to(h.dtype)))
            y = y * g.unsqueeze(-1).to(y.dtype)
        y = y.reshape(B, T, H * D)
        # TTT adapters: "proj" on the projection's input, "o" (record #1855) from the block's normalized input
        return plus(plus(self.proj(y, p), lora_delta(ctx, "proj", y)), lora_delta(ctx, "o", h))


class MLP(nn.Module):
    def __init__(self, cfg: Config, kernels: Kernels | None = None):
        super().__init__()
        self.kernels = kernels or resolve_kernels(cfg, torch.device("cpu"))
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, "muon/mlp", ortho_init=True)
        self.proj = CastedLinear(hidden, cfg.model_dim, "muon/mlp", zero_init=cfg.proj_init == "zero", ortho_init=True)
        self.slope = cfg.leaky_slope
        self.cfg = cfg

    def forward(self, x, ctx: dict | None = None):  # one code path for every slope (0 = relu^2)
        lora = ctx.get("lora") if ctx else None
        p = ctx.get("pass") if ctx else None  # pass of a looped layer (per-loop LoRA)
        if lora and any(f"{ctx['vi']}.{t}" in lora["w"] for t in ("up", "down")):  # TTT adapters inside the MLP: torch path
            u = plus(self.fc(x, p), lora_delta(ctx, "up", x))
            a = F.leaky_relu(u, self.slope).square()
            return plus(self.proj(a, p), lora_delta(ctx, "down", a))
        dgrad = self.kernels.mlp_dgrad if torch.is_grad_enabled() else None
        if dgrad is not None:
            dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            w1, w2 = (lin.effective_weight(p).to(dt) for lin in (self.fc, self.proj))
            y = MLPFusedGrad.apply(x.to(dt).reshape(-1, x.size(-1)), w1, w2, self.slope, dgrad, None)
            return y.view(*x.shape[:-1], -1)
        return self.proj(F.leaky_relu(self.fc(x, p), self.slope).square(), p)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int, kernels: Kernels):
        super().__init__()
        dim = cfg.model_dim
        self.kernels = kernels
        self.attn, self.mlp = Attention(cfg, layer, kernels), MLP(cfg, kernels)
        if cfg.loop_lora_rank and cfg.num_loops and cfg.loop_start <= layer <= cfg.loop_end:  # one delta per pass
            gen = torch.Generator().manual_seed((torch.initial_seed() + 1009 * (layer + 1)) % 2 ** 63)  # the trunk's init is untouched
            for lin in (self.attn.c_q, self.attn.c_k, self.attn.c_v, self.attn.proj, self.mlp.fc, self.mlp.proj):
                lin.add_loop_lora(cfg.num_loops + 1, cfg.loop_lora_rank, gen)
        if cfg.proj_init == "ortho_scaled":  # PR #487: orthogonal output projections scaled by 1/sqrt(2 L)
            with torch.no_grad():
                for lin in (self.attn.proj, self.mlp.proj):
                    lin.weight.mul_((2 * cfg.num_layers) ** -0.5)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(dim), torch.zeros(dim)]))
        declare(self, attn_scale="scalar/control", mlp_scale="scalar/control", resid_mix="scalar/control")
        s = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        self.s_in, self.s_out = (s, 1.0) if cfg.ln_scale_mode == "input" else (1.0, s)

    def forward(self, x, x0, ctx):
        k = self.kernels
        x_in = self.resid_mix[0] * x + self.resid_mix[1] * x0
        x = x_in + k.scale(self.attn(rms_norm(x_in) * self.s_in, x_in, ctx), self.attn_scale * self.s_out)
        return x + k.scale(self.mlp_out(rms_norm(x) * self.s_in, ctx), self.mlp_scale * self.s_out)

    def forward_gptj(self, x, x0, ctx):
        """Single-lane parallel block (GPT-J; PR #1493/#1774): attention and MLP read the same input, both add to it."""
        k = self.kernels
        x_in = self.resid_mix[0] * x + self.resid_mix[1] * x0
        h = rms_norm(x_in) * self.s_in
        return x_in + k.scale(self.attn(h, x_in, ctx), self.attn_scale * self.s_out) + k.scale(self.mlp_out(h, ctx), self.mlp_scale * self.s_out)

    def mlp_out(self, h, ctx):  # the TTT adapter "mlp" (record #1855) reads the MLP's normalized input
        return plus(self.mlp(h, ctx), lora_delta(ctx, "mlp", h))

    def forward_parallel(self, lane0, lane1, x0, ctx, r, p):
        """Two-lane parallel residual (PR #1204/#1529): attention reads lane0, MLP reads lane1."""
        k = self.kernels
        x_in = self.resid_mix[0] * lane0 + self.resid_mix[1] * x0
        a = k.scale(self.attn(rms_norm(x_in) * self.s_in, x_in, ctx), self.attn_scale * self.s_out)
        m = k.scale(self.mlp_out(rms_norm(lane1) * self.s_in, ctx), self.mlp_scale * self.s_out)
        return k.lane_mix(lane0, lane1, a, m, r, p)


# The model's mixing math as plain expressions; the fused-gradient versions (FUSED_GRADS=1) are fused_scale,
# fused_skip_mix and fused_lane_mix below: same forward, a custom backward.
def scale(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """s * t, s per channel ([D]) or a scalar ([1]): attention / MLP output scales, U-Net skip weights, SmearGate."""
    return s * t


def skip_mix(x: torch.Tensor, skip: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gated U-Net skip: lerp(w * skip, x, sigmoid(g)), w and g per channel."""
    sg = torch.sigmoid(g)
    return sg * x + (1 - sg) * (w * skip)


def lane_mix(l0, l1, a, m, r, p) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-lane parallel residual update: lane_i' = r_i * lane_i + p_0i * attn_out + p_1i * mlp_out."""
    return r[0] * l0 + p[0, 0] * a + p[1, 0] * m, r[1] * l1 + p[0, 1] * a + p[1, 1] * m


def layer_order(cfg: Config, looping: bool, grown: bool = True) -> list[int]:
    """Virtual layer sequence: [0..s-1] + [s..e] x (NUM_LOOPS+1) + [e+1..L-1] when looping; [0..N-1] before growing."""
    L = cfg.num_layers
    if cfg.grow_layers_from and not grown:
        return list(range(cfg.grow_layers_from))
    if not (looping and cfg.num_loops > 0):
        return list(range(L))
    s, e = cfg.loop_start, cfg.loop_end
    return list(range(s)) + list(range(s, e + 1)) * (cfg.num_loops + 1) + list(range(e + 1, L))


class GPT(nn.Module):
    def __init__(self, cfg: Config, bos_id: int = 1, kernels: Kernels | None = None):
        super().__init__()
        self.cfg, self.bos_id = cfg, bos_id
        self.kernels = kernels = kernels or resolve_kernels(cfg, torch.device("cpu"))  # CPU kernels run anywhere
        V, dim, L = cfg.vocab_size, cfg.model_dim, cfg.num_layers
        self.tok_emb = nn.Embedding(V, dim)
        declare(self.tok_emb, weight="embed/tok_emb")
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(dim, V, "head/head", zero_init=True)
        declare(self, bigram_scale="scalar/control", smear_gamma="scalar/control", smear_w="scalar/control", smear_lambda="scalar/control",
                ve_scale="scalar/control", ve_layer_scales="scalar/control", vr_lambdas="scalar/control", skip_weights="scalar/control",
                skip_gates="scalar/control", parallel_resid_lambdas="scalar/control", parallel_post_lambdas="scalar/control")
        # Optional embedding-side features draw their random init from a private generator, so that
        # switching one on never shifts the init of the rest of the model (same SEED, same trunk).
        side = lambda salt: torch.Generator().manual_seed((torch.initial_seed() + salt) % 2 ** 63)
        if cfg.bigram_hash:
            # Table zero (transparent at init), projection orthogonal: the seeds' _init_weights overwrites
            # their zeros_ of this projection; with both factors zero no gradient would ever reach either.
            self.bigram_table = nn.Embedding(cfg.bigram_buckets, cfg.bigram_dim, _weight=torch.zeros(cfg.bigram_buckets, cfg.bigram_dim))
            declare(self.bigram_table, weight="embed/table")
            self.bigram_proj = CastedLinear(cfg.bigram_dim, dim, "muon/matrix", zero_init=True)
            nn.init.orthogonal_(self.bigram_proj.weight, generator=side(1))
            self.bigram_scale = nn.Parameter(torch.tensor(0.05))
        if cfg.smear_gate and cfg.smear_gate_mode == "v1":
            self.smear_gamma = nn.Parameter(torch.zeros(dim))
        elif cfg.smear_gate:
            self.smear_w = nn.Parameter(torch.zeros(1, cfg.smear_width))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.ve_layer_ids() and cfg.ve_dim > 0:
            self.ve_shared = nn.Embedding(V, cfg.ve_dim, _weight=torch.empty(V, cfg.ve_dim))
            declare(self.ve_shared, weight="embed/table")
            nn.init.normal_(self.ve_shared.weight, std=0.01, generator=side(2))
            self.ve_proj = CastedLinear(cfg.ve_dim, cfg.num_kv_heads * cfg.d_head, "muon/matrix", zero_init=True)
            self.ve_scale = nn.Parameter(torch.tensor(0.1))
            self.ve_layer_scales = nn.Parameter(torch.ones(L))  # used by the shared table only
        if cfg.value_residual:
            self.vr_lambdas = nn.Parameter(torch.full((L, 2), 0.5))
        self.blocks = nn.ModuleList(Block(cfg, i, kernels) for i in range(L))
        orders = (layer_order(cfg, False), layer_order(cfg, True), layer_order(cfg, False, grown=False))
        n_skip = max(min(len(o) // 2, len(o) - len(o) // 2) for o in orders)
        if cfg.unet_skips and n_skip:
            self.skip_weights = nn.Parameter(torch.ones(n_skip, dim))
            if cfg.skip_gates_enabled:
                self.skip_gates = nn.Parameter(torch.zeros(n_skip, dim))
        if cfg.parallel_start_layer > 0 and cfg.parallel_mode == "lanes":
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), cfg.parallel_resid_init))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
        self.register_parameter("asym_softcap", None)  # AsymLogit (c+, c-): made by add_asym_softcap at artifact load only
        self.looping_active = False
        self.grown = True  # GROW_LAYERS_FROM: the Trainer starts small and grows (eval and artifacts are full depth)
        if cfg.qat:
            enable_qat(self, cfg)

    def add_asym_softcap(self) -> GPT:
        """AsymLogit (PR #1923): learnable softcaps (c+, c-) for positive / negative logits, both LOGIT_SOFTCAP (the
        plain softcap at creation). Made after the weights are loaded, so it is neither stored nor trained in training."""
        self.asym_softcap = nn.Parameter(torch.full((2,), float(self.cfg.logit_softcap), device=self.tok_emb.weight.device))
        return self

    def set_kernels(self, kernels: Kernels) -> GPT:
        """Attend / run the MLP backward with `kernels` (resolve_kernels for the model's device), before compile."""
        for m in self.modules():
            if "kernels" in m.__dict__:
                m.kernels = kernels
        return self

    def masks(self, ids, train: bool = False, cu_seqlens: torch.Tensor | None = None, doc: bool | None = None,
              seq_len: int | None = None) -> dict:
        return self.kernels.masks(ids, self.bos_id, train, cu_seqlens, doc, seq_len)

    # -- embedding stream ------------------------------------------------------------------------
    def embed(self, ids):
        cfg = self.cfg
        x = self.tok_emb(ids)
        if cfg.bigram_hash:  # (36313*t XOR 27191*t_prev) mod (B-1); position 0 -> bucket B-1
            prev = F.pad(ids[:, :-1], (1, 0))
            h = torch.bitwise_xor(36313 * ids, 27191 * prev) % (cfg.bigram_buckets - 1)
            h[:, 0] = cfg.bigram_buckets - 1
            if cfg.smear_bos_fix or cfg.doc_attention:  # a BOS never hashes the previous document's token
                h = torch.where(ids == self.bos_id, cfg.bigram_buckets - 1, h)
            x = x + self.bigram_scale * self.bigram_proj(self.bigram_table(h))
        not_bos = (ids != self.bos_id).unsqueeze(-1) if cfg.smear_bos_fix else None
        v2 = cfg.smear_gate and cfg.smear_gate_mode == "v2"
        if v2 and cfg.smear_gate_norm == "before":
            x = self.smear_v2(x, not_bos)
        x = rms_norm(x)
        if v2 and cfg.smear_gate_norm == "after":
            x = self.smear_v2(x, not_bos)
        if cfg.smear_gate and cfg.smear_gate_mode == "v1":  # x_t = (1-g) x_t + g x_{t-1}, g = sigmoid(gamma)
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))
            g = torch.sigmoid(self.smear_gamma)
            mixed = (1 - g) * x + g * prev
            x = torch.where(not_bos, mixed, x) if not_bos is not None else mixed
        return x

    def smear_v2(self, x, not_bos):  # x_t += l * sigmoid(w x_t[:W]) x_{t-1}
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        gate = torch.sigmoid(F.linear(x[..., :self.cfg.smear_width], self.smear_w.to(x.dtype)))
        term = self.kernels.scale(gate * prev, self.smear_lambda)
        return x + (term * not_bos if not_bos is not None else term)

    def hidden(self, ids, masks=None, lora: dict | None = None):
        cfg = self.cfg
        if masks is None and cfg.eval_doc_attention_on:  # document masks depend on the batch: build them when not given
            masks = self.masks(ids)
        x = self.embed(ids)
        x0 = x
        ctx: dict = {"ids": ids, "masks": masks, "lora": lora, "vi": 0}
        if cfg.value_residual:
            ctx["vr_lambdas"] = self.vr_lambdas
        if cfg.ve_layer_ids() and cfg.ve_dim > 0:
            ctx["ve_layer_scales"] = self.ve_layer_scales
            ctx["ve_shared"] = self.ve_scale * self.ve_proj(self.ve_shared(ids))
        order = layer_order(cfg, self.looping_active, self.grown)
        n_enc = len(order) // 2
        skips: list = []
        lanes = None
        for vi, li in enumerate(order):
            block = self.blocks[li]
            ctx["vi"] = vi  # TTT adapters are per virtual layer (a looped block gets one per pass)
            ctx["pass"] = order[:vi].count(li)  # per-loop LoRA: the how-manieth visit of this block
            if vi >= n_enc:
                j = vi - n_enc
                parallel = cfg.parallel_start_layer > 0 and li >= cfg.parallel_start_layer and cfg.parallel_mode == "lanes"
                if parallel and lanes is None and cfg.parallel_skip == "lane0":
                    lanes = (x, x)  # split first: the skip below enters lane 0 only
                if cfg.unet_skips and skips and j < self.skip_weights.size(0):
                    tgt = lanes[0] if lanes is not None else x
                    if cfg.skip_gates_enabled:  # lerp(w*skip, x, sigmoid(g))
                        tgt = self.kernels.skip_mix(tgt, skips.pop(), self.skip_weights[j], self.skip_gates[j])
                    else:
                        tgt = tgt + self.kernels.scale(skips.pop(), self.skip_weights[j])
                    if lanes is not None:
                        lanes = (tgt, lanes[1])
                    else:
                        x = tgt
                if parallel:
                    if lanes is None:
                        lanes = (x, x)
                    lanes = block.forward_parallel(lanes[0], lanes[1], x0, ctx, self.parallel_resid_lambdas[li], self.parallel_post_lambdas[li])
                    continue
            if lanes is not None:  # a sequential block after parallel ones: merge the lanes first
                x, lanes = (lanes[0] + lanes[1]) * 0.5, None
            gptj = cfg.parallel_mode == "gptj" and 0 < cfg.parallel_start_layer <= li
            x = block.forward_gptj(x, x0, ctx) if gptj else block(x, x0, ctx)
            if vi < n_enc:
                skips.append(x)
        if lanes is not None:
            x = (lanes[0] + lanes[1]) * 0.5
        return rms_norm(x)

    def logits_from_hidden(self, h, lora: dict | None = None):
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.effective_weight()
        logits = plus(F.linear(h, w.to(h.dtype)), lora_delta({"lora": lora}, "head", h)).float()
        c = self.cfg.logit_softcap
        if self.asym_softcap is not None:  # c+ where z >= 0, c- below (one tanh: the cap is picked per logit)
            c = torch.where(logits >= 0, self.asym_softcap[0], self.asym_softcap[1])
            return c * torch.tanh(logits / c)
        return c * torch.tanh(logits / c) if c > 0 else logits

    def forward_logits(self, ids, masks=None, lora: dict | None = None):
        return self.logits_from_hidden(self.hidden(ids, masks, lora), lora)

    def forward(self, ids, targets, masks=None, reduction: str = "mean", lora: dict | None = None, hint=None):
        if self.kernels.ce is not None and reduction == "mean" and lora is None and hint is None and self.asym_softcap is None:
            # CE_KERNEL=triton: the bf16 logits go to one kernel each way (no fp32 [tokens x vocab] copy)
            h = self.hidden(ids, masks, None)
            w = self.tok_emb.weight if self.lm_head is None else self.lm_head.effective_weight()
            logits = F.linear(h, w.to(h.dtype))
            return self.kernels.ce(logits.view(-1, logits.size(-1)), targets.reshape(-1), float(self.cfg.logit_softcap))[0].mean()
        logits = self.forward_logits(ids, masks, lora)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        loss = loss if reduction == "mean" else loss.view(targets.shape)
        if hint is None:
            return loss
        # n-gram tilt (NgramTilt): also -log p(hint) per position, from the same logits
        return loss, torch.logsumexp(logits, -1) - logits.gather(-1, hint.unsqueeze(-1)).squeeze(-1)


def enable_qat(model: GPT, cfg: Config) -> None:
    """Give every block matrix that the artifact quantizes its spec (from quant_plan) and a 0-d mix buffer (0 = off)."""
    plan = quant_plan(cfg, param_roles(model))
    for name, mod in model.blocks.named_modules(prefix="blocks"):
        if isinstance(mod, CastedLinear):
            spec = plan(f"{name}.weight", mod.weight)
            if spec[0] in ("gptq", "rtn", "int8_row"):
                mod.qat = spec
                mod.register_buffer("qat_mix", torch.zeros(()), persistent=False)


@torch.no_grad()
def set_qat(model: GPT, on: bool) -> int:
    """Switch QAT on or off in place (a buffer value: a compiled graph stays valid); returns the number of weights."""
    mods = [m for m in model.modules() if isinstance(m, CastedLinear) and m.qat is not None]
    for m in mods:
        m.qat_mix.fill_(1.0 if on else 0.0)
    return len(mods)


def fake_quant(w: torch.Tensor, spec: tuple) -> torch.Tensor:
    """The artifact's round trip of one weight: RTN on its SDClip grid (the GPTQ grid too: GPTQ itself is not
    differentiable), or the int8 rows of QUANT=int8; in w's dtype."""
    if spec[0] == "int8_row":
        q, sc = quantize_int8_rows(w, *map(float, spec[1:3]))
    else:
        q, sc = quantize_rtn(w, int(spec[1]), float(spec[2]))
    return dequantize(q, sc, w.dtype)


@torch.no_grad()
def grow_layers(model: GPT, opts: Optimizers | None = None, averagers=()) -> list[int]:
    """Progressive growing: block i of the full depth L becomes a copy of block i*N//L of the N trained ones, so each
    small layer is stacked ~L/N times in order (0,0,1,1,...). Its optimizer state and EMA/SWA shadow move with it;
    a tensor the source block lacks (a per-layer feature) keeps its own. Returns the source of every block."""
    N, L = model.cfg.grow_layers_from, model.cfg.num_layers
    src = [i * N // L for i in range(L)]
    pairs = []  # (dst, src) parameters
    for i, j in enumerate(src):
        have = dict(model.blocks[j].named_parameters())
        pairs += [(p, have[n]) for n, p in model.blocks[i].named_parameters() if n in have and have[n].shape == p.shape and i != j]
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)  # noqa: E731
    states = [(o.state, {id(ps): {k: clone(v) for k, v in o.state[ps].items()} for _, ps in pairs if ps in o.state})
              for o in (opts.opts if opts is not None else [])]
    index = {id(p): k for k, p in enumerate(model.parameters())}
    shadows = [(a.shadow, {id(ps): a.shadow[index[id(ps)]].clone() for _, ps in pairs}) for a in averagers]
    weights = {id(ps): ps.detach().clone() for _, ps in pairs}  # snapshot first: a block can be a source and a target
    for pd, ps in pairs:
        pd.copy_(weights[id(ps)])
        for state, snap in states:
            state.pop(pd, None)
            if id(ps) in snap:
                state[pd] = snap[id(ps)]
        for shadow, snap in shadows:
            shadow[index[id(pd)]].copy_(snap[id(ps)])
    model.grown = True
    return src


@torch.no_grad()
def bake_shared_heads(model: GPT):
    """SHD: write the tied rows into the raw weights and switch the tie off, so the stored matrices
    hold identical shared rows (compressible) and the forward uses them directly. Idempotent."""
    for m in model.modules():
        if isinstance(m, CastedLinear) and m.shared:
            m.weight.copy_(tie_shared_rows(m.weight, *m.shared))
            m.shared = None


# ----------------------------------------------------------------------------------------------
# OPTIMIZERS: Muon (Polar-Express Newton-Schulz, Nesterov, MuonEq-R, decoupled WD) for block
# matrices, AdamW for embeddings / head / scalars. Each rank orthogonalizes only its share of the
# matrices; one all-reduce combines the updates (PR #1394 scheme).
# ----------------------------------------------------------------------------------------------

POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
STOCK_NS = [(3.4445, -4.7750, 2.0315)]


def newton_schulz(G: torch.Tensor, steps: int, coeffs: tuple) -> torch.Tensor:
    """Approximate the orthogonal polar factor of G [..., m, n] (bf16 on CUDA, fp32 on CPU); a leading batch
    dim orthogonalizes each matrix on its own (Muon stacks same-shape matrices to cut kernel launches)."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for i in range(steps):
        a, b, c = coeffs[i % len(coeffs)]
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum, backend_steps, row_normalize, weight_decay, coeffs, rank=0, world=1, ns_fn=None):
        super().__init__(params, dict(lr=lr, base_lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.backend_steps, self.row_normalize, self.coeffs = backend_steps, row_normalize, tuple(coeffs)
        self.rank, self.world = rank, world
        self.ns = ns_fn or newton_schulz

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16 if params[0].is_cuda else torch.float32)
            views = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params)]
            owned = [i for i in range(len(params)) if i % self.world == self.rank]  # rank-sharded orthogonalization
            if owned:
                for i in owned:
                    if "momentum_buffer" not in self.state[params[i]]:
                        self.state[params[i]]["momentum_buffer"] = torch.zeros_like(params[i])
                grads = [params[i].grad for i in owned]
                bufs = [self.state[params[i]]["momentum_buffer"] for i in owned]
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads)
                nesterov = torch._foreach_add(grads, bufs, alpha=mom)
                by_shape: dict[tuple, list[int]] = {}  # shape -> positions in `owned`
                for k, i in enumerate(owned):
                    by_shape.setdefault(tuple(params[i].shape), []).append(k)
                for shape, ks in by_shape.items():  # one batched Newton-Schulz per matrix shape
                    u = torch.stack([nesterov[k] for k in ks])
                    if self.row_normalize:
                        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                    u = self.ns(u, self.backend_steps, self.coeffs) * math.sqrt(max(1.0, shape[0] / shape[1]))
                    for u_k, k in zip(u, ks):
                        views[owned[k]].copy_(u_k)
            if self.world > 1:
                dist.all_reduce(flat)
            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, [v.to(p.dtype) for v, p in zip(views, params)], alpha=-lr)


def param_groups(model: GPT) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters by their declared optimizer group (muon / embed / head / scalar)."""
    roles = param_roles(model)
    groups: dict[str, list] = {g: [] for g in ROLE_OPT}
    for name, p in model.named_parameters():
        groups[roles[name][0]].append((name, p))
    return groups


class Optimizers:
    """All optimizers of a run; `step(lr_mul, step)` applies the schedule and momentum warmup."""

    def __init__(self, model: GPT, cfg: Config, rank=0, world=1, ns_fn=None):
        self.cfg = cfg
        g = param_groups(model)
        fused = dict(fused=True) if next(model.parameters()).is_cuda else {}
        adam = lambda params, lr, wd: torch.optim.AdamW([dict(params=params, lr=lr, base_lr=lr)], betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=wd, **fused)
        embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
        self.opts: list[torch.optim.Optimizer] = []
        self.muon = None
        if g["muon"]:
            coeffs = POLAR_EXPRESS if cfg.muon_ns_coeffs == "polar" else STOCK_NS
            self.muon = Muon([p for _, p in g["muon"]], cfg.matrix_lr, cfg.muon_momentum, cfg.muon_backend_steps, cfg.muon_row_normalize, cfg.muon_wd, coeffs, rank, world, ns_fn)
            self.opts.append(self.muon)
        if g["embed"]:
            self.opts.append(adam([p for _, p in g["embed"]], embed_lr, cfg.embed_wd))
        if g["head"]:
            self.opts.append(adam([p for _, p in g["head"]], cfg.head_lr, cfg.embed_wd))
        if g["scalar"]:
            self.opts.append(adam([p for _, p in g["scalar"]], cfg.scalar_lr, cfg.adam_wd))

    def step(self, lr_mul: float, step: int, progress: float = 0.0):
        cfg = self.cfg
        for opt in self.opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mul
        if self.muon is not None and cfg.muon_wd_schedule == "linear":  # progress: fraction of the run done
            for group in self.muon.param_groups:
                group["weight_decay"] = cfg.muon_wd * max(0.0, 1.0 - progress)
        if self.muon is not None:
            w = min(1.0, step / cfg.muon_momentum_warmup_steps) if cfg.muon_momentum_warmup_steps > 0 else 1.0
            for group in self.muon.param_groups:
                group["momentum"] = (1 - w) * cfg.muon_momentum_warmup_start + w * cfg.muon_momentum
        for opt in self.opts:
            opt.step()

    def zero_grad(self):
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)

    def state_dict(self):
        return [opt.state_dict() for opt in self.opts]

    def load_state_dict(self, states):
        for opt, s in zip(self.opts, states):
            opt.load_state_dict(s)


def lr_multiplier(cfg: Config, frac: float, step: int, avg_step_ms: float, remaining_ms: float) -> float:
    """Flat, then linear warmdown over the last WARMDOWN_FRAC of training (by wallclock), floored at
    MIN_LR. WARMDOWN_ITERS>0 instead counts the last N steps, converted to time by the step time."""
    if cfg.warmdown_iters > 0:
        if cfg.max_wallclock_seconds > 0:
            span = cfg.warmdown_iters * max(avg_step_ms, 1e-6)
            mul = remaining_ms / span if remaining_ms < span else 1.0
        else:
            left = cfg.iterations - step
            mul = left / cfg.warmdown_iters if left < cfg.warmdown_iters else 1.0
    elif cfg.warmdown_frac <= 0 or frac < 1 - cfg.warmdown_frac:
        return 1.0
    else:
        mul = (1 - frac) / cfg.warmdown_frac
    if cfg.warmdown_shape == "cosine":
        mul = 0.5 * (1 - math.cos(math.pi * min(max(mul, 0.0), 1.0)))
    return max(mul, cfg.min_lr)


class EMA:
    """fp32 shadow of every parameter, e <- d*e + (1-d)*w after each step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params] if self.params[0].dtype != torch.float32 else [p.detach() for p in self.params], 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s.to(p.dtype))

    @torch.no_grad()
    def restart(self):  # late start: the shadow begins at the live weights
        torch._foreach_copy_(self.shadow, [p.detach().float() for p in self.params])


class SWA(EMA):
    """Stochastic weight averaging: the running mean of the weights at the sampled steps (fp32)."""

    def __init__(self, model: nn.Module):
        super().__init__(model, 0.0)
        self.samples = 0

    @torch.no_grad()
    def update(self):
        self.samples += 1
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 / self.samples)

# ----------------------------------------------------------------------------------------------
# TRAINING LOOP: compile warmup (rolled back), wallclock-driven LR schedule, EMA, lagged all-reduced
# stop flag (all ranks stop on the same step, no per-step host sync), NaN abort, periodic val.
# ----------------------------------------------------------------------------------------------

class TrainingError(RuntimeError):
    pass


class Logger:
    """key:value lines to stdout and RUN_DIR/train.log (rank 0 only)."""

    def __init__(self, path: Path | None, rank: int):
        self.path, self.rank = path, rank

    @staticmethod
    def fmt(v) -> str:
        if isinstance(v, bool):
            return str(int(v))
        if isinstance(v, float):
            if v != 0 and abs(v) < 1e-4:  # ADAM_EPS=1e-8 must not print as 0.000000
                return f"{v:.6g}"
            return f"{v:.6f}" if abs(v) < 1e5 else f"{v:.1f}"
        return str(v).replace(" ", "_").replace("\n", "_")

    @classmethod
    def line(cls, event: str, **kv) -> str:
        return " ".join([f"event:{event}"] + [f"{k}:{cls.fmt(v)}" for k, v in kv.items()])

    def __call__(self, event: str, **kv):
        if self.rank != 0:
            return
        self.raw(self.line(event, **kv))

    def raw(self, line: str):
        if self.rank != 0:
            return
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def train_warmup_plan(cfg: Config) -> list[tuple[int, bool, bool]]:
    """Every (sequence length, looping, grown) variant of the forward the timed loop can meet, in training order: the
    compile warmup runs each, so no TRAIN_SEQ_SCHEDULE change, loop switch or growth compiles inside the timer. Each
    switch is a step function of the training fraction, so the variants are the states at 0 and at every switch point."""
    loop_at = cfg.enable_looping_at if cfg.num_loops > 0 else math.inf
    grow_at = cfg.grow_at_frac if cfg.grow_layers_from else 0.0
    cuts = sorted({0.0, loop_at, grow_at, *(start for _, start in cfg.train_seq_phases())} - {math.inf})
    return list(dict.fromkeys((cfg.train_seq_len_at(f), f >= loop_at, f >= grow_at) for f in cuts))


def autocast_ctx(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class Trainer:
    """Owns the model, its compiled/DDP wrappers, optimizers, EMA and the training data stream."""

    def __init__(self, cfg: Config, model: GPT, device, rank: int, world: int, train_files: list[str], log: Logger):
        self.cfg, self.model, self.device, self.rank, self.world, self.log = cfg, model, device, rank, world, log
        if model.kernels.device != torch.device(device):  # a model built without them: this device's kernels, before compile
            model.set_kernels(resolve_kernels(cfg, device))
        self.accum = cfg.grad_accum_steps or max(1, 8 // world)
        err = cfg.batch_split_error(world, self.accum)
        if err:
            raise ConfigError(err)
        self.local_tokens = cfg.train_batch_tokens // (world * self.accum)
        self.seq_len = cfg.train_seq_phases()[0][0]  # the training length in force (TRAIN_SEQ_SCHEDULE)
        self.train_files = train_files
        use_compile = cfg.compile and device.type == "cuda"
        ns_fn = torch.compile(newton_schulz) if use_compile else None
        self.fwd = torch.compile(model, dynamic=False) if use_compile else model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.fwd = DDP(self.fwd, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False, gradient_as_bucket_view=True,
                           find_unused_parameters=bool(cfg.grow_layers_from))  # the layers not yet grown get no gradient
        self.opts = Optimizers(model, cfg, rank, world, ns_fn)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_enabled else None
        self.ema_live = False  # EMA_START_FRAC: the shadow restarts from the weights when training reaches it
        self.qat_on = False  # QAT: switched on (buffers) when training reaches QAT_START_FRAC
        model.grown = not cfg.grow_layers_from  # GROW_LAYERS_FROM: start with the first N layers
        self.ungrown = [p for b in model.blocks[cfg.grow_layers_from:] for p in b.parameters()] if cfg.grow_layers_from else []
        self.swa = SWA(model) if cfg.swa_enabled else None
        self.loader = self.new_loader()

    def new_loader(self):
        doc = (self.model.bos_id, self.seq_len) if self.cfg.doc_attention else None
        return DistributedLoader(self.train_files, self.rank, self.world, self.local_tokens, self.seq_len, self.device,
                                 self.cfg.prefetch_batches, doc=doc, vocab_size=self.cfg.vocab_size)

    def set_seq_len(self, seq_len: int):
        self.seq_len = seq_len
        self.loader.set_seq_len(seq_len)

    @property
    def rows(self) -> int:  # rows of a micro-batch on one rank (DOC_ATTENTION: one packed row)
        return 1 if self.cfg.doc_attention else self.local_tokens // self.seq_len

    def forward_backward(self, x, y, cu, div: int) -> torch.Tensor:
        with autocast_ctx(self.device):
            loss = self.fwd(x, y, self.model.masks(x, train=True, cu_seqlens=cu, seq_len=self.seq_len))
        (loss / div).backward()
        return loss.detach()

    def step(self, step: int, lr_mul: float, progress: float = 0.0) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y, cu = self.loader.next()
            sync = self.fwd.no_sync() if (self.world > 1 and micro < self.accum - 1) else contextlib.nullcontext()
            with sync:
                total += self.forward_backward(x, y, cu, self.accum)
        if not self.model.grown:  # layers not grown yet take no step (DDP may hand them zero gradients: no decay either)
            for p in self.ungrown:
                p.grad = None
        if self.cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        self.opts.step(lr_mul, step, progress)
        self.opts.zero_grad()
        if self.ema is not None:
            if self.cfg.ema_start_frac <= 0:
                self.ema.update()
            elif not self.ema_live and progress >= self.cfg.ema_start_frac:
                self.ema.restart()
                self.ema_live = True
            elif self.ema_live:
                self.ema.update()
        if self.swa is not None and lr_mul < self.cfg.swa_start_lr and step % self.cfg.swa_every == 0:
            self.swa.update()
        return total / self.accum

    def warmup(self):
        """Prime torch.compile on real steps for every (length, loop mode, depth) variant of train_warmup_plan, then
        restore every state and the loader."""
        cfg = self.cfg
        if cfg.warmup_steps <= 0:
            return
        model_state = copy.deepcopy(self.model.state_dict())
        opt_state = copy.deepcopy(self.opts.state_dict())
        plan = train_warmup_plan(cfg)
        t0 = time.perf_counter()
        for seq_len, looping, grown in plan:
            self.set_seq_len(seq_len)
            self.model.looping_active, self.model.grown = looping, grown
            for i in range(cfg.warmup_steps):
                self.step(i, 1.0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.model.load_state_dict(model_state)
        self.opts.load_state_dict(opt_state)
        self.model.looping_active, self.model.grown = False, not cfg.grow_layers_from
        if self.ema is not None:
            self.ema, self.ema_live = EMA(self.model, cfg.ema_decay), False
        if self.swa is not None:
            self.swa = SWA(self.model)
        self.loader.close()
        self.seq_len = cfg.train_seq_phases()[0][0]
        self.loader = self.new_loader()
        extra = dict(plan=",".join(f"{L}/{'on' if lp else 'off'}" for L, lp, _ in plan)) if cfg.train_seq_schedule.strip() else {}
        self.log("warmup", steps=cfg.warmup_steps, loop_modes=len({(lp, gr) for _, lp, gr in plan}), steps_run=cfg.warmup_steps * len(plan),
                 seconds=time.perf_counter() - t0, rolled_back=1, **extra)

    def hard_stop_margin_ms(self, elapsed_ms: float, steps: int) -> float:
        """What must still fit in MAX_WALLCLOCK_SECONDS after this step: one more step (the stop flag is read a step
        late) and the GPTQ Hessian pass, estimated as GPTQ_CALIBRATION_BATCHES micro-steps. With the default reserve
        (8 s) this never binds; with GPTQ_RESERVE_SECONDS=0 it is what keeps train + Hessians inside the budget."""
        step_ms = elapsed_ms / max(steps, 1)
        hess_ms = step_ms / self.accum * self.cfg.gptq_calibration_batches if self.cfg.quant == "gptq" else 0.0
        return 2 * step_ms + hess_ms

    def train(self, evaluate: Callable[[], tuple[float, float]] | None) -> dict:
        cfg, dev = self.cfg, self.device
        budget_ms = 1000 * (cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds) if cfg.max_wallclock_seconds > 0 else 0.0
        tokens_per_step = cfg.train_batch_tokens
        train_ms, step, last_log_t, last_log_step = 0.0, 0, None, 0
        nonfinite = torch.zeros((), device=dev, dtype=torch.bool)
        pending = None  # (flag tensor, async work) of the previous step
        stop_reason = "iterations"
        scheduled, seq_changed = bool(cfg.train_seq_schedule.strip()), None  # seq_changed: step of the last length change
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        last_log_t = t0
        while True:
            elapsed_ms = train_ms + 1000 * (time.perf_counter() - t0)
            frac = elapsed_ms / budget_ms if budget_ms > 0 else step / cfg.iterations
            if cfg.num_loops > 0 and not self.model.looping_active and frac >= cfg.enable_looping_at:
                self.model.looping_active = True
                self.log("layer_loop", enabled=1, step=step, frac=frac)
            if scheduled and (step == 0 or cfg.train_seq_len_at(frac) != self.seq_len):
                self.set_seq_len(cfg.train_seq_len_at(frac))
                seq_changed = step if step > 0 else None  # the first length is no change: no re-warm
                self.log("seq_len", step=step, seq_len=self.seq_len, rows=self.rows, frac=frac)
            if not self.model.grown and frac >= cfg.grow_at_frac:
                src = grow_layers(self.model, self.opts, [a for a in (self.ema, self.swa) if a is not None])
                self.log("grow", step=step, frac=frac, layers_from=cfg.grow_layers_from, layers_to=cfg.num_layers,
                         source=",".join(map(str, src)))
            if cfg.qat and not self.qat_on and frac >= cfg.qat_start_frac:
                self.qat_on = True
                n = set_qat(self.model, True)
                self.log("qat", enabled=1, step=step, frac=frac, weights=n, quant=cfg.quant, bits=8 if cfg.quant == "int8" else cfg.matrix_bits)
                if not n:
                    self.log("warning", msg="QAT=1 but no block matrix is quantized (all are <= 65,536 elements or FP16_TENSORS): QAT changes nothing")
            avg_ms = elapsed_ms / max(step, 1)
            lr_mul = lr_multiplier(cfg, frac, step, avg_ms, budget_ms - elapsed_ms)
            if seq_changed is not None and step - seq_changed < cfg.seq_change_warmup_steps:  # re-warm after a length change
                lr_mul *= (step - seq_changed + 1) / cfg.seq_change_warmup_steps
            loss = self.step(step, lr_mul, frac)
            nonfinite |= ~torch.isfinite(loss)
            step += 1
            elapsed_ms = train_ms + 1000 * (time.perf_counter() - t0)
            out_of_time = budget_ms > 0 and (elapsed_ms >= budget_ms or elapsed_ms + self.hard_stop_margin_ms(
                elapsed_ms, step) >= 1000 * cfg.max_wallclock_seconds)
            flag = torch.stack([torch.tensor(float(out_of_time), device=dev), nonfinite.float()])
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True) if self.world > 1 else None
            if step % cfg.train_log_every == 0 or step == 1:
                if self.world > 1:  # log the global mean loss, not rank 0's share
                    loss = loss.clone()
                    dist.all_reduce(loss)
                    loss /= self.world
                lv = loss.item()
                now = time.perf_counter()
                dt = (now - last_log_t) / max(step - last_log_step, 1)
                last_log_t, last_log_step = now, step
                elapsed_s = (train_ms + 1000 * (now - t0)) / 1000
                budget = dict(remaining_s=budget_ms / 1000 - elapsed_s) if budget_ms else {}  # absent without a wallclock cap
                self.log("train", step=step, max_steps=cfg.iterations, loss=lv, lr_mul=lr_mul, ms_step=1000 * dt, tok_s=tokens_per_step / dt,
                         elapsed_s=elapsed_s, **budget)
            if cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0 and evaluate is not None:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                train_ms += 1000 * (time.perf_counter() - t0)
                vl, vb = evaluate()
                self.log("val", step=step, val_loss=vl, val_bpb=vb, elapsed_s=train_ms / 1000)
                t0 = time.perf_counter()
                last_log_t = t0
            # Read the PREVIOUS step's flag (its GPU work is long done), so the host never waits on this step.
            # The step count is known on every rank without a sync: ITERATIONS stops on exactly that step
            # (this step's NaN check still runs first).
            if dev.type != "cuda" or step >= cfg.iterations:
                pending = (flag, work)
            if pending is not None:
                f, w = pending
                if w is not None:
                    w.wait()
                stop, bad = f.tolist()
                if bad:
                    raise TrainingError(f"loss became NaN/inf by step {step}: training diverged (try a lower MATRIX_LR/TIED_EMBED_LR or GRAD_CLIP_NORM>0)")
                if stop or step >= cfg.iterations:
                    stop_reason = "wallclock" if stop else "iterations"
                    break
            pending = (flag, work)
        if work is not None:  # the last step's flag reduction is still in flight after the break
            work.wait()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        train_ms += 1000 * (time.perf_counter() - t0)
        self.loader.close()
        ms_step = train_ms / max(step, 1)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else None
        self.log("stop", step=step, train_s=train_ms / 1000, reason=stop_reason, ms_step=ms_step,
                 tok_s=tokens_per_step / (ms_step / 1000), peak_mem_gib=peak if peak is not None else "na")
        return dict(steps=step, train_seconds=train_ms / 1000, ms_per_step=ms_step, tokens_per_s=tokens_per_step / (ms_step / 1000),
                    peak_mem_gib=peak, stop_reason=stop_reason)


# ----------------------------------------------------------------------------------------------
# ARTIFACT: SDClip scales, RTN and GPTQ (int2..int8, symmetric, per-row fp16 scales), int8 gates,
# LQER low-rank error correction, the state-dict driver. Nothing here knows the model: callers pass
# names, plans and Hessians (H = sum X^T X over the *input* columns of each weight, shape (cols, cols)).
# The byte containers and codecs are appendices B and C.
# ----------------------------------------------------------------------------------------------

_FP16_TINY, _FP16_MAX = 2.0 ** -24, 65504.0  # smallest positive / largest finite fp16


def _qmax(bits: int) -> int:
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 2..8 (int8 container), got {bits}")
    return (1 << (int(bits) - 1)) - 1


def _as_rows(W: torch.Tensor) -> torch.Tensor:
    """View any >=1-d tensor as (rows, last_dim): the unit that gets one scale."""
    if W.ndim == 0:
        raise ValueError("cannot row-quantize a 0-d tensor")
    return W.reshape(1, -1) if W.ndim == 1 else W.reshape(-1, W.shape[-1])


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """Cast scales to fp16 without ever producing 0/inf/nan (a zero scale would make q = w/0)."""
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.clamp(_FP16_TINY, _FP16_MAX).to(torch.float16)


def sdclip_scales(W: torch.Tensor, bits: int, clip_sigmas: float) -> torch.Tensor:
    """SDClip: s_r = k*std(W_r)/qmax per row, as fp16 (shape (rows,)).

    The clip is a multiple of the row std rather than an MSE search because the entropy of the
    quantized values (hence compressed size) falls monotonically with k. Constant rows (std=0)
    fall back to absmax/qmax; all-zero rows get scale 1 (every q is 0 anyway).
    """
    qmax = _qmax(bits)
    W2 = _as_rows(W.detach()).float()
    std = W2.std(dim=1) if W2.shape[1] > 1 else torch.zeros(W2.shape[0], device=W2.device)
    s = float(clip_sigmas) * std / qmax
    absmax = W2.abs().amax(dim=1) if W2.shape[1] else torch.zeros_like(s)
    return _fp16_scale(torch.where(torch.isfinite(s) & (s > 0), s, absmax / qmax))


def _round_to_grid(W2: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int | None = None):
    # Always divide by the *fp16-rounded* scale so that dequantization q*s is the exact grid.
    s = scale.to(W2.dtype).reshape(-1, 1)
    return torch.clamp(torch.round(W2 / s), -qmax if qmin is None else qmin, qmax)


def quantize_rtn(W: torch.Tensor, bits: int, clip_sigmas: float):
    """Round-to-nearest on the SDClip grid -> (q int8 with W's shape, scale fp16 (rows,))."""
    scale = sdclip_scales(W, bits, clip_sigmas)
    q = _round_to_grid(_as_rows(W.detach()).float(), scale, _qmax(bits))
    return q.to(torch.int8).reshape(W.shape), scale


def quantize_absmax_rows(W: torch.Tensor, bits: int = 8):
    """Per-row absmax quantization (scale = rowmax/qmax): used for small gate matrices."""
    qmax = _qmax(bits)
    W2 = _as_rows(W.detach()).float()
    scale = _fp16_scale(W2.abs().amax(dim=1) / qmax if W2.shape[1] else W2.new_ones(W2.shape[0]))
    return _round_to_grid(W2, scale, qmax).to(torch.int8).reshape(W.shape), scale


def row_percentile(a: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per-row percentile of a (rows, cols) with linear interpolation between order statistics (torch.quantile's
    default), by sort: torch.quantile refuses inputs of more than 2^24 elements (a large embedding)."""
    srt = a.sort(dim=1).values
    # the rank in fp32 as torch.quantile computes it; numpy, not a tensor, so a compiled QAT forward needs no host sync
    pos = np.float32(percentile / 100.0) * np.float32(a.size(1) - 1)
    lo = min(int(np.floor(pos)), a.size(1) - 1)
    hi = min(lo + 1, a.size(1) - 1)
    return torch.lerp(srt[:, lo], srt[:, hi], float(pos - np.float32(lo)))


def quantize_int8_rows(W: torch.Tensor, percentile: float = 100.0, floor: float = 0.0):
    """The baseline script's int8: each row clipped at the `percentile`-th percentile of |w|, scale = max(clip/127,
    floor). Absmax without a floor (100 or 0, 0) is quantize_absmax_rows, unchanged."""
    if percentile in (0.0, 100.0) and floor <= 0:
        return quantize_absmax_rows(W, 8)
    W2 = _as_rows(W.detach()).float()
    clip = W2.abs().amax(dim=1) if percentile in (0.0, 100.0) or W2.shape[1] < 2 else row_percentile(W2.abs(), percentile)
    scale = _fp16_scale(torch.clamp(clip / 127, min=floor))
    W2 = torch.minimum(torch.maximum(W2, -clip[:, None]), clip[:, None])
    return _round_to_grid(W2, scale, 127).to(torch.int8).reshape(W.shape), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    """q*s with one scale per row (last dim). Exact in fp32: |q|<=127 times an fp16 scale."""
    s = scale.to(torch.float32).reshape(*q.shape[:-1], 1) if q.ndim >= 1 else scale.float()
    return (q.to(torch.float32) * s).to(dtype)


def awq_hi_scale(scale: torch.Tensor, bits: int, hi_bits: int) -> torch.Tensor:
    """AWQ-lite: the per-row step of the high-precision columns, fp32 (rows,): the row's own clip range (qmax * s)
    on the finer grid of hi_bits. Derived from the stored fp16 scale, so the artifact stores no second scale."""
    return scale.float() * (_qmax(bits) / _qmax(hi_bits))


def awq_salient_groups(W: torch.Tensor, H: torch.Tensor, group_size: int, top_k: int) -> list[int]:
    """AWQ-lite saliency (PR #1908): input column j scores sqrt(H_jj) * mean_r |W_rj| (its activation RMS, H = E[x x^T] up
    to a constant, times its weight magnitude); a group of `group_size` consecutive columns scores the sum over its
    columns. Returns the indices of the top_k groups (ties to the lower index), ascending."""
    cols = W.shape[1]
    score = H.detach().diagonal().double().clamp_min(0).sqrt().to(W.device) * W.detach().double().abs().mean(0)
    n_groups = -(-cols // group_size)
    per_group = F.pad(score, (0, n_groups * group_size - cols)).view(n_groups, group_size).sum(1)
    return sorted(torch.argsort(per_group, descending=True, stable=True)[:top_k].tolist())


def awq_columns(groups: list[int], group_size: int, cols: int) -> torch.Tensor:
    """The input columns of AWQ-lite groups (the last group may be short)."""
    return torch.tensor([j for g in groups for j in range(g * group_size, min((g + 1) * group_size, cols))], dtype=torch.long)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, clip_sigmas: float,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = True,
                  max_retries: int = 4, math_dtype: torch.dtype = torch.float64,
                  return_info: bool = False, hi_cols: torch.Tensor | None = None, hi_bits: int = 8):
    """GPTQ (Frantar et al.) on the SDClip grid -> (q int8 (rows, cols), scale fp16 (rows,)).

    W: (rows, cols) weight used as y = x @ W.T;  H: (cols, cols) ~ sum of x^T x (any float
    dtype/device, only its relative scale matters). Runs on W's device in `math_dtype`
    (float64 default: no TF32 surprises, deterministic, cheap at these sizes).
    If the Cholesky of H+damping fails, damping is multiplied by 10 up to `max_retries` times;
    if it still fails (or H/W are non-finite) we fall back to RTN on the same grid.
    hi_cols (AWQ-lite): input columns quantized at hi_bits with step awq_hi_scale; the error feedback is the
    same for every column (the OBS update holds for any per-column grid), so the other columns absorb their error too.
    With return_info=True also returns {"damp": relative damping used, "retries", "fallback"}.
    """
    if W.ndim != 2:
        raise ValueError(f"gptq_quantize needs a 2-d weight, got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight cols {cols}")
    qmax, dev = _qmax(bits), W.device
    scale = sdclip_scales(W, bits, clip_sigmas)  # std of the original, unpermuted row
    info = {"damp": None, "retries": 0, "fallback": None}

    hi = torch.zeros(cols, dtype=torch.bool, device=dev)
    if hi_cols is not None:
        hi[hi_cols.to(dev)] = True
    qmax_hi = _qmax(hi_bits)

    def fallback(reason):
        q, s = quantize_rtn(W, bits, clip_sigmas)
        if hi.any():  # the same mixed grid, rounded to nearest
            s_hi = awq_hi_scale(s, bits, hi_bits).to(dev).unsqueeze(1)
            q[:, hi] = torch.clamp(torch.round(W.detach().float()[:, hi] / s_hi), -qmax_hi, qmax_hi).to(torch.int8)
        info["fallback"] = reason
        return (q, s, info) if return_info else (q, s)

    if rows == 0 or cols == 0:
        return fallback(None)
    Wf = W.detach().to(dev, math_dtype).clone()
    Hf = H.detach().to(dev, math_dtype).clone()
    if not (torch.isfinite(Hf).all() and torch.isfinite(Wf).all()):
        return fallback("non-finite H or W")

    # 1. Dead inputs (never activated): give them unit curvature and a zero weight.
    diag = Hf.diagonal()
    dead = torch.nonzero(diag == 0).squeeze(1)
    Hf[dead, dead] = 1.0
    Wf[:, dead] = 0.0
    # 2-3. Damping is relative to the mean curvature; act-order = most salient columns first
    # (stable sort keeps ties deterministic).
    mean_diag = float(diag.mean())
    base = mean_diag if math.isfinite(mean_diag) and mean_diag > 0 else 1.0
    perm = (torch.argsort(diag, descending=True, stable=True) if act_order
            else torch.arange(cols, device=dev))
    Wf, Hf = Wf[:, perm], Hf[perm][:, perm]
    eye = torch.eye(cols, dtype=math_dtype, device=dev)
    # 4. Hinv = upper Cholesky factor of H^-1 (its rows give the optimal error feedback).
    Hinv = None
    for attempt in range(max_retries + 1):
        rel = damp if attempt == 0 else max(damp, 1e-3) * 10 ** attempt
        L, bad = torch.linalg.cholesky_ex(Hf + (rel * base) * eye)
        if int(bad) == 0:
            U, bad = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(bad) == 0 and torch.isfinite(U).all():
                Hinv, info["damp"], info["retries"] = U, rel, attempt
                break
    if Hinv is None:
        info["retries"] = max_retries
        return fallback("cholesky failed")

    # 5-6. Column sweep: quantize column j, push its scaled error onto the not-yet-quantized
    # columns of the block immediately, and onto all later columns lazily once per block.
    s = scale.to(dev, math_dtype).unsqueeze(1)
    s_hi = awq_hi_scale(scale, bits, hi_bits).to(dev, math_dtype).unsqueeze(1)
    col_hi = hi[perm].tolist()
    Q = torch.zeros_like(Wf)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, H1 = Wf[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        for j in range(i2 - i1):
            w = W1[:, j:j + 1]
            sj, qm = (s_hi, qmax_hi) if col_hi[i1 + j] else (s, qmax)
            q = torch.clamp(torch.round(w / sj), -qm, qm)
            Q[:, i1 + j:i1 + j + 1] = q
            e = (w - q * sj) / H1[j, j]
            W1[:, j:] -= e * H1[j:j + 1, j:]
            Err[:, j:j + 1] = e
        if i2 < cols:
            Wf[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    # 7. Undo the permutation.
    q = Q[:, torch.argsort(perm)].to(torch.int8)
    return (q, scale, info) if return_info else (q, scale)


# ---- LQER: low-rank correction of the quantization error E = W - W_hat ------------------------

def lqer_factors(W: torch.Tensor, W_hat: torch.Tensor, rank: int, asym: bool = True,
                 group: int = 64, refit: bool = False) -> dict:
    """Rank-r SVD of E = W - W_hat, factors quantized to tiny grids.

    asym (when B.numel % group == 0): A = U_r diag(S_r) -> INT2 {-2,-1,0,1} with one fp16 scale
    max|A|/1.5; B = V_r^T -> INT4 [-8,7] per `group` consecutive flattened elements, scale
    group_absmax/7.5. Otherwise symmetric: per-row INT4 [-7,7] (absmax/7) for both.
    refit=True (not in the reference) re-solves B by least squares against the *quantized* A
    before quantizing B; it can only lower the pre-quantization error.
    Returns {"mode","rank","group","a_q","a_s","b_q","b_s"} (int8 / fp16 tensors on W's device).
    """
    if W.ndim != 2 or W.shape != W_hat.shape:
        raise ValueError(f"lqer_factors needs matching 2-d tensors, got {tuple(W.shape)} "
                         f"and {tuple(W_hat.shape)}")
    E = W.detach().double() - W_hat.detach().to(W.device).double()
    r = max(0, min(int(rank), *E.shape))
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = U[:, :r] * S[:r], Vh[:r]
    if asym and group > 0 and B.numel() % group == 0:
        a_s = _fp16_scale(A.abs().amax().reshape(1) / 1.5 if A.numel() else torch.ones(1))
        a_q = _round_to_grid(A.reshape(1, -1), a_s, 1, -2).reshape(A.shape)
        if refit and r:
            B = torch.linalg.pinv(a_q * a_s.double()) @ E
        Bg = B.reshape(-1, group)
        b_s = _fp16_scale(Bg.abs().amax(dim=1) / 7.5)
        b_q = _round_to_grid(Bg, b_s, 7, -8).reshape(B.shape)
        mode = "asym"
    else:
        a_s = _fp16_scale(A.abs().amax(dim=1) / 7) if r else torch.ones(A.shape[0]).half()
        a_q = _round_to_grid(A, a_s, 7)
        if refit and r:
            B = torch.linalg.pinv(a_q * a_s.double().unsqueeze(1)) @ E
        b_s = _fp16_scale(B.abs().amax(dim=1) / 7)
        b_q = _round_to_grid(B, b_s, 7)
        mode = "sym"
    return {"mode": mode, "rank": r, "group": int(group), "a_q": a_q.to(torch.int8),
            "a_s": a_s, "b_q": b_q.to(torch.int8), "b_s": b_s}


def lqer_delta(f: dict) -> torch.Tensor:
    """The dense fp32 correction (q_A s_A)(q_B s_B) described by lqer_factors' output."""
    a_q, b_q = f["a_q"], f["b_q"]
    if f["mode"] == "asym":
        A = a_q.float() * f["a_s"].float().reshape(1, 1)
        g = int(f["group"])
        B = (b_q.float().reshape(-1, g) * f["b_s"].float().reshape(-1, 1)).reshape(b_q.shape)
    elif f["mode"] == "sym":
        A = a_q.float() * f["a_s"].float().reshape(-1, 1)
        B = b_q.float() * f["b_s"].float().reshape(-1, 1)
    else:
        raise ValueError(f"unknown LQER mode {f['mode']!r}")
    return A @ B.to(A.device)


def lqer_apply(W_hat: torch.Tensor, factors: dict) -> torch.Tensor:
    return (W_hat.float() + lqer_delta(factors).to(W_hat.device)).to(W_hat.dtype)


def select_lqer_targets(errors: dict, top_k: int) -> list:
    """Names of the top_k largest errors (ties broken by name, so the choice is deterministic)."""
    ranked = sorted(errors.items(), key=lambda kv: (-float(kv[1]), kv[0]))
    return [name for name, _ in ranked[:max(0, int(top_k))]]


# ---- state-dict driver ---------------------------------------------------------------------------
# plan(name, tensor) -> spec  (or a dict name -> spec), where spec is one of
#   ("gptq", bits, clip_sigmas[, damp])  GPTQ with hessians[name]   -> name.q int8, name.scale fp16
#   ("rtn", bits, clip_sigmas)           round-to-nearest, same grid -> name.q, name.scale
#   ("int8_row"[, percentile, floor])    per-row absmax/127 (clip at a percentile of |w|, scale floor) -> name.q, name.scale
#   ("fp16",) / ("bf16",) / ("fp32",)    cast passthrough            -> name
#   ("raw",)                             stored unchanged (any packable dtype) -> name
# LQER factors of a target go to name.lqer.{a_q,a_s,b_q,b_s}.
# AWQ-lite (awq=(hi_bits, top_k, group_size)): a GPTQ tensor below hi_bits stores its salient column groups in the
# same name.q at hi_bits (step awq_hi_scale of name.scale) and names them in its entry's "awq"; the manifest is then
# "pgq-state-v2", otherwise (every artifact without AWQ) "pgq-state-v1", byte for byte as before AWQ existed.
# meta = {"format": "pgq-state-v1" | "pgq-state-v2",
#         "tensors": {name: {"scheme", "dtype" (original), "shape", ["bits", "clip_sigmas"],
#                            ["awq": {"bits", "group_size", "groups"}], ["lqer": {"mode", "rank", "group"}]}},
#         "stats":   {name: {"mse", "rel_fro", ["rel_out" (H-weighted), "gptq": {...}, "awq": {...},
#                            "lqer_rel_fro" / "lqer_skipped"]}}}
# Only "format" and "tensors" are needed to decode; drop "stats" (meta_for_storage) to save bytes.
PGQ_FORMATS = ("pgq-state-v1", "pgq-state-v2")  # v2 = v1 + the "awq" entries

_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_LQER_KEYS = ("a_q", "a_s", "b_q", "b_s")


def classify_tensor(name: str, numel: int, ndim: int, patterns, default_matrix=("gptq", 6, 12.85),
                    small_numel: int = 65536, small=("fp16",)):
    """Generic plan helper: first (regex, spec[, min_numel, max_numel]) in `patterns` whose regex
    is found in `name` (and whose numel bounds hold) wins; else small or <2-d tensors -> `small`,
    everything else -> `default_matrix`."""
    for p in patterns:
        rx, spec = p[0], p[1]
        lo = p[2] if len(p) > 2 and p[2] is not None else 0
        hi = p[3] if len(p) > 3 and p[3] is not None else float("inf")
        if re.search(rx, name) and lo <= numel <= hi:
            return tuple(spec)
    return tuple(small) if ndim < 2 or numel <= small_numel else tuple(default_matrix)


def dequantize_entry(q: torch.Tensor, scale: torch.Tensor, e: Mapping) -> torch.Tensor:
    """q*s per row, with the AWQ-lite columns of manifest entry `e` (if any) on their finer step."""
    W = dequantize(q, scale)
    awq = e.get("awq")
    if awq:
        cols = awq_columns(awq["groups"], int(awq["group_size"]), q.shape[-1]).to(q.device)
        W[:, cols] = q[:, cols].float() * awq_hi_scale(scale, int(e["bits"]), int(awq["bits"])).to(q.device).unsqueeze(1)
    return W


def _entropy_bits(q: torch.Tensor) -> float:
    """Order-0 entropy of int8 codes in bits per code (what a byte-level compressor roughly pays)."""
    p = torch.bincount(q.reshape(-1).to(torch.int64) + 128, minlength=256).double()
    p = p[p > 0] / max(q.numel(), 1)
    return float(-(p * p.log2()).sum())


def meta_for_storage(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "stats"}


def _err_stats(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None = None) -> dict:
    W, E = W.double(), W.double() - W_hat.to(W.device).double()
    st = {"mse": float(E.pow(2).mean()) if E.numel() else 0.0,
          "rel_fro": float(E.norm() / W.norm().clamp_min(1e-30))}
    if H is not None:  # relative output error tr(E H E^T) / tr(W H W^T): what GPTQ minimizes
        Hd = H.to(W.device, torch.float64)
        st["rel_out"] = float(((E @ Hd) * E).sum() / ((W @ Hd) * W).sum().clamp_min(1e-30))
    return st


def quantize_state_dict(state_dict: dict, hessians: dict, plan, *, lqer_rank: int = 0,
                        lqer_top_k: int = 0, lqer_group: int = 64, lqer_asym: bool = True,
                        lqer_refit: bool = False, block_size: int = 128, damp: float = 0.01,
                        act_order: bool = True, on_missing_hessian: str = "error", awq: tuple | None = None):
    """Quantize every tensor per `plan` -> (tensors to pack (CPU), meta). See the schema above.
    on_missing_hessian: "error" (default) or "rtn" (fall back, recorded in stats).
    awq: None or (hi_bits, top_k, group_size): AWQ-lite on every GPTQ tensor below hi_bits."""
    tensors, meta = {}, {"format": "pgq-state-v1", "tensors": {}, "stats": {}}
    errors = {}  # LQER candidates: name -> ||W - W_hat||_F

    def put(key, t):
        if key in tensors:
            raise ValueError(f"stored tensor name collision on {key!r}")
        tensors[key] = t.detach().cpu().contiguous()

    for name, t in state_dict.items():
        spec = plan(name, t) if callable(plan) else plan.get(name)
        if spec is None:
            raise ValueError(f"no quantization plan for tensor {name!r}")
        spec = tuple(spec)
        kind = spec[0]
        entry = {"scheme": kind, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        st = {}
        if kind in ("gptq", "rtn", "int8_row"):
            if not t.is_floating_point() or t.ndim == 0:
                raise ValueError(f"tensor {name!r}: scheme {kind} needs a >=1-d float tensor")
            W = t.detach()
            H = hessians.get(name) if hessians else None
            if kind == "gptq" and W.ndim != 2:
                raise ValueError(f"tensor {name!r}: gptq needs a 2-d weight, got {tuple(W.shape)}")
            if kind == "gptq" and H is None:
                if on_missing_hessian != "rtn":
                    raise ValueError(f"tensor {name!r}: plan says gptq but no Hessian was given")
                kind = entry["scheme"] = "rtn"
                st["fallback"] = "no hessian"
            if kind == "int8_row":
                q, s = quantize_int8_rows(W, *map(float, spec[1:3]))
            else:
                bits, k = int(spec[1]), float(spec[2])
                entry.update(bits=bits, clip_sigmas=k)
                if kind == "gptq":
                    d = float(spec[3]) if len(spec) > 3 else damp
                    hi = None
                    if awq is not None and bits < int(awq[0]):
                        hb, top_k, gs = (int(v) for v in awq)
                        groups = awq_salient_groups(W, H, gs, top_k)
                        hi = awq_columns(groups, gs, W.shape[1])
                        entry["awq"] = {"bits": hb, "group_size": gs, "groups": groups}
                    q, s, st["gptq"] = gptq_quantize(W, H.to(W.device), bits, k, block_size, d,
                                                     act_order, return_info=True, hi_cols=hi,
                                                     hi_bits=int(awq[0]) if hi is not None else 8)
                    if hi is not None:  # what the high-precision columns cost: bit width, and order-0 entropy of the codes
                        is_hi = torch.zeros(W.shape[1], dtype=torch.bool, device=q.device)
                        is_hi[hi.to(q.device)] = True
                        n_hi = W.shape[0] * len(hi)
                        st["awq"] = {"columns": len(hi), "extra_bits_raw": n_hi * (hb - bits), "extra_bits_entropy":
                                     n_hi * (_entropy_bits(q[:, is_hi]) - _entropy_bits(q[:, ~is_hi])) if not is_hi.all() else 0.0}
                else:
                    q, s = quantize_rtn(W, bits, k)
            put(name + ".q", q)
            put(name + ".scale", s)
            W_hat = dequantize_entry(q, s, entry)
            ok_h = H is not None and W.ndim == 2 and tuple(H.shape) == (W.shape[1],) * 2
            st.update(_err_stats(W, W_hat, H if ok_h else None))
            if kind in ("gptq", "rtn") and W.ndim == 2:
                errors[name] = float((W.double() - W_hat.to(W.device).double()).norm())
        elif kind in _CAST:
            put(name, t.to(_CAST[kind]))
            if t.is_floating_point():
                st.update(_err_stats(t.detach(), tensors[name]))
        elif kind == "raw":
            _dtype_name(t.dtype)  # fail early on unpackable dtypes
            put(name, t)
        else:
            raise ValueError(f"tensor {name!r}: unknown scheme {kind!r}")
        meta["tensors"][name], meta["stats"][name] = entry, st

    if lqer_rank > 0 and lqer_top_k > 0:
        for name in select_lqer_targets(errors, lqer_top_k):
            W = state_dict[name].detach()
            W_hat = dequantize_entry(tensors[name + ".q"], tensors[name + ".scale"], meta["tensors"][name]).to(W.device)
            f = lqer_factors(W, W_hat, lqer_rank, lqer_asym, lqer_group, lqer_refit)
            new_err = float((W.double() - lqer_apply(W_hat, f).double()).norm())
            if not new_err < errors[name]:  # never store a correction that does not help
                meta["stats"][name]["lqer_skipped"] = True
                continue
            for k in _LQER_KEYS:
                put(f"{name}.lqer.{k}", f[k])
            meta["tensors"][name]["lqer"] = {"mode": f["mode"], "rank": f["rank"], "group": f["group"]}
            meta["stats"][name]["lqer_rel_fro"] = new_err / max(float(W.double().norm()), 1e-30)
    if any("awq" in e for e in meta["tensors"].values()):  # only then: artifacts without AWQ keep the v1 bytes
        meta["format"] = "pgq-state-v2"
    return tensors, meta


def awq_summary(meta: dict) -> dict:
    """The awq_lite event: tensors with high-precision groups, their columns, and the extra bytes they cost (raw bit
    width; order-0 entropy of the codes, closer to what the compressor pays)."""
    st = [v["awq"] for v in meta["stats"].values() if "awq" in v]
    return dict(tensors=len(st), columns=sum(a["columns"] for a in st), extra_bytes_raw=sum(a["extra_bits_raw"] for a in st) // 8,
                extra_bytes_entropy=int(sum(a["extra_bits_entropy"] for a in st) / 8))


def dequantize_state_dict(tensors: dict, meta: dict, device="cpu") -> dict:
    """Inverse of quantize_state_dict: {name: tensor with the original dtype and shape}."""
    if not isinstance(meta, dict) or meta.get("format") not in PGQ_FORMATS:
        raise ValueError(f"meta is not a quantization manifest of {'/'.join(PGQ_FORMATS)}")

    def get(key):
        if key not in tensors:
            raise ValueError(f"artifact is missing stored tensor {key!r}")
        return tensors[key].to(device)

    out = {}
    if not isinstance(meta.get("tensors"), dict):
        raise ValueError("manifest meta.tensors: expected an object")
    for name, e in meta["tensors"].items():
        if not isinstance(e, dict) or "scheme" not in e or not isinstance(e.get("shape"), list):
            raise ValueError(f"tensor {name!r}: manifest entry needs a scheme and a shape")
        scheme, shape = e["scheme"], tuple(e["shape"])
        dtype = _PACK_DTYPES[e["dtype"]][0] if e.get("dtype") in _PACK_DTYPES else None
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unknown original dtype {e.get('dtype')!r}")
        try:
            if "awq" in e and (meta["format"] == "pgq-state-v1" or scheme != "gptq" or not _valid_awq(e, shape)):
                raise ValueError(f"tensor {name!r}: malformed AWQ-lite entry {e['awq']!r}")
            if scheme in ("gptq", "rtn", "int8_row"):
                W = dequantize_entry(get(name + ".q"), get(name + ".scale"), e)
                if "lqer" in e:
                    f = dict(e["lqer"], **{k: get(f"{name}.lqer.{k}") for k in _LQER_KEYS})
                    W = W + lqer_delta(f)
                out[name] = W.reshape(shape).to(dtype)
            elif scheme in _CAST or scheme == "raw":
                out[name] = get(name).reshape(shape).to(dtype)
            else:
                raise ValueError(f"tensor {name!r}: unknown scheme {scheme!r}")
        except (RuntimeError, TypeError, KeyError, IndexError) as err:  # stored tensors that do not fit the manifest
            raise ValueError(f"tensor {name!r}: stored data does not fit its manifest entry ({type(err).__name__}: {err})") from None
    return out


def _valid_awq(e: dict, shape: tuple) -> bool:
    a = e["awq"]
    if not (isinstance(a, dict) and len(shape) == 2 and type(e.get("bits")) is int and all(type(a.get(k)) is int for k in ("bits", "group_size"))
            and isinstance(a.get("groups"), list) and all(type(g) is int for g in a["groups"])):
        return False
    return e["bits"] < a["bits"] <= 8 and a["group_size"] >= 1 and all(0 <= g * a["group_size"] < shape[1] for g in a["groups"])


def serialize_state(tensors: dict, meta: dict, compressor: str = "brotli", shuffle: int = 2, **codec) -> bytes:
    """pack_state + compress_blob (or the per-group container); `meta` is stored as given (meta_for_storage slims it)."""
    if compressor == "pergroup":
        return serialize_pergroup(tensors, meta)
    return compress_blob(pack_state(tensors, meta), compressor, shuffle, **codec)


def deserialize_state(blob: bytes) -> tuple:
    if bytes(blob[:4]) == PGRP_MAGIC:
        return deserialize_pergroup(blob)
    return unpack_state(decompress_blob(blob))


# ----------------------------------------------------------------------------------------------
# ARTIFACT OF THIS MODEL: Hessians E[x x^T] from TRAINING batches (inside the budget), the
# per-tensor plan (bits / clip sigmas by class), and the artifact (config + quantized weights).
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def collect_hessians(model: GPT, loader: DistributedLoader, n_batches: int, device, world: int) -> dict[str, torch.Tensor]:
    """Inputs of every block linear (looped layers accumulate once per visit) and, for the tied
    embedding (or untied head), the final-norm output that feeds the output projection."""
    H: dict[str, torch.Tensor] = {}
    hooks = []

    def add(name, x):
        x = x.reshape(-1, x.size(-1)).float()
        if name not in H:
            H[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
        H[name].addmm_(x.T, x)

    for mname, mod in model.named_modules():
        if isinstance(mod, CastedLinear) and mod.param_roles["weight"].split("/")[1] in ("attn", "mlp", "gate") and min(mod.weight.shape) > 1:
            hooks.append(mod.register_forward_pre_hook(lambda m, inp, n=mname + ".weight": add(n, inp[0])))
    head = "tok_emb.weight" if model.lm_head is None else "lm_head.weight"
    was_training = model.training
    model.eval()
    try:
        for _ in range(n_batches):
            x, _y, _cu = loader.next()
            with autocast_ctx(device):
                add(head, model.hidden(x, model.masks(x)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for k in sorted(H):
        if world > 1:
            dist.all_reduce(H[k])
        H[k] /= n_batches * world
    return H


def quant_plan(cfg: Config, roles: Mapping[str, tuple[str, str]]) -> Callable:
    """Storage of each state tensor by its declared quantization class (`param_roles`); matrices of more than
    65,536 elements are quantized, smaller tensors pass through as fp16 (gates as int8 rows with GATE_QUANT_INT8)."""
    mb, eb = cfg.matrix_bits, cfg.embed_bits
    keep_fp16 = {n.strip() for n in cfg.fp16_tensors.split(",") if n.strip()}
    unknown = sorted(keep_fp16 - set(roles))
    if unknown:
        raise ConfigError(f"FP16_TENSORS: {unknown[0]!r} is not a parameter of this model (e.g. {sorted(roles)[:3]})")

    def plan(name: str, t: torch.Tensor):
        if name in keep_fp16:
            return ("fp16",)
        cls = roles[name][1] if name in roles else "control"
        big = t.ndim == 2 and t.numel() > 65536
        if cfg.quant == "int8" and big:  # the clip options only when set: today's spec (and artifact bytes) otherwise
            clipped = cfg.int8_clip_percentile not in (0.0, 100.0) or cfg.int8_scale_floor > 0
            return ("int8_row", cfg.int8_clip_percentile, cfg.int8_scale_floor) if clipped else ("int8_row",)
        kind = "gptq" if cfg.quant == "gptq" else "rtn"
        if cls == "tok_emb":
            return (kind if cfg.tie_embeddings else "rtn", eb, cfg.embed_clip_sigmas)
        if cls == "head":
            return (kind, mb, cfg.matrix_clip_sigmas)
        if cls == "table" and big:
            return ("rtn", eb, cfg.embed_clip_sigmas)
        if cls in ("attn", "gate") and big:
            return (kind, mb, cfg.attn_clip_sigmas)
        if cls == "mlp" and big:
            return (kind, mb, cfg.mlp_clip_sigmas)
        if big:
            return ("rtn", mb, cfg.matrix_clip_sigmas)
        if cfg.gate_quant_int8 and cls == "gate" and t.ndim == 2 and 32 <= t.numel() <= 8192:
            return ("int8_row",)
        return ("fp16",) if t.is_floating_point() else ("raw",)
    return plan


def quantize_model(model: GPT, cfg: Config, hessians: dict) -> tuple[dict, dict]:
    sd = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    return quantize_state_dict(sd, hessians, quant_plan(cfg, param_roles(model)), lqer_rank=cfg.lqer_rank if cfg.lqer_enabled else 0,
                               lqer_top_k=cfg.lqer_top_k, lqer_group=cfg.lqer_group, block_size=cfg.gptq_block_size,
                               damp=cfg.gptq_damp, act_order=cfg.gptq_act_order, on_missing_hessian="rtn",
                               awq=(cfg.awq_lite_bits, cfg.awq_lite_group_top_k, cfg.awq_lite_group_size) if cfg.awq_lite_enabled else None)


def build_artifact(tensors: dict, qmeta: dict, cfg: Config, bos_id: int) -> bytes:
    meta = meta_for_storage(qmeta)
    # Per-run names stay out, so the same code + seed give the same artifact bytes anywhere.
    meta["model_config"] = {k: v for k, v in cfg.to_dict().items() if k not in ("RUN_ID", "RUN_DIR")}
    meta["bos_id"] = bos_id
    return serialize_state(tensors, meta, cfg.compressor, lgwin=cfg.brotli_lgwin,
                           lzma_preset=cfg.lzma_preset | (lzma.PRESET_EXTREME if cfg.lzma_extreme else 0))


def check_manifest(cfg: Config, tensors: dict, meta: dict, bos_id: int) -> None:
    """Before anything is built: the manifest is well formed, its tensors are stored, its sizes fit the payload, and
    the config's model has exactly the manifest's parameters and shapes (checked on the meta device: no memory)."""
    man = meta.get("tensors")
    if not isinstance(man, dict) or not man:
        raise ValueError("artifact manifest meta.tensors: expected a non-empty object")
    stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    numel = 0
    for name, e in man.items():
        shape = e.get("shape") if isinstance(e, dict) else None
        if not isinstance(e, dict) or not isinstance(e.get("scheme"), str) or not isinstance(shape, list) \
                or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"artifact manifest entry {name!r}: expected {{'scheme': str, 'shape': [ints], ...}}")
        numel += math.prod(shape)
    if numel > stored_bytes:  # every element is stored in at least one byte (int8 codes or wider)
        raise ValueError(f"artifact manifest declares {numel:,} weights but stores only {stored_bytes:,} bytes: corrupt manifest")
    blocks = {int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", n) for n in man) if m}
    if blocks != set(range(cfg.num_layers)):
        raise ValueError(f"artifact model_config NUM_LAYERS={cfg.num_layers} but its manifest holds blocks {sorted(blocks)[:8]}...")
    emb = man.get("tok_emb.weight", {}).get("shape")
    if emb != [cfg.vocab_size, cfg.model_dim]:
        raise ValueError(f"artifact model_config VOCAB_SIZE={cfg.vocab_size} MODEL_DIM={cfg.model_dim} but its tok_emb is {emb}")
    with torch.device("meta"):
        want = {k: list(v.shape) for k, v in GPT(cfg, bos_id).state_dict().items()}
    have = {k: e["shape"] for k, e in man.items()}
    diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if diff:
        k = diff[0]
        raise ValueError(f"artifact manifest does not match its model_config: {len(diff)} tensors differ, e.g. {k!r}: "
                         f"model {want.get(k, 'absent')} vs manifest {have.get(k, 'absent')}")


def load_artifact(blob: bytes, device, env_overrides: Mapping[str, str] | None = None,
                  ignored: list[str] | None = None) -> tuple[GPT, Config]:
    """Fresh model from the artifact alone: config from its manifest (validated as env input), weights dequantized.
    Every problem is a ValueError/ConfigError naming it; env overrides it cannot honour are appended to `ignored`."""
    tensors, meta = deserialize_state(blob)
    if "model_config" not in meta:
        raise ValueError("artifact has no model_config: not written by this train_gpt.py")
    cfg, skipped = Config.from_artifact(meta["model_config"], env_overrides)
    if ignored is not None:
        ignored.extend(skipped)
    bos_id = meta.get("bos_id", 1)
    if type(bos_id) is not int or not 0 <= bos_id < cfg.vocab_size:
        raise ValueError(f"artifact bos_id={bos_id!r}: expected an int in [0, VOCAB_SIZE={cfg.vocab_size})")
    check_manifest(cfg, tensors, meta, bos_id)
    sd = dequantize_state_dict(tensors, meta)
    bad = [n for n, t in sd.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"artifact weights hold NaN/inf in {len(bad)} tensors (e.g. {bad[0]!r}): refusing to score them")
    model = GPT(cfg, bos_id)
    bake_shared_heads(model)  # stored weights are already baked; the forward must not re-tie
    model.load_state_dict(sd)
    if cfg.asym_logit_rescale:
        model.add_asym_softcap()
    model.looping_active = cfg.num_loops > 0
    return model.to(device).set_kernels(resolve_kernels(cfg, device)), cfg


EVAL_OVERRIDABLE = {"DATA_PATH", "TOKENIZER_PATH", "VAL_MAX_TOKENS", "EVAL_SEQ_LEN", "EVAL_STRIDE", "EVAL_BATCH_SEQS", "EVAL_DOC_ATTENTION",
                    "SLIDING_EVAL", "MAX_EVAL_SECONDS", "ATTN_BACKEND", "COMPILE", "RUN_ID", "RUN_DIR", "SEED", "ASYM_LOGIT_RESCALE"} | {
                    f.name for f in FIELDS if f.name.startswith(("TTT_", "PHASED_TTT_", "GLOBAL_TTT_", "NGRAM_"))}

# ----------------------------------------------------------------------------------------------
# EVALUATION: val_bpb = sum(NLL nats) / ln2 / sum(bytes). Plain eval is the sliding eval with
# stride = seq_len; every target token is scored exactly once (the tail included). Score-first
# LoRA TTT trains only on chunks that were already scored.
# ----------------------------------------------------------------------------------------------

def eval_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(input start, scored count) per window. Window inputs are tokens[s : s+L] and score its last
    `n` positions; targets 1..N-1 are each covered exactly once, later windows with full context."""
    if n_tokens - 1 <= seq_len:
        return [(0, n_tokens - 1)]
    wins, end = [(0, seq_len)], seq_len + 1  # `end`: first target index not yet scored
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        wins.append((new_end - 1 - seq_len, new_end - end))
        end = new_end
    return wins


class LUTs:
    """Bytes charged per scored target: the SentencePiece LUT rule, or (CaseOps data) the byte sidecar's entry at
    the target's position in the val stream."""

    def __init__(self, luts, device, sidecar: np.ndarray | None = None):
        self.base, self.lead, self.boundary = (torch.as_tensor(a, device=device) for a in luts)
        self.sidecar = torch.as_tensor(sidecar, device=device) if sidecar is not None else None

    def bytes(self, prev, tgt, pos=None):
        if self.sidecar is not None:
            return self.sidecar[pos]
        return self.base[tgt] + (self.lead[tgt] & ~self.boundary[prev]).long()


# ---- token-only n-gram tilt (NGRAM_TILT_ENABLED; PR #2135, after PR #1514) ------------------------
# A causal token n-gram over the val tokens already scored proposes at most one "hint" token per target; the model's
# distribution p at that target is tilted toward it and renormalized (B = NGRAM_TOKEN_BOOST, h = the hint):
#     p'(a) = p(a) exp(B [a = h]) / Z,   Z = sum_a p(a) exp(B [a = h]) = 1 + p(h) (e^B - 1)
#     -log p'(y) = -log p(y) - B [y = h] + log(1 + p(h) (e^B - 1))
# p' sums to 1 over the vocabulary by construction and every p'(a) > 0, so the score stays a code length (Issue #1017
# C2). Legality (C1, C3): the hint of target i is a function of tokens scored before i only. Visible to target i are
# the occurrences (context -> continuation j) with j scored earlier: in stream order (roundtrip, sliding, chunked TTT;
# the order a one-pass decoder reads, whatever rank scored a window) every j < i; in phased TTT the documents of all
# earlier batches (batch order, the same on every WORLD_SIZE) plus the document's own targets before i, never a
# batch-mate or a later batch. The tables are replayed in one vectorized pass (sorts + prefix maxima) instead of a
# table updated after each token; ngram_hints never reads a target before it is scored (tests perturb each token).

def _prefix_max_by_group(sorted_keys: torch.Tensor, value: torch.Tensor, mult: int, width: int) -> torch.Tensor:
    """Inclusive running max of `value` (>= 0, < width * (group size + 1)) within each group of equal sorted_keys // mult
    (contiguous in the sorted order): one global cummax, each group lifted above every earlier one."""
    start = torch.searchsorted(sorted_keys, sorted_keys // mult * mult)
    lift = 2 * width * start  # a group's values stay below the next group's lift: size + 1 <= 2 * size
    return torch.cummax(value + lift, 0).values - lift


def _count_before(sorted_keys: torch.Tensor, group: torch.Tensor, bound: torch.Tensor, mult: int) -> torch.Tensor:
    """How many entries group * mult + position of `sorted_keys` have position < bound."""
    return torch.searchsorted(sorted_keys, group * mult + bound) - torch.searchsorted(sorted_keys, group * mult)


def _lookup(sorted_unique: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each key in a sorted unique array, and whether it is there."""
    i = torch.searchsorted(sorted_unique, keys).clamp_max(max(len(sorted_unique) - 1, 0))
    return i, sorted_unique[i] == keys if len(sorted_unique) else torch.zeros_like(keys, dtype=torch.bool)


@torch.no_grad()
def ngram_hints(stream: torch.Tensor, order: int, threshold: float, seg: torch.Tensor | None = None,
                cut: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hint, has), both [N], for the targets of `stream` ([N] ids, any device). Target i's contexts are its last k tokens,
    k <= order, never reaching before seg[i] (its document's first position; 0 = no documents); a document's first
    position is no target. An occurrence is a target j with the same k-token context; it is visible to i when j < i, or,
    with `cut` (phased TTT, cut[i] <= seg[i]), when j < cut[i] or j is in i's document before i. The hint is the majority
    continuation of the LONGEST context with a visible occurrence, when its share of them is >= threshold (> 0.5, so the
    majority is unique); otherwise has[i] = False. Exact (dense context ids, no hashing)."""
    dev, N = stream.device, len(stream)
    assert N < 2 ** 31 and threshold > 0.5
    t = stream.long()
    hint, has = torch.zeros(N, dtype=torch.long, device=dev), torch.zeros(N, dtype=torch.bool, device=dev)
    if N < 2:
        return hint, has
    V, M = int(t.max()) + 1, N + 1  # key multipliers (any values above the largest token / position give the same ids)
    seg = torch.zeros(N, dtype=torch.long, device=dev) if seg is None else seg.long()
    live = torch.arange(N, device=dev)
    live = live[live > seg]  # targets still in play at this order
    ctx = torch.zeros_like(live)  # dense id of each live target's context of the previous order
    for k in range(1, order + 1):
        keep = live - k >= seg[live]
        live, ctx = live[keep], ctx[keep]
        _, ctx, cnt = torch.unique(ctx * V + t[live - k], return_inverse=True, return_counts=True)
        # a context seen once in the whole stream matches nothing now or at any longer order: drop it (same result)
        keep = cnt[ctx] >= 2
        live, ctx = live[keep], ctx[keep]
        if len(live) == 0:
            break
        matched, ok, tok = _ngram_order(t, live, ctx, seg[live], None if cut is None else cut[live], threshold, V, M)
        at = live[matched]  # longer contexts come later and overwrite shorter ones
        has[at], hint[at] = ok[matched], tok[matched]
    return hint, has


def _ngram_order(t, p, c, seg_p, cut_p, threshold: float, V: int, M: int):
    """One order: p = the live targets (ascending), c = their dense context ids. Returns per target: matched (a visible
    occurrence exists), ok (the majority share >= threshold) and the majority continuation."""
    y = t[p]
    bound = p if cut_p is None else cut_p  # part A: occurrences at positions < bound (stream order: all earlier ones)
    S1, o1 = torch.sort(c * M + p)  # occurrences by (context, position)
    pair_u, pair = torch.unique(c * V + y, return_inverse=True)  # (context, continuation) ids
    S2 = torch.sort(pair * M + p).values
    seen = _count_before(S2, pair, p, M) + 1  # occurrences of this (context, continuation) up to and including p
    # running max over a context's occurrences of seen*V + continuation = the most frequent continuation so far
    best = _prefix_max_by_group(S1, (seen * V + y)[o1], M, V)
    end = torch.searchsorted(S1, c * M + bound)
    n_a = end - torch.searchsorted(S1, c * M)
    top_a = torch.where(n_a > 0, best[(end - 1).clamp_min(0)], 0)
    cnt_a, tok_a = top_a // V, top_a % V
    if cut_p is None:
        n_tot, cnt, tok = n_a, cnt_a, tok_a
    else:  # part B: the target's own document before it (positions >= seg >= cut), grouped by (context, document)
        _, cs = torch.unique(c * M + seg_p, return_inverse=True)
        ps_u, ps = torch.unique(pair * M + seg_p, return_inverse=True)
        S3, o3 = torch.sort(cs * M + p)
        S4 = torch.sort(ps * M + p).values
        seen_doc = _count_before(S4, ps, p, M) + 1
        best_b = _prefix_max_by_group(S3, (seen_doc * V + y)[o3], M, V)
        end_b = torch.searchsorted(S3, cs * M + p)
        n_b = end_b - torch.searchsorted(S3, cs * M)
        top_b = torch.where(n_b > 0, best_b[(end_b - 1).clamp_min(0)], 0)
        cnt_b, tok_b = top_b // V, top_b % V
        # a majority of A + B is a majority of A or of B: total each part's candidate over both parts
        pa, _ = _lookup(pair_u, c * V + tok_a)  # exists where n_a > 0
        da, in_doc = _lookup(ps_u, pa * M + seg_p)
        tot_a = cnt_a + torch.where(in_doc, _count_before(S4, da, p, M), 0)
        pb, exists = _lookup(pair_u, c * V + tok_b)
        tot_b = cnt_b + torch.where(exists, _count_before(S2, pb, bound, M), 0)
        tot_a, tot_b = torch.where(n_a > 0, tot_a, 0), torch.where(n_b > 0, tot_b, 0)
        n_tot = n_a + n_b
        cnt, tok = torch.maximum(tot_a, tot_b), torch.where(tot_a >= tot_b, tok_a, tok_b)
    matched = n_tot > 0
    return matched, matched & (cnt.double() >= threshold * n_tot.double()), tok


class NgramTilt:
    """The hints of one scoring order (per target position of the val stream) and the tilt of the scores (formula
    above). Accumulates per pass: scored targets, tilted targets, hits (target == hint), nats saved by the tilt."""

    def __init__(self, hint: torch.Tensor, has: torch.Tensor, boost: float, seconds: float = 0.0):
        self.hint, self.has, self.boost, self.seconds = hint, has, boost, seconds
        self.log_z_scale = math.expm1(boost)
        self.stats: torch.Tensor | None = None

    def hint_at(self, pos: torch.Tensor) -> torch.Tensor:
        if self.hint.device != pos.device:
            self.hint, self.has = self.hint.to(pos.device), self.has.to(pos.device)
        return self.hint[pos]

    def apply(self, nll: torch.Tensor, nll_hint: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """-log p'(y) (float64) from -log p(y) and -log p(h) of the same forward."""
        on = self.has[pos]
        hit = on & (y == self.hint[pos])
        nll = nll.double()
        tilted = torch.where(on, nll - self.boost * hit + torch.log1p(torch.exp(-nll_hint.double()) * self.log_z_scale), nll)
        m = scored.bool()
        s = torch.stack([m.sum(), (on & m).sum(), (hit & m).sum()]).double()
        s = torch.cat([s, ((nll - tilted) * m).sum()[None]])
        self.stats = s if self.stats is None else self.stats + s
        return tilted

    def summary(self, name: str, loss: float, bpb: float, world: int) -> dict:
        """The event:ngram_tilt fields of one pass (all ranks call it: one all-reduce), then reset for the next pass.
        seconds = the table's build time, charged to the first pass that uses it (0 when reused)."""
        s = self.stats if self.stats is not None else torch.zeros(4, dtype=torch.float64, device=self.hint.device)
        if world > 1:
            s = s.clone()
            dist.all_reduce(s)
        n, tilted, hits, saved = s.tolist()
        out = dict(name=name, tokens=int(n), tilted=int(tilted), frac=tilted / max(n, 1), hit_rate=hits / max(tilted, 1),
                   gain_bpb=saved / max(n, 1) * (bpb / loss if loss else 0.0), seconds=self.seconds)
        self.stats, self.seconds = None, 0.0
        return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream_ngram_tilt(tokens: torch.Tensor, cfg: Config, device) -> NgramTilt:
    """Hints in stream order (roundtrip, sliding, chunked TTT), computed on `device`."""
    t0 = time.perf_counter()
    hint, has = ngram_hints(tokens.to(device), cfg.ngram_token_order, cfg.ngram_token_threshold)
    _sync(device)
    return NgramTilt(hint, has, cfg.ngram_token_boost, time.perf_counter() - t0)


def phased_ngram_tilt(tokens: torch.Tensor, docs: list[tuple[int, int]], batches: list[list[int]], cfg: Config, device) -> NgramTilt:
    """Hints for phased TTT: the documents laid out in batch order, each seeing the earlier batches and its own prefix."""
    t0 = time.perf_counter()
    order = [d for b in batches for d in b]
    lens, sizes = torch.tensor([docs[d][1] for d in order]), torch.tensor([len(b) for b in batches])
    start = torch.cumsum(lens, 0) - lens  # each document's offset in the layout
    cut_doc = torch.repeat_interleave(start[torch.cumsum(sizes, 0) - sizes], sizes)  # the offset of its batch's first document
    doc = torch.repeat_interleave(torch.arange(len(order)), lens)
    local = torch.arange(int(lens.sum())) - start[doc]
    orig = torch.tensor([docs[d][0] for d in order])[doc] + local  # val-stream position of each layout position
    hint_l, has_l = ngram_hints(tokens[orig].to(device), cfg.ngram_token_order, cfg.ngram_token_threshold,
                                start[doc].to(device), cut_doc[doc].to(device))
    tgt = (local >= 1).to(device)  # a document's first token is the previous one's last target
    at = orig.to(device)[tgt]
    hint = torch.zeros(len(tokens), dtype=torch.long, device=device)
    has = torch.zeros(len(tokens), dtype=torch.bool, device=device)
    hint[at], has[at] = hint_l[tgt], has_l[tgt]
    _sync(device)
    return NgramTilt(hint, has, cfg.ngram_token_boost, time.perf_counter() - t0)


@torch.no_grad()
def score_windows(fwd, model: GPT, tokens: torch.Tensor, wins, seq_len: int, batch: int, luts: LUTs, device, lora: dict | None = None,
                  tilt: NgramTilt | None = None):
    """Sum of NLL (float64; n-gram tilted with `tilt`), scored targets, bytes over `wins` (this rank's share)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tok = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.float64, device=device)
    L = min(seq_len, len(tokens) - 1)
    ar = torch.arange(L, device=device)
    for i in range(0, len(wins), batch):
        chunk = list(wins[i:i + batch])
        pad = batch - len(chunk)
        starts = torch.tensor([s for s, _ in chunk] + [chunk[0][0]] * pad)
        ns = torch.tensor([n for _, n in chunk] + [0] * pad, device=device)
        idx = starts[:, None] + torch.arange(L + 1)[None, :]
        seq = tokens[idx].to(device, non_blocking=True)
        x, y = seq[:, :-1], seq[:, 1:]
        pos = idx[:, 1:].to(device)
        m = ar[None, :] >= (L - ns)[:, None]
        with autocast_ctx(device):
            if tilt is None:
                nll = fwd(x, y, model.masks(x), "none", lora).double()
            else:
                nll = tilt.apply(*fwd(x, y, model.masks(x), "none", lora, hint=tilt.hint_at(pos)), y, pos, m)
        loss_sum += (nll * m).sum()
        n_tok += m.sum()
        n_bytes += (luts.bytes(x, y, pos) * m).sum()
    return loss_sum, n_tok, n_bytes


def _all_reduce(*ts, world: int):
    if world > 1:
        buf = torch.stack(list(ts))
        dist.all_reduce(buf)
        return tuple(buf.unbind(0))
    return ts


def evaluate(fwd, model: GPT, tokens: torch.Tensor, seq_len: int, stride: int, batch: int, luts: LUTs, device, rank: int, world: int,
             tilt: NgramTilt | None = None):
    """Distributed windowed eval -> (val_loss nats/token, val_bpb, scored tokens, bytes)."""
    wins = eval_windows(len(tokens), seq_len, stride)
    lo, hi = rank * len(wins) // world, (rank + 1) * len(wins) // world
    was = model.training
    model.eval()
    ls, nt, nb = score_windows(fwd, model, tokens, wins[lo:hi], seq_len, batch, luts, device, tilt=tilt)
    model.train(was)
    ls, nt, nb = _all_reduce(ls, nt, nb, world=world)
    loss = (ls / nt).item()
    return loss, loss / math.log(2) * (nt / nb).item(), int(nt.item()), int(nb.item())


# ---- test-time training: adapters ----------------------------------------------------------------

def ttt_target_dims(cfg: Config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each TTT adapter target."""
    dim, hq, hkv, hidden = cfg.model_dim, cfg.n_heads * cfg.d_head, cfg.num_kv_heads * cfg.d_head, int(cfg.mlp_mult * cfg.model_dim)
    return {"q": (dim, hq), "k": (dim, hkv), "v": (dim, hkv), "o": (dim, dim), "mlp": (dim, dim), "proj": (hq, dim),
            "up": (dim, hidden), "down": (hidden, dim), "head": (dim, cfg.vocab_size)}


class TTTAdapters:
    """The TTT LoRA adapters, one per (virtual layer, target) plus "head": A [R, r, in] ~ U(+-1/sqrt(in)),
    B [R, out, r] = 0, so a fresh adapter changes nothing. R = 1 (one adapter for every row: chunked TTT) or one slice
    per document slot (phased TTT); the slices never mix (AdamW is elementwise, the loss a sum over documents)."""

    def __init__(self, cfg: Config, n_virtual: int, rows: int, device, seed: int):
        self.scale, self.rows = cfg.ttt_lora_alpha / cfg.ttt_lora_rank, rows
        self.rows_per_forward = cfg.ttt_rows_per_forward  # 0 = all; halved for the rest of the pass on a CUDA OOM
        self.oom_splits: list[int] = []  # the rows per forward chosen after each OOM (for the log)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        dims, r = ttt_target_dims(cfg), cfg.ttt_lora_rank
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for t in cfg.ttt_target_list:
            for key in ["head"] if t == "head" else [f"{vi}.{t}" for vi in range(n_virtual)]:
                fan_in, fan_out = dims[t]
                self.a[key] = torch.empty(rows, r, fan_in, device=device, requires_grad=True)
                self.b[key] = torch.zeros(rows, fan_out, r, device=device, requires_grad=True)
        self.reset_a()

    def params(self) -> list[torch.Tensor]:
        return list(self.a.values()) + list(self.b.values())

    @torch.no_grad()
    def reset_a(self, seed: int | None = None):
        if seed is not None:
            self.gen.manual_seed(seed)
        for a in self.a.values():
            a.copy_((torch.rand(a.shape, generator=self.gen, device=a.device) * 2 - 1) / math.sqrt(a.size(-1)))

    @torch.no_grad()
    def reset_b(self):
        for b in self.b.values():
            b.zero_()

    def weights(self, rows: torch.Tensor | int | None = None) -> dict:
        """The `lora` argument of GPT.forward; `rows` picks document slots: an int k = the first k slots, a slice = those
        slots (views, no copy), a tensor = those slots (autograd flows back to the slices either way)."""
        if rows is None:
            pick = lambda t: t  # noqa: E731
        elif isinstance(rows, slice):
            pick = lambda t: t[rows]  # noqa: E731
        elif isinstance(rows, int):
            pick = lambda t: t[:rows]  # noqa: E731
        else:
            pick = lambda t: t.index_select(0, rows)  # noqa: E731
        return {"scale": self.scale, "w": {k: (pick(self.a[k]), pick(self.b[k])) for k in self.a}}


def ttt_adamw(cfg: Config, params: list[torch.Tensor], device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.ttt_lr * cfg.ttt_local_lr_mult, betas=(cfg.ttt_beta1, cfg.ttt_beta2), eps=1e-10,
                             weight_decay=cfg.ttt_weight_decay, fused=device.type == "cuda")


def freeze_base(model: GPT, frozen: bool):
    for p in model.parameters():
        p.requires_grad_(not frozen)


def all_reduce_grads(params: list[torch.Tensor], world: int):
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        o = 0
        for p in params:
            p.grad.copy_(flat[o:o + p.numel()].view_as(p))
            o += p.numel()

# ---- test-time training: chunked (one LoRA over the stream) --------------------------------------

def ttt_chunks(wins, chunk_tokens: int) -> list[list[tuple[int, int]]]:
    chunks, cur, n = [], [], 0
    for w in wins:
        cur.append(w)
        n += w[1]
        if n >= chunk_tokens:
            chunks.append(cur)
            cur, n = [], 0
    if cur:
        chunks.append(cur)
    return chunks


def eval_ttt_chunked(model: GPT, tokens: torch.Tensor, cfg: Config, luts: LUTs, device, rank: int, world: int, log: Logger | None = None,
                     tilt: NgramTilt | None = None):
    """TTT_MODE=chunked: for each chunk of sliding windows, first score it (no grad), then train one shared LoRA on
    exactly those already-scored targets. Returns (val_loss, val_bpb, per-chunk (loss_sum, tokens))."""
    L = min(cfg.eval_seq_len, len(tokens) - 1)
    chunks = ttt_chunks(eval_windows(len(tokens), cfg.eval_seq_len, cfg.eval_stride), cfg.ttt_chunk_tokens)
    freeze_base(model, True)
    adapters = TTTAdapters(cfg, len(layer_order(cfg, model.looping_active)), 1, device, cfg.seed)
    params = adapters.params()
    opt = ttt_adamw(cfg, params, device)
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    per_chunk = []
    model.eval()
    try:
        for ci, cw in enumerate(chunks):
            lo, hi = rank * len(cw) // world, (rank + 1) * len(cw) // world
            s = torch.stack(score_windows(model, model, tokens, cw[lo:hi], cfg.eval_seq_len, cfg.eval_batch_seqs, luts, device, adapters.weights(),
                                          tilt))
            if world > 1:
                dist.all_reduce(s)
            tot += s
            per_chunk.append((s[0].item(), s[1].item()))
            if ci == len(chunks) - 1:
                break
            # Train on this chunk's scored targets only: target indices [t0, t1).
            t0 = cw[0][0] + (L - cw[0][1]) + 1
            t1 = cw[-1][0] + L + 1
            seg = tokens[t0 - 1:t1]
            n_rows = max(1, math.ceil((len(seg) - 1) / L))
            pad = n_rows * L + 1 - len(seg)
            seg = torch.cat([seg, seg.new_zeros(pad)]) if pad > 0 else seg
            xs = torch.stack([seg[i * L:i * L + L] for i in range(n_rows)])
            ys = torch.stack([seg[i * L + 1:i * L + L + 1] for i in range(n_rows)])
            valid = (torch.arange(n_rows * L).view(n_rows, L) < (t1 - t0))
            mine = list(range(rank, n_rows, world))
            count = valid.sum().item()
            for _ in range(cfg.ttt_epochs):
                opt.zero_grad(set_to_none=False)
                for i in mine:
                    x, y, v = xs[i:i + 1].to(device), ys[i:i + 1].to(device), valid[i:i + 1].to(device)
                    with autocast_ctx(device):
                        nll = model(x, y, model.masks(x), "none", adapters.weights())
                    ((nll * v).sum() / count).backward()
                all_reduce_grads(params, world)
                opt.step()
            if log is not None and (ci % 50 == 0):
                rl = (tot[0] / tot[1]).item()
                log("ttt_progress", chunk=ci + 1, chunks=len(chunks), running_loss=rl, running_bpb=rl / math.log(2) * (tot[1] / tot[2]).item())
    finally:
        freeze_base(model, False)
    loss = (tot[0] / tot[1]).item()
    return loss, loss / math.log(2) * (tot[1] / tot[2]).item(), per_chunk

# ---- test-time training: phased (per-document LoRA + global SGD phases; record #1855) -------------
# Documents are [BOS_i .. BOS_i+1] (the next BOS is a document's last target), processed longest first in batches of
# TTT_DOCS_PER_BATCH. Each document's targets are scored in chunks of TTT_CHUNK_SIZE, each chunk from a causal window of
# at most TTT_EVAL_SEQ_LEN tokens of its own document, and only then does the document's LoRA slice take a step on that
# chunk. Batch j runs on rank j % WORLD_SIZE in round j // WORLD_SIZE (deterministic; no shared counter). After the round
# in which the first prefix*(i+1)/phases documents are all scored, every rank runs SGD on all base weights over exactly
# those documents; later batches are scored with the updated model. No update ever sees a target before it is scored.

def ttt_documents(tokens: torch.Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(start, length) of every val document; together they score each target 1..N-1 exactly once."""
    t = tokens.cpu().numpy()
    starts = np.flatnonzero(t == bos_id).tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts  # a stream cut by VAL_MAX_TOKENS may start inside a document
    ends = [b + 1 for b in starts[1:]] + [len(t)]
    return [(s, e - s) for s, e in zip(starts, ends) if e - s >= 2]


def ttt_chunk_window(n_pred: int, c: int, chunk: int, window: int) -> tuple[int, int, int]:
    """Chunk c of a document with n_pred targets: (window start, window end, first scored target), document-local.
    Inputs are doc[ws:we], targets doc[ws+1:we+1]; targets [first, we) are scored."""
    we = min((c + 1) * chunk, n_pred)
    return max(0, we - window), we, c * chunk


def ttt_doc_cost(length: int, chunk: int, window: int) -> int:
    """Forward tokens spent on a document (each chunk recomputes its window): the progress projection's unit."""
    n_pred = length - 1
    return sum(we - ws for ws, we, _ in (ttt_chunk_window(n_pred, c, chunk, window) for c in range(-(-n_pred // chunk))))


def ttt_schedule(docs: list[tuple[int, int]], cfg: Config, world: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Batches of document indices (longest first) and the global phases as (after round, prefix documents)."""
    order = sorted(range(len(docs)), key=lambda i: (-docs[i][1], i))
    bs = cfg.ttt_docs_per_batch
    batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    n_rounds = -(-len(batches) // world)
    phases, K = [], cfg.phased_ttt_num_phases
    for k in range(K):
        boundary = min(len(docs), cfg.phased_ttt_prefix_docs * (k + 1) // K)
        after = (-(-boundary // bs) - 1) // world
        if boundary > 0 and after < n_rounds - 1:  # a phase after the last round would help no score
            phases.append((after, boundary))
    return batches, phases


def ttt_phase_stream(tokens: torch.Tensor, docs: list[tuple[int, int]], bos_id: int) -> torch.Tensor:
    """The scored prefix documents concatenated for global SGD (each without its trailing BOS: the next one's
    leading BOS is the same target)."""
    segs = []
    for s, n in docs:
        seg = tokens[s:s + n]
        segs.append(seg[:-1] if int(seg[-1]) == bos_id else seg)
    return torch.cat(segs)


def ttt_global_sgd(fwd, model: GPT, cfg: Config, stream: torch.Tensor, device, rank: int, world: int) -> dict:
    """SGD on all base weights over already-scored documents: one step per GLOBAL_TTT_CHUNK_TOKENS (the last chunk
    is not trained on), cosine LR, rows of TTT_EVAL_SEQ_LEN split over ranks, attention within documents."""
    W, G = cfg.ttt_eval_seq_len, cfg.global_ttt_chunk_tokens
    n_in = len(stream) - 1
    n_chunks = -(-n_in // G)
    n_train = max(0, n_chunks - 1)
    params = list(model.parameters())
    freeze_base(model, False)
    opt = torch.optim.SGD(params, lr=cfg.global_ttt_lr, momentum=cfg.global_ttt_momentum)
    steps, loss_sum, tok_sum = 0, 0.0, 0
    try:
        for _ in range(cfg.global_ttt_epochs):
            for k in range(n_train):
                for g in opt.param_groups:
                    g["lr"] = cfg.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * k / n_train))
                c0, c1 = k * G, min((k + 1) * G, n_in)
                rows = [(st, min(W, c1 - st)) for st in range(c0, c1, W)]
                mine = rows[rank::world]
                opt.zero_grad(set_to_none=True)
                for i in range(0, len(mine), cfg.global_ttt_batch_seqs):
                    part = mine[i:i + cfg.global_ttt_batch_seqs]
                    x = torch.zeros(len(part), W, dtype=torch.long)
                    y = torch.zeros(len(part), W, dtype=torch.long)
                    for r, (st, n) in enumerate(part):
                        x[r, :n], y[r, :n] = stream[st:st + n], stream[st + 1:st + n + 1]
                    valid = (torch.arange(W)[None, :] < torch.tensor([n for _, n in part])[:, None]).to(device)
                    x, y = x.to(device), y.to(device)
                    with autocast_ctx(device):
                        nll = fwd(x, y, model.masks(x, doc=True), "none", None)
                    loss = (nll * valid).sum() / (c1 - c0)
                    loss.backward()
                    loss_sum += loss.item() * (c1 - c0)
                    tok_sum += int(valid.sum().item())
                all_reduce_grads(params, world)
                if cfg.global_ttt_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.global_ttt_grad_clip)
                opt.step()
                steps += 1
    finally:
        opt.zero_grad(set_to_none=True)
        freeze_base(model, True)
    return dict(steps=steps, tokens=n_in, train_loss=loss_sum / max(tok_sum, 1))


def ttt_score_batch(fwd, model: GPT, cfg: Config, adapters: TTTAdapters, tokens: torch.Tensor, docs: list[tuple[int, int]],
                    luts: LUTs, device, acc: torch.Tensor, nll_out: torch.Tensor | None, min_rows: int = 1, tilt: NgramTilt | None = None):
    """One batch of documents: per chunk step, one forward scores every active document's chunk (added to `acc`:
    loss, tokens, bytes) and then trains each document's LoRA slice on it (not on a document's last chunk).
    `tokens` is the val stream on `device`; windows are gathered there (no host copy per step). Documents longest
    first make the active ones a prefix of the slots; `min_rows` pads a step with empty rows (no target scored, no
    loss) so that a compiled forward never sees one row (dynamo specializes size 1: a second graph). With `tilt` the score
    is n-gram tilted; the LoRA still trains on the model's own NLL. Each document has its own chunk size
    (TTT_CHUNK_SCHEDULE: short documents in smaller chunks); the slots are ordered by chunk count (stable: with one
    chunk size this is the given longest-first order), so the active ones stay a prefix."""
    W = cfg.ttt_eval_seq_len
    chunks_of = lambda d: -(-(d[1] - 1) // cfg.ttt_chunk_for(d[1] - 1))  # noqa: E731
    docs = sorted(docs, key=lambda d: -chunks_of(d))
    n_pred = [n - 1 for _, n in docs]
    Cs = [cfg.ttt_chunk_for(p) for p in n_pred]
    n_chunks = [chunks_of(d) for d in docs]
    adapters.reset_b()
    opt = ttt_adamw(cfg, adapters.params(), device) if adapters.a else None
    for c in range(max(n_chunks)):
        active = [i for i in range(len(docs)) if c < n_chunks[i]]
        prefix = active == list(range(len(active)))
        rows = max(len(active), min(min_rows, adapters.rows)) if prefix else len(active)
        info = torch.zeros(3, rows, dtype=torch.long)  # per row: absolute window start, window length, first scored
        for r, i in enumerate(active):
            ws, we, first = ttt_chunk_window(n_pred[i], c, Cs[i], W)
            info[0, r], info[1, r], info[2, r] = docs[i][0] + ws, we - ws, first - ws
        T = -(-int(info[1].max()) // 64) * 64  # few distinct shapes for the compiled forward
        info = info.to(device)
        ar = torch.arange(T, device=device)[None, :]
        valid = ar < info[1][:, None]
        idx = torch.where(valid, info[0][:, None] + ar, 0)
        x = torch.where(valid, tokens[idx], 0)
        y = torch.where(valid, tokens[idx + 1], 0)
        pos = torch.where(valid, idx + 1, 0)
        scored = valid & (ar >= info[2][:, None])
        trains = [c < n_chunks[i] - 1 for i in active] + [False] * (rows - len(active))  # a last chunk is never trained on
        train = torch.tensor(trains, device=device)
        active_t = None if prefix else torch.tensor(active, device=device)
        learn = opt is not None and any(trains)  # from the host list: no device sync per chunk step
        for step in range(cfg.ttt_grad_steps if learn else 1):
            while True:  # one attempt per rows-per-forward: a CUDA OOM halves it and redoes the step from its start
                per = adapters.rows_per_forward or rows
                n_parts = -(-rows // per)
                bounds = [rows * k // n_parts for k in range(n_parts + 1)]  # parts differ by <= 1 row
                tilt_stats, score, kept = None if tilt is None else tilt.stats, torch.zeros_like(acc), []
                try:
                    for r0, r1 in zip(bounds[:-1], bounds[1:]):
                        part = slice(r0, r1)
                        xs, ys, ps, sc = x[part], y[part], pos[part], scored[part]
                        masks = model.masks(xs, doc=False)  # one document per row, right-padded: plain causal is exact
                        lora = (adapters.weights(part) if prefix else adapters.weights(active_t[part])) if adapters.a else None
                        # with adapters the forward always records the graph (also on a batch's last, untrained step): one
                        # compiled graph instead of a second, no-grad one
                        with torch.set_grad_enabled(opt is not None), autocast_ctx(device):
                            nll = fwd(xs, ys, masks, "none", lora) if tilt is None else fwd(xs, ys, masks, "none", lora, hint=tilt.hint_at(ps))
                        nll, nll_hint = (nll, None) if tilt is None else nll
                        if step == 0:  # the score: this forward has seen no update from this chunk
                            m = sc.double()
                            nd = nll.detach().double() if tilt is None else tilt.apply(nll.detach(), nll_hint.detach(), ys, ps, sc)
                            score += torch.stack([(nd * m).sum(), m.sum(), (luts.bytes(xs, ys, ps) * m).sum()])
                            if nll_out is not None:
                                kept.append((ps[sc], nd[sc]))
                        if learn:
                            per_doc = (nll * sc).sum(1) / sc.sum(1).clamp_min(1)
                            (per_doc * train[part]).sum().backward()
                    break
                except torch.cuda.OutOfMemoryError:
                    if per == 1:
                        raise
                # out of memory (here, after the except: its traceback no longer holds the activations): drop this
                # attempt's partial gradients, score and tilt counts, and redo the step in smaller parts
                nll = nll_hint = masks = lora = None
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                if tilt is not None:
                    tilt.stats = tilt_stats
                torch.cuda.empty_cache()
                adapters.rows_per_forward = -(-per // 2)
                adapters.oom_splits.append(adapters.rows_per_forward)
            acc += score
            for ps, nd in kept:
                nll_out[ps] = nd.to(nll_out.dtype)
            if learn:
                opt.step()
                opt.zero_grad(set_to_none=True)


def eval_ttt_phased(model: GPT, tokens: torch.Tensor, cfg: Config, luts: LUTs, device, rank: int, world: int,
                    log: Logger | None = None, fwd=None, keep_nll: bool = False, budget_s: float = 0.0) -> dict:
    """TTT_MODE=phased. Returns val_loss, val_bpb, documents, batches, phase stats (and the per-target NLL with keep_nll)."""
    t_start = time.perf_counter()
    fwd = model if fwd is None else fwd  # never `fwd or model`: bool() of a compiled module raises
    tokens = tokens.cpu()
    tokens_dev = tokens.to(device)
    docs = ttt_documents(tokens, model.bos_id)
    batches, phases = ttt_schedule(docs, cfg, world)
    tilt = phased_ngram_tilt(tokens, docs, batches, cfg, device) if cfg.ngram_tilt_enabled else None  # inside the eval timer
    n_rounds = -(-len(batches) // world)
    W = cfg.ttt_eval_seq_len
    cost = [sum(ttt_doc_cost(docs[i][1], cfg.ttt_chunk_for(docs[i][1] - 1), W) for i in b) for b in batches]
    chunk_docs = collections.Counter(cfg.ttt_chunk_for(n - 1) for _, n in docs)  # documents per chunk size, for the log
    total_cost = sum(cost)
    acc = torch.zeros(3, dtype=torch.float64, device=device)
    nll_out = torch.full((len(tokens),), float("nan"), dtype=torch.float64, device=device) if keep_nll else None
    n_virtual = len(layer_order(cfg, model.looping_active))
    adapters = TTTAdapters(cfg, n_virtual, cfg.ttt_docs_per_batch, device, cfg.seed + 1000 * rank)
    log_every = max(1, n_rounds // 20)
    phase_stats, warned = [], False
    model.eval()
    freeze_base(model, True)
    try:
        for rnd in range(n_rounds):
            j = rnd * world + rank
            if j < len(batches):
                if not cfg.ttt_warm_start_a:  # A drawn per batch index: the result does not depend on WORLD_SIZE
                    adapters.reset_a(cfg.seed * 1_000_003 + j)
                ttt_score_batch(fwd, model, cfg, adapters, tokens_dev, [docs[i] for i in batches[j]], luts, device, acc, nll_out,
                                min_rows=2 if fwd is not model else 1, tilt=tilt)
                for per in adapters.oom_splits:  # this rank ran out of GPU memory in the batch: it now splits every step
                    oom = dict(rank=rank, batch=j, rows_per_forward=per, note="same_update_in_smaller_parts")
                    if rank == 0 and log is not None:
                        log("ttt_oom", **oom)
                    else:  # the run log is rank 0's: other ranks say it on their stdout
                        print(Logger.line("ttt_oom", **oom), flush=True)
                adapters.oom_splits.clear()
            if rnd % log_every == log_every - 1 or rnd == n_rounds - 1:  # the same rounds on every rank (a collective)
                done = acc.clone()
                if world > 1:
                    dist.all_reduce(done)
                n_b = min(len(batches), (rnd + 1) * world)
                elapsed = time.perf_counter() - t_start
                projected = elapsed * total_cost / max(sum(cost[:n_b]), 1)
                if log is not None:
                    rl = (done[0] / done[1]).item()
                    log("ttt_progress", round=rnd + 1, rounds=n_rounds, docs_done=sum(len(b) for b in batches[:n_b]), docs=len(docs),
                        running_loss=rl, running_bpb=rl / math.log(2) * (done[1] / done[2]).item(), elapsed_s=elapsed, projected_s=projected)
                    if budget_s > 0 and projected > budget_s and not warned:
                        warned = True
                        log("warning", msg=f"ttt_projected_{projected:.0f}s_exceeds_MAX_EVAL_SECONDS={budget_s:.0f};_lower_PHASED_TTT_PREFIX_DOCS,"
                            f"_raise_TTT_CHUNK_SIZE_or_TTT_DOCS_PER_BATCH")
            for after, boundary in phases:
                if after == rnd:
                    t0 = time.perf_counter()
                    prefix = [docs[i] for b in batches for i in b][:boundary]  # the batches hold the longest-first order
                    st = ttt_global_sgd(fwd, model, cfg, ttt_phase_stream(tokens, prefix, model.bos_id), device, rank, world)
                    adapters = TTTAdapters(cfg, n_virtual, cfg.ttt_docs_per_batch, device, cfg.seed + 1000 * rank + 17 * (len(phase_stats) + 1))
                    st.update(phase=len(phase_stats) + 1, after_round=rnd + 1, docs=boundary, seconds=time.perf_counter() - t0)
                    if model.asym_softcap is not None:
                        st.update(softcap_pos=float(model.asym_softcap[0]), softcap_neg=float(model.asym_softcap[1]))
                    phase_stats.append(st)
                    if log is not None:
                        log("ttt_phase", **st)
    finally:
        freeze_base(model, False)
    if world > 1:
        dist.all_reduce(acc)
        if nll_out is not None:
            nll_out = torch.nan_to_num(nll_out, nan=0.0)
            dist.all_reduce(nll_out)
    loss = (acc[0] / acc[1]).item()
    out = dict(val_loss=loss, val_bpb=loss / math.log(2) * (acc[1] / acc[2]).item(), tokens=int(acc[1].item()), bytes=int(acc[2].item()),
               docs=len(docs), batches=len(batches), phases=phase_stats, seconds=time.perf_counter() - t_start,
               chunk_docs=",".join(f"{c}={chunk_docs[c]}" for c in sorted(chunk_docs)))
    if tilt is not None:
        out["ngram_tilt"] = tilt.summary("ttt", out["val_loss"], out["val_bpb"], world)
    if keep_nll:
        out["nll"] = nll_out.cpu()
    return out


class _WarmBytes:
    """Byte counts for the warmup's random documents (the real LUTs / sidecar describe validation data)."""

    @staticmethod
    def bytes(prev, tgt, pos=None):
        return torch.ones_like(tgt)


def compile_ttt(model: GPT, backend="inductor"):
    """The phased TTT forward, compiled once for every (rows, window length) it meets: dynamic shapes, and no duck
    sizing. With duck sizing dynamo gives equal sizes one symbol: the first 64-token window and the 64 LoRA slots
    became one, and the next window length recompiled the 17-layer forward+backward for minutes (BENCHMARKS.md,
    "Phased TTT"). The setting is process-wide; the other compiled graphs of the eval are static."""
    import torch.fx.experimental._config as fx_config
    fx_config.use_duck_shape = False
    return torch.compile(model, dynamic=True, backend=backend)


def warm_ttt(fwd, model: GPT, cfg: Config, device, log: Logger | None = None) -> float:
    """Compile warmup of the TTT forward on RANDOM tokens (never validation data), outside the eval timer: one batch
    of random documents through ttt_score_batch itself (a full-batch step, windows growing to TTT_EVAL_SEQ_LEN, the
    padded few-row steps, a last untrained chunk, a document of every TTT_CHUNK_SCHEDULE class) and a global-SGD
    forward/backward (weights untouched)."""
    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(0)
    n_virtual = len(layer_order(cfg, model.looping_active))
    R, C, W = cfg.ttt_docs_per_batch, cfg.ttt_chunk_size, cfg.ttt_eval_seq_len
    adapters = TTTAdapters(cfg, n_virtual, R, device, 0)
    # one long document; the others end after their first chunk. R - 1 documents: a first call whose row count equals
    # its window length (64 and 64 at the defaults) makes dynamo "duck size" both to one symbol, and every later
    # window length then recompiles the graph (minutes each: BENCHMARKS.md, "Phased TTT")
    # every chunk-schedule class: a document of two chunks just above the class's lower bound (tokens = targets + 1)
    lo, classes = 0, []
    for max_len, chunk in (parse_chunk_schedule(cfg.ttt_chunk_schedule) if cfg.ttt_chunk_schedule.strip() else ()):
        classes.append(min(max_len, lo + 2 * chunk) + 1)
        lo = max_len
    lengths = [W + 2 * C + 1] + classes
    lengths += [C + 1] * max(0, R - 1 - len(lengths))
    stream = torch.randint(0, cfg.vocab_size, (sum(lengths),), generator=g)
    docs = [(int(s), n) for s, n in zip(np.cumsum([0] + lengths[:-1]), lengths)]
    acc = torch.zeros(3, dtype=torch.float64, device=device)
    # with the n-gram tilt the forward also takes the hints: warm that signature (no hint here: nothing is tilted)
    tilt = NgramTilt(torch.zeros(len(stream), dtype=torch.long), torch.zeros(len(stream), dtype=torch.bool), cfg.ngram_token_boost) \
        if cfg.ngram_tilt_enabled else None
    freeze_base(model, True)
    try:
        per = max(1, R - 1)
        for i in range(0, len(docs), per):  # more classes than slots: several batches
            ttt_score_batch(fwd, model, cfg, adapters, stream.to(device), docs[i:i + per], _WarmBytes(), device, acc, None,
                            min_rows=2 if fwd is not model else 1, tilt=tilt)
        if log is not None:  # which stage the compile time goes to (one line each)
            if device.type == "cuda":
                torch.cuda.synchronize()
            log("ttt_warmup_stage", stage="lora_batch", seconds=time.perf_counter() - t0)
        if cfg.ttt_mode == "phased" and cfg.phased_ttt_num_phases > 0:
            freeze_base(model, False)
            x = torch.randint(0, cfg.vocab_size, (min(cfg.global_ttt_batch_seqs, max(1, cfg.global_ttt_chunk_tokens // W)), W + 1), generator=g).to(device)
            with autocast_ctx(device):
                fwd(x[:, :-1], x[:, 1:], model.masks(x[:, :-1], doc=True), "none", None).mean().backward()
            model.zero_grad(set_to_none=True)
            if log is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                log("ttt_warmup_stage", stage="global_sgd", seconds=time.perf_counter() - t0)
    finally:
        freeze_base(model, False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0

# ----------------------------------------------------------------------------------------------
# MAIN: setup -> data -> model -> warmup + train -> EMA -> Hessians -> pre-quant eval -> GPTQ ->
# artifact (atomic, budget-checked) -> roundtrip / sliding / TTT eval from the artifact -> summary.
# ----------------------------------------------------------------------------------------------

def setup_distributed():
    world, rank, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world: int):
    if world > 1:
        dist.barrier()


def resolve_run_dir(cfg: Config, rank: int, world: int) -> Path:
    """Rank 0 picks RUN_DIR and refuses one that already holds a run: earlier results are never destroyed."""
    obj = [None]
    if rank == 0:
        run_id = cfg.run_id or time.strftime("%Y%m%d_%H%M%S") + f"_seed{cfg.seed}"
        run_dir = Path(cfg.run_dir or os.path.join("runs", run_id))
        taken = [n for n in ("summary.json", "final_model.ptz", "train.log") if (run_dir / n).exists()]
        obj[0] = str(run_dir) if not taken else "ERR:" + f"RUN_DIR={run_dir} already holds a run ({', '.join(taken)}); set a new RUN_ID or RUN_DIR"
        if not taken:
            try:
                if run_dir.exists() and not run_dir.is_dir():
                    raise NotADirectoryError(0, "it exists and is not a folder")
                run_dir.mkdir(parents=True, exist_ok=True)
                # the run takes its folder by creating train.log exclusively: a second run started at the same moment
                # with the same RUN_DIR (or default RUN_ID) fails here instead of interleaving one log
                os.close(os.open(run_dir / "train.log", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                obj[0] = "ERR:" + f"RUN_DIR={run_dir} was just taken by another run (train.log); set a new RUN_ID or RUN_DIR"
            except OSError as e:
                obj[0] = "ERR:" + f"RUN_DIR={run_dir}: cannot create the run folder there ({e.strerror or e})"
    if world > 1:
        dist.broadcast_object_list(obj, src=0)
    if obj[0].startswith("ERR:"):
        raise ConfigError(obj[0][4:])
    return Path(obj[0])


def code_info() -> tuple[bytes, str]:
    """The bytes of the file that runs: this is what ships and what the budget counts."""
    code = Path(__file__).read_bytes()
    return code, hashlib.sha256(code).hexdigest()


def warm_compiled(fwd, model: GPT, device, batch: int, tilt: bool = False):
    """Compile warmup on RANDOM tokens (never validation data), outside the eval timer; `tilt`: the forward that also
    takes the n-gram hints."""
    if fwd is None:
        return 0.0
    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.eval_seq_len + 1), generator=g).to(device)
    with torch.no_grad(), autocast_ctx(device):
        if tilt:  # called as score_windows calls it
            fwd(x[:, :-1], x[:, 1:], model.masks(x[:, :-1]), "none", None, hint=x[:, 1:])
        else:
            fwd(x[:, :-1], x[:, 1:], model.masks(x[:, :-1]), "none")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_evals(model: GPT, cfg: Config, val: torch.Tensor, luts: LUTs, device, rank: int, world: int, log: Logger, t_load: float) -> dict:
    """Roundtrip (plain), sliding and optional TTT eval of a model loaded from the artifact."""
    use_compile = cfg.compile and device.type == "cuda"
    fwd = torch.compile(model, dynamic=False) if use_compile else model
    L = min(cfg.eval_seq_len, len(val) - 1)
    warm_s = warm_compiled(fwd if use_compile else None, model, device, cfg.eval_batch_seqs, cfg.ngram_tilt_enabled)
    ttt_fwd = None
    if cfg.ttt_enabled and cfg.ttt_mode == "phased":  # the phased forward sees a new window length every chunk step
        ttt_fwd = compile_ttt(model) if use_compile and cfg.ttt_compile else model
        ttt_warm_s = warm_ttt(ttt_fwd, model, cfg, device, log)
        log("ttt_warmup", seconds=ttt_warm_s, compiled=ttt_fwd is not model, chunk_sizes=",".join(map(str, cfg.ttt_chunk_sizes())),
            note="random_tokens_no_val_data_outside_the_eval_timer")
        warm_s += ttt_warm_s
    out: dict[str, Any] = {"eval_warmup_seconds": warm_s}
    t0 = time.perf_counter()
    # the n-gram hints in stream order (roundtrip, sliding, chunked TTT): built from val data, so inside the eval timer
    tilt = stream_ngram_tilt(val, cfg, device) if cfg.ngram_tilt_enabled else None
    rl, rb, nt, nb = evaluate(fwd, model, val, L, L, cfg.eval_batch_seqs, luts, device, rank, world, tilt)
    t1 = time.perf_counter()
    # the model's own score beside the tilted one: plain vs prequant_val_bpb is the quantization gap
    ng = tilt.summary("roundtrip", rl, rb, world) if tilt is not None else None
    pl, pb = (rl, rb) if ng is None else (rl + ng["gain_bpb"] * (rl / rb if rb else 0.0), rb + ng["gain_bpb"])
    log("roundtrip", val_loss=rl, val_bpb=rb, eval_s=t1 - t0, tokens=nt, bytes=nb, **({} if ng is None else dict(plain_val_loss=pl, plain_val_bpb=pb)))
    if ng is not None:
        log("ngram_tilt", **ng)
    out.update(quant_val_loss=rl, quant_val_bpb=rb, quant_plain_val_loss=pl, quant_plain_val_bpb=pb, val_tokens=nt, val_bytes=nb,
               final_val_loss=rl, final_val_bpb=rb, final_metric="roundtrip")
    out.update(sliding_val_loss=None, sliding_val_bpb=None, ttt_val_loss=None, ttt_val_bpb=None)
    if cfg.sliding_eval and cfg.eval_stride < L:
        sl, sb, nt2, _ = evaluate(fwd, model, val, L, cfg.eval_stride, cfg.eval_batch_seqs, luts, device, rank, world, tilt)
        t2 = time.perf_counter()
        assert nt2 == nt, "sliding eval must score exactly the same targets as the plain eval"
        n_win = len(eval_windows(len(val), L, cfg.eval_stride))
        log("sliding", val_loss=sl, val_bpb=sb, eval_s=t2 - t1, tokens=nt2, tok_s=n_win * L / (t2 - t1), windows=n_win)
        if tilt is not None:
            log("ngram_tilt", **tilt.summary("sliding", sl, sb, world))
        out.update(sliding_val_loss=sl, sliding_val_bpb=sb, sliding_seconds=t2 - t1, final_val_loss=sl, final_val_bpb=sb, final_metric="sliding")
    if cfg.ttt_enabled:
        t3 = time.perf_counter()
        if cfg.ttt_mode == "phased":
            r = eval_ttt_phased(model, val, cfg, luts, device, rank, world, log, ttt_fwd, budget_s=cfg.max_eval_seconds - (t3 - t0) - t_load)
            tl, tb = r["val_loss"], r["val_bpb"]
            assert r["tokens"] == nt, "phased TTT must score exactly the targets of the plain eval"
            out.update(ttt_docs=r["docs"], ttt_phases=r["phases"])
            chunks = dict(chunk_schedule=cfg.ttt_chunk_schedule.replace(" ", "") or "off", chunk_docs=r["chunk_docs"])
            if "ngram_tilt" in r:
                log("ngram_tilt", **r["ngram_tilt"])
        else:
            tl, tb, _ = eval_ttt_chunked(model, val, cfg, luts, device, rank, world, log, tilt)
            chunks = {}
            if tilt is not None:
                log("ngram_tilt", **tilt.summary("ttt", tl, tb, world))
        log("ttt", mode=cfg.ttt_mode, val_loss=tl, val_bpb=tb, eval_s=time.perf_counter() - t3, **chunks)
        out.update(ttt_val_loss=tl, ttt_val_bpb=tb, ttt_seconds=time.perf_counter() - t3, final_val_loss=tl, final_val_bpb=tb, final_metric="ttt")
    out["eval_seconds"] = t_load + time.perf_counter() - t0
    out["valid_score"] = cfg.val_max_tokens <= 0  # a truncated validation set (VAL_MAX_TOKENS) gives no challenge score
    log("final", val_loss=out["final_val_loss"], val_bpb=out["final_val_bpb"], metric=out["final_metric"], eval_s=out["eval_seconds"],
        valid_score=out["valid_score"])
    return out


def load_eval_data(cfg: Config, device):
    sp, luts_np = load_tokenizer(cfg.tokenizer_path, cfg.vocab_size)
    val = load_val_tokens(cfg.data_path, cfg.val_max_tokens)
    if int(val.max()) >= cfg.vocab_size:
        raise DataError(f"{cfg.data_path}: val token id {int(val.max())} >= VOCAB_SIZE={cfg.vocab_size}: vocab mismatch with the data")
    if cfg.caseops:
        missing = [hex(0xE001 + i) for i in range(4) if sp.piece_to_id(chr(0xE001 + i)) == sp.unk_id()]
        if missing:
            raise DataError(f"CASEOPS=1: TOKENIZER_PATH={cfg.tokenizer_path} has no pieces for the CaseOps operators {missing}: "
                            f"use the CaseOps tokenizer (fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model)")
    sidecar = None
    if cfg.val_bytes != "luts":
        n_full = sum(read_shard_header(f) for f in shard_files(cfg.data_path, "val"))  # headers only: VAL_MAX_TOKENS cut val
        sidecar = load_val_byte_sidecar(cfg.data_path, n_full)
        sidecar = sidecar[:val.size] if sidecar is not None else None
        if sidecar is None and (cfg.caseops or cfg.val_bytes == "sidecar"):
            why = "CASEOPS=1" if cfg.caseops else "VAL_BYTES=sidecar"
            raise DataError(f"{why}: DATA_PATH={cfg.data_path} has no byte sidecar fineweb_val_bytes_*.bin (build the val shards with "
                            f"`python data/text_to_shards.py --caseops ...`, see data/README.md)")
    return sp, LUTs(luts_np, device, sidecar), torch.from_numpy(val.astype(np.int64))


def write_summary(run_dir: Path, summary: dict, rank: int, log: Logger):
    if rank == 0:
        atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=1, default=str).encode())
        log("summary", path=run_dir / "summary.json")


def run(cfg: Config, rank: int, world: int, device, eval_only: str | None) -> int:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64
    run_dir = resolve_run_dir(cfg, rank, world)
    log = Logger(run_dir / "train.log", rank)
    ACTIVE_LOG[0] = log
    code, code_sha = code_info()
    if rank == 0:
        atomic_write_bytes(run_dir / "train_gpt.py", code)
    if not eval_only:  # eval-only logs the artifact's config once it is loaded
        log("config", **cfg.to_dict())
    kernels = resolve_kernels(cfg, device)  # every kernel check, once, before anything is compiled
    log("env", torch=torch.__version__, cuda=torch.version.cuda or "none", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        world_size=world, flash_attn=FLASH_ATTN or "none", attention=kernels.attention, mlp_kernel=kernels.mlp,
        ce_kernel="triton" if kernels.ce is not None else "torch",
        fused_grads=cfg.fused_grads, code_sha256=code_sha, code_bytes=len(code), run_dir=run_dir)
    for verdicts, what in ((FA4_CHECK, "flash-attn-4 is installed but not used (SDPA instead)"),
                           (MLP_DGRAD_CHECK, "the Triton MLP kernel is not used (cuBLAS + inductor instead)")):
        failed = verdicts.get(device.index or 0) if device.type == "cuda" else None
        if failed:
            log("warning", msg=f"{what}: {failed}")
    if device.type == "cuda" and cfg.doc_attention and kernels.varlen in (None, sdpa_varlen):
        how = "document masks" if kernels.varlen is None else "SDPA per document (COMPILE=0)"
        log("warning", msg=f"DOC_ATTENTION=1 without a varlen flash kernel (flash-attn 3 or flash-attn-4): {how} "
                           "instead, a much slower step (BENCHMARKS.md); install one, or DOC_ATTENTION=0 (attention crosses documents)")
    base = dict(run_id=run_dir.name, seed=cfg.seed, code_sha256=code_sha, code_bytes=len(code), config=cfg.to_dict(), world_size=world,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch_version=torch.__version__,
                cuda_version=torch.version.cuda, max_wallclock_seconds=cfg.max_wallclock_seconds, max_eval_seconds=cfg.max_eval_seconds,
                bytes_limit=BYTES_LIMIT)
    if eval_only:
        return run_eval_only(cfg, Path(eval_only), rank, world, device, log, run_dir, base)
    if cfg.preset == "smoke":
        if rank == 0:
            build_smoke_dataset(cfg.data_path, cfg.tokenizer_path, cfg.vocab_size, lambda m: log.raw(m))
        barrier(world)
    sp, luts, val = load_eval_data(cfg, device)
    bos = bos_of(sp)
    train_files = shard_files(cfg.data_path, "train")
    TokenStream(train_files, vocab_size=cfg.vocab_size)  # fails now, with the file named, on empty shards or a vocab mismatch
    log("data", train_shards=len(train_files), train_tokens=sum(read_shard_header(f) for f in train_files), val_tokens=len(val) - 1,
        val_bytes=int(luts.bytes(val[:-1].to(device), val[1:].to(device), torch.arange(1, len(val), device=device)).sum().item()),
        val_bytes_from="sidecar" if luts.sidecar is not None else "luts",
        tokenizer_pieces=sp.vocab_size(), bos_id=bos)

    model = GPT(cfg, bos, kernels).to(device)
    quant_plan(cfg, param_roles(model))  # FP16_TENSORS names are checked now, not after training
    log("model", params=sum(p.numel() for p in model.parameters()), layers_virtual=len(layer_order(cfg, True)))
    trainer = Trainer(cfg, model, device, rank, world, train_files, log)
    L = min(cfg.eval_seq_len, len(val) - 1)
    periodic = (lambda: evaluate(model, model, val, L, L, cfg.eval_batch_seqs, luts, device, rank, world)[:2]) if cfg.val_loss_every > 0 else None
    trainer.warmup()
    stats = trainer.train(periodic)
    set_qat(model, False)  # QAT off again: prequant eval and GPTQ Hessians see the float weights the artifact quantizes

    # EMA weights replace the live ones; SHD rows are baked before the Hessians see the model.
    if trainer.ema is not None:
        trainer.ema.copy_to(model)
    if trainer.swa is not None and trainer.swa.samples:
        trainer.swa.copy_to(model)
        log("swa", samples=trainer.swa.samples)
    bake_shared_heads(model)
    t0 = time.perf_counter()
    hessians = {}
    if cfg.quant == "gptq":
        calib = DistributedLoader(train_files, rank, world, trainer.local_tokens, trainer.seq_len, device, prefetch=0, reverse=True,  # the length training ended at
                                  vocab_size=cfg.vocab_size)
        hessians = collect_hessians(model, calib, cfg.gptq_calibration_batches, device, world)
        if device.type == "cuda":
            torch.cuda.synchronize()
    hess_s = time.perf_counter() - t0
    train_total = stats["train_seconds"] + hess_s
    train_ok = cfg.max_wallclock_seconds <= 0 or train_total <= cfg.max_wallclock_seconds
    log("gptq", hessian_s=hess_s, train_plus_hessian_s=train_total, budget_s=cfg.max_wallclock_seconds, within_budget=train_ok, hessians=len(hessians))

    pl, pb, _, _ = evaluate(model, model, val, L, L, cfg.eval_batch_seqs, luts, device, rank, world)
    log("prequant", val_loss=pl, val_bpb=pb, eval_s=time.perf_counter() - t0 - hess_s)

    t0 = time.perf_counter()
    tensors, qmeta = quantize_model(model, cfg, hessians)
    if cfg.awq_lite_enabled:
        log("awq_lite", bits=cfg.awq_lite_bits, group_size=cfg.awq_lite_group_size, top_k=cfg.awq_lite_group_top_k, **awq_summary(qmeta))
    blob = build_artifact(tensors, qmeta, cfg, bos)
    quant_s = time.perf_counter() - t0
    art = run_dir / "final_model.ptz"
    if rank == 0:
        atomic_write_bytes(art, blob)
    bytes_total = len(blob) + len(code)
    fits = bytes_total <= BYTES_LIMIT
    art_sha = hashlib.sha256(blob).hexdigest()
    log("artifact", bytes_model=len(blob), bytes_code=len(code), bytes_total=bytes_total, limit=BYTES_LIMIT, fits=fits,
        compressor=cfg.compressor, sha256=art_sha, quant_s=quant_s, path=art)
    barrier(world)

    del trainer
    t0 = time.perf_counter()
    qmodel, qcfg = load_artifact(art.read_bytes(), device)  # roundtrip from the file alone
    ev = run_evals(qmodel, cfg, val, luts, device, rank, world, log, time.perf_counter() - t0)
    eval_ok = ev["eval_seconds"] <= cfg.max_eval_seconds
    summary = dict(base, **stats, hessian_seconds=hess_s, train_plus_hessian_seconds=train_total, prequant_val_loss=pl, prequant_val_bpb=pb,
                   **ev, bytes_model=len(blob), bytes_code=len(code), bytes_total=bytes_total, artifact_sha256=art_sha,
                   compressor=cfg.compressor, quant_seconds=quant_s, train_time_ok=train_ok, eval_time_ok=eval_ok, size_ok=fits)
    write_summary(run_dir, summary, rank, log)
    rc = fail_loudly(log, fits, train_ok, eval_ok, bytes_total, train_total, ev["eval_seconds"], cfg, code)
    log_done(log, summary, run_dir, rc)
    return rc


def log_done(log: Logger, summary: dict, run_dir: Path, rc: int):
    """The closing line: the score, whether it counts, bytes against the limit, times, where the files are."""
    why = [] if summary.get("valid_score", True) else ["VAL_MAX_TOKENS_truncated_the_validation_set"]
    why += [n for n, ok in (("over_16MB", summary.get("size_ok", True)), ("training_over_budget", summary.get("train_time_ok", True)),
                            ("eval_over_budget", summary.get("eval_time_ok", True))) if not ok]
    log("done", val_bpb=summary.get("final_val_bpb"), metric=summary.get("final_metric"), valid_score=summary.get("valid_score", True),
        bytes_total=summary.get("bytes_total"), limit=BYTES_LIMIT, fits=summary.get("size_ok"), train_s=summary.get("train_plus_hessian_seconds", "na"),
        eval_s=summary.get("eval_seconds"), rc=rc, problems=",".join(why) or "none", run_dir=run_dir,
        files="train.log,summary.json" + (",final_model.ptz" if (run_dir / "final_model.ptz").exists() else ""))


def packed_code_bound(code: bytes) -> int:
    """Upper bound on the bytes of tools/pack_code.py's output: lzma + base85 of the raw file plus its
    ~250-byte wrapper (the tool also strips comments and docstrings first, so it does at least this well)."""
    return len(base64.b85encode(lzma.compress(code, preset=9 | lzma.PRESET_EXTREME))) + 300


def fail_loudly(log, fits, train_ok, eval_ok, bytes_total, train_total, eval_s, cfg, code: bytes | None = None) -> int:
    rc = 0
    if not fits:
        bound = packed_code_bound(code) if code else None
        packed_total = bytes_total - len(code) + bound if bound is not None else None
        if packed_total is not None and packed_total <= BYTES_LIMIT:
            log("error", msg=f"artifact_over_budget:{bytes_total}>{BYTES_LIMIT}_bytes_(model+code):_the_code_counts_{len(code)}_raw_bytes;"
                f"_packed_(python3_tools/pack_code.py_train_gpt.py_-o_OUT)_it_is_at_most_{bound}_bytes_and_model+code_would_be_"
                f"{packed_total}:_run_that_packed_file_instead")
        else:
            log("error", msg=f"artifact_over_budget:{bytes_total}>{BYTES_LIMIT}_bytes_(model+code);_lower_MATRIX_BITS/EMBED_BITS,_raise_clip_sigmas_or_shrink_the_model")
        rc = 1
    if not train_ok:
        log("error", msg=f"training_plus_GPTQ_Hessians_took_{train_total:.1f}s>{cfg.max_wallclock_seconds}s;_raise_GPTQ_RESERVE_SECONDS")
        rc = 1
    if not eval_ok:
        log("error", msg=f"eval_took_{eval_s:.1f}s>MAX_EVAL_SECONDS={cfg.max_eval_seconds}")
        rc = 1
    return rc


def run_eval_only(cfg: Config, artifact: Path, rank, world, device, log: Logger, run_dir: Path, base: dict) -> int:
    if not artifact.is_file():
        raise DataError(f"--eval-only {artifact}: artifact file not found")
    t0 = time.perf_counter()
    blob = artifact.read_bytes()
    known = {f.name for f in FIELDS}
    overrides = {k: v for k, v in os.environ.items() if ALIASES.get(k, k) in known}
    ignored: list[str] = []
    try:
        qmodel, qcfg = load_artifact(blob, device, overrides, ignored)
    except ValueError as e:  # ConfigError too: the stored config failed the env checks
        raise DataError(f"--eval-only {artifact}: {e}") from None
    t_load = time.perf_counter() - t0
    log("config", **qcfg.to_dict())  # the config in force: the artifact's, with the eval-side overrides
    for item in ignored:
        log("warning", msg=f"{item}_is_ignored_by_--eval-only:_the_artifact's_weights_fix_it_(eval-side_options:_DATA_PATH,_TOKENIZER_PATH,_EVAL_*,_TTT_*,...)")
    log("eval_only", artifact=artifact, bytes_model=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    _, luts, val = load_eval_data(qcfg, device)
    ev = run_evals(qmodel, qcfg, val, luts, device, rank, world, log, t_load)
    eval_ok = ev["eval_seconds"] <= qcfg.max_eval_seconds
    bytes_total = len(blob) + base["code_bytes"]
    summary = dict(base, config=qcfg.to_dict(), mode="eval_only", artifact=str(artifact), artifact_sha256=hashlib.sha256(blob).hexdigest(),
                   **ev, bytes_model=len(blob), bytes_total=bytes_total, eval_time_ok=eval_ok, size_ok=bytes_total <= BYTES_LIMIT)
    write_summary(run_dir, summary, rank, log)
    rc = fail_loudly(log, bytes_total <= BYTES_LIMIT, True, eval_ok, bytes_total, 0.0, ev["eval_seconds"], qcfg)
    log_done(log, summary, run_dir, rc)
    return rc


ACTIVE_LOG: list = [None]  # the running job's Logger: failures end its train.log too, not only stderr


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) received: the run stops with one event line instead of a traceback."""


def log_failure(line: str):
    print(line, file=sys.stderr, flush=True)
    log = ACTIVE_LOG[0]
    if log is not None and log.rank == 0 and log.path is not None:
        try:
            with open(log.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass


def _on_sigterm(signum, frame):
    raise Interrupted("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    eval_only = None
    if argv:
        if argv[0] == "--eval-only" and len(argv) == 2:
            eval_only = argv[1]
        else:
            print("usage: train_gpt.py [--eval-only ARTIFACT]\n"
                  "Everything else is configured by env vars: see the env table in README.md (generated from FIELDS in this file),\n"
                  "e.g. PRESET=smoke python train_gpt.py for a CPU smoke run.", file=sys.stderr)
            return 0 if argv[0] in ("-h", "--help") else 2
    try:
        cfg = Config.from_env()
    except ConfigError as e:
        print(f"event:error msg:config: {e}", file=sys.stderr, flush=True)
        return 2
    rank, world, device = setup_distributed()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(cfg, rank, world, device, eval_only)
    except (ConfigError, DataError, TrainingError) as e:
        log_failure(f"event:error kind:{type(e).__name__} msg:{e}")
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        sig = "SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
        log_failure(f"event:interrupted signal:{sig} msg:stopped_by_{sig};_files_already_written_in_the_run_folder_are_complete")
        return 130 if sig == "SIGINT" else 143
    except Exception as e:  # an unexpected failure: its traceback follows, and the log says why it ended
        log_failure(f"event:error kind:{type(e).__name__} msg:{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        raise
    finally:
        ACTIVE_LOG[0] = None
        if world > 1 and dist.is_initialized():
            # Collect cyclic garbage first (it may still hold the process group, which would then be torn down
            # during interpreter shutdown). Without it ~1 in 9 two-process gloo runs aborted at exit ("terminate
            # called without an active exception") after all their work was done; with it 0 in 60.
            gc.collect()
            dist.destroy_process_group()


# ==============================================================================================
# APPENDIX: machinery. The recipe above calls into it; nothing here changes what is computed.
#   A. kernels: FlashAttention 3/2/4 entry points, the Triton MLP dgrad kernel and their on-device checks, attention
#      masks, the fused-gradient autograd Functions; resolve_kernels chooses among them once per device.
#   B. containers: PGQ1 (tensors + JSON meta, no pickle, CRC32 trailer) and the per-group container (COMPRESSOR=pergroup).
#   C. codecs: byte shuffle, brotli / zstd / lzma / lrzip, size-bounded decompression.
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# APPENDIX A. KERNELS: resolve_kernels and the kernels, checks, masks and fused-gradient Functions it picks from.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Kernels:
    """What the model runs on for one config and device, chosen once (`resolve_kernels`) before compile, so the
    compiled step reads fixed attributes instead of asking a policy on every forward."""
    cfg: Config
    device: torch.device          # resolved for this device
    attention: str                # fa3 | fa2 | fa4 | sdpa | flex: full-causal attention (for the log)
    flash: Callable | None        # dense flash_attn_func(q, k, v, causal, window_size), None = SDPA / FlexAttention
    varlen: Callable | None       # varlen(q, k, v, cu_seqlens, max_seqlen, window) for document attention, or None
    flex: bool                    # window / document masks as FlexAttention BlockMasks (CUDA) instead of dense SDPA masks
    mlp_dgrad: Callable | None    # the fused MLP dgrad op, None = cuBLAS + inductor
    scale: Callable               # scale(t, s), skip_mix(x, skip, w, g), lane_mix(...): the model's math, with
    skip_mix: Callable            # fused-gradient versions under FUSED_GRADS=1
    lane_mix: Callable
    window_masks: dict = dataclasses.field(default_factory=dict, repr=False)  # static window masks by (T, device)
    ce: Callable | None = None    # the fused softcapped CE op (CE_KERNEL=triton), None = torch

    @property
    def mlp(self) -> str:
        return "triton" if self.mlp_dgrad is not None else "torch"

    def __deepcopy__(self, memo):  # stateless choices (the mask cache is a pure function of its key): shared
        return self

    def masks(self, x: torch.Tensor, bos_id: int, train: bool = False, cu_seqlens: torch.Tensor | None = None,
              doc: bool | None = None, seq_len: int | None = None) -> dict:
        """Mask objects for a batch ({} when every layer takes the plain causal fast path). Document attention
        (DOC_ATTENTION for training, EVAL_DOC_ATTENTION otherwise, `doc` when given): {"varlen": (cu_seqlens, max_seqlen)}
        with a varlen kernel (a flash kernel's, or sdpa_varlen in eager runs), else per-window masks over segment ids
        (compiled CUDA without flash); `cu_seqlens` comes from the loader in training
        (computed here from x otherwise: a host sync). Window-only masks are static and cached. `seq_len`: the training
        length in force (TRAIN_SEQ_SCHEDULE), the document cut length of the varlen kernel."""
        cfg = self.cfg
        if doc if doc is not None else cfg.doc_attention if train else cfg.eval_doc_attention_on:
            max_len = min((seq_len or cfg.train_seq_len) if train else x.size(1), x.numel())
            if cu_seqlens is None:
                cu_seqlens = torch.from_numpy(doc_cu_seqlens(x.detach().cpu().numpy(), bos_id, max_len)).to(x.device)
            if self.varlen is not None:
                # one compiled graph for every cu_seqlens length: a micro-batch with more documents than any warmup
                # batch had (the next power-of-two bucket) recompiled the whole step inside the timed loop
                torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
                return {"varlen": (cu_seqlens, max_len)}
            return build_masks(cfg, x.size(1), x.device, segment_ids(cu_seqlens, x.shape), self.flex)
        if (self.flash is not None and x.is_cuda) or not any(cfg.layer_windows()):
            return {}
        key = (x.size(1), str(x.device))
        if key not in self.window_masks:
            self.window_masks[key] = build_masks(cfg, x.size(1), x.device, None, self.flex and x.is_cuda)
        return self.window_masks[key]


def resolve_kernels(cfg: Config, device) -> Kernels:
    """Every kernel choice for `cfg` on `device`, with the on-device checks of the optional kernels (FA4, the Triton
    MLP dgrad) run here, eagerly: a kernel that fails its check is not used (auto) or fails loudly (asked for)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    flash = flash_kernel(cfg, device) if cuda else None
    attention = (FLASH_ATTN if flash is _flash_attn_func else "fa4") if flash is not None else \
        "flex" if cuda and cfg.attn_backend == "flex" else "sdpa"
    ops = (fused_scale, fused_skip_mix, fused_lane_mix) if cfg.fused_grads else (scale, skip_mix, lane_mix)
    return Kernels(cfg, device, attention, flash, varlen_kernel(cfg, device), cuda and flash is None and cfg.attn_backend != "sdpa",
                   mlp_dgrad_kernel(cfg, device), *ops, ce=ce_kernel(cfg, device))


try:  # FlashAttention 3 (Hopper) or 2, used when importable; everything works without it.
    from flash_attn_interface import flash_attn_func as _flash_attn_func, flash_attn_varlen_func as _flash_varlen_func  # type: ignore
    FLASH_ATTN = "fa3"
except Exception:
    try:
        from flash_attn import flash_attn_func as _flash_attn_func, flash_attn_varlen_func as _flash_varlen_func  # type: ignore
        FLASH_ATTN = "fa2"
    except Exception:
        _flash_attn_func, _flash_varlen_func, FLASH_ATTN = None, None, None

_FA4: list = []  # [callable or None] once loaded


def fa4_attention():
    """FlashAttention 4 (`pip install flash-attn-4`: CuTe DSL, JIT-compiled, Hopper/Blackwell) as
    flash_attn_func(q, k, v, causal, window_size), or None when not importable. Forward and backward are
    registered as torch custom ops so torch.compile keeps the step one graph (FA4's own autograd.Function
    would be a graph break per layer). Loaded on first use: importing the DSL takes seconds."""
    if _FA4:
        return _FA4[0]
    try:
        from flash_attn.cute import interface as fa4  # type: ignore
    except Exception:
        _FA4.append(None)
        return None

    def windows(window: int):  # our window w = keys q-w..q; FA's (left, right)
        return (window, 0) if window > 0 else (None, None)

    @torch.library.custom_op("train_gpt::fa4_fwd", mutates_args=())
    def fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = windows(window)
        out, lse = fa4._flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), causal=True, window_size_left=left,
                                       window_size_right=right, return_lse=True)[:2]
        return out, lse

    @fa4_fwd.register_fake
    def _(q, k, v, window):
        B, T, H, D = q.shape
        return q.new_empty((B, T, H, v.size(-1))), q.new_empty((B, H, T), dtype=torch.float32)

    @torch.library.custom_op("train_gpt::fa4_bwd", mutates_args=())
    def fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        left, right = windows(window)
        dq, dk, dv = fa4._flash_attn_bwd(q.contiguous(), k.contiguous(), v.contiguous(), out, dout.contiguous(), lse,
                                         causal=True, window_size_left=left, window_size_right=right)[:3]
        return dq, dk, dv

    @fa4_bwd.register_fake
    def _(dout, q, k, v, out, lse, window):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, window = inputs
        ctx.save_for_backward(q, k, v, *output)
        ctx.window = window

    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = fa4_bwd(dout, q, k, v, out, lse, ctx.window)
        return dq, dk, dv, None

    fa4_fwd.register_autograd(backward, setup_context=setup_context)

    # Varlen (DOC_ATTENTION): q/k/v [total, H, D] with int32 cu_seqlens; segments attend only within themselves.
    @torch.library.custom_op("train_gpt::fa4_varlen_fwd", mutates_args=())
    def fa4_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int,
                       window: int) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = windows(window)
        out, lse = fa4._flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q=cu, cu_seqlens_k=cu,
                                       max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True,
                                       window_size_left=left, window_size_right=right, return_lse=True)[:2]
        return out, lse

    @fa4_varlen_fwd.register_fake
    def _(q, k, v, cu, max_seqlen, window):
        N, H, _ = q.shape
        return q.new_empty((N, H, v.size(-1))), q.new_empty((H, N), dtype=torch.float32)

    @torch.library.custom_op("train_gpt::fa4_varlen_bwd", mutates_args=())
    def fa4_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu: torch.Tensor, max_seqlen: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        left, right = windows(window)
        dq, dk, dv = fa4._flash_attn_bwd(q.contiguous(), k.contiguous(), v.contiguous(), out, dout.contiguous(), lse,
                                         causal=True, window_size_left=left, window_size_right=right, cu_seqlens_q=cu,
                                         cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)[:3]
        return dq, dk, dv

    @fa4_varlen_bwd.register_fake
    def _(dout, q, k, v, out, lse, cu, max_seqlen, window):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def varlen_setup_context(ctx, inputs, output):
        q, k, v, cu, max_seqlen, window = inputs
        ctx.save_for_backward(q, k, v, cu, *output)
        ctx.max_seqlen, ctx.window = max_seqlen, window

    def varlen_backward(ctx, dout, dlse):
        q, k, v, cu, out, lse = ctx.saved_tensors
        return (*fa4_varlen_bwd(dout, q, k, v, out, lse, cu, ctx.max_seqlen, ctx.window), None, None, None)

    fa4_varlen_fwd.register_autograd(varlen_backward, setup_context=varlen_setup_context)

    def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)):
        assert causal, "fa4_attention: causal only"
        return fa4_fwd(q, k, v, max(int(window_size[0]), 0))[0]

    def flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, window=0):
        return fa4_varlen_fwd(q, k, v, cu_seqlens, int(max_seqlen), int(window))[0]

    flash_attn_func.varlen = flash_attn_varlen_func
    _FA4.append(flash_attn_func)
    return flash_attn_func


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen, window=0):
    """FA3's / FA2's flash_attn_varlen_func in the signature of FA4's varlen wrapper (causal)."""
    out = _flash_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                             window_size=(window, 0) if window else (-1, -1))
    return out[0] if isinstance(out, tuple) else out


def causal_window(q, kv, window: int):
    """Which (query, key) positions attend: causal, and within `window` positions when window > 0 (the token-level
    rule of every mask: sdpa_varlen's, FlexAttention's mask_mod and the dense SDPA masks of build_masks)."""
    m = q >= kv
    return m & (q - kv <= window) if window else m


SDPA_VARLEN_DENSE_MAX = 4096  # packed-row tokens up to which sdpa_varlen uses one dense mask (8 heads: ~0.5 GB of scores)


def sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, window=0):
    """Varlen attention without a flash kernel, in FA4's varlen signature: causal SDPA on each segment of cu_seqlens
    (keys q-window..q when window > 0). Memory is the sum of squared segment lengths where a document mask over the
    packed row [1, B*T] costs (B*T)^2 (a 24k-token CPU micro-batch: ~10 GB per layer, killed by the OOM killer).
    A host loop over the segments (it reads cu_seqlens) in eager runs (the CPU; CUDA with COMPILE=0). Up to
    SDPA_VARLEN_DENSE_MAX tokens, and traced (dynamo's explain, a compiled CPU test: one graph), the same mask over the
    whole packed row instead: small, and a position's output then stays bit-identical when a later token becomes a BOS
    (per segment it changes in the last bits: the segment's length sets SDPA's blocking)."""
    gqa = k.size(1) != q.size(1)
    if torch.compiler.is_compiling() or q.size(0) <= SDPA_VARLEN_DENSE_MAX:
        pos = torch.arange(q.size(0), device=q.device)
        seg = torch.searchsorted(cu_seqlens, pos.to(cu_seqlens.dtype), right=True)
        m = (seg[:, None] == seg[None, :]) & causal_window(pos[:, None], pos[None, :], window)
        y = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=m, enable_gqa=gqa)
        return y[0].transpose(0, 1)
    outs, cu = [], cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        if e <= s:  # the padding of the power-of-two bucket
            continue
        qs, ks, vs = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))
        if window and e - s > window + 1:
            i = torch.arange(e - s, device=q.device)
            m = causal_window(i[:, None], i[None, :], window)
            y = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=m, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        outs.append(y[0].transpose(0, 1))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


FA4_CHECK: dict = {}  # device index -> None (FA4 matched SDPA on the probe) or why it is not used


def fa4_check(device) -> str | None:
    """Run FA4 once (fwd + bwd, causal GQA, bf16) on `device` against fp32 SDPA and remember the verdict:
    a broken flash-attn-4 install (DSL/CUDA library mismatch, unsupported GPU) then falls back to SDPA under
    auto instead of failing inside the compiled step. Runs eagerly, from resolve_kernels."""
    return checked_kernel(FA4_CHECK, device, fa4_attention(), _fa4_probe, "flash_attn.cute.interface does not import")


def checked_kernel(verdicts: dict, device, kernel, probe: Callable, missing: str) -> str | None:
    """Memoized (per process and device) check of an optional kernel: `probe(kernel, device)` returns None when the
    kernel matches its reference, else why not; an exception (or kernel None: `missing`) also means "do not use it"."""
    key = device.index if device.index is not None else 0
    if key in verdicts:
        return verdicts[key]
    try:
        if kernel is None:
            raise ImportError(missing)
        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device, torch.enable_grad(), torch.autocast(device.type, enabled=False):
            verdict = probe(kernel, device)
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        verdict = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    verdicts[key] = verdict
    return verdict


def _fa4_probe(fn, device) -> str | None:
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, T, H, Hkv, D = 2, 256, 4, 2, 64
    q, k, v = (torch.randn(B, T, h, D, device=device, dtype=dtype, generator=g).requires_grad_() for h in (H, Hkv, Hkv))
    go = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=g)
    out = fn(q, k, v, causal=True, window_size=(-1, -1))
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in ref_in), is_causal=True, enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, ref_in, go.float())
    def worst_error(got, want):  # max relative error over out/dq/dk/dv
        return max(((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(got, want))

    worst = worst_error((out, *grads), (ref, *ref_grads))
    if not (math.isfinite(worst) and worst < 0.05):
        return f"differs from SDPA: max relative error {worst:.3g} (out/dq/dk/dv)"
    varlen = getattr(fn, "varlen", None)
    if varlen is None:
        return None
    # varlen: the same batch as one packed sequence, segments = [rows cut at BOS-like points], padded cu_seqlens
    ids = torch.ones(B, T, dtype=torch.int64)
    ids[0, 100], ids[1, 7] = 0, 0
    cu = torch.from_numpy(doc_cu_seqlens(ids.numpy(), 0, T)).to(device)
    flat = [t.detach().reshape(B * T, *t.shape[2:]).requires_grad_() for t in (q, k, v)]
    out = varlen(*flat, cu, T, 0)
    grads = torch.autograd.grad(out, flat, go.reshape(B * T, H, D))
    seg = segment_ids(cu, (1, B * T))[0]
    mask = (seg[:, None] == seg[None, :]) & torch.ones(B * T, B * T, dtype=torch.bool, device=device).tril()
    ref_in = [t.detach().float().requires_grad_() for t in flat]
    ref = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in ref_in), attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
    ref_grads = torch.autograd.grad(ref, ref_in, go.reshape(B * T, H, D).float())
    worst = worst_error((out, *grads), (ref, *ref_grads))
    return None if math.isfinite(worst) and worst < 0.05 else f"varlen differs from masked SDPA: max relative error {worst:.3g} (out/dq/dk/dv)"


def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _indexed_cuda(device=None) -> torch.device:
    """`device` with its index; a bare "cuda" (or None) is the current CUDA device."""
    return device if device is not None and device.index is not None else torch.device("cuda", torch.cuda.current_device())


def flash_kernel(cfg: Config, device=None):
    """The flash-attn function this config attends with on a CUDA device, or None (SDPA / FlexAttention).
    auto: FlashAttention 3, else FlashAttention 4 on Hopper or newer once it has passed `fa4_check` on this
    device (it beats cuDNN's SDPA in the full step: BENCHMARKS.md), else SDPA; FlashAttention 2 only when asked
    for (flash): it predates Hopper and is slower there than cuDNN's SDPA. ATTN_BACKEND=fa4
    fails loudly when the check fails. DOC_ATTENTION uses the same kernel's varlen entry point (`varlen_kernel`)."""
    backend = cfg.attn_backend
    if backend in ("sdpa", "flex"):
        return None
    if backend == "flash" or (backend == "auto" and FLASH_ATTN == "fa3"):
        return _flash_attn_func
    device = _indexed_cuda(device)
    if backend == "auto" and (_cuda_major(device.index) < 9 or fa4_attention() is None):
        return None
    why = fa4_check(device)
    if why is not None and backend == "fa4":
        raise RuntimeError(f"ATTN_BACKEND=fa4: flash-attn-4 failed its check on {device}: {why}")
    return None if why is not None else fa4_attention()


def varlen_kernel(cfg: Config, device=None):
    """varlen(q, k, v, cu_seqlens, max_seqlen, window) of the flash kernel this config attends with (FA3/FA2's
    flash_attn_varlen_func or FA4's); without one, `sdpa_varlen` in eager runs (the CPU, CUDA with COMPILE=0: a
    document mask over the packed row would be dense, and unfused FlexAttention materialises the same scores), else
    None: compiled CUDA then uses FlexAttention document masks (block-sparse)."""
    if device is None:
        return None
    device = torch.device(device)
    flash = flash_kernel(cfg, device) if device.type == "cuda" else None
    if flash is None:
        return sdpa_varlen if device.type != "cuda" or not cfg.compile else None
    return _flash_varlen if flash is _flash_attn_func else getattr(flash, "varlen", None)


def triton_op_once(build: Callable) -> Callable:
    """Decorator for the optional Triton ops: `build(triton, tl)` makes the op once per process; the decorated
    function returns it, or None when triton (or a part of it the op needs) does not import. `.cache`: [op or None]."""
    cache: list = []

    def get():
        if not cache:
            try:
                import triton
                import triton.language as tl
            except Exception:  # noqa: BLE001 - any import failure: not usable here
                cache.append(None)
                return None
            try:
                cache.append(build(triton, tl))
            except ImportError:
                cache.append(None)
        return cache[0]

    get.cache, get.__doc__, get.__name__ = cache, build.__doc__, build.__name__
    return get


MLP_DGRAD_CHECK: dict = {}  # device index -> None (the Triton kernel matched fp32 on the probe) or why it is not used
MLP_DGRAD_TILE = dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4)  # an autotuning's pick (BENCHMARKS.md)


@triton_op_once
def mlp_dgrad_op(triton, tl):
    """The MLP backward's dgrad GEMM with the activation derivative in its epilogue, as a torch custom op
    mlp_dgrad(g, w2, pre, slope) = (g @ w2) * f'(pre), f(u) = leaky_relu(u, slope)^2, f'(u) = 2u (u > 0) or
    2 slope^2 u; or None without triton. One Triton kernel (TMA loads/stores, persistent over output tiles) in
    place of cuBLAS + a pass that reads the [tokens x hidden] product and pre again (its gain: BENCHMARKS.md).
    TRITON_INTERPRET=1 runs it on a CPU."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def dgrad_kernel(g_desc, w_desc, pre_desc, out_desc, M, N, slope, K: tl.constexpr, PROGRAMS: tl.constexpr,
                     TILES_PER_PROGRAM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr):
        # builtins only, no tl.cdiv / tl.zeros (jit functions): the CPU interpreter (tests) cannot call those when
        # triton was imported before TRITON_INTERPRET=1 was set
        grid_m, grid_n = (M + BM - 1) // BM, (N + BN - 1) // BN
        for i in tl.range(0, TILES_PER_PROGRAM, flatten=True):  # persistent: loads of the next tile overlap this epilogue
            tile = tl.program_id(0) + i * PROGRAMS
            if tile < grid_m * grid_n:
                per_group = GROUP_M * grid_n  # GROUP_M row blocks in a row share w's column blocks in L2
                first_m = (tile // per_group) * GROUP_M
                size_m = min(grid_m - first_m, GROUP_M)
                om = (first_m + (tile % per_group) % size_m) * BM
                on = ((tile % per_group) // size_m) * BN
                acc = tl.full((BM, BN), 0.0, tl.float32)
                for k in range(0, K, BK):
                    acc = tl.dot(g_desc.load([om, k]), w_desc.load([k, on]), acc)
                u = pre_desc.load([om, on]).to(tl.float32)
                out_desc.store([om, on], (acc * tl.where(u > 0, 2.0 * u, (2.0 * slope * slope) * u)).to(out_desc.dtype))

    @torch.library.custom_op("train_gpt::mlp_dgrad", mutates_args=())
    def mlp_dgrad(g: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, slope: float) -> torch.Tensor:
        g, w2, pre = g.contiguous(), w2.contiguous(), pre.contiguous()
        (M, K), N = g.shape, w2.size(1)
        out = torch.empty_like(pre)
        tile = MLP_DGRAD_TILE if g.is_cuda else dict(BM=32, BN=32, BK=16, GROUP_M=2, num_warps=4, num_stages=1)
        BM, BN, BK = tile["BM"], tile["BN"], tile["BK"]
        descs = [TensorDescriptor.from_tensor(t, shape) for t, shape in ((g, [BM, BK]), (w2, [BK, BN]), (pre, [BM, BN]), (out, [BM, BN]))]
        tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
        programs = min(tiles, torch.cuda.get_device_properties(g.device).multi_processor_count if g.is_cuda else 4)
        dgrad_kernel[(programs,)](*descs, M, N, float(slope), K, programs, triton.cdiv(tiles, programs), BM, BN, BK,
                                  tile["GROUP_M"], num_warps=tile["num_warps"], num_stages=tile["num_stages"])
        return out

    @mlp_dgrad.register_fake
    def _(g, w2, pre, slope):
        return torch.empty_like(pre)

    return mlp_dgrad


def _mlp_dgrad_probe(op, device) -> str | None:
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M, K, N, slope = 300, 64, 200, 0.5  # ragged tiles on purpose
    dy, w2, pre = (torch.randn(*shape, device=device, dtype=dtype, generator=g) for shape in ((M, K), (K, N), (M, N)))
    got = op(dy, w2, pre, slope).float()
    u = pre.float()
    ref = (dy.float() @ w2.float()) * torch.where(u > 0, 2 * u, 2 * slope * slope * u)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    return None if math.isfinite(err) and err < 0.02 else f"differs from fp32: max relative error {err:.3g}"


def mlp_dgrad_kernel(cfg: Config, device):
    """The fused MLP dgrad op this config's backward uses on `device`, or None (cuBLAS + inductor).
    auto: on CUDA sm90+ (TMA) once `checked_kernel` has run it against fp32 on this device; MLP_KERNEL=triton
    fails loudly when the check fails; LoRA'd MLPs (TTT) always take the torch path."""
    if cfg.mlp_kernel == "torch" or device.type != "cuda" or cfg.model_dim % 8 or int(cfg.mlp_mult * cfg.model_dim) % 8:
        return None  # (TMA needs 16-byte aligned rows; MLP_KERNEL=triton: a ConfigError up front)
    device, op = _indexed_cuda(device), mlp_dgrad_op()
    if cfg.mlp_kernel == "auto" and (_cuda_major(device.index) < 9 or op is None):
        return None
    why = checked_kernel(MLP_DGRAD_CHECK, device, op, _mlp_dgrad_probe, "triton does not import")
    if why is not None and cfg.mlp_kernel == "triton":
        raise RuntimeError(f"MLP_KERNEL=triton: the Triton MLP kernel failed its check on {device}: {why}")
    return None if why is not None else op


SOFTCAP_CE_CHECK: dict = {}  # device index -> None (the fused CE matched fp32 on the probe) or why it is not used


@triton_op_once
def softcap_ce_op(triton, tl):
    """Softcapped cross-entropy as a torch custom op with its own backward, or None without triton:
    softcap_ce(logits [N, V], targets [N], c) -> (loss [N], lse [N]) in fp32, z = c tanh(x / c), loss = lse(z) - z_t;
    the backward writes dx = g (softmax(z) - onehot(t)) (1 - (z / c)^2) in the logits' dtype. One program per row,
    an online logsumexp over V in blocks: each direction reads the logits once (inductor's path keeps an fp32 copy).
    TRITON_INTERPRET=1 runs it on a CPU."""
    # builtins only (tl.where / tl.exp / tl.log / tl.reduce with our own combine functions): the CPU interpreter
    # (tests) cannot call triton's own jit helpers (tl.max, tl.sum, tl.sigmoid) once triton was imported without it
    @triton.jit
    def _ce_max(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _ce_add(a, b):
        return a + b

    globals().update(_ce_max=_ce_max, _ce_add=_ce_add)  # a kernel resolves the functions it calls in module globals

    @triton.jit
    def fwd_kernel(x_ptr, t_ptr, loss_ptr, lse_ptr, stride, c, V: tl.constexpr, BLOCK: tl.constexpr):  # V: the vocab, one compile
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        m = tl.full((BLOCK,), -1e30, tl.float32)  # per-lane running max and sum; one reduction at the end
        acc = tl.full((BLOCK,), 0.0, tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            z = tl.where(cols < V, c - 2.0 * c / (tl.exp(2.0 * x / c) + 1.0), -1e30)  # c tanh(x / c)
            m_new = tl.maximum(m, z)
            acc = acc * tl.exp(m - m_new) + tl.exp(z - m_new)
            m = m_new
        top = tl.reduce(m, 0, _ce_max)
        lse = top + tl.log(tl.reduce(acc * tl.exp(m - top), 0, _ce_add))
        xt = tl.load(base + tl.load(t_ptr + row)).to(tl.float32)
        tl.store(loss_ptr + row, lse - (c - 2.0 * c / (tl.exp(2.0 * xt / c) + 1.0)))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def bwd_kernel(x_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr, stride, c, V: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base, dbase = x_ptr + row * stride, dx_ptr + row * stride
        lse, g, t = tl.load(lse_ptr + row), tl.load(g_ptr + row), tl.load(t_ptr + row)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            z = c - 2.0 * c / (tl.exp(2.0 * x / c) + 1.0)
            p = tl.exp(z - lse) - tl.where(cols == t, 1.0, 0.0)
            u = z / c
            tl.store(dbase + cols, (g * p * (1.0 - u * u)).to(dx_ptr.dtype.element_ty), mask=cols < V)

    block = lambda V: min(1024, triton.next_power_of_2(V))

    @torch.library.custom_op("train_gpt::softcap_ce", mutates_args=())
    def softcap_ce(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits, targets = logits.contiguous(), targets.contiguous()
        N, V = logits.shape
        loss = torch.empty(N, device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        fwd_kernel[(N,)](logits, targets, loss, lse, logits.stride(0), float(softcap), V=V, BLOCK=block(V), num_warps=4)
        return loss, lse

    @softcap_ce.register_fake
    def _(logits, targets, softcap):
        return logits.new_empty(logits.size(0), dtype=torch.float32), logits.new_empty(logits.size(0), dtype=torch.float32)

    @torch.library.custom_op("train_gpt::softcap_ce_bwd", mutates_args=())
    def softcap_ce_bwd(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, softcap: float) -> torch.Tensor:
        logits, targets, grad = logits.contiguous(), targets.contiguous(), grad.contiguous().float()
        N, V = logits.shape
        dx = torch.empty_like(logits)
        bwd_kernel[(N,)](logits, targets, lse, grad, dx, logits.stride(0), float(softcap), V=V, BLOCK=block(V), num_warps=4)
        return dx

    @softcap_ce_bwd.register_fake
    def _(grad, logits, targets, lse, softcap):
        return torch.empty_like(logits)

    def setup_context(ctx, inputs, output):
        logits, targets, softcap = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.softcap = softcap

    def backward(ctx, grad_loss, grad_lse):  # lse is an output for the backward only: its gradient is ignored
        logits, targets, lse = ctx.saved_tensors
        return softcap_ce_bwd(grad_loss, logits, targets, lse, ctx.softcap), None, None

    softcap_ce.register_autograd(backward, setup_context=setup_context)
    return softcap_ce


def _softcap_ce_probe(op, device) -> str | None:
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    N, V, c = 37, 1500, 30.0  # a ragged last block on purpose
    x = (torch.randn(N, V, device=device, generator=g) * 40).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=device, generator=g)
    loss = op(x, t, c)[0]
    (dx,) = torch.autograd.grad(loss.mean(), x)
    xr = x.detach().float().requires_grad_()
    ref = F.cross_entropy(c * torch.tanh(xr / c), t, reduction="none")
    (dref,) = torch.autograd.grad(ref.mean(), xr)
    err = max(((loss - ref).abs().max() / ref.abs().max()).item(), ((dx.float() - dref).abs().max() / dref.abs().max()).item())
    return None if math.isfinite(err) and err < 0.02 else f"differs from fp32: max relative error {err:.3g}"


def ce_kernel(cfg: Config, device):
    """The fused softcapped CE op on CUDA once `checked_kernel` has run it against fp32 on this device, else None
    (torch). auto: only with the plain tanh softcap, and a failed check falls back to torch; CE_KERNEL=triton fails
    loudly when the check fails (it was asked for)."""
    if cfg.ce_kernel == "torch" or device.type != "cuda":
        return None
    if cfg.ce_kernel == "auto" and (cfg.logit_softcap <= 0 or cfg.asym_logit_rescale or softcap_ce_op() is None):
        return None  # the kernel fuses the plain tanh softcap only (CE_KERNEL=triton: a ConfigError up front)
    device = _indexed_cuda(device)
    why = checked_kernel(SOFTCAP_CE_CHECK, device, softcap_ce_op(), _softcap_ce_probe, "triton does not import")
    if why is not None and cfg.ce_kernel == "triton":
        raise RuntimeError(f"CE_KERNEL=triton: the fused CE kernel failed its check on {device}: {why}")
    return None if why is not None else softcap_ce_op()


class MLPFusedGrad(torch.autograd.Function):
    """proj(leaky_relu(fc(x), slope)^2) on [tokens, d] rows of the compute dtype, with `dgrad` (mlp_dgrad_op)
    for the activation's gradient; the forward and the other three backward GEMMs are plain torch ops."""

    @staticmethod
    def forward(ctx, x, w1, w2, slope, dgrad, up=None):  # up(x, w1, slope) -> (pre, act): bench/mlp_triton.py's fused GEMM
        if up is None:
            pre = x @ w1.t()
            act = F.leaky_relu(pre, slope).square()
        else:
            pre, act = up(x, w1, slope)
        ctx.save_for_backward(x, w1, w2, pre, act)
        ctx.slope, ctx.dgrad = slope, dgrad
        return act @ w2.t()

    @staticmethod
    def backward(ctx, dy):
        w2 = ctx.saved_tensors[2]
        # One dtype for every GEMM operand: an eager CUDA run (COMPILE=0) crashed here on a bf16/fp32 mix (H200,
        # 2026-12-02; this cast is the fix, not yet re-run there: MLP_KERNEL=torch is the safe setting for eager CUDA).
        cd = w2.dtype
        x, w1, pre, act = (t.to(cd) for t in ctx.saved_tensors[:2] + ctx.saved_tensors[3:])
        dy = dy.to(cd).contiguous()
        dpre = ctx.dgrad(dy, w2, pre, ctx.slope)
        need = ctx.needs_input_grad  # TTT freezes the weights: skip their GEMMs
        return (dpre @ w1 if need[0] else None, dpre.t() @ x if need[1] else None, dy.t() @ act if need[2] else None,
                None, None, None)


FLEX_BLOCK = 128  # FlexAttention's block size (query and key/value)


def flex_block_mask(T: int, window: int, seg: torch.Tensor | None, device, block: int = FLEX_BLOCK):
    """FlexAttention BlockMask for causal attention within `window` (0 = full) and, with `seg` [B, T] (segment ids,
    non-decreasing along each row), within segments. Built from block-level bounds, O((T/block)^2): a block pair is
    empty, full (every pair attends: no mask_mod call) or partial (mask_mod decides per token). create_block_mask
    evaluates mask_mod over all T x T pairs (int64 intermediates): 72 GiB at the 98,304-token packed row of the
    default micro-batch, an OOM on an H200."""
    from torch.nn.attention.flex_attention import BlockMask
    device = torch.device(device)
    nb = -(-T // block)
    starts = torch.arange(nb, device=device) * block
    ends = torch.clamp(starts + block, max=T) - 1  # last token of each block
    q_lo, q_hi, k_lo, k_hi = starts[:, None], ends[:, None], starts[None, :], ends[None, :]
    some = k_lo <= q_hi   # some query of block i sees some key of block j (causal)
    every = k_hi <= q_lo  # every query sees every key
    if window:
        some = some & (q_lo - k_hi <= window)
        every = every & (q_hi - k_lo <= window)
    some, every = some[None], every[None]  # [1, nb, nb], broadcast over rows
    if seg is not None:
        s_lo, s_hi = seg[:, starts], seg[:, ends]  # first / last segment of each block (segments ascend)
        some = some & (s_lo[:, :, None] <= s_hi[:, None, :]) & (s_lo[:, None, :] <= s_hi[:, :, None])
        one = s_lo == s_hi
        every = every & (one[:, :, None] & one[:, None, :] & (s_lo[:, :, None] == s_lo[:, None, :]))
    partial = (some & ~every)[:, None]  # [B, 1, nb, nb]
    full = every.expand_as(some)[:, None]

    def blocks(m):  # (count, indices with the set blocks first, ascending) per query block
        return m.sum(-1, dtype=torch.int32), torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)

    def mask_mod(b, h, q, kv):
        m = causal_window(q, kv, window)
        return m & (seg[b, q] == seg[b, kv]) if seg is not None else m
    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T))


def build_masks(cfg: Config, T: int, device, seg: torch.Tensor | None, use_flex: bool) -> dict:
    """One mask object per distinct window: None = plain causal (fast path), else a FlexAttention
    BlockMask (CUDA) or a boolean SDPA mask (CPU). `seg` [B, T] (DOC_ATTENTION without a varlen kernel, i.e. a compiled
    CUDA run without flash-attn):
    per-token segment index (`segment_ids`); attention stays inside a segment."""
    masks = {}
    for w in set(cfg.layer_windows()):  # distinct per-layer windows (0 = full)
        if w == 0 and seg is None:
            masks[w] = None
            continue
        if use_flex:
            masks[w] = flex_block_mask(T, w, seg, device)
        else:
            q = torch.arange(T, device=device)
            m = causal_window(q[:, None], q[None, :], w)[None, None]
            if seg is not None:
                m = m & (seg[:, None, :, None] == seg[:, None, None, :])
            masks[w] = m
    return masks


def distinct(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same tensor passed twice to an autograd.Function is a torch.compile graph break (the last encoder
    output is also the first skip; the first parallel block gets lanes (x, x)): repeats become views."""
    return tuple(t.view_as(t) if any(t is u for u in ts[:i]) else t for i, t in enumerate(ts))


def channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every leading dim of a [..., D] tensor as a GEMV (cuBLAS), in fp32. Inductor schedules
    these token-axis column sums as slow strided reductions (BENCHMARKS.md, "ChannelScale")."""
    D = t.size(-1)
    ones = torch.ones(t.numel() // D, device=t.device, dtype=t.dtype)
    return (ones @ t.reshape(-1, D)).float()


class ChannelScale(torch.autograd.Function):
    """s * t with s per channel ([D]) or a scalar ([1]), broadcast over tokens: the plain product, with the
    gradient of s taken by `channel_sum`. Used for the attention/MLP output scales, the U-Net skip weights
    and the SmearGate lambda. Not for resid_mix: its x0 products all read the same x0 and inductor fuses
    them into one kernel, cheaper than this (BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, t, s):
        ctx.save_for_backward(t, s)
        return s * t

    @staticmethod
    def backward(ctx, grad):
        t, s = ctx.saved_tensors
        out_dtype = torch.promote_types(t.dtype, s.dtype)
        g_t = (grad * s).to(t.dtype) if ctx.needs_input_grad[0] else None
        g_s = None
        if ctx.needs_input_grad[1]:
            g_s = channel_sum(grad * t.to(out_dtype))
            g_s = (g_s.sum().reshape(s.shape) if s.numel() == 1 else g_s).to(s.dtype)
        return g_t, g_s


class LaneMix(torch.autograd.Function):
    """lane0' = r0*lane0 + p00*a + p10*m,  lane1' = r1*lane1 + p01*a + p11*m. The scalar lambdas'
    gradients are full-tensor dot products via `channel_sum` (cuBLAS) instead of fused inductor reductions."""

    @staticmethod
    def forward(ctx, l0, l1, a, m, r, p):
        ctx.save_for_backward(l0, l1, a, m, r, p)
        return r[0] * l0 + p[0, 0] * a + p[1, 0] * m, r[1] * l1 + p[0, 1] * a + p[1, 1] * m

    @staticmethod
    def backward(ctx, g0, g1):
        l0, l1, a, m, r, p = ctx.saved_tensors
        dot = lambda u, v: channel_sum(u * v.to(u.dtype)).sum()  # torch.dot would become an inductor reduction
        gr = torch.stack([dot(g0, l0), dot(g1, l1)])
        gp = torch.stack([torch.stack([dot(g0, a), dot(g1, a)]), torch.stack([dot(g0, m), dot(g1, m)])])
        ga = g0 * p[0, 0].to(g0.dtype) + g1 * p[0, 1].to(g1.dtype)
        gm = g0 * p[1, 0].to(g0.dtype) + g1 * p[1, 1].to(g1.dtype)
        return g0 * r[0].to(g0.dtype), g1 * r[1].to(g1.dtype), ga.to(a.dtype), gm.to(m.dtype), gr.to(r.dtype), gp.to(p.dtype)


class GatedSkip(torch.autograd.Function):
    """U-Net skip mix  sg*x + (1-sg)*(w*skip),  sg = sigmoid(g), w and g per channel. Same math as the
    plain expression; the backward computes the per-channel gradients of w and g as matrix-vector
    products (cuBLAS) because inductor schedules these strided column sums badly."""

    @staticmethod
    def forward(ctx, x, skip, w, g):
        sg = torch.sigmoid(g)
        ctx.save_for_backward(x, skip, w, sg)
        return sg * x + (1 - sg) * (w * skip)

    @staticmethod
    def backward(ctx, grad):
        x, skip, w, sg = ctx.saved_tensors
        g_skipped = grad * (1 - sg)
        gw = channel_sum(g_skipped * skip)
        gg = channel_sum(grad * (x - w * skip)) * sg * (1 - sg)
        return grad * sg, g_skipped * w, gw.to(w.dtype), gg.to(sg.dtype)


def fused_scale(t, s):
    return ChannelScale.apply(t, s)


def fused_skip_mix(x, skip, w, g):
    return GatedSkip.apply(*distinct(x, skip), w, g)


def fused_lane_mix(l0, l1, a, m, r, p):
    return LaneMix.apply(*distinct(l0, l1), a, m, r, p)


# ----------------------------------------------------------------------------------------------
# APPENDIX B. CONTAINERS: the artifact's byte layouts (PGQ1, per-group).
# ----------------------------------------------------------------------------------------------

# ---- "PGQ1" container ----------------------------------------------------------------------------
# Layout (all little-endian):
#   b"PGQ1" | uint32 header_len | header (UTF-8 JSON) | data
#   header = {"version": 1, "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...],
#             "meta": <user JSON>}
# Entries are listed in the caller's order; offsets are relative to the start of `data`, where
# tensors are stored grouped by dtype (all int8 together, then fp16, ...) so that similar bytes
# sit next to each other for the compressor. No pickle anywhere: loading is pure parsing.

PGQ_MAGIC = b"PGQ1"
_PACK_DTYPES = {  # name -> (torch dtype, numpy little-endian storage dtype); order = data layout
    "int8": (torch.int8, "<i1"), "uint8": (torch.uint8, "<u1"), "bool": (torch.bool, "<u1"),
    "int16": (torch.int16, "<i2"), "int32": (torch.int32, "<i4"), "int64": (torch.int64, "<i8"),
    "float16": (torch.float16, "<f2"), "bfloat16": (torch.bfloat16, "<i2"),
    "float32": (torch.float32, "<f4"), "float64": (torch.float64, "<f8"),
}
_DTYPE_NAMES = {td: name for name, (td, _) in _PACK_DTYPES.items()}


def _dtype_name(dt: torch.dtype) -> str:
    if dt not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype for packing: {dt}")
    return _DTYPE_NAMES[dt]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bf16: ship the raw 16-bit patterns
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.numpy().astype(_PACK_DTYPES[_dtype_name(t.dtype)][1], copy=False).tobytes()


def pack_state(tensors: dict, meta: dict | None = None) -> bytes:
    """Serialize {name: tensor} plus a JSON-able meta dict into the PGQ1 byte format."""
    order = list(_PACK_DTYPES)
    names = list(tensors)
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"tensor names must be non-empty strings, got {n!r}")
    layout = sorted(range(len(names)), key=lambda i: (order.index(_dtype_name(tensors[names[i]].dtype)), i))
    chunks, entries, off = [], [None] * len(names), 0
    for i in layout:
        t = tensors[names[i]]
        b = _tensor_bytes(t)
        entries[i] = {"name": names[i], "dtype": _dtype_name(t.dtype), "shape": list(t.shape),
                      "offset": off, "nbytes": len(b)}
        chunks.append(b)
        off += len(b)
    header = json.dumps({"version": 2, "tensors": entries, "meta": meta or {}},
                        separators=(",", ":")).encode("utf-8")
    body = PGQ_MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)
    return body + struct.pack("<I", zlib.crc32(body))  # version 2: a CRC32 of everything before it closes the blob


def _json_header(raw: bytes, what: str):
    """A container's JSON header, parsed with clear errors (bad UTF-8/JSON, nesting too deep for the parser)."""
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} header is not valid UTF-8 JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{what} header JSON is nested too deeply: corrupt or hostile artifact") from None


def unpack_state(buf) -> tuple:
    """Inverse of pack_state -> (tensors dict in original order, meta). Validates everything and
    raises ValueError naming the problem on any malformed input."""
    buf = bytes(buf) if not isinstance(buf, bytes) else buf
    if len(buf) < 8:
        raise ValueError(f"PGQ1 blob truncated: {len(buf)} bytes, need at least 8")
    if buf[:4] != PGQ_MAGIC:
        raise ValueError(f"bad magic {buf[:4]!r}: not a PGQ1 blob (expected {PGQ_MAGIC!r})")
    (hlen,) = struct.unpack("<I", buf[4:8])
    if 8 + hlen > len(buf):
        raise ValueError(f"PGQ1 header length {hlen} exceeds blob size {len(buf)} (truncated?)")
    header = _json_header(buf[8:8 + hlen], "PGQ1")
    if not isinstance(header, dict) or header.get("version") not in (1, 2) \
            or not isinstance(header.get("tensors"), list) or not isinstance(header.get("meta"), dict):
        raise ValueError("PGQ1 header must be {'version': 1|2, 'tensors': [...], 'meta': {...}}")
    end_data = len(buf)
    if header["version"] == 2:  # version 1 (older artifacts) carries no checksum
        if len(buf) < 8 + hlen + 4:
            raise ValueError("PGQ1 blob truncated: no room for its checksum")
        end_data = len(buf) - 4
        (stored,) = struct.unpack("<I", buf[end_data:])
        got = zlib.crc32(memoryview(buf)[:end_data])
        if got != stored:
            raise ValueError(f"PGQ1 checksum mismatch (stored crc32 {stored:08x}, computed {got:08x}): the artifact is corrupt")
    data = memoryview(buf)[8 + hlen:end_data]
    out, spans = {}, []
    for k, e in enumerate(header["tensors"]):
        if not isinstance(e, dict):
            raise ValueError(f"PGQ1 tensor entry #{k} is not an object")
        name, dt, shape = e.get("name"), e.get("dtype"), e.get("shape")
        off, nb = e.get("offset"), e.get("nbytes")
        if not isinstance(name, str) or not name or name in out:
            raise ValueError(f"PGQ1 tensor entry #{k}: missing or duplicate name {name!r}")
        if dt not in _PACK_DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {dt!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {name!r}: invalid shape {shape!r}")
        if type(off) is not int or type(nb) is not int or off < 0 or nb < 0:
            raise ValueError(f"tensor {name!r}: invalid offset/nbytes {off!r}/{nb!r}")
        tdt, npdt = _PACK_DTYPES[dt]
        numel = math.prod(shape)
        if nb != numel * np.dtype(npdt).itemsize:
            raise ValueError(f"tensor {name!r}: nbytes {nb} does not match shape {shape} of {dt}")
        if off + nb > len(data):
            raise ValueError(f"tensor {name!r}: byte range [{off}, {off + nb}) out of range of "
                             f"the {len(data)}-byte data section (truncated or corrupt)")
        arr = np.frombuffer(data, dtype=npdt, count=numel, offset=off).copy()
        t = torch.from_numpy(arr).reshape(shape)
        if dt == "bfloat16":
            t = t.view(torch.bfloat16)
        elif dt == "bool":
            t = t.to(torch.bool)
        out[name] = t
        spans.append((off, off + nb, name))
    end = 0
    for a, b, name in sorted(spans):
        if a < end:
            raise ValueError(f"tensor {name!r}: byte range overlaps a previous tensor")
        end = max(end, b)
    if end != len(data):
        raise ValueError(f"PGQ1 data section has {len(data) - end} unexpected trailing bytes")
    return out, header["meta"]


# ---- per-group container (COMPRESSOR=pergroup, record #1855) -------------------------------------------------------
# The int8 codes of each weight role (tok_emb, attn.c_q/c_k/c_v/proj, mlp.fc/proj) over all layers form one stream:
# every matrix written transposed (column-major), the rows of the "hot" roles first put in greedy L1 nearest-neighbour
# order (the permutation is stored), each stream compressed with whichever available codec makes it smallest
# (brotli / lzma / zstd, lrzip -L 9 when the binary is installed). Everything else (scales, gates, LQER factors,
# passthroughs, meta) takes the ordinary brotli path. Layout: b"PGRP" | uint32 header_len | JSON header | streams.
PGRP_MAGIC = b"PGRP"
PERGROUP_ROLES = ("tok_emb.weight.q", "attn.c_q.weight.q", "attn.c_k.weight.q", "attn.c_v.weight.q", "attn.proj.weight.q",
                  "mlp.fc.weight.q", "mlp.proj.weight.q")
PERGROUP_HOT = ("tok_emb.weight.q", "attn.c_q.weight.q", "mlp.fc.weight.q")


def _perm_dtype(rows: int):
    """Storage of a stored row permutation: uint16 while row indices fit."""
    return np.uint32 if rows > 65536 else np.uint16


def tensor_role(name: str) -> str:
    """'blocks.3.attn.c_q.weight.q' -> 'attn.c_q.weight.q' (the layer index dropped)."""
    return re.sub(r"^blocks\.\d+\.", "", name)


def l1_row_order(q: torch.Tensor) -> list[int]:
    """Greedy nearest-neighbour row order: start at row 0, then always the unused row closest in L1 to the last one."""
    rows = q.to(torch.int32)
    left = torch.ones(rows.size(0), dtype=torch.bool)
    order, cur = [0], 0
    left[0] = False
    for _ in range(rows.size(0) - 1):
        d = (rows - rows[cur]).abs().sum(1)
        d[~left] = torch.iinfo(torch.int32).max
        cur = int(torch.argmin(d))
        order.append(cur)
        left[cur] = False
    return order


def serialize_pergroup(tensors: dict, meta: dict, codecs: list[str] | None = None) -> bytes:
    codecs = codecs or pergroup_codecs()
    groups: dict[str, list[str]] = {}
    for name, t in tensors.items():
        if tensor_role(name) in PERGROUP_ROLES and t.dtype == torch.int8 and t.dim() == 2:
            groups.setdefault(tensor_role(name), []).append(name)
    grouped = {n for names in groups.values() for n in names}
    header: dict = {"version": 2, "groups": []}
    streams, perms = [], []
    for role in (r for r in PERGROUP_ROLES if r in groups):
        parts, entries = [], []
        for name in groups[role]:
            q = tensors[name]
            order = l1_row_order(q) if role in PERGROUP_HOT and q.size(0) > 2 else None
            if order is not None:
                q = q[order]
                perms.append(np.asarray(order, dtype=_perm_dtype(q.size(0))).tobytes())
            parts.append(q.t().contiguous().numpy().tobytes())
            entries.append({"name": name, "shape": list(q.shape), "perm": order is not None})
        raw = b"".join(parts)
        sizes = {c: _stream_compress(raw, c) for c in codecs}
        best = min(sizes, key=lambda c: len(sizes[c]))
        header["groups"].append({"role": role, "tensors": entries, "codec": best, "nbytes": len(sizes[best]), "crc32": zlib.crc32(raw),
                                 "bytes_by_codec": {c: len(v) for c, v in sizes.items()}})
        streams.append(sizes[best])
    perm_blob = compress_blob(b"".join(perms), "brotli", 0) if perms else b""
    header["perm_crc32"] = zlib.crc32(b"".join(perms))
    rest = serialize_state({n: t for n, t in tensors.items() if n not in grouped}, meta, "brotli")
    header["perm_nbytes"], header["rest_nbytes"] = len(perm_blob), len(rest)
    hdr = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head = PGRP_MAGIC + struct.pack("<I", len(hdr)) + hdr
    # version 2: the header's CRC32 follows it; each stream's raw bytes carry theirs (the rest is a PGQ1 blob: its own)
    return head + struct.pack("<I", zlib.crc32(head)) + b"".join(streams) + perm_blob + rest


def deserialize_pergroup(blob: bytes) -> tuple:
    blob = bytes(blob)
    if len(blob) < 8:
        raise ValueError(f"pergroup artifact truncated: {len(blob)} bytes")
    (hlen,) = struct.unpack("<I", blob[4:8])
    if 8 + hlen + 4 > len(blob):
        raise ValueError(f"pergroup header length {hlen} exceeds the artifact's {len(blob)} bytes (truncated?)")
    (stored,) = struct.unpack("<I", blob[8 + hlen:12 + hlen])
    if zlib.crc32(blob[:8 + hlen]) != stored:
        raise ValueError("pergroup artifact: header checksum mismatch: the artifact is corrupt (or from a version 1 writer: repack it)")
    header = _json_header(blob[8:8 + hlen], "pergroup")
    try:
        return _pergroup_tensors(blob, header, 12 + hlen)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"pergroup artifact: malformed header ({type(e).__name__}: {e})") from None


def _pergroup_tensors(blob: bytes, header: dict, pos: int) -> tuple:
    groups = header["groups"]
    if header.get("version") != 2 or not isinstance(groups, list):
        raise ValueError("pergroup artifact: header must be {'version': 2, 'groups': [...]}")
    payloads = []
    for g in groups:
        if type(g["nbytes"]) is not int or g["nbytes"] < 0 or pos + g["nbytes"] > len(blob):
            raise ValueError(f"pergroup artifact: group {g.get('role')!r} byte count {g['nbytes']!r} out of range")
        payloads.append(blob[pos:pos + g["nbytes"]])
        pos += g["nbytes"]
    pn, rn = header["perm_nbytes"], header["rest_nbytes"]
    if type(pn) is not int or type(rn) is not int or pn < 0 or rn < 0 or pos + pn + rn != len(blob):
        raise ValueError(f"pergroup artifact: {len(blob)} bytes, the header accounts for {pos}+{pn!r}+{rn!r}")
    perm_raw = decompress_blob(blob[pos:pos + pn]) if pn else b""
    if zlib.crc32(perm_raw) != header["perm_crc32"]:
        raise ValueError("pergroup artifact: row permutations fail their checksum: the artifact is corrupt")
    pos += pn
    tensors, meta = deserialize_state(blob[pos:pos + rn])
    ppos = 0
    for g, payload in zip(groups, payloads):
        raw, off = _stream_decompress(payload, g["codec"]), 0
        if zlib.crc32(raw) != g["crc32"]:
            raise ValueError(f"pergroup artifact: group {g['role']!r} fails its checksum: the artifact is corrupt")
        for e in g["tensors"]:
            R, C = e["shape"]
            if type(R) is not int or type(C) is not int or R < 0 or C < 0 or off + R * C > len(raw) or e["name"] in tensors:
                raise ValueError(f"pergroup artifact: tensor {e['name']!r} of shape {e['shape']!r} does not fit group {g['role']!r}")
            q = torch.from_numpy(np.frombuffer(raw, dtype=np.int8, count=R * C, offset=off).copy()).view(C, R).t().contiguous()
            off += R * C
            if e["perm"]:
                dt = _perm_dtype(R)
                if ppos + R * np.dtype(dt).itemsize > len(perm_raw):
                    raise ValueError(f"pergroup artifact: row permutation of {e['name']!r} out of range")
                order = np.frombuffer(perm_raw, dtype=dt, count=R, offset=ppos).astype(np.int64)
                ppos += R * np.dtype(dt).itemsize
                if not np.array_equal(np.sort(order), np.arange(R)):
                    raise ValueError(f"pergroup artifact: the stored row order of {e['name']!r} is not a permutation")
                restored = torch.empty_like(q)
                restored[torch.from_numpy(order)] = q
                q = restored
            tensors[e["name"]] = q
        if off != len(raw):
            raise ValueError(f"pergroup artifact: group {g['role']} holds {len(raw)} bytes, its tensors {off}")
    return tensors, meta


# ----------------------------------------------------------------------------------------------
# APPENDIX C. CODECS: byte shuffle, self-describing compressed blobs, size-bounded decompression, lrzip.
# ----------------------------------------------------------------------------------------------

# ---- byte shuffle + compression ------------------------------------------------------------------

BSHF_MAGIC, BLOB_MAGIC = b"BSHF", b"PGZ"
_CODEC_IDS = {"none": b"N", "brotli": b"B", "zstd": b"Z", "lzma": b"X", "zlib": b"D"}


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """b"BSHF" + stride byte + bytes at offsets = 0 mod stride, then 1 mod stride, ...
    Stride 2 separates low/high bytes of 16-bit values, which compress much better apart."""
    if not 1 <= int(stride) <= 255:
        raise ValueError(f"byte_shuffle stride must be in 1..255, got {stride}")
    data = bytes(data)
    return BSHF_MAGIC + bytes([stride]) + b"".join(data[i::stride] for i in range(stride))


def byte_unshuffle(blob: bytes) -> bytes:
    blob = bytes(blob)
    if len(blob) < 5 or blob[:4] != BSHF_MAGIC:
        raise ValueError("not a byte-shuffled blob (missing BSHF magic)")
    stride, payload = blob[4], blob[5:]
    if stride < 1:
        raise ValueError("byte-shuffled blob has invalid stride 0")
    n, out, pos = len(payload), bytearray(len(payload)), 0
    for i in range(stride):
        cnt = (n - i + stride - 1) // stride if n > i else 0
        out[i::stride] = payload[pos:pos + cnt]
        pos += cnt
    return bytes(out)


def _import_codec(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"compressor needs the Python package {pip_name!r} "
                           f"(pip install {pip_name})") from None


def compress_blob(raw: bytes, compressor: str = "brotli", shuffle: int = 2, lgwin: int = 24,
                  lzma_preset: int = 9 | lzma.PRESET_EXTREME) -> bytes:
    """b"PGZ" + codec id byte + compressed payload. shuffle>1 byte-shuffles first; the shuffle
    is self-describing (BSHF magic), so decompress_blob undoes it automatically."""
    if compressor not in _CODEC_IDS:
        raise ValueError(f"unknown compressor {compressor!r}; choose from {sorted(_CODEC_IDS)}")
    raw = bytes(raw)
    if shuffle and shuffle > 1:
        raw = byte_shuffle(raw, shuffle)
    elif raw[:4] == BSHF_MAGIC:
        raw = byte_shuffle(raw, 1)  # identity wrap keeps auto-detection unambiguous
    if compressor == "brotli":
        payload = _import_codec("brotli", "brotli").compress(raw, quality=11, lgwin=lgwin)
    elif compressor == "zstd":
        payload = _import_codec("zstandard", "zstandard").ZstdCompressor(level=22).compress(raw)
    elif compressor == "lzma":
        payload = lzma.compress(raw, format=lzma.FORMAT_XZ, preset=lzma_preset)
    elif compressor == "zlib":
        payload = zlib.compress(raw, 9)
    else:
        payload = raw
    return BLOB_MAGIC + _CODEC_IDS[compressor] + payload


RAW_CAP_MIN, RAW_CAP_RATIO, RAW_CAP_MAX = 16 << 20, 64, 2 << 30


def raw_cap(n_compressed: int) -> int:
    """Most bytes a compressed blob may expand to: 64x its size (at least 16 MiB, at most 2 GiB). A real artifact
    expands ~2-3x; a hostile one (a tiny file that decodes to gigabytes) is refused before it is allocated."""
    return min(RAW_CAP_MAX, max(RAW_CAP_MIN, RAW_CAP_RATIO * n_compressed))


def _bounded_decode(codec: str, payload: bytes, cap: int) -> bytes:
    """Decode in bounded steps; more than `cap` output bytes is an error, not an allocation."""
    over = ValueError(f"{codec} payload expands beyond {cap:,} bytes ({RAW_CAP_RATIO}x the blob, at least {RAW_CAP_MIN >> 20} MiB): "
                      "corrupt or hostile artifact")
    step = 1 << 22
    if codec == "none":
        if len(payload) > cap:
            raise over
        return payload
    if codec == "lzma":
        d = lzma.LZMADecompressor()
        out = d.decompress(payload, max_length=cap + 1)
        if len(out) > cap:
            raise over
        if not d.eof:
            raise ValueError("lzma payload is truncated")
        return out
    if codec == "zlib":
        d = zlib.decompressobj()
        out = d.decompress(payload, cap + 1)
        if len(out) > cap:
            raise over
        if not d.eof:
            raise ValueError("zlib payload is truncated")
        return out
    if codec == "zstd":
        reader = _import_codec("zstandard", "zstandard").ZstdDecompressor().stream_reader(payload)
        parts, n = [], 0
        while True:
            chunk = reader.read(step)
            if not chunk:
                break
            parts.append(chunk)
            n += len(chunk)
            if n > cap:
                raise over
        return b"".join(parts)
    brotli = _import_codec("brotli", "brotli")
    d = brotli.Decompressor()
    try:
        out = d.process(payload, output_buffer_limit=step)
    except TypeError:  # brotli < 1.2 cannot bound its output: decode whole, then check
        out = brotli.decompress(payload)
        if len(out) > cap:
            raise over from None
        return out
    parts, n = [], 0
    while True:
        parts.append(out)
        n += len(out)
        if n > cap:
            raise over
        if d.is_finished():
            return b"".join(parts)
        if not out and d.can_accept_more_data():
            raise ValueError("brotli payload is truncated")
        out = d.process(b"", output_buffer_limit=step)


def decompress_blob(blob: bytes, cap: int | None = None) -> bytes:
    blob = bytes(blob)
    if len(blob) < 4 or blob[:3] != BLOB_MAGIC:
        raise ValueError(f"not a compressed PGZ blob (header {blob[:4]!r})")
    codec = {v: k for k, v in _CODEC_IDS.items()}.get(blob[3:4])
    if codec is None:
        raise ValueError(f"unknown codec id {blob[3:4]!r} in PGZ blob")
    try:
        raw = _bounded_decode(codec, blob[4:], raw_cap(len(blob)) if cap is None else cap)
    except (ValueError, RuntimeError):  # ours: over the cap, truncated, codec not installed
        raise
    except Exception as e:  # each library raises its own error type on corrupt input
        raise ValueError(f"corrupt {codec} payload: {e}") from None
    return byte_unshuffle(raw) if raw[:4] == BSHF_MAGIC else raw


def _lrzip(args: list[str], data: bytes) -> bytes:
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pgrp_") as d:
        src, dst = Path(d) / "in", Path(d) / "out"
        src.write_bytes(data)
        r = subprocess.run(["lrzip", "-q", "-f", *args, "-o", str(dst), str(src)], capture_output=True)
        if r.returncode != 0:
            raise ValueError(f"lrzip {' '.join(args)} failed: {r.stderr.decode(errors='replace').strip()[:200]}")
        if "-d" in args and dst.stat().st_size > raw_cap(len(data)):
            raise ValueError(f"lrzip stream expands beyond {raw_cap(len(data)):,} bytes: corrupt or hostile artifact")
        return dst.read_bytes()


def pergroup_codecs() -> list[str]:
    """The codecs a pergroup stream may use here: the Python ones that import, and lrzip when its binary exists."""
    import shutil
    return [c for c, m in (("brotli", "brotli"), ("lzma", "lzma"), ("zstd", "zstandard")) if module_available(m)] + \
        (["lrzip"] if shutil.which("lrzip") else [])


def _stream_compress(raw: bytes, codec: str) -> bytes:
    if codec == "lrzip":
        return _lrzip(["-z", "-L", "9"], raw)
    return compress_blob(raw, codec, 0)[4:]


def _stream_decompress(payload: bytes, codec: str) -> bytes:
    if codec == "lrzip":
        import shutil
        if not shutil.which("lrzip"):
            raise RuntimeError("this pergroup artifact has lrzip-compressed streams: install lrzip (apt-get install lrzip)")
        return _lrzip(["-d"], payload)
    if codec not in _CODEC_IDS:
        raise ValueError(f"pergroup stream with unknown codec {codec!r}")
    return decompress_blob(BLOB_MAGIC + _CODEC_IDS[codec] + payload)


if __name__ == "__main__":
    sys.exit(main())
