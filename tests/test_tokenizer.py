import os

import pytest
from hypothesis import given, settings, strategies as st

from nanochat.common import UserError
from nanochat.dataset import load_bundled
from nanochat.tokenizer import Tokenizer, SPECIAL_TOKENS, get_tokenizer


@pytest.fixture(scope="module")
def hf(tiny_tokenizer):
    """A fresh HF tokenizer from the saved tokenizer.json, reading special-token names as plain text
    (as tiktoken's encode_ordinary does), so the two can be compared on any string."""
    from tokenizers import Tokenizer as HFTokenizer
    t = HFTokenizer.from_file(os.path.join(tiny_tokenizer.directory, "tokenizer.json"))
    t.encode_special_tokens = True
    return t


# text that stresses the split regex: contractions, digit runs, whitespace kinds, marks, emoji
TRICKY = st.text(st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u3000'sdmtlvreSLVRE0123456789aé中😀.,!?-_\u0301\u200b")),
                 max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), TRICKY))
def test_roundtrip_any_unicode(tiny_tokenizer, s):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(s)) == s


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), TRICKY))
def test_hf_ids_equal_tiktoken_ids(tiny_tokenizer, hf, s):
    assert tiny_tokenizer.encode(s) == hf.encode(s, add_special_tokens=False).ids


def test_hf_ids_equal_tiktoken_ids_on_corpus(tiny_tokenizer, hf):
    docs = [d["text"][:5000] for d in load_bundled()["val"]] + [d["text"][:5000] for d in load_bundled()["train"][-20:]]
    assert tiny_tokenizer.encode(docs) == [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)]
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(docs[0])) == docs[0]


def test_layout_and_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.get_vocab_size() == 512
    assert [tok.token_bytes(b) for b in range(256)] == [bytes([b]) for b in range(256)]  # bytes are ids 0..255
    ids = [tok.encode_special(s) for s in tok.get_special_tokens()]
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    assert ids == list(range(512 - len(SPECIAL_TOKENS), 512)) and tok.get_bos_token_id() == ids[0]
    for s in SPECIAL_TOKENS:
        assert tok.id_to_token(tok.encode_special(s)) == s
    text = "".join(SPECIAL_TOKENS) + " user: <|bos|>hi<|assistant_end|>"
    enc = tok.encode(text)
    assert not set(enc) & set(ids), "ordinary text must never produce special tokens"
    assert tok.decode(enc) == text


def test_encode_batch_prepend_append(tiny_tokenizer):
    tok = tiny_tokenizer
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    texts = ["hello world", "", "Thou art more lovely"]
    batch = tok.encode(texts, prepend="<|bos|>", append=end, num_threads=2)
    assert batch == [[bos] + tok.encode(t) + [end] for t in texts]
    assert tok.encode("", prepend=bos) == [bos]
    # loss_eval's bytes-per-token count: token bytes add up to the UTF-8 length
    s = "Tomorrow, and tomorrow, and tomorrow — ünïcödé"
    assert sum(len(tok.token_bytes(i)) for i in tok.encode(s)) == len(s.encode())


def test_bad_input_is_user_error(tiny_tokenizer):
    tok = tiny_tokenizer
    with pytest.raises(UserError, match="unknown special token"):
        tok.encode_special("<|nope|>")
    with pytest.raises(UserError, match="str or a list of str"):
        tok.encode(123)
    with pytest.raises(UserError, match="outside the vocabulary"):
        tok.decode([0, 512])
    with pytest.raises(UserError, match="vocab_size"):
        Tokenizer.train_from_iterator(iter(["abc"]), 100)


def _chat(tok, messages):
    return tok.render_conversation({"messages": messages})


def test_chat_mask_covers_exactly_assistant_content_and_end(tiny_tokenizer):
    tok = tiny_tokenizer
    s = tok.encode_special
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me check. "},
                                              {"type": "python", "text": "3+3"},
                                              {"type": "python_output", "text": "6"},
                                              {"type": "text", "text": "It is 6."}]}]
    ids, mask = _chat(tok, msgs)
    E = tok.encode
    expected = [(s("<|bos|>"), 0), (s("<|user_start|>"), 0)] + [(t, 0) for t in E("Be brief.\n\nWhat is 2+2?")] \
        + [(s("<|user_end|>"), 0), (s("<|assistant_start|>"), 0)] + [(t, 1) for t in E("4.")] \
        + [(s("<|assistant_end|>"), 1), (s("<|user_start|>"), 0)] + [(t, 0) for t in E("And 3+3?")] \
        + [(s("<|user_end|>"), 0), (s("<|assistant_start|>"), 0)] + [(t, 1) for t in E("Let me check. ")] \
        + [(s("<|python_start|>"), 1)] + [(t, 1) for t in E("3+3")] + [(s("<|python_end|>"), 1)] \
        + [(s("<|output_start|>"), 0)] + [(t, 0) for t in E("6")] + [(s("<|output_end|>"), 0)] \
        + [(t, 1) for t in E("It is 6.")] + [(s("<|assistant_end|>"), 1)]
    assert list(zip(ids, mask)) == expected
    assert msgs[1]["content"] == "What is 2+2?", "rendering must not mutate the conversation"
    ids2, mask2 = tok.render_conversation({"messages": msgs}, max_tokens=10)
    assert ids2 == ids[:10] and mask2 == mask[:10]
    assert "\033[92m" in tok.visualize_tokenization(ids, mask)


def test_render_for_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    prompt = tok.render_for_completion({"messages": msgs})
    full, _ = _chat(tok, msgs)
    n_prefix = full.index(tok.encode_special("<|assistant_start|>")) + 1
    assert prompt == full[:n_prefix]
    assert tok.render_for_completion({"messages": msgs[:1]}) == prompt  # a trailing user turn works too


@pytest.mark.parametrize("conversation, match", [
    ({"messages": []}, "at least one message"),
    ("hello", "at least one message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}, "followed by a user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]}, "alternate"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "role"),
    ({"messages": [{"role": "user", "content": 3}]}, "string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "x", "text": ""}]}]},
     "unknown assistant content part"),
])
def test_bad_conversation_is_user_error(tiny_tokenizer, conversation, match):
    with pytest.raises(UserError, match=match):
        tiny_tokenizer.render_conversation(conversation)


def test_save_load_roundtrip_and_errors(tiny_tokenizer, tmp_path, monkeypatch):
    d = tmp_path / "tokenizer"
    tiny_tokenizer.save(str(d))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    loaded = get_tokenizer()
    text = "To be, or not to be, that is the question: 1234 ☃"
    assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert loaded.hf.encode(text).ids == loaded.encode(text)
    assert loaded.get_bos_token_id() == tiny_tokenizer.get_bos_token_id()
    with pytest.raises(UserError, match="no tokenizer at .*tok_train"):
        Tokenizer.from_directory(str(tmp_path / "missing"))
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt tokenizer"):
        Tokenizer.from_directory(str(d))
    (d / "tokenizer.pkl").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt tokenizer"):
        Tokenizer.from_directory(str(d))
