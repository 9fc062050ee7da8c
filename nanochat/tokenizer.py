"""
Byte-level BPE tokenizer: trained with HuggingFace `tokenizers`, encoded at run time with `tiktoken`.

- GPT-4-style split regex (as nanochat), then byte-level BPE over all 256 bytes, so any string
  round-trips and there is no unknown token.
- After training, the HF vocab is renumbered to the canonical tiktoken layout: ids 0..255 are the
  raw bytes in byte order, then merged tokens in the order training created them (that order is
  the merge priority in both libraries), then the special tokens last. The HF tokenizer is
  rebuilt with the same ids and saved beside the tiktoken ranks, so both encode to identical ids
  (tests/test_tokenizer.py checks this).
- Special tokens are never produced from ordinary text: `encode` uses `encode_ordinary`, so a
  user typing "<|bos|>" gets the ordinary tokens for those characters.
- Chat rendering follows nanochat: bos, then <|user_start|>..<|user_end|> and
  <|assistant_start|>..<|assistant_end|> turns; the loss mask is 1 only on what the model must
  produce (assistant content, tool calls, <|assistant_end|>), 0 on everything it is given.
"""
import os
import copy
import json
import pickle
from functools import lru_cache

import tiktoken

from nanochat.common import UserError, fail, get_base_dir, atomic_write_bytes

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with this; it delimits documents in the packed stream
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool answers (given to the model, never trained on)
]

