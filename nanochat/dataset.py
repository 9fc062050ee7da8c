"""
Pretraining documents: the FineWeb-Edu parquet shards nanochat uses, or a small bundled corpus.

- Shards: karpathy/fineweb-edu-100b-shuffle on HuggingFace, shard_00000..shard_01822.parquet
  (~100 MB each, already shuffled); the last one is the val split. Env NANOCHAT_DATA_URL
  overrides the base URL (tests point it at a local http.server), NANOCHAT_DATA_DIR the local
  directory (default <base_dir>/base_data).
- Downloads are parallel, resumable and verified: bytes go to `shard.parquet.part` (resumed with
  an HTTP Range request), the file is opened as parquet and checked for a `text` column and rows
  (and its sha256 against `checksums.txt` in the data dir, if present), and only then renamed
  into place. So a `.parquet` file in the data dir is always a complete shard.
- Readers yield *row groups* (lists of document strings). `start`/`step` index row groups
  globally across a split's files, so rank r of W reads groups r, r+W, ... (disjoint data), and
  a reader can resume at any group: the dataloader's state is just (epoch, group, token offset).
- Bundled corpus (nanochat/data/bundled.jsonl.gz, ~2.8 MB of Milton and Shakespeare, see
  nanochat/data/make_bundled.py): each ~20 KB document is its own group, for the CPU path and
  tests with no network.
- Python sources (`pysrc`): the interpreter's own .py files, tens of MB with no download, for
  GPU runs on machines without network (the bundled corpus is memorised within minutes there).
"""
import os
import sys
import gzip
import json
import time
import hashlib
import argparse
import threading
from functools import lru_cache
from concurrent.futures import ThreadPoolExecutor

from nanochat.common import UserError, fail, get_base_dir, main_guard

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # shard_01822 is the last one, used as val
REDOWNLOAD = " (delete it; `python -m nanochat.dataset` downloads it again)"
BUNDLED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bundled.jsonl.gz")


def get_data_dir():
    return os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(get_base_dir(), "base_data")


def shard_name(index):
    return f"shard_{index:05d}.parquet"

# ---------------------------------------------------------------------------- reading shards


def list_parquet_files(data_dir=None):
    data_dir = data_dir or get_data_dir()
    hint = "download shards with `python -m nanochat.dataset -n 8` (or use the bundled corpus: --data bundled)"
    if not os.path.isdir(data_dir):
        fail(f"data directory {data_dir} does not exist: {hint}")
    files = sorted(f for f in os.listdir(data_dir) if f.endswith(".parquet"))
    if not files:
        fail(f"no .parquet shards in {data_dir}: {hint}")
    return [os.path.join(data_dir, f) for f in files]


