"""Synthetic long-context tasks: exact lengths, answer at the end, depth, determinism, splits, mixing."""

import functools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from megacontext import tasks

encode = lambda s: list(s.encode())  # byte-level "tokenizer"
decode = lambda ids: bytes(int(i) for i in ids).decode()
# Filler without digits, so a planted number can only come from a needle.
filler = tasks.make_repeat_filler(encode)
text_filler = tasks.make_text_filler(np.frombuffer(b"lorem ipsum dolor sit amet, consectetur. " * 50, np.uint8))
MIN_LEN = {"passkey": 200, "multikey": 500, "multivalue": 500, "kv": 900}


def check_example(ex, length):
    ids = ex["ids"]
    assert ids.dtype == np.int64 and ids.shape == (length,)
    assert ex["answer_start"] + ex["answer_len"] == length
    assert decode(ids[ex["answer_start"]:]) == ex["answer_text"]
    assert ex["needle_pos"] == sorted(ex["needle_pos"])
    assert set(ex["target_pos"]) <= set(ex["needle_pos"])


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(tasks.TASKS)), extra=st.integers(0, 3000),
       seed=st.integers(0, 2**31 - 1), fmt=st.integers(0, len(tasks.PASSKEY_TEMPLATES) - 1), text=st.booleans())
def test_exact_length_and_answer_at_end(kind, extra, seed, fmt, text):
    length = MIN_LEN[kind] + extra
    ex = tasks.make_example(kind, np.random.default_rng(seed), length,
                            text_filler if text else filler, encode, fmt=fmt)
    check_example(ex, length)
    assert ex["kind"] == kind


def test_too_short_raises():
    with pytest.raises(ValueError, match="needs at least"):
        tasks.passkey(np.random.default_rng(0), 50, filler, encode)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_example("nope", np.random.default_rng(0), 500, filler, encode)
    with pytest.raises(ValueError, match="fmt"):
        tasks.passkey(np.random.default_rng(0), 500, filler, encode, fmt=len(tasks.PASSKEY_TEMPLATES))


def test_minimal_length_fits_exactly():
    # No filler at all: needle, question, answer fill the sequence exactly.
    rng = np.random.default_rng(1)
    k = tasks.passkey(rng, 1000, filler, encode, depth=0.5)["answer_text"].strip()
    needle, question = tasks.PASSKEY_TEMPLATES[0]
    n_needed = len(encode(needle.format(k=k))) + len(encode(question)) + len(encode(" " + k))
    rng = np.random.default_rng(1)  # same draws -> same passkey
    ex = tasks.passkey(rng, n_needed, filler, encode, depth=0.5)
    check_example(ex, n_needed)
    assert ex["needle_pos"] == [0]
    with pytest.raises(ValueError, match="needs at least"):
        tasks.passkey(np.random.default_rng(1), n_needed - 1, filler, encode, depth=0.5)


def test_passkey_decodes_and_depth():
    for depth in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]:
        for length in [300, 1000, 4096]:
            ex = tasks.passkey(np.random.default_rng(7), length, filler, encode, depth=depth)
            k = ex["answer_text"].strip()
            assert len(k) == 5 and k.isdigit()
            (pos,) = ex["needle_pos"]
            needle = decode(ex["ids"][pos:pos + 60])
            assert needle.startswith(" The pass key is " + k)
            # Depth is relative to the filler; measured against the text before the question.
            needle_len = len(encode(tasks.PASSKEY_TEMPLATES[0][0].format(k=k)))
            question_len = len(encode(tasks.PASSKEY_TEMPLATES[0][1]))
            n_fill = ex["answer_start"] - needle_len - question_len
            assert abs(pos - depth * n_fill) <= 1
            assert decode(ex["ids"][ex["answer_start"] - question_len:ex["answer_start"]]) == \
                tasks.PASSKEY_TEMPLATES[0][1]


