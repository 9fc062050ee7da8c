"""
Synthetic long-context tasks (RULER-style), built in token space so they work with any tokenizer.

Notable:
- Every generator returns `{"ids", "answer_start", "answer_len", "needle_pos", "target_pos",
  "target_spans", "kind", "answer_text"}` (target_spans: the answer's needles as token spans
  [start, end)). `ids` has exactly the requested length and ends with the answer, right
  after the question: `answer_start + answer_len == length`. A model is scored by teacher-forced
  NLL / accuracy of `ids[answer_start:]` given everything before it.
- Pieces (needles, question, answer) are encoded separately and concatenated as token arrays;
  the filler gets exactly the tokens left over. So lengths are exact whatever the tokenizer.
- Tasks: passkey, multi-key NIAH (distractor keys), multi-value NIAH (all values of one key, in
  document order), KV recall (many key-value pairs, query one).
- Train/eval separation, three ways: seeds (`task_rng`: train seeds < 2**31 <= eval seeds),
  phrasing (`fmt` 0, 1, 3, 4, 5 and 12 generated ones, 6-17, for training; 2 held out for eval) and values (every answer number has
  an even digit sum in the train split and an odd one in eval), so an eval answer is never seen
  as an answer in training.
- `mix_tasks_into_batch` swaps a random fraction of rows of a (B, T) token batch for task
  examples and returns a loss-weight mask that up-weights the answer tokens.
"""

import re

import numpy as np

TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 2**31  # train seeds live in [0, 2**31), eval seeds in [2**31, 2**32)
N_GENERATED = 12               # generated training phrasings per task (fmt 6..17), see _generated_templates
TRAIN_FMTS = (0, 1, 3, 4, 5) + tuple(range(6, 6 + N_GENERATED))   # a copy rule, not memorised sentences
EVAL_FMTS = (2,)
SPLITS = ("train", "eval")

RULER_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

# (needle, question) per fmt; the answer is always " {k}".
PASSKEY_TEMPLATES = [
    (" The pass key is {k}. Remember it. {k} is the pass key. ",
     " What is the pass key? The pass key is"),
    (" Remember this: the secret key is {k}. The secret key is {k}. ",
     " What is the secret key? The secret key is"),
    (" Important: the access code is {k}. Keep the access code {k} in mind. ",
     " Recall the access code. The access code is"),
    (" The password is {k}. Do not forget the password {k}. ",
     " What is the password? The password is"),
    (" My lucky number is {k}. Once more, my lucky number is {k}. ",
     " What is my lucky number? My lucky number is"),
    (" Note the PIN: {k}. The PIN is {k}. ",
     " What was the PIN? The PIN is"),
]
# (needle, question for one value, question for all values) per fmt.
MAGIC_TEMPLATES = [
    (" One of the special magic numbers for {key} is: {v}. ",
     " What is the special magic number for {key}? The special magic number for {key} is",
     " What are all the special magic numbers for {key}? The special magic numbers for {key} are"),
    (" The magic number of {key} is {v}. ",
     " Which magic number belongs to {key}? The magic number of {key} is",
     " Which magic numbers belong to {key}? The magic numbers of {key} are"),
    (" Note that {key} has the hidden number {v}. ",
     " What is the hidden number of {key}? The hidden number of {key} is",
     " List every hidden number of {key}. The hidden numbers of {key} are"),
    (" The secret number for {key} is {v}. ",
     " What is the secret number for {key}? The secret number for {key} is",
     " What are the secret numbers for {key}? The secret numbers for {key} are"),
    (" Remember that {key} goes with {v}. ",
     " What goes with {key}? {key} goes with",
     " What all goes with {key}? {key} goes with"),
    (" The code of {key} is {v}. ",
     " What is the code of {key}? The code of {key} is",
     " What are the codes of {key}? The codes of {key} are"),
]
KV_TEMPLATES = [
    (" key-{k}: value-{v}.", " What is the value for key-{k}? The value for key-{k} is"),
    (" The value of key-{k} is value-{v}.", " Look up key-{k}. Its value is"),
    (" key-{k} maps to value-{v}.", " What does key-{k} map to? key-{k} maps to"),
    (" key-{k} = value-{v}.", " Then key-{k} = ? key-{k} ="),
    (" key-{k} holds value-{v}.", " What does key-{k} hold? It holds"),
    (" value-{v} belongs to key-{k}.", " Which value belongs to key-{k}? It is"),
]


