"""
Generate from a distilled LAWCAT student (or its teacher) and measure what the paper claims:
long-context retrieval (passkey, S-NIAH-1/2/3, BABILong QA2/QA3) and prefill/decode speed and memory.

    python sample.py --prompt "The capital of France is"   # the newest out/*/stage*.pt, or --ckpt PATH
    python sample.py --teacher --chat --prompt "Hi!"       # the plain teacher (--init picks its weights)
    python sample.py --passkey [--lengths 1K,4K --depths 0.1,0.5,0.9 --trials 4]
    python sample.py --niah                                # S-NIAH-1/2/3, student and teacher side by side
    python sample.py --babilong                            # BABILong-style QA2/QA3, the same
    python sample.py --ppl [--lengths 1K,4K]               # held-out perplexity, student and teacher
    python sample.py --bench [--random-model llama3.2-1b]  # speed/memory; random weights of a preset shape
    python sample.py --halflives [--lengths 4K]            # how far back the student's decays reach

Evaluation prompts are raw text (no chat template), the form in which the small teacher retrieves best.
The model continues "... The pass key is" greedily and stops at a newline, a stop token, or once its
first word is complete. Scoring is exact: the first whitespace-separated word of the output, with
surrounding .,;:!?"'() stripped, must equal the answer (case-insensitive). For the key 12345,
" 12345. Remember it" scores 1; "12346", "123456" and "the pass key" score 0. The teacher runs up
to its trained context (cfg.max_seq_len) unless --past-context; longer rows are student-only. On CPU,
lengths over 8K are skipped unless --force.

--ppl: exp(mean next-token loss) over --trials disjoint windows of length+1 tokens of held-out text
(docstrings of the standard library's Python files, which the default distillation corpus does not
contain), every position of a window scored; same JSON with task "ppl", subtask "ppl", depth "all"
and the perplexity in place of an accuracy.

JSON from --passkey/--niah/--babilong/--ppl (default path: next to the checkpoint, <task>_<ckpt stem>.json,
or out/<task>_teacher.json for the teacher alone; --json PATH chooses; --bench writes its own table there too):
    {"task": "passkey" | "niah" | "babilong" | "ppl",
     "model": {"student": checkpoint path or null, "teacher": teacher weights},
     "lengths": [1024, ...], "depths": ["0.1", ...] (["all"] for babilong), "trials": 4,
     "results": {"student": {subtask: {"1024": {"0.1": accuracy in [0, 1], or null if not run}}},
                 "teacher": {...}},        # subtasks: passkey | niah1 niah2 niah3 | qa2 qa3
     "notes": {"teacher": {"16384": "n/a (> trained context 8192)"}},   # why a row was not run
     "samples": [{"model", "subtask", "length", "depth", "trial", "tokens", "answer", "output", "correct"}],
     # print_tables also counts, from "answer" and "output", near misses (one edit from the key),
     # answers cut short (a proper prefix of the key) and, for S-NIAH, RULER's score (the key in the answer)
     "meta": {"device", "dtype", "teacher_context", "seconds", "argv", "python"}}
"""
import argparse
import ast
import contextlib
import functools
import glob
import json
import math
import os
import random
import re
import sys
import time
import uuid
from pathlib import Path

import torch

import lawcat as L

# ----------------------------------------------------------------------------------------------
# Prompts. Passkey: the usual instruction, repeated filler and needle (raw form); S-NIAH lines from RULER.

FILLER = L.PASSKEY_FILLER
INSTR_NIAH = ("Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the {kind}s afterwards.")
NEEDLE_NIAH = "One of the special magic {kind}s for {word} is: {key}."
Q_NIAH = "What is the special magic {kind} for {word} mentioned in the provided text?"
A_NIAH = "The special magic {kind} for {word} mentioned in the provided text is"
WORDS = ("apple river lantern violet harbor thunder marble falcon pepper cactus meadow compass glacier "
         "saffron anchor orchid quartz walnut ember canyon").split()
SUBTASKS = {"passkey": ["passkey"], "niah": ["niah1", "niah2", "niah3"], "babilong": ["qa2", "qa3"], "ppl": ["ppl"]}
MAX_NEW = {"passkey": 10, "niah1": 12, "niah2": 12, "niah3": 40, "qa2": 6, "qa3": 6}  # new tokens, at most


@functools.cache
def prose():
    """English sentences from the stdlib's pydoc_data.topics: paragraphs of >= 80 chars, >= 90% letters
    and spaces, no grammar rules (::=) or >>> code; whitespace collapsed; split into sentences."""
    from pydoc_data.topics import topics
    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            p = " ".join(para.split())
            letters = sum(c.isalpha() or c == " " for c in p)
            if len(p) >= 80 and "::=" not in p and ">>>" not in p and letters >= 0.9 * len(p):
                out += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", p) if len(s) > 20]
    return out