def _open_shard(path, hint=""):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        fail(f"corrupt shard {path}: {e}{hint}")
    if "text" not in pf.schema_arrow.names:
        fail(f"corrupt shard {path}: no `text` column (columns: {pf.schema_arrow.names})")
    return pf


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the row groups (lists of str) with global index start, start+step, ... of a split."""
    if split not in ("train", "val"):
        fail(f"split must be train or val, got {split!r}")
    paths = list_parquet_files(data_dir)
    if split == "train" and len(paths) < 2:
        fail(f"only {len(paths)} shard in {os.path.dirname(paths[0])}: the last shard is val, so train needs 2+")
    paths = paths[:-1] if split == "train" else paths[-1:]
    offset = 0  # global index of this file's first row group
    for path in paths:
        pf = _open_shard(path, hint=REDOWNLOAD)
        n = pf.num_row_groups
        first = start if start >= offset else start + -(-(offset - start) // step) * step
        for g in range(first, offset + n, step):
            try:
                texts = pf.read_row_group(g - offset, columns=["text"]).column("text").to_pylist()
            except Exception as e:
                fail(f"corrupt shard {path}: row group {g - offset}: {e}{REDOWNLOAD}")
            yield texts
        offset += n

# ---------------------------------------------------------------------------- bundled corpus


@lru_cache(maxsize=1)
def load_bundled():
    """{"train": [doc], "val": [doc]}, doc = {"title", "part", "text"}; titles/parts rebuild whole works."""
    out = {"train": [], "val": []}
    try:
        with gzip.open(BUNDLED_PATH, "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                out[d.pop("split")].append(d)
    except Exception as e:
        fail(f"bundled corpus {BUNDLED_PATH} is missing or corrupt ({e}); rebuild it with nanochat/data/make_bundled.py")
    return out


def bundled_iter_batched(split, start=0, step=1):
    if split not in ("train", "val"):
        fail(f"split must be train or val, got {split!r}")
    docs = load_bundled()[split]
    for g in range(start, len(docs), step):
        yield [docs[g]["text"]]


# ---------------------------------------------------------------------------- Python sources


@lru_cache(maxsize=1)
def pysrc_files():
    """{"train": [path], "val": [path]}: every .py file of this interpreter's standard library and
    site-packages, sorted; a file is val when the sha1 of its relative path is 0 mod 50. Tens of MB
    of real text on any machine, no download: for GPU runs that must not depend on a network and
    would overfit the bundled corpus (its content follows the installed Python and packages)."""
    import sysconfig
    roots = sorted({os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib")})
    seen, out = set(), {"train": [], "val": []}
    for root in roots:
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                path = os.path.realpath(os.path.join(d, f))
                if not f.endswith(".py") or path in seen:
                    continue
                seen.add(path)
                rel = os.path.relpath(path, root)
                val = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 50 == 0
                out["val" if val else "train"].append(path)
    if not out["train"] or not out["val"]:
        fail(f"data source pysrc: too few .py files under {roots}")
    return out


def pysrc_iter_batched(split, start=0, step=1, group_size=64):
    if split not in ("train", "val"):
        fail(f"split must be train or val, got {split!r}")
    files = pysrc_files()[split]
    for g in range(start, (len(files) + group_size - 1) // group_size, step):
        texts = []
        for path in files[g * group_size:(g + 1) * group_size]:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
        yield texts


SOURCES = ("bundled", "fineweb", "pysrc")


def documents_iter_batched(source, split, start=0, step=1, data_dir=None):
    if source == "bundled":
        return bundled_iter_batched(split, start, step)
    if source == "fineweb":
        return parquets_iter_batched(split, start, step, data_dir)
    if source == "pysrc":
        return pysrc_iter_batched(split, start, step)
    fail(f"unknown data source {source!r}: use one of {', '.join(SOURCES)}")

# ---------------------------------------------------------------------------- downloading


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_checksums(data_dir):
    """checksums.txt in `sha256sum` format ("<hex>  <name>" per line) -> {name: hex}; {} if absent."""
    path = os.path.join(data_dir, "checksums.txt")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {parts[1].lstrip("*"): parts[0].lower() for parts in (l.split() for l in f) if len(parts) == 2}


def validate_shard(path, sha256=None, name=None):
    """Rows in the shard; UserError if it is not a complete parquet file with text (and the right hash)."""
    name = name or path
    if sha256 is not None and _sha256(path) != sha256:
        fail(f"checksum mismatch for {name}: sha256 is not {sha256} (from checksums.txt)")
    pf = _open_shard(path)
    rows = pf.metadata.num_rows
    if rows <= 0 or sum(pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)) != rows:
        fail(f"corrupt shard {name}: {rows} rows")
    return rows


class _Progress:
    """Bytes and shards done across worker threads; tqdm if installed, else a line every few seconds."""

    def __init__(self, n, enabled=True):
        self.n, self.done, self.bytes, self.t0, self.last = n, 0, 0, time.time(), 0.0
        self.lock, self.bar = threading.Lock(), None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=n, unit="shard", desc="download")
            except ImportError:
                pass
        self.enabled = enabled

    def update(self, nbytes=0, shards=0):
        with self.lock:
            self.bytes += nbytes
            self.done += shards
            now = time.time()
            if not self.enabled or (now - self.last < 1.0 and not shards):
                return
            self.last = now
            mb, rate = self.bytes / 1e6, self.bytes / 1e6 / max(now - self.t0, 1e-6)
            if self.bar is not None:
                self.bar.update(shards)
                self.bar.set_postfix_str(f"{mb:.0f} MB, {rate:.1f} MB/s", refresh=True)
            else:
                print(f"download: {self.done}/{self.n} shards, {mb:.0f} MB, {rate:.1f} MB/s", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _NotFound(UserError):
    """A 404 will not go away by retrying."""


def _download_one(index, data_dir, base_url, checksums, progress, retries, backoff, timeout):
    import requests
    name = shard_name(index)
    path, part, url = os.path.join(data_dir, name), os.path.join(data_dir, name + ".part"), f"{base_url}/{name}"
    expected = checksums.get(name)
    if os.path.exists(path):
        try:
            validate_shard(path, expected)
            progress.update(shards=1)
            return "skipped"
        except UserError as e:
            print(f"{e}: downloading it again", file=sys.stderr)
            os.remove(path)
    error = None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 404:
                    raise _NotFound(f"{url}: 404 not found (shard indices go 0..{MAX_SHARD}; check NANOCHAT_DATA_URL)")
                if r.status_code != 416:  # 416: the .part already holds the whole file
                    r.raise_for_status()
                    resumed = r.status_code == 206  # a 200 means the server ignored Range: start over
                    expect = int(r.headers.get("Content-Length", -1)) + (have if resumed else 0)
                    with open(part, "ab" if resumed else "wb") as f:
                        for block in r.iter_content(1 << 16):
                            f.write(block)
                            progress.update(len(block))
                    if expect >= 0 and os.path.getsize(part) != expect:
                        raise IOError(f"connection dropped at {os.path.getsize(part)} of {expect} bytes")
            try:
                validate_shard(part, expected, name=name)
            except UserError:
                os.remove(part)  # bad bytes, not a short read: resuming would keep them
                raise
            os.replace(part, path)
            progress.update(shards=1)
            return "downloaded"
        except _NotFound:
            raise
        except UserError as e:
            error = e
        except (requests.RequestException, OSError) as e:
            error = e
    fail(f"could not download {url} after {retries} attempts: {error}")


def download_shards(indices, data_dir=None, workers=8, retries=5, backoff=1.0, timeout=60, progress=True):
    """Download shards by index into data_dir. Returns {index: "downloaded"|"skipped"}; UserError on failure."""
    data_dir = data_dir or get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    base_url = os.environ.get("NANOCHAT_DATA_URL", BASE_URL).rstrip("/")
    bad = [i for i in indices if not 0 <= i <= MAX_SHARD]
    if bad:
        fail(f"shard indices must be in 0..{MAX_SHARD}, got {bad[:5]}")
    checksums = read_checksums(data_dir)
    prog = _Progress(len(indices), enabled=progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {i: pool.submit(_download_one, i, data_dir, base_url, checksums, prog, retries, backoff, timeout)
                       for i in indices}
            return {i: f.result() for i, f in futures.items()}
    finally:
        prog.close()


def main():
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu pretraining shards (first n + the val shard)")
    parser.add_argument("-n", "--num-shards", type=int, default=-1, help="train shards to download, -1 = all")
    parser.add_argument("-w", "--workers", type=int, default=8)
    parser.add_argument("--data-dir", default=None, help="default: $NANOCHAT_DATA_DIR or <base_dir>/base_data")
    args = parser.parse_args()
    n = MAX_SHARD if args.num_shards < 0 else min(args.num_shards, MAX_SHARD)
    indices = list(range(n)) + [MAX_SHARD]
    data_dir = args.data_dir or get_data_dir()
    t0 = time.time()
    result = download_shards(indices, data_dir, workers=args.workers)
    n_new = sum(v == "downloaded" for v in result.values())
    print(f"{len(indices)} shards in {data_dir} ({n_new} downloaded, {len(indices) - n_new} already there) "
          f"in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main_guard(main)