# GPT-4's pattern with \p{N}{1,2} instead of {1,3}: nanochat found 2 better for small vocabs.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def _byte_to_unicode():
    """GPT-2's printable stand-in character for each byte; HF's ByteLevel uses the same table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _build_hf(vocab, merges):
    from tokenizers import Tokenizer as HFTokenizer, Regex, pre_tokenizers, decoders
    from tokenizers.models import BPE
    hf = HFTokenizer(BPE(vocab=vocab, merges=merges) if vocab is not None else BPE())
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # the Split already split
    ])
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = None
    return hf


class Tokenizer:

    def __init__(self, mergeable_ranks, special_tokens, pattern=SPLIT_PATTERN, hf=None):
        self.pattern, self.mergeable_ranks, self.special_tokens = pattern, mergeable_ranks, dict(special_tokens)
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self.hf = hf  # the HF tokenizer with the same ids; only needed for training and for tests
        self.directory = None  # where it was loaded from, if it was

    # ------------------------------------------------------------------ training and storage

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        from tokenizers import pre_tokenizers
        from tokenizers.trainers import BpeTrainer
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
            fail(f"vocab_size must be an int >= {256 + len(SPECIAL_TOKENS) + 1} (256 bytes + specials + 1 merge), got {vocab_size!r}")
        trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL_TOKENS)
        hf = _build_hf(None, None)
        hf.train_from_iterator(text_iterator, trainer)
        model = hf.get_vocab(with_added_tokens=False)
        merges = json.loads(hf.to_str())["model"]["merges"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        # Renumber: bytes first in byte order, then merge results in creation order. HF can learn two
        # merges with the same result (ab+c, a+bc); the token keeps the rank of its first creation.
        u2b = {u: b for b, u in _byte_to_unicode().items()}
        to_bytes = lambda s: bytes(u2b[ch] for ch in s)
        ranks = {bytes([b]): b for b in range(256)}
        for a, b in merges:
            tok = to_bytes(a) + to_bytes(b)
            if tok not in ranks:
                ranks[tok] = len(ranks)
        missing = [t for t in model if t not in SPECIAL_TOKENS and to_bytes(t) not in ranks]
        assert not missing, f"HF vocab tokens not reachable by merges: {missing[:5]}"
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        b2u = _byte_to_unicode()
        vocab = {"".join(b2u[x] for x in tok): r for tok, r in ranks.items()}
        hf = _build_hf(vocab, merges)
        hf.add_special_tokens(SPECIAL_TOKENS)  # appended after the model vocab: same ids as `specials`
        assert all(hf.token_to_id(name) == i for name, i in specials.items())
        return cls(ranks, specials, hf=hf)

    def save(self, directory):
        payload = {"version": 1, "pattern": self.pattern, "mergeable_ranks": self.mergeable_ranks,
                   "special_tokens": self.special_tokens}
        atomic_write_bytes(os.path.join(directory, "tokenizer.pkl"), pickle.dumps(payload))
        if self.hf is not None:
            atomic_write_bytes(os.path.join(directory, "tokenizer.json"), self.hf.to_str().encode())

    @classmethod
    def from_directory(cls, directory):
        path = os.path.join(directory, "tokenizer.pkl")
        if not os.path.isfile(path):
            fail(f"no tokenizer at {path}: train one with `python -m scripts.tok_train --out {directory}`")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f)
            ranks, specials, pattern = d["mergeable_ranks"], d["special_tokens"], d["pattern"]
            assert isinstance(ranks, dict) and all(isinstance(k, bytes) for k in ranks)
            assert set(SPECIAL_TOKENS) <= set(specials), f"missing special tokens {set(SPECIAL_TOKENS) - set(specials)}"
        except Exception as e:
            raise UserError(f"corrupt tokenizer {path} ({type(e).__name__}: {e}); retrain it with scripts.tok_train") from None
        hf = None
        hf_path = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(hf_path):
            from tokenizers import Tokenizer as HFTokenizer
            try:
                hf = HFTokenizer.from_file(hf_path)
            except Exception as e:
                raise UserError(f"corrupt tokenizer {hf_path}: {e}") from None
        tok = cls(ranks, specials, pattern=pattern, hf=hf)
        tok.directory = directory
        return tok

    # ------------------------------------------------------------------ basics

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return list(SPECIAL_TOKENS)

    def encode_special(self, name):
        try:
            return self.special_tokens[name]
        except KeyError:
            raise UserError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")

    def id_to_token(self, id):
        return self.enc.decode([int(id)])

    def token_bytes(self, id):
        """The raw bytes of one token id (special tokens: their name's bytes)."""
        return self.enc.decode_single_token_bytes(int(id))

    def _special_id(self, x):
        return int(x) if isinstance(x, int) else self.encode_special(x)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int]; list[str] -> list[list[int]]. prepend/append: a special token name or id."""
        pre = self._special_id(prepend) if prepend is not None else None
        app = self._special_id(append) if append is not None else None
        if isinstance(text, str):
            rows, single = [self.enc.encode_ordinary(text)], True
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            rows, single = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads), False
        else:
            fail(f"encode expects a str or a list of str, got {type(text).__name__}")
        for ids in rows:
            if pre is not None:
                ids.insert(0, pre)
            if app is not None:
                ids.append(app)
        return rows[0] if single else rows

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.enc.n_vocab]
        if bad:
            fail(f"cannot decode token ids outside the vocabulary [0, {self.enc.n_vocab}): {bad[:5]}")
        return self.enc.decode(ids)

    # ------------------------------------------------------------------ chat

    def _chat_messages(self, conversation):
        """Validated message list with a leading system message merged into the first user turn."""
        if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list) \
                or not conversation["messages"]:
            fail('a conversation must be {"messages": [{"role": ..., "content": ...}, ...]} with at least one message')
        messages = conversation["messages"]
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
                fail(f"message {i} must be a dict with role system|user|assistant and content, got {str(m)[:80]!r}")
        if messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                fail("a system message must be followed by a user message")
            if not isinstance(messages[0]["content"], str):
                fail("system message content must be a string")
            messages = copy.deepcopy(messages[1:])
            messages[0]["content"] = conversation["messages"][0]["content"] + "\n\n" + str(messages[0]["content"])
        for i, m in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want:
                fail(f"message {i} is from {m['role']} but roles must alternate user/assistant starting with user")
        return messages

    def render_conversation(self, conversation, max_tokens=2048):
        """-> (ids, mask): mask[i] = 1 where token i is something the model must learn to produce."""
        ids, mask = [], []

        def add(tokens, m):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        s = self.encode_special
        add(self.get_bos_token_id(), 0)
        for m in self._chat_messages(conversation):
            content = m["content"]
            if m["role"] == "user":
                if not isinstance(content, str):
                    fail("user message content must be a string")
                add(s("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(s("<|user_end|>"), 0)
                continue
            add(s("<|assistant_start|>"), 0)  # given to the model at inference, so not trained on
            if isinstance(content, str):
                add(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                        fail(f"assistant content parts must be {{'type': ..., 'text': str}}, got {str(part)[:80]!r}")
                    kind, part_ids = part.get("type"), self.encode(part["text"])
                    if kind == "text":
                        add(part_ids, 1)
                    elif kind == "python":
                        add(s("<|python_start|>"), 1)
                        add(part_ids, 1)
                        add(s("<|python_end|>"), 1)
                    elif kind == "python_output":  # comes from the tool at inference: not trained on
                        add(s("<|output_start|>"), 0)
                        add(part_ids, 0)
                        add(s("<|output_end|>"), 0)
                    else:
                        fail(f"unknown assistant content part type {kind!r} (text|python|python_output)")
            else:
                fail(f"assistant content must be a string or a list of parts, got {type(content).__name__}")
            add(s("<|assistant_end|>"), 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation):
        """Prompt for generating the next assistant turn: drops a trailing assistant message if any."""
        conversation = copy.deepcopy(conversation)
        msgs = conversation.get("messages") if isinstance(conversation, dict) else None
        if isinstance(msgs, list) and len(msgs) > 1 and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs.pop()
        ids, _ = self.render_conversation(conversation, max_tokens=None)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask=None):
        """ANSI-coloured string for eyeballing: trained-on tokens green, others grey; specials bold."""
        mask = mask if mask is not None else [0] * len(ids)
        specials = set(self.special_tokens.values())
        out = []
        for i, m in zip(ids, mask):
            text = self.id_to_token(i)
            style = ("\033[1m" if i in specials else "") + ("\033[92m" if m else "\033[90m")
            out.append(f"{style}{text}\033[0m|")
        return "".join(out)


def get_tokenizer(directory=None):
    return Tokenizer.from_directory(directory or os.path.join(get_base_dir(), "tokenizer"))