def test_multikey_answer_is_queried_needle():
    for seed in range(20):
        ex = tasks.multikey_niah(np.random.default_rng(seed), 1500, filler, encode, n_keys=5)
        v = ex["answer_text"].strip()
        assert len(v) == 7 and v.isdigit() and len(ex["needle_pos"]) == 5
        (tp,) = ex["target_pos"]
        needle = decode(ex["ids"][tp:tp + 100]).split(".")[0]
        key = needle.split(" for ")[1].split(" is")[0]
        assert needle.endswith(v)
        question = decode(ex["ids"][ex["answer_start"] - 150:ex["answer_start"]])
        assert key in question
        # The other needles carry other values (distractors).
        text = decode(ex["ids"])
        assert text.count("special magic numbers for") == 5 and text.count(v) == 2


def test_multivalue_lists_values_in_document_order():
    for seed in range(20):
        ex = tasks.multivalue_niah(np.random.default_rng(seed), 1500, filler, encode, n_values=4)
        values = ex["answer_text"].strip().split(", ")
        assert len(values) == 4 and len(set(values)) == 4
        found = [decode(ex["ids"][p:p + 100]).split(": ")[1][:7] for p in ex["needle_pos"]]
        assert found == values


def test_kv_recall_answer_matches_pair():
    for seed in range(20):
        ex = tasks.kv_recall(np.random.default_rng(seed), 1200, text_filler, encode, n_pairs=16)
        (tp,) = ex["target_pos"]
        pair = decode(ex["ids"][tp:tp + 40]).split(".")[0]  # " key-xxxxxx: value-yyyyyy"
        key, value = pair.strip().split(": ")
        assert ex["answer_text"] == " " + value
        assert key in decode(ex["ids"][ex["answer_start"] - 80:ex["answer_start"]])
        assert len(ex["needle_pos"]) == 16


def test_determinism():
    for kind in tasks.TASKS:
        a = tasks.make_example(kind, tasks.task_rng("eval", 3), 1500, text_filler, encode, fmt=2)
        b = tasks.make_example(kind, tasks.task_rng("eval", 3), 1500, text_filler, encode, fmt=2)
        c = tasks.make_example(kind, tasks.task_rng("eval", 4), 1500, text_filler, encode, fmt=2)
        assert np.array_equal(a["ids"], b["ids"]) and a["needle_pos"] == b["needle_pos"]
        assert not np.array_equal(a["ids"], c["ids"])


def test_seed_ranges_disjoint():
    assert tasks.TRAIN_SEED_BASE + 2**31 <= tasks.EVAL_SEED_BASE
    with pytest.raises(ValueError):
        tasks.task_rng("train", 2**31)
    # Same index, different split -> different streams.
    assert tasks.task_rng("train", 5).integers(2**62) != tasks.task_rng("eval", 5).integers(2**62)
    assert set(tasks.TRAIN_FMTS).isdisjoint(tasks.EVAL_FMTS)


def test_eval_values_never_produced_by_train():
    def answers(split, kind, n, **kw):
        out = set()
        for i in range(n):
            ex = tasks.make_example(kind, tasks.task_rng(split, i), 800, filler, encode, split=split, **kw)
            out.update(v.removeprefix("value-") for v in ex["answer_text"].strip().split(", "))
        return out
    train = answers("train", "passkey", 3000)
    evals = answers("eval", "passkey", 3000)
    assert len(train) > 2000 and len(evals) > 2000
    assert train.isdisjoint(evals)
    assert all(tasks.is_train_value(v) for v in train) and not any(tasks.is_train_value(v) for v in evals)
    for kind, kw in [("multikey", {}), ("multivalue", {}), ("kv", {"n_pairs": 4})]:
        tr, ev = answers("train", kind, 300, **kw), answers("eval", kind, 300, **kw)
        assert tr.isdisjoint(ev)
        assert all(tasks.is_train_value(v) for v in tr) and not any(tasks.is_train_value(v) for v in ev)


