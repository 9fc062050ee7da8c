"""
Train the BPE tokenizer and save it (tokenizer.pkl for tiktoken + tokenizer.json for HF).

    python -m scripts.tok_train --vocab-size 65536 --max-chars 2000000000 --data fineweb
    python -m scripts.tok_train --vocab-size 4096 --data bundled   # CPU path, seconds

Documents are cropped to --doc-cap characters (as nanochat does) so a few huge documents cannot
dominate the pair statistics. Prints one JSON line with the compression (UTF-8 bytes per token)
on the val split, the number to compare tokenizers by.
"""
import os
import json
import time
from dataclasses import dataclass

from nanochat.common import main_guard, get_base_dir, print0, fail
from nanochat.configurator import parse_config
from nanochat.dataset import documents_iter_batched, SOURCES
from nanochat.tokenizer import Tokenizer


@dataclass
class TokTrainConfig:
    vocab_size: int = 65536
    max_chars: int = 2_000_000_000   # train on at most this many characters
    doc_cap: int = 10_000            # crop each document to this many characters
    data: str = "fineweb"            # fineweb | bundled | pysrc
    out: str = ""                    # default: <base_dir>/tokenizer
    eval_chars: int = 10_000_000     # val characters for the compression number


def main():
    args = parse_config(TokTrainConfig, section="tok_train")
    if args.data not in SOURCES:
        fail(f"--data must be one of {', '.join(SOURCES)}, got {args.data!r}")
    out = args.out or os.path.join(get_base_dir(), "tokenizer")

    seen = {"chars": 0, "docs": 0}

    def text_iterator():
        for batch in documents_iter_batched(args.data, "train"):
            for doc in batch:
                doc = doc[:args.doc_cap]
                seen["chars"] += len(doc)
                seen["docs"] += 1
                yield doc
                if seen["chars"] >= args.max_chars:
                    return

    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(text_iterator(), args.vocab_size)
    train_s = time.time() - t0
    tokenizer.save(out)
    print0(f"trained on {seen['chars']:,} chars ({seen['docs']:,} docs) in {train_s:.1f}s, saved to {out}")

    eval_docs, n = [], 0
    for batch in documents_iter_batched(args.data, "val"):
        eval_docs.extend(batch)
        n += sum(map(len, batch))
        if n >= args.eval_chars:
            break
    n_bytes = sum(len(d.encode("utf-8")) for d in eval_docs)
    n_tokens = sum(map(len, tokenizer.encode(eval_docs)))
    print0(json.dumps({"vocab_size": tokenizer.get_vocab_size(), "data": args.data, "train_chars": seen["chars"],
                       "train_seconds": round(train_s, 2), "eval_bytes": n_bytes, "eval_tokens": n_tokens,
                       "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4), "out": out}))


if __name__ == "__main__":
    main_guard(main)