# sentence shapes of the generated training phrasings; "{n}" is the noun slot
PK_SHAPES = (
    (" The {n} is {k}. Remember the {n}. ", " What is the {n}? The {n} is"),
    (" Write down the {n}: {k}. Again: {k}. ", " Tell me the {n}. The {n} is"),
    (" Here is the {n}, {k}. Do not lose it. ", " Earlier you were given the {n}. It was"),
    (" Please memorize the {n} {k}. ", " Which {n} did you memorize? The {n} is"))
MAGIC_SHAPES = (
    (" The {n} of {key} is {v}. ", " What is the {n} of {key}? The {n} of {key} is",
     " What are all the {n}s of {key}? The {n}s of {key} are"),
    (" Note: {key} has the {n} {v}. ", " Which {n} does {key} have? {key} has the {n}",
     " Which {n}s does {key} have? {key} has the {n}s"),
    (" Remember the {n} for {key}: {v}. ", " Name the {n} for {key}. It is",
     " Name every {n} for {key}. They are"))


def _generated_templates():
    """Training phrasings beyond the hand-written ones: one noun (or connector) per fmt, set in a
    rotating sentence shape. The held-out fmt 2 stays unseen: no generated phrasing uses its
    nouns ("access code", "hidden number", "maps to") or its words ("Important", "Keep",
    "Recall", "List"). An earlier H100 run read the needle in a training phrasing far better
    than in the held-out one (README, #4): more nouns and shapes teach the rule, not the words."""
    nouns = ("pass code", "secret number", "code word", "combination", "ticket number", "locker number",
             "serial number", "safe code", "room number", "order number", "key number", "pin code")
    tags = ("lucky number", "special number", "magic value", "secret value", "tag number", "reference number",
            "label number", "id number", "token number", "badge number", "rank number", "record number")
    links = ("points to", "stores", "gives", "returns", "contains", "yields",
             "sets", "keeps", "has", "owns", "reads", "outputs")
    kv_q = (" Query key-{k}. key-{k} {c}", " Which value does key-{k} give? key-{k} {c}")
    # as short as the hand-written needles: 16 pairs must still fit the contexts that fit before
    kv_shapes = [(" key-{k} {c} value-{v}.", q) for q in kv_q]

    def fill(shapes, words, slot):  # word i goes into shape i (mod the number of shapes)
        return [tuple(t.replace(slot, w) for t in shapes[i % len(shapes)]) for i, w in enumerate(words)]
    return fill(PK_SHAPES, nouns, "{n}"), fill(MAGIC_SHAPES, tags, "{n}"), fill(kv_shapes, links, "{c}")


_pk, _magic, _kv = _generated_templates()
PASSKEY_TEMPLATES += _pk
MAGIC_TEMPLATES += _magic
KV_TEMPLATES += _kv
assert all(len(t) == 6 + N_GENERATED for t in (PASSKEY_TEMPLATES, MAGIC_TEMPLATES, KV_TEMPLATES))

# Keys for the NIAH tasks are two of these joined by a hyphen (1600 combinations), as in RULER.
WORDS = (
    "apple river stone cloud tiger lamp window garden silver ocean forest candle mirror rocket "
    "violin pepper marble thunder falcon harbor meadow lantern copper velvet glacier orchid "
    "compass saddle willow ember canyon pebble quartz badger comet hollow maple crimson ladder "
    "fearless"
).split()

# Open phrasings (opt-in: random_train_example(open_nouns=True), base_train --mc-task-open-nouns):
# a generated shape with a noun drawn per example ("the falcon code", "the ember tag"): 400 nouns x
# 4 or 3 shapes instead of 17 fixed phrasings. In the held-out phrasing LensNet ranked the needle's
# gist below chance while it ranked it first in a training phrasing (README, #4): it had learned
# the phrasings' surface. None of these words is one of the held-out phrasing's (tests/test_tasks.py).
OPEN_HEADS = ("number", "code", "key", "value", "id", "word", "tag", "token", "label", "pin")