def test_fmts_differ():
    for kind in tasks.TASKS:
        texts = set()
        fmts = sorted(tasks.TRAIN_FMTS + tasks.EVAL_FMTS)
        assert fmts == list(range(len(fmts)))
        for fmt in fmts:
            ex = tasks.make_example(kind, np.random.default_rng(0), 1500, filler, encode, fmt=fmt)
            texts.add(decode(ex["ids"][ex["answer_start"] - 40:ex["answer_start"]]))  # question tail
            needle_start = ex["needle_pos"][0]
            texts.add(decode(ex["ids"][needle_start:needle_start + 40]))  # shapes repeat: the noun must be in view
        assert len(texts) == 2 * len(fmts), kind


def test_fillers_exact_length():
    rng = np.random.default_rng(0)
    short = tasks.make_text_filler(np.arange(10))
    for n in [0, 1, 9, 10, 11, 1000]:
        assert filler(rng, n).shape == (n,) and text_filler(rng, n).shape == (n,)
        x = short(rng, n)
        assert x.shape == (n,) and np.all(np.diff(x) % 10 == 1)  # contiguous, wrapping
    assert decode(filler(rng, 40)) == tasks.RULER_NOISE[:40]


def test_mix_tasks_into_batch():
    B, T, rate = 400, 256, 0.25
    tokens = np.full((B, T), 7, dtype=np.int32)
    make = functools.partial(tasks.random_train_example, filler=filler, encode=encode, kinds=("passkey",))
    out, w = tasks.mix_tasks_into_batch(tokens, np.random.default_rng(0), rate,
                                        lambda rng, n: make(rng, n), answer_weight=5.0)
    assert out.dtype == tokens.dtype and out.shape == (B, T) and w.shape == (B, T)
    assert np.all(tokens == 7)  # input untouched
    replaced = np.any(out != 7, axis=1)
    assert abs(replaced.mean() - rate) < 0.07
    assert np.all(w[~replaced] == 1.0)
    for b in np.flatnonzero(replaced):
        ans = np.flatnonzero(w[b] == 5.0)
        assert len(ans) > 0 and ans[-1] == T - 1 and np.all(np.diff(ans) == 1)
        assert decode(out[b, ans]).strip().isdigit()
    none, w0 = tasks.mix_tasks_into_batch(tokens, np.random.default_rng(0), 0.0, make)
    assert np.all(none == tokens) and np.all(w0 == 1.0)


def test_generated_phrasings_keep_the_eval_phrasing_unseen():
    """The 12 generated training phrasings per task add nouns and sentence shapes, and none of
    them borrows the held-out phrasing's nouns or cue words."""
    held_out = ("access code", "hidden number", "maps to", "Important", "Keep", "Recall", "List")
    for templates in (tasks.PASSKEY_TEMPLATES, tasks.MAGIC_TEMPLATES, tasks.KV_TEMPLATES):
        assert len(templates) == 6 + tasks.N_GENERATED
        train = [templates[f] for f in tasks.TRAIN_FMTS]
        assert len(set(train)) == len(train)
        for t in templates[6:]:
            assert not any(w in part for w in held_out for part in t), t
        eval_parts = set(templates[tasks.EVAL_FMTS[0]])
        assert not eval_parts & {part for t in train for part in t}


def test_generated_phrasings_need_no_longer_contexts():
    """A generated phrasing is never longer than the longest hand-written one, so every context
    length that fit a training example before still fits one (a CPU config trains at 512 tokens)."""
    def min_len(kind, fmt):
        lo, hi = 1, 4096
        while lo < hi:  # the shortest length that assembles (fixed seed: same keys and values)
            mid = (lo + hi) // 2
            try:
                tasks.make_example(kind, np.random.default_rng(0), mid, filler, encode, fmt=fmt)
                hi = mid
            except ValueError:
                lo = mid + 1
        return lo
    for kind in tasks.TASKS:
        written = max(min_len(kind, f) for f in range(6))
        assert max(min_len(kind, f) for f in range(6, 6 + tasks.N_GENERATED)) <= written, kind