@functools.cache
def held_out_text():
    """Docstrings (>= 200 chars) of the standard library's Python files, in path order: English the default
    distillation corpus does not contain (its pydoc_data help topics are left out here). Parsed, not imported."""
    lib = Path(json.__file__).parent.parent
    skip = {"test", "tests", "idlelib", "pydoc_data", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    docs = []
    for f in sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py")):
        if skip & set(f.relative_to(lib).parts) or f.name.startswith("test"):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs += [d for n in ast.walk(tree) if isinstance(n, nodes) and len(d := ast.get_docstring(n) or "") >= 200]
    return "\n\n".join(docs)


def build_passkey(tok, length, depth, key):
    """<= length tokens (within one 24-token filler of it); the needle after round(depth * n) of n fillers."""
    return L.fit_prompt(tok, lambda n: L.passkey_prompt(n, depth, key), length)[0]


def build_niah(tok, subtask, length, depth, word, key):
    """S-NIAH-1: a number in repeated noise; -2: a number in prose; -3: a UUID in prose."""
    kind, hay = "uuid" if subtask == "niah3" else "number", [FILLER] if subtask == "niah1" else prose()
    needle = NEEDLE_NIAH.format(kind=kind, word=word, key=key)

    def render(n):
        units, a = [hay[i % len(hay)] for i in range(n)], round(depth * n)
        return (INSTR_NIAH.format(kind=kind) + "\n" + " ".join(units[:a] + [needle] + units[a:]) + "\n"
                + Q_NIAH.format(kind=kind, word=word) + " " + A_NIAH.format(kind=kind, word=word))
    return L.fit_prompt(tok, render, length)[0]


# BABILong-style QA2/QA3: bAbI facts simulated on the fly and scattered, in order, through prose
PEOPLE, OBJECTS = ["Mary", "John", "Daniel", "Sandra"], ["apple", "football", "milk"]
PLACES = ["bathroom", "hallway", "kitchen", "office", "garden", "bedroom"]
MOVE, GET, DROP = ["went to", "journeyed to", "travelled to", "moved to"], ["picked up", "got", "grabbed", "took"], \
    ["dropped", "discarded", "put down"]
INSTR_BABI = ("I will give you context with the facts about positions of objects and people hidden in some random "
              "text and a question. You need to answer the question based only on the information from the facts.")
EXAMPLE = {  # its people, objects and places are not among the story's, so copying it never scores
    "qa2": "Example: Bob went to the porch. Bob picked up the ball. Bob travelled to the attic. "
           "Question: Where is the ball? Answer: The ball is in the attic.",
    "qa3": "Example: Anna went to the cellar. Anna got the book. Anna went to the porch. Anna journeyed to the "
           "attic. Question: Where was the book before the attic? Answer: Before the attic, the book was in the porch."}


def babi_story(rng, task):
    """(facts, question, answer prefix, answer). People move, pick up and drop objects in a simulated
    world, so the answer is known. qa2: where is an object that was carried (>= 2 supporting facts);
    qa3: where was it before its last place (>= 3 facts)."""
    while True:
        where, holder, trail, facts = {}, {}, {o: [] for o in OBJECTS}, []  # trail: an object's places
        for _ in range(8 if task == "qa2" else 10):
            p = rng.choice(PEOPLE)
            held = [o for o, h in holder.items() if h == p]
            free = [o for o in OBJECTS if o not in holder and p in where and trail[o][-1:] in ([], [where[p]])]
            act = rng.choices(["move", "get", "drop"], [4, 2 * bool(free), bool(held)])[0]
            if act == "move":
                where[p] = rng.choice([x for x in PLACES if x != where.get(p)])
                facts.append(f"{p} {rng.choice(MOVE)} the {where[p]}.")
            elif act == "get":
                o = rng.choice(free)
                holder[o] = p
                facts.append(f"{p} {rng.choice(GET)} the {o}.")
            else:
                o = rng.choice(held)
                del holder[o]
                facts.append(f"{p} {rng.choice(DROP)} the {o}.")
            for o, h in holder.items():  # a carried object is where its holder is
                if trail[o][-1:] != [where[h]]:
                    trail[o].append(where[h])
        ok = [o for o in OBJECTS if len(trail[o]) >= 2 and (task == "qa2" or trail[o][-1] not in trail[o][:-1])]
        if ok:
            o = rng.choice(ok)
            last = trail[o][-1]
            if task == "qa2":
                return facts, f"Where is the {o}?", f"The {o} is in the", last
            before = trail[o][-2]
            return facts, f"Where was the {o} before the {last}?", f"Before the {last}, the {o} was in the", before


def build_babilong(tok, length, task, facts, question, prefix, seed):
    """Facts scattered in order through prose (from a seeded offset); length 0: the facts alone."""
    hay = prose()
    start = random.Random(seed).randrange(len(hay))

    def render(n):
        units = [hay[(start + i) % len(hay)] for i in range(n)]
        places = sorted(random.Random(seed).choices(range(n + 1), k=len(facts)))
        for p, f in reversed(list(zip(places, facts))):  # from the back, so the facts keep their order
            units.insert(p, f)
        return f"{INSTR_BABI}\n{EXAMPLE[task]}\n\nContext: {' '.join(units)}\nQuestion: {question}\nAnswer: {prefix}"
    return L.fit_prompt(tok, render, length)[0] if length else tok.encode(render(0))


def make_case(subtask, tok, length, depth, trial):
    """(prompt ids, answer) of one trial; all randomness from random.Random(f"{subtask}-{trial}-{length}-{depth}")."""
    seed = f"{subtask}-{trial}-{length}-{depth}"
    rng = random.Random(seed)
    if subtask == "passkey":
        key = str(rng.randint(10000, 99999))
        return build_passkey(tok, length, float(depth), key), key
    if subtask.startswith("niah"):
        word = rng.choice(WORDS)
        key = uuid.UUID(int=rng.getrandbits(128), version=4) if subtask == "niah3" else rng.randint(10**6, 10**7 - 1)
        key = str(key)
        return build_niah(tok, subtask, length, float(depth), word, key), key
    facts, question, prefix, answer = babi_story(rng, subtask)
    return build_babilong(tok, length, subtask, facts, question, prefix, seed), answer


def first_word(output):
    """The answer a model gave: its output's first word, surrounding punctuation stripped, lower case."""
    words = output.split()
    return words[0].strip(".,;:!?\"'()").lower() if words else ""


def score(output, answer):
    """1 if the output's first word equals the answer (any case); else 0."""
    return int(first_word(output) == answer.lower())


def one_edit_off(output, answer):
    """1 if the output's first word is one edit from the answer: a character dropped, added or changed, or two
    neighbours swapped. A student that answers 52565 for 52556 found the key but copied it out of order."""
    a, b = first_word(output), answer.lower()
    if not a or a == b or abs(len(a) - len(b)) > 1:
        return 0
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        swap = len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
        return int(len(diff) == 1 or swap)
    shorter, longer = sorted((a, b), key=len)
    return int(any(longer[:i] + longer[i + 1:] == shorter for i in range(len(longer))))


def contains_key(output, answer):
    """1 if the answer appears anywhere in the output (any case): RULER's S-NIAH score (string_match_all, one
    needle), which the paper's S-NIAH numbers use. Here the output stops once its first word is complete (RULER
    scores a whole generation: this is at most its score), so it adds answers like 50835788 for the key 5083578:
    the key found and copied, its end missed."""
    return int(answer.lower() in output.lower())


def cut_short(output, answer):
    """1 if the output's first word is a proper prefix of the answer: the model began the key and stopped too early
    (at 8K a student answered 887 for the key 88720)."""
    a = first_word(output)
    return int(0 < len(a) < len(answer) and answer.lower().startswith(a))


# ----------------------------------------------------------------------------------------------
# Evaluation


def answer(model, tok, ids, max_new):
    """Greedy continuation; stops at a newline, a stop token, or once the first word is complete."""
    out = []
    for t in L.generate(model, ids, max_new, stop_ids=tok.stop_ids):
        if t in tok.stop_ids:
            break
        out.append(t)
        text = tok.decode(out)
        if "\n" in text.lstrip() or re.match(r"\s*\S+\s", text):
            break
    return tok.decode(out).lstrip("\n").split("\n")[0]


def skip_reason(name, length, model, device, force, past_context=False):
    if name == "teacher" and length > model.cfg.max_seq_len and not past_context:
        return f"n/a (> trained context {model.cfg.max_seq_len})"
    if str(device) == "cpu" and length > 8192 and not force:
        return "skipped on CPU (> 8K; --force runs it)"
    return None


@torch.no_grad()
def perplexity(model, windows):
    """exp(mean next-token cross-entropy) over the windows, (N, T + 1) token ids, one forward each."""
    nll = 0.0
    for w in windows:
        logits = model(w[None, :-1])[0].float()  # (T, V)
        nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
    return math.exp(nll / windows[:, 1:].numel())


def evaluate(task, runners, tok, lengths, depths, trials, device="cpu", force=False, past_context=False):
    """runners: [(name, model, context manager)]. Returns the JSON dict less "model" and "meta".
    For "ppl", `trials` disjoint windows of length + 1 held-out tokens take the place of the trials."""
    depths = ["all"] if task in ("babilong", "ppl") else [str(d) for d in depths]
    res = dict(task=task, lengths=lengths, depths=depths, trials=trials, results={}, notes={}, samples=[])
    if task == "ppl":
        held = tok.encode(held_out_text(), bos=False)
        if len(held) < trials * (max(lengths) + 1):  # before anything runs
            raise L.UserError(f"--ppl: the held-out text has {len(held):,} tokens, fewer than {trials} windows of "
                              f"{max(lengths) + 1}; lower --trials or --lengths")
    for name, model, ctx in runners:
        with ctx(model):
            for sub in SUBTASKS[task]:
                for n in lengths:
                    row = res["results"].setdefault(name, {}).setdefault(sub, {})[str(n)] = dict.fromkeys(depths)
                    why, t0 = skip_reason(name, n, model, device, force, past_context), time.time()
                    if why:
                        res["notes"].setdefault(name, {})[str(n)] = why
                        continue
                    if task == "ppl":
                        windows = torch.tensor(held[:trials * (n + 1)], device=device).view(trials, n + 1)
                        row["all"] = perplexity(model, windows)
                    else:
                        for d in depths:
                            for trial in range(trials):
                                ids, key = make_case(sub, tok, n, d, trial)
                                out = answer(model, tok, ids, MAX_NEW[sub])
                                res["samples"].append(dict(model=name, subtask=sub, length=n, depth=d, trial=trial,
                                                           tokens=len(ids), answer=key, output=out,
                                                           correct=score(out, key)))
                            row[d] = sum(s["correct"] for s in res["samples"][-trials:]) / trials
                    print(f"  {name:7s} {sub:7s} {n:6d}: " + " ".join(f"{row[d]:.2f}" for d in depths)
                          + f"  ({time.time() - t0:.1f} s)", flush=True)
    return res


def avg(row):
    vals = [v for v in row.values() if v is not None]
    return sum(vals) / len(vals) if vals else None


def pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def print_tables(res):
    lengths, depths, names = res["lengths"], res["depths"], list(res["results"])
    if res["task"] == "ppl":
        print(f"\nheld-out perplexity, {res['trials']} windows per length" + (", student / teacher" if len(names) > 1 else ""))
        cols = names + (["ratio"] if len(names) > 1 else [])
        print("| length | " + " | ".join(f"{c:>8s}" for c in cols) + " |")
        for n in lengths:
            ppl = [res["results"][name]["ppl"][str(n)]["all"] for name in names]
            cells = ["n/a" if p is None else f"{p:.3f}" for p in ppl]
            ratio = [f"{ppl[0] / ppl[1]:.3f}" if None not in ppl else "-"] if len(names) > 1 else []
            print(f"| {n:6d} | " + " | ".join(f"{c:>8s}" for c in cells + ratio) + " |")
        return
    for name in names if len(depths) > 1 else []:  # length x depth, per model and subtask
        for sub, rows in res["results"][name].items():
            print(f"\n{sub}, {name}: exact-match accuracy, {res['trials']} trial(s) per cell")
            print("| length | " + " | ".join(f"d={d:>4s}" for d in depths) + " |  avg |")
            for n in lengths:
                note = res["notes"].get(name, {}).get(str(n))
                row = rows[str(n)]
                cells = [note] if note else [f"{pct(row[d]):>6s}" for d in depths] + [f"{pct(avg(row)):>4s}"]
                print(f"| {n:6d} | " + " | ".join(cells) + " |")
    cols = [f"{sub} {name}" for sub in SUBTASKS[res["task"]] for name in names]

    def summary(title, cell):  # one row per length, one column per (subtask, model): cell(name, sub, n) -> text
        print(f"\n{title}\n| length | " + " | ".join(cols) + " |")
        for n in lengths:
            cells = [cell(name, sub, n) for sub in SUBTASKS[res["task"]] for name in names]
            print(f"| {n:6d} | " + " | ".join(f"{a:>{len(c)}s}" for a, c in zip(cells, cols)) + " |")

    def accuracy(name, sub, n):
        return "n/a" if str(n) in res["notes"].get(name, {}) else pct(avg(res["results"][name][sub][str(n)]))

    summary(f"{res['task']}: accuracy, " + ("mean over depths" if len(depths) > 1 else f"{res['trials']} trials per cell"),
            accuracy)
    tables = [  # (title, is_miss, always): a miss table is printed only when some answer is such a miss
        ("near misses: answers one edit from the key (a character dropped, added, changed, or two swapped), as a share "
         "of all answers", one_edit_off, False),
        ("cut short: answers that are a proper prefix of the key (the model began it and stopped), as a share of all "
         "answers", cut_short, False)]
    if res["task"] == "niah":
        tables.insert(0, ("RULER's score, the paper's for S-NIAH: answers that contain the key (the exact ones, and the "
                          "key with characters added), as a share of all answers", contains_key, True))
    for title, is_miss, always in tables:
        misses = {}  # (name, sub, length) -> is_miss of each answer, over all depths
        for x in res["samples"]:
            misses.setdefault((x["model"], x["subtask"], x["length"]), []).append(is_miss(x["output"], x["answer"]))
        if always or any(map(any, misses.values())):
            summary(title, lambda name, sub, n: pct(sum(v) / len(v)) if (v := misses.get((name, sub, n))) else "n/a")
    for name, notes in res["notes"].items():
        print(f"{name} not run at: " + "; ".join(f"{n} ({why})" for n, why in notes.items()))


def heatmap(res, path):
    """A length x depth heatmap per model and subtask, if matplotlib is installed (it is optional)."""
    if res["task"] == "ppl":
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    grids = [(f"{sub} {name}", rows) for name, subs in res["results"].items() for sub, rows in subs.items()]
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], grids):
        lengths, depths = res["lengths"], res["depths"]
        grid = [[float("nan") if rows[str(n)][d] is None else rows[str(n)][d] for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set(title=title, xticks=range(len(lengths)), yticks=range(len(depths)), yticklabels=depths)
        ax.set_xticklabels([f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths], rotation=45)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------------------------
# Generation and speed

def state_bytes(cfg, dtype, student, T):
    """Decode state: the student's conv tails + S + z (fp32) over all layers, or the teacher's KV cache at T tokens."""
    H, D, b = cfg.n_heads, cfg.head_dim, torch.empty(0, dtype=dtype).element_size()
    if not student:
        return 2 * cfg.n_layers * cfg.n_kv_heads * D * b * T
    return cfg.n_layers * ((2 * (cfg.conv_size - 1) * H * D * b if cfg.conv else 0) + 4 * (H * D * D + H * D))


def mib(n):
    return f"{n / 2**20:.2f} MiB"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def stream(model, tok, ids, max_new, temperature, top_k, seed, echo=True):
    """Generate, printing text as it comes (held back while a multi-byte character is incomplete).
    Returns (new ids, stop token excluded; prefill seconds; seconds for the rest)."""
    device, out, shown = model.tok_embeddings.weight.device, [], ""
    t0 = t1 = time.perf_counter()
    for i, t in enumerate(L.generate(model, ids, max_new, temperature, top_k, tok.stop_ids, seed)):
        if i == 0:
            sync(device)
            t1 = time.perf_counter()
        if t in tok.stop_ids:
            break
        out.append(t)
        text = tok.decode(out)
        if echo and not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    sync(device)
    return out, t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def measure(model, T, steps, device):
    """(prefill seconds, decode set-up seconds (the student's CUDA-graph capture on a GPU, once per generation),
    decode seconds for `steps` tokens, (prefill, decode) peak bytes or (None, None) off a GPU, decode-state bytes)
    at context T."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    caches = model.new_caches(1, T + steps, device, model.tok_embeddings.weight.dtype)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, T), device=device)
    sync(device)
    t0 = time.perf_counter()
    nxt = model(tokens, caches, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
    sync(device)
    t1 = time.perf_counter()
    prefill_peak = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:  # decode's own peak: weights, state or KV cache, one token's activations (and the student's graph
        torch.cuda.reset_peak_memory_stats()  # capture: a saved copy of the state and the graph's buffers)
    step = L.decoder(model, caches, T, nxt)
    sync(device)
    t2 = time.perf_counter()
    for i in range(steps):
        nxt = step(nxt).argmax(-1, keepdim=True)
    sync(device)
    state = sum(v.numel() * v.element_size() for c in caches for v in c.values() if torch.is_tensor(v))
    peaks = (prefill_peak, torch.cuda.max_memory_allocated()) if cuda else (None, None)
    return t1 - t0, t2 - t1, time.perf_counter() - t2, peaks, state


def bench(runners, lengths, device, steps):
    """Prefill latency, decode tokens/s, peak GPU memory (weights included) and decode-state size by context,
    printed as a table and returned as rows. Each length runs twice and the second run is reported (the first
    compiles kernels for its shapes)."""
    print(f"{torch.cuda.get_device_name() if torch.device(device).type == 'cuda' else 'CPU'}, "
          f"{next(m for _, m, _ in runners).tok_embeddings.weight.dtype}, batch 1, {steps} decode steps")
    print("| model | context | prefill ms | prefill tok/s | decode set-up ms | decode ms/token | decode tok/s | "
          "peak memory prefill | peak memory decode | decode state |")
    rows = []
    for name, model, ctx in runners:
        with ctx(model):
            for T in lengths:
                try:
                    measure(model, T, 2, device)
                    prefill, setup, decode, peak, state = measure(model, T, steps, device)
                except torch.OutOfMemoryError:
                    print(f"| {name} | {T} | out of memory | | | | | | | |", flush=True)
                    rows.append(dict(model=name, context=T, error="out of memory"))
                    continue
                print(f"| {name} | {T} | {1e3 * prefill:.1f} | {T / prefill:,.0f} | {1e3 * setup:.1f} | "
                      f"{1e3 * decode / steps:.2f} | {steps / decode:.1f} | {'-' if peak[0] is None else mib(peak[0])} | "
                      f"{'-' if peak[1] is None else mib(peak[1])} | {mib(state)} |", flush=True)
                rows.append(dict(model=name, context=T, prefill_ms=1e3 * prefill, decode_setup_ms=1e3 * setup,
                                 decode_ms_per_token=1e3 * decode / steps, peak_bytes_prefill=peak[0],
                                 peak_bytes_decode=peak[1], state_bytes=state))
    return rows


# ----------------------------------------------------------------------------------------------
# Command line

def parse_lengths(s):
    try:
        lengths = [int(float(x[:-1]) * 1024) if x[-1] in "kK" else int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 0:
        raise L.UserError(f"--lengths {s!r}: expected comma-separated token counts such as 1K,2K,4096")
    return lengths


def parse_depths(s):
    try:
        depths = [float(d) for d in s.split(",")]
    except ValueError:
        depths = [-1.0]
    if not all(0 <= d <= 1 for d in depths):
        raise L.UserError(f"--depths {s!r}: expected comma-separated fractions in [0, 1] such as 0.1,0.5,0.9")
    return depths


def load(args, device, dtype):
    """([(name, model, context manager)], tokenizer, {"student": path, "teacher": path})."""
    if args.random_model:  # random weights: speed and memory only
        with torch.device(device):
            model = L.Llama(L.preset(args.random_model))
        model.to(dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, 0, 0.02)
        L.convert_to_lawcat(model, verbose=False)
        return [("student", model, contextlib.nullcontext), ("teacher", model, L.as_teacher)], None, {}
    found = sorted(glob.glob("out/*/stage*.pt"), key=os.path.getmtime)
    ckpt = Path(args.ckpt) if args.ckpt else Path(found[-1]) if found else None
    if args.teacher:
        recorded = None
        if not args.init and ckpt and ckpt.exists():  # the teacher this checkpoint was distilled from
            c = L.read_checkpoint(ckpt, "pass --init with the teacher's weights")
            if not isinstance(c, dict) or "teacher" not in c:
                raise L.UserError(f"{ckpt}: not a lawcat checkpoint (no teacher); pass --init with the teacher's weights")
            recorded = L.recorded_teacher(c, ckpt)
        model, tok, path = L.load_model(args.init or recorded or "smollm2-135m", device, dtype)
        return [("teacher", model, contextlib.nullcontext)], tok, {"student": None, "teacher": str(path)}
    if ckpt is None:
        raise L.UserError("no checkpoint in out/*/stage*.pt: run `python train.py` first, or pass --ckpt PATH "
                          "(a student) or --teacher (the plain teacher)")
    model, tok, c = L.load_student(ckpt, device, dtype, teacher=args.init)
    if args.decay_scale != 1:  # log-decay = logsigmoid(gate) / gate_norm: every channel forgets decay_scale x as fast
        if not args.decay_scale > 0 or not model.cfg.gate:
            raise L.UserError(f"--decay-scale {args.decay_scale:g}: needs a positive number and a student with gates")
        model.cfg.gate_norm /= args.decay_scale
    if args.max_halflife is not None:  # replaces the cap it was trained with (0: none)
        if not args.max_halflife >= 0 or not model.cfg.gate:
            raise L.UserError(f"--max-halflife {args.max_halflife}: needs a number of tokens (0: no cap) and a student "
                              "with gates")
        model.cfg.max_halflife = args.max_halflife
    runners = [("student", model, contextlib.nullcontext)]
    if not args.no_teacher:
        runners.append(("teacher", model, L.as_teacher))
    return runners, tok, {"student": str(ckpt), "teacher": args.init or L.recorded_teacher(c, ckpt)}


def results_path(args, task, paths):
    """--json, else <task>_<checkpoint name>.json beside the student's checkpoint, else out/<task>_teacher.json
    (out/<task>_random-<preset>.json for --random-model); its folder is made."""
    student = paths.get("student")
    default = Path(student).with_name(f"{task}_{Path(student).stem}.json") if student else \
        Path("out") / (f"{task}_random-{args.random_model}.json" if args.random_model else f"{task}_teacher.json")
    out = Path(args.json or default)
    if out.is_dir():
        raise L.UserError(f"--json {out}: is a directory; pass a file name such as {out / (task + '.json')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def run_bench(args, runners, paths, lengths, device):
    model, out = runners[0][1], results_path(args, "bench", paths)
    rows = bench(runners, lengths, device, args.decode_steps)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                dtype=str(model.tok_embeddings.weight.dtype), decode_steps=args.decode_steps, argv=args.argv,
                torch=torch.__version__)
    out.write_text(json.dumps(dict(task="bench", model=paths or {"random": args.random_model}, lengths=lengths,
                                   results=rows, meta=meta), indent=1))
    print(f"\nwrote {out}")


def run_eval(args, task, runners, tok, paths, lengths, depths, device):
    model, t0, out = runners[0][1], time.time(), results_path(args, task, paths)
    trials = args.trials or {"babilong": 20, "ppl": 16}.get(task, 4)
    print(f"{task} on {device}; the teacher's trained context is {model.cfg.max_seq_len} tokens", flush=True)
    res = evaluate(task, runners, tok, lengths, depths, trials, device, args.force, args.past_context)
    res["model"] = paths
    res["meta"] = dict(device=str(device), dtype=str(model.tok_embeddings.weight.dtype),
                       teacher_context=model.cfg.max_seq_len, seconds=round(time.time() - t0, 1), argv=args.argv,
                       python=sys.version.split()[0])  # --ppl's held-out text is this Python's standard library
    print_tables(res)
    keys = ("task", "model", "lengths", "depths", "trials", "results", "notes", "samples", "meta")
    out.write_text(json.dumps({k: res[k] for k in keys}, indent=1))
    png = heatmap(res, out.with_suffix(".png"))
    print(f"\nwrote {out}" + (f" and {png}" if png else "" if task == "ppl" else " (no heatmap: matplotlib is not installed)"))


def run_halflives(args, runners, tok, paths, length, device):
    """--halflives: how far back each of the student's decays reaches on a passkey prompt of `length` tokens. A key
    channel's half-life is ln 2 / -(its log-decay) tokens (a stored key's weight halves in that many), its median
    over the prompt's tokens taken; per layer and over all layers, the median channel and the share of channels
    past 1K to 64K tokens. Stage 1 trains the gates on 1K sequences, where 64K and 4K look alike: this shows how
    many channels it left without a bound (README: "Why the 4K students stop before 16K")."""
    name, model, _ = runners[0]
    if name != "student" or not model.cfg.gate:
        raise L.UserError("--halflives reads a student's gates: pass --ckpt with a student that has them")
    ids = torch.tensor([build_passkey(tok, length, 0.5, 12345)], device=device)
    decays = []  # per layer (T, H_kv, D), from the attention input the layer sees
    hooks = [b.attention.register_forward_pre_hook(lambda m, a: decays.append(m.lawcat.log_decay(a[0], m.cfg)[0]))
             for b in model.layers]
    try:
        with torch.no_grad():
            model(ids, logits=False)
    finally:
        for h in hooks:
            h.remove()
    edges = (1024, 4096, 16384, 65536)

    def row(layer, half):
        return dict(layer=layer, median=half.median().item(), **{f"over_{e}": (half > e).double().mean().item()
                                                                for e in edges})
    # a log-decay of exactly 0 (logsigmoid rounds to it past gate logits of ~100) forgets nothing: half-life inf
    halves = [torch.where(g < 0, math.log(2) / -g.double(), math.inf).median(0).values.flatten().cpu()
              for g in decays]  # per layer (H_kv * D,)
    rows = [row(i, h) for i, h in enumerate(halves)] + [row("all", torch.cat(halves))]
    print(f"half-lives of {paths['student']} on a {ids.shape[1]}-token passkey prompt (cap: "
          f"{model.cfg.max_halflife or 'none'}): each channel's median over the tokens")
    print("| layer | median channel | " + " | ".join(f"> {e // 1024}K" for e in edges) + " |")
    for r in rows:
        print(f"| {r['layer']} | {r['median']:,.0f} | " + " | ".join(f"{r[f'over_{e}']:.0%}" for e in edges) + " |")
    out = results_path(args, "halflives", paths)
    meta = dict(device=str(device), dtype=str(model.tok_embeddings.weight.dtype), max_halflife=model.cfg.max_halflife,
                argv=args.argv)
    out.write_text(json.dumps(dict(task="halflives", model=paths, tokens=ids.shape[1], layers=rows, meta=meta),
                              indent=1))  # an unbounded median is written as Infinity, which Python's json reads
    print(f"wrote {out}")


def run_generate(args, runners, tok, paths):
    name, model, _ = runners[0]
    try:
        text = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    except (OSError, UnicodeDecodeError) as e:
        raise L.UserError(f"--prompt-file: {e}") from None
    ids = tok.chat_prompt(text) if args.chat else tok.encode(text)
    print(f"[{name}: {paths[name]}]\n" + ("" if args.chat else text), end="", flush=True)
    out, t_prefill, t_rest = stream(model, tok, ids, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    T, dtype = len(ids) + len(out), model.tok_embeddings.weight.dtype
    graph = L.decodes_with_graph(model)
    print(f"\n\n[{len(ids)} prompt tokens: prefill {1e3 * t_prefill:.0f} ms; {len(out)} new tokens: "
          f"{max(len(out) - 1, 0) / max(t_rest, 1e-9):.1f} tokens/s" +
          (", the one-time CUDA-graph capture included]" if graph else "]"))
    print(f"[decode state: student {mib(state_bytes(model.cfg, dtype, True, T))} (conv tails + S + z, the same at any "
          f"length); teacher KV cache {mib(state_bytes(model.cfg, dtype, False, T))} at {T} tokens]")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=L.HelpFormatter)
    p.add_argument("--ckpt", help="student checkpoint (default: the newest out/*/stage*.pt)")
    p.add_argument("--teacher", action="store_true", help="run the plain teacher only")
    p.add_argument("--init", help="teacher weights (default: the path the checkpoint records, else smollm2-135m)")
    p.add_argument("--no-teacher", action="store_true", help="evaluate the student only")
    p.add_argument("--prompt", default="The capital of France is", help="text to continue")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed")
    mode = p.add_mutually_exclusive_group()
    for m, what in (("passkey", "passkey retrieval"), ("niah", "S-NIAH-1/2/3"), ("babilong", "BABILong-style QA2/QA3"),
                    ("ppl", "held-out perplexity"), ("bench", "prefill/decode speed and memory against context length"),
                    ("halflives", "the student's decay half-lives on a passkey prompt (--lengths: one, default 4K)")):
        mode.add_argument(f"--{m}", action="store_true", help=what)
    p.add_argument("--lengths", help="e.g. 1K,2K,4096 (default: passkey/niah 1K..32K, babilong 0..16K, ppl 1K,4K, "
                                     "bench 1K..64K (on CPU 256..2K))")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle positions as fractions of the context")
    p.add_argument("--trials", type=int, help="per cell (default: 4, babilong 20); --ppl: windows per length (16)")
    p.add_argument("--json", help="results file (default: next to the checkpoint, or out/<task>_teacher.json, "
                                  "or out/bench_random-<preset>.json)")
    p.add_argument("--force", action="store_true", help="run lengths over 8K on CPU too")
    p.add_argument("--past-context", action="store_true", help="evaluate the teacher past its trained context too")
    p.add_argument("--random-model", help="--bench random weights of a preset's shape, e.g. llama3.2-1b")
    p.add_argument("--decode-steps", type=int, default=64, help="--bench: tokens decoded after each prefill")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="(default: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--decay-scale", type=float, default=1.0,
                   help="multiply the student's log-decays by this at inference (below 1: it forgets more slowly)")
    p.add_argument("--max-halflife", type=int,
                   help="cap every decay's half-life at this many tokens at inference (0: none; default: as trained)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise L.UserError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise L.UserError("--device cuda: no GPU here; use --device cpu")
        if args.random_model and not args.bench:
            raise L.UserError("--random-model is for --bench only")
        if args.teacher and args.no_teacher:
            raise L.UserError("--teacher runs the teacher alone, --no-teacher the student alone: pass one of them")
        for k in ("trials", "max_new_tokens", "decode_steps"):
            if getattr(args, k) is not None and getattr(args, k) < 1:
                raise L.UserError(f"--{k.replace('_', '-')} {getattr(args, k)}: must be 1 or more")
        if args.top_k < 0:
            raise L.UserError(f"--top-k {args.top_k}: must be 0 (the whole vocabulary) or more")
        if not args.temperature >= 0:
            raise L.UserError(f"--temperature {args.temperature}: must be 0 (greedy) or more")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
        task = next((t for t in SUBTASKS if getattr(args, t)), None)
        default = ("256,512,1K,2K" if device.type == "cpu" else "1K,2K,4K,8K,16K,32K,64K") if args.bench else \
            "0,1K,2K,4K,8K,16K" if task == "babilong" else "1K,4K" if task == "ppl" else \
            "4K" if args.halflives else "1K,2K,4K,8K,16K,32K"
        lengths, depths = parse_lengths(args.lengths or default), parse_depths(args.depths)
        runners, tok, paths = load(args, device, dtype)
        if args.bench:
            run_bench(args, runners, paths, lengths, device)
        elif args.halflives:
            if len(lengths) != 1:
                raise L.UserError(f"--halflives takes one length, not {args.lengths}")
            run_halflives(args, runners, tok, paths, lengths[0], device)
        elif task:
            run_eval(args, task, runners, tok, paths, lengths, depths, device)
        else:
            run_generate(args, runners, tok, paths)
        return 0
    except L.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