def open_template(kind, rng, words=None):
    """A training template for `kind` ("passkey", "multikey", "multivalue") with a random noun:
    a WORDS word and an OPEN_HEADS word, or (words given, e.g. open_vocab(...)) two words drawn
    from `words`."""
    shapes = PK_SHAPES if kind == "passkey" else MAGIC_SHAPES
    shape = shapes[int(rng.integers(len(shapes)))]
    if words is None:
        noun = f"{WORDS[int(rng.integers(len(WORDS)))]} {OPEN_HEADS[int(rng.integers(len(OPEN_HEADS)))]}"
    else:
        i, j = rng.choice(len(words), 2, replace=False)
        noun = f"{words[i]} {words[j]}"
    return tuple(t.replace("{n}", noun) for t in shape)


def held_out_words():
    """Every word of the held-out phrasings (fmt 2 of each task), lowercased: open_vocab never
    draws one, so the eval phrasing's nouns stay unseen as nouns."""
    text = " ".join(" ".join(t[2]) for t in (PASSKEY_TEMPLATES, MAGIC_TEMPLATES, KV_TEMPLATES))
    return frozenset(w.lower() for w in re.findall(r"[A-Za-z]+", text))


def open_vocab(token_strings, min_len=3, max_len=12):
    """Nouns for open_template(words=...) from a tokenizer's vocabulary: the tokens that are one
    lowercase word after a space (" falcon"), minus the held-out phrasings' words. With WORDS x
    OPEN_HEADS (400 nouns from 50 words) LensNet ranked a held-out multi-key needle first at every
    length but a held-out passkey needle ("access code") almost never (README, #4): it could have
    learned to spot those 50 words rather than to match the question's noun. Thousands of
    one-token words leave matching as the only rule that works. Sorted, so a seed gives the same
    nouns for the same tokenizer."""
    held = held_out_words()
    pat = re.compile(rf"^ [a-z]{{{min_len},{max_len}}}$")
    out = sorted({t[1:] for t in token_strings if pat.match(t) and t[1:] not in held})
    if len(out) < 2:
        raise ValueError(f"open_vocab: the vocabulary has {len(out)} usable words (need >= 2)")
    return out


def task_rng(split, index):
    """Generator for example `index` of `split`; train and eval seed ranges never overlap."""
    assert split in SPLITS, f"split must be one of {SPLITS}, got {split!r}"
    if not 0 <= index < 2**31:
        raise ValueError(f"index must be in [0, 2**31), got {index}")
    base = TRAIN_SEED_BASE if split == "train" else EVAL_SEED_BASE
    return np.random.default_rng(base + index)


# -----------------------------------------------------------------------------
# Filler