def test_open_nouns_vary_the_surface_and_keep_the_eval_phrasing_unseen():
    """open_nouns=True: half the passkey/NIAH examples take a shape with a random noun. Their needles
    and questions vary far more than 17 phrasings, never use the held-out phrasing's words, keep
    the answer contract, and need no longer contexts than the hand-written phrasings."""
    held_out = ("access code", "hidden number", "maps to", "Important", "Keep", "Recall", "List")
    rng = np.random.default_rng(0)
    surfaces, n_open = set(), 0
    for _ in range(300):  # passkey needles carry no key: their surface is the phrasing alone
        ex = tasks.random_train_example(rng, 300, filler, encode, kinds=("passkey",), open_nouns=True)
        check_example(ex, 300)
        text = decode(ex["ids"][ex["needle_pos"][0]:ex["answer_start"]])
        assert not any(w in text for w in held_out), text
        needle = decode(ex["ids"][ex["target_spans"][0][0]:ex["target_spans"][0][1]])
        surfaces.add("".join(c for c in needle if not c.isdigit()))
        n_open += any(f" {w} " in needle for w in tasks.WORDS)
    assert 100 <= n_open <= 200, n_open          # about half
    assert len(surfaces) > 100, len(surfaces)    # the 17 fixed phrasings give at most 17
    ex = tasks.random_train_example(np.random.default_rng(1), MIN_LEN["multikey"], filler, encode,
                                    kinds=("multikey",), open_nouns=True)
    check_example(ex, MIN_LEN["multikey"])
    longest = max((f"{w} {h}" for w in tasks.WORDS for h in tasks.OPEN_HEADS), key=len)
    for kind, shapes in (("passkey", tasks.PK_SHAPES), ("multikey", tasks.MAGIC_SHAPES)):
        written = max(_min_len(kind, fmt=f) for f in range(6))
        for shape in shapes:
            t = tuple(p.replace("{n}", longest) for p in shape)
            assert _fits(kind, written, template=t), (kind, t)


def _fits(kind, n, **kw):
    try:
        tasks.make_example(kind, np.random.default_rng(0), n, filler, encode, **kw)
        return True
    except ValueError:
        return False


def _min_len(kind, **kw):
    lo, hi = 1, 4096  # the shortest length that assembles (fixed seed: same keys and values)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(kind, mid, **kw) else (mid + 1, hi)
    return lo


def test_open_vocab_takes_one_word_tokens_and_never_a_held_out_word():
    toks = [" falcon", " access", " Apple", " ab", " return", " code", "xyz", " two words", " ember",
            " hidden", " recall", "\ufffd", " verylongwordthatistoolong", " ember"]
    words = tasks.open_vocab(toks)
    assert words == ["ember", "falcon", "return"], words       # sorted, deduplicated, lowercase words only
    held = tasks.held_out_words()
    assert {"access", "code", "hidden", "number", "maps", "important", "keep", "recall", "list"} <= held
    with pytest.raises(ValueError, match="usable words"):
        tasks.open_vocab([" access", " code", "xyz"])


def test_open_vocab_nouns_vary_and_keep_the_eval_phrasing_unseen():
    """words=open_vocab(...): the open templates' nouns are two words of that vocabulary, none of the
    held-out phrasing's; a seed gives the same template."""
    vocab = [f"zq{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]   # 676 stand-in words
    held_phrases = ("access code", "hidden number", "maps to", "Important", "Keep", "Recall", "List")
    rng = np.random.default_rng(0)
    nouns = set()
    for _ in range(300):
        ex = tasks.random_train_example(rng, 300, filler, encode, kinds=("passkey",), open_nouns=True, words=vocab)
        check_example(ex, 300)
        text = decode(ex["ids"][ex["needle_pos"][0]:ex["answer_start"]])
        assert not any(w in text for w in held_phrases), text
        found = [w for w in vocab if f"{w} " in text or f" {w}" in text]
        if found:
            assert len(found) >= 2, text                     # a noun is two vocabulary words
            nouns.add(tuple(sorted(found)))
    assert len(nouns) > 100, len(nouns)                      # vs 400 fixed nouns of 50 words before
    t1 = tasks.open_template("multikey", np.random.default_rng(3), vocab)
    t2 = tasks.open_template("multikey", np.random.default_rng(3), vocab)
    assert t1 == t2 and "{key}" in t1[0] and "{v}" in t1[0]