def make_text_filler(token_ids):
    """Filler that returns random contiguous slices of a long token array (wrapping around)."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    if token_ids.size == 0:
        raise ValueError("make_text_filler needs a non-empty token array")

    def filler(rng, n):
        start = int(rng.integers(token_ids.size))
        return token_ids[(start + np.arange(n)) % token_ids.size]
    return filler


def make_repeat_filler(encode):
    """Filler that repeats the classic RULER noise essay ("The grass is green. ...")."""
    unit = np.asarray(encode(RULER_NOISE), dtype=np.int64)

    def filler(rng, n):
        # Deterministic like RULER; the rng is unused but kept for the common filler signature.
        return np.resize(unit, n)
    return filler


# -----------------------------------------------------------------------------
# Values and keys

def _number(rng, n_digits, split):
    """Random n-digit number whose digit sum is even (train) or odd (eval): disjoint sets."""
    assert split in SPLITS, f"split must be one of {SPLITS}, got {split!r}"
    digits = [int(rng.integers(1, 10))] + [int(d) for d in rng.integers(0, 10, n_digits - 2)]
    parity = 0 if split == "train" else 1
    # The last digit takes one of the five digits of the needed parity, so the draw stays uniform.
    digits.append(2 * int(rng.integers(5)) + (parity - sum(digits)) % 2)
    return "".join(map(str, digits))


def _hex(rng, n, split=None):
    """Random hex string; with a split, its hex-digit sum parity encodes the split as above."""
    digits = [int(d) for d in rng.integers(0, 16, n)]
    if split is not None:
        parity = 0 if split == "train" else 1
        digits[-1] = 2 * (digits[-1] // 2) + (parity - sum(digits[:-1])) % 2
    return "".join("0123456789abcdef"[d] for d in digits)


def _distinct(draw, n):
    """n distinct values from a zero-arg draw function (rejection; collisions are rare)."""
    out = []
    while len(out) < n:
        v = draw()
        if v not in out:
            out.append(v)
    return out


def is_train_value(value):
    """True if `value` (digits or hex) belongs to the train partition (even digit sum)."""
    return sum(int(c, 16) for c in value) % 2 == 0


# -----------------------------------------------------------------------------
# Assembly

def _check_fmt(fmt, templates):
    if fmt not in range(len(templates)):
        raise ValueError(f"fmt must be in 0..{len(templates) - 1}, got {fmt}")


def _assemble(rng, length, filler, encode, kind, needles, depths, question, answer, target):
    """filler with needles at relative depths (sorted), then question, then answer: exactly `length`."""
    enc = lambda s: np.asarray(encode(s), dtype=np.int64)
    needle_ids = [enc(s) for s in needles]
    q_ids, a_ids = enc(question), enc(answer)
    n_fill = length - sum(len(x) for x in needle_ids) - len(q_ids) - len(a_ids)
    if n_fill < 0:
        raise ValueError(
            f"{kind}: needs at least {length - n_fill} tokens ({len(needles)} needle(s) "
            f"{sum(len(x) for x in needle_ids)} + question {len(q_ids)} + answer {len(a_ids)}), "
            f"got length {length}")
    assert all(a <= b for a, b in zip(depths, depths[1:])), "depths must be sorted"
    fill = np.asarray(filler(rng, n_fill), dtype=np.int64)
    assert len(fill) == n_fill, f"filler returned {len(fill)} tokens, asked for {n_fill}"
    offsets = [int(round(d * n_fill)) for d in depths]
    parts, needle_pos, prev, pos = [], [], 0, 0
    for off, ids in zip(offsets, needle_ids):
        parts += [fill[prev:off], ids]
        pos += off - prev
        needle_pos.append(pos)
        pos += len(ids)
        prev = off
    parts += [fill[prev:], q_ids, a_ids]
    ids = np.concatenate(parts)
    assert len(ids) == length
    return {"ids": ids, "answer_start": length - len(a_ids), "answer_len": len(a_ids),
            "needle_pos": needle_pos, "target_pos": [needle_pos[i] for i in target],
            "target_spans": [(needle_pos[i], needle_pos[i] + len(needle_ids[i])) for i in target],
            "kind": kind, "answer_text": answer}


def _depths(rng, n):
    return sorted(float(d) for d in rng.random(n))


# -----------------------------------------------------------------------------
# Tasks

def passkey(rng, length, filler, encode, depth=None, fmt=0, split="train", n_digits=5, template=None):
    """One passkey needle at relative depth `depth` in [0, 1] (random if None). template: a
    (needle, question) pair in place of fmt's (open_template)."""
    _check_fmt(fmt, PASSKEY_TEMPLATES)
    if depth is None:
        depth = float(rng.random())
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    k = _number(rng, n_digits, split)
    needle, question = template or PASSKEY_TEMPLATES[fmt]
    return _assemble(rng, length, filler, encode, "passkey", [needle.format(k=k)], [depth],
                     question, f" {k}", target=[0])


def _magic_keys(rng, n):
    return _distinct(lambda: "-".join(rng.choice(WORDS, 2, replace=False)), n)


def multikey_niah(rng, length, filler, encode, n_keys=4, fmt=0, split="train", n_digits=7, template=None):
    """n_keys needles with distinct word keys at random depths; the question asks for one of them."""
    _check_fmt(fmt, MAGIC_TEMPLATES)
    keys = _magic_keys(rng, n_keys)
    values = _distinct(lambda: _number(rng, n_digits, split), n_keys)
    q = int(rng.integers(n_keys))
    needle, question, _ = template or MAGIC_TEMPLATES[fmt]
    return _assemble(rng, length, filler, encode, "multikey",
                     [needle.format(key=k, v=v) for k, v in zip(keys, values)], _depths(rng, n_keys),
                     question.format(key=keys[q]), f" {values[q]}", target=[q])


def multivalue_niah(rng, length, filler, encode, n_values=4, fmt=0, split="train", n_digits=7, template=None):
    """One key with n_values values at random depths; the answer lists them in document order."""
    _check_fmt(fmt, MAGIC_TEMPLATES)
    key = _magic_keys(rng, 1)[0]
    # depths are sorted, so values[i] lands before values[i+1]: list order == document order.
    values = _distinct(lambda: _number(rng, n_digits, split), n_values)
    needle, _, question = template or MAGIC_TEMPLATES[fmt]
    return _assemble(rng, length, filler, encode, "multivalue",
                     [needle.format(key=key, v=v) for v in values], _depths(rng, n_values),
                     question.format(key=key), " " + ", ".join(values), target=list(range(n_values)))


def kv_recall(rng, length, filler, encode, n_pairs=16, fmt=0, split="train", n_hex=6):
    """n_pairs "key-XXXXXX: value-YYYYYY" pairs (random hex) at random depths; query one key."""
    _check_fmt(fmt, KV_TEMPLATES)
    keys = _distinct(lambda: _hex(rng, n_hex), n_pairs)
    values = [_hex(rng, n_hex, split) for _ in range(n_pairs)]
    q = int(rng.integers(n_pairs))
    needle, question = KV_TEMPLATES[fmt]
    return _assemble(rng, length, filler, encode, "kv",
                     [needle.format(k=k, v=v) for k, v in zip(keys, values)], _depths(rng, n_pairs),
                     question.format(k=keys[q]), f" value-{values[q]}", target=[q])


TASKS = {"passkey": passkey, "multikey": multikey_niah, "multivalue": multivalue_niah, "kv": kv_recall}


def make_example(kind, rng, length, filler, encode, **kw):
    """One example of task `kind` (a key of TASKS); **kw go to the generator (fmt, split, ...)."""
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; choose from {sorted(TASKS)}")
    return TASKS[kind](rng, length, filler, encode, **kw)


def random_train_example(rng, length, filler, encode, kinds=tuple(TASKS), open_nouns=False, words=None):
    """A training example: random kind, random train phrasing, train values. open_nouns: half of
    the passkey and NIAH examples take an open_template instead (the rng draws no more otherwise,
    so the default stream is unchanged); words: its nouns' vocabulary (open_vocab), else WORDS x
    OPEN_HEADS."""
    kind = kinds[int(rng.integers(len(kinds)))]
    fmt = TRAIN_FMTS[int(rng.integers(len(TRAIN_FMTS)))]
    kw = {}
    if open_nouns and kind != "kv" and rng.random() < 0.5:
        kw["template"] = open_template(kind, rng, words)
    return make_example(kind, rng, length, filler, encode, fmt=fmt, split="train", **kw)


# -----------------------------------------------------------------------------
# Mixing into the training stream

def mix_tasks_into_batch(tokens, rng, rate, make_example, answer_weight=4.0):
    """
    Replace each row of `tokens` (B, T) with a task example with probability `rate`.
    `make_example(rng, T)` returns an example dict (e.g. a partial of random_train_example).
    Returns (new_tokens, weights): weights[b, t] (float32) weights the loss of predicting
    tokens[b, t]: 1 everywhere, `answer_weight` on answer tokens. With x = tokens[:, :-1] and
    y = tokens[:, 1:], use weights[:, 1:].
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    B, T = tokens.shape
    out = tokens.copy()
    weights = np.ones((B, T), dtype=np.float32)
    # Per-row coin flips, not round(rate * B): with small B and rate round() would mix in nothing.
    for b in np.flatnonzero(rng.random(B) < rate):
        ex = make_example(rng, T)
        assert len(ex["ids"]) == T, f"example has {len(ex['ids'])} tokens, batch rows have {T}"
        out[b] = ex["ids"]
        weights[b, ex["answer_start"]:ex["answer_start"] + ex["answer_len"]] = answer_weight
    return out, weights
