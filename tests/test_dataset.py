import os
import sys
import hashlib
import threading
import subprocess
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError
from nanochat.dataset import (download_shards, list_parquet_files, parquets_iter_batched, bundled_iter_batched,
                              documents_iter_batched, load_bundled, shard_name, MAX_SHARD)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_shard(path, docs, row_group_size=4):
    pq.write_table(pa.table({"text": docs}), str(path), row_group_size=row_group_size)
    return path.read_bytes()


class Server:
    """A stand-in for the HF file server: serves bytes by name, honours Range, and can be told to
    answer 500 or to drop the connection half way for the next few requests of a file."""

    def __init__(self):
        self.files, self.fail_500, self.truncate, self.requests = {}, {}, {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    return self.send_error(404)
                if server.fail_500.get(name, 0) > 0:
                    server.fail_500[name] -= 1
                    return self.send_error(500)
                data, start = server.files[name], 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        return self.send_error(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate.get(name, 0) > 0:
                    server.truncate[name] -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()


@pytest.fixture
def server(tmp_path, monkeypatch):
    s = Server()
    good = make_shard(tmp_path / "good.parquet", [f"document {i} " * 20 for i in range(10)])
    s.files[shard_name(0)] = good
    s.files[shard_name(1)] = good[: len(good) // 2] + b"\0" * 100  # bytes that are not a parquet file
    s.files[shard_name(MAX_SHARD)] = make_shard(tmp_path / "val.parquet", ["val doc"] * 5)
    monkeypatch.setenv("NANOCHAT_DATA_URL", s.url)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


FAST = dict(workers=2, retries=3, backoff=0.0, timeout=5, progress=False)


def test_download_good_then_skip(server, tmp_path):
    d = tmp_path / "data"
    assert download_shards([0, MAX_SHARD], str(d), **FAST) == {0: "downloaded", MAX_SHARD: "downloaded"}
    assert (d / shard_name(0)).read_bytes() == server.files[shard_name(0)]
    n = len(server.requests)
    assert download_shards([0], str(d), **FAST) == {0: "skipped"}
    assert len(server.requests) == n, "a valid shard on disk must not be fetched again"
    assert sorted(os.listdir(d)) == [shard_name(0), shard_name(MAX_SHARD)]


def test_corrupt_download_is_user_error(server, tmp_path):
    d = tmp_path / "data"
    with pytest.raises(UserError, match=r"could not download .*shard_00001.*corrupt shard"):
        download_shards([1], str(d), **FAST)
    assert os.listdir(d) == [], "no bad .parquet (or .part) may be left behind"


def test_resume_part_file_with_range(server, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    data = server.files[shard_name(0)]
    (d / (shard_name(0) + ".part")).write_bytes(data[:300])
    download_shards([0], str(d), **FAST)
    assert server.requests == [(shard_name(0), "bytes=300-")]
    assert (d / shard_name(0)).read_bytes() == data


def test_dropped_connection_resumes(server, tmp_path):
    # big enough that the half sent before the drop holds whole 64 KB read chunks
    data = make_shard(tmp_path / "big.parquet", [os.urandom(3000).hex() for _ in range(100)], row_group_size=50)
    server.files[shard_name(0)] = data
    server.truncate[shard_name(0)] = 1
    d = tmp_path / "data"
    download_shards([0], str(d), **FAST)
    assert (d / shard_name(0)).read_bytes() == data
    assert server.requests[0] == (shard_name(0), None)
    resumed_at = int(server.requests[1][1].split("=")[1].rstrip("-"))
    assert 0 < resumed_at <= len(data) // 2


def test_retries_after_500(server, tmp_path):
    server.fail_500[shard_name(0)] = 1
    assert download_shards([0], str(tmp_path), **FAST) == {0: "downloaded"}
    assert [r[0] for r in server.requests] == [shard_name(0)] * 2
    server.fail_500[shard_name(MAX_SHARD)] = 10
    with pytest.raises(UserError, match="after 3 attempts.*500"):
        download_shards([MAX_SHARD], str(tmp_path), **FAST)


def test_404_not_retried(server, tmp_path):
    with pytest.raises(UserError, match="404"):
        download_shards([5], str(tmp_path), **FAST)
    assert len(server.requests) == 1
    with pytest.raises(UserError, match="0..1822"):
        download_shards([MAX_SHARD + 1], str(tmp_path), **FAST)


def test_checksum_manifest(server, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "checksums.txt").write_text(f"{'0' * 64}  {shard_name(0)}\n")
    with pytest.raises(UserError, match="checksum mismatch for shard_00000"):
        download_shards([0], str(d), **FAST)
    assert not (d / shard_name(0)).exists()
    (d / "checksums.txt").write_text(f"{hashlib.sha256(server.files[shard_name(0)]).hexdigest()}  {shard_name(0)}\n")
    assert download_shards([0], str(d), **FAST) == {0: "downloaded"}


def test_cli_downloads_first_n_plus_val(server, tmp_path):
    del server.files[shard_name(1)]
    env = dict(os.environ, NANOCHAT_DATA_DIR=str(tmp_path / "d"), NANOCHAT_BASE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "1", "-w", "2"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "d")) == [shard_name(0), shard_name(MAX_SHARD)]
    r = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "2"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)  # shard 1 is not on the server: 404
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "404" in r.stderr


def test_parquet_reader_global_row_groups(tmp_path):
    docs = [[f"s{s}d{i}" for i in range(n)] for s, n in enumerate([10, 7, 6])]
    for s, dd in enumerate(docs):
        make_shard(tmp_path / shard_name(s), dd, row_group_size=3)  # 4 + 3 row groups of train, 2 of val
    train = list(parquets_iter_batched("train", data_dir=str(tmp_path)))
    assert [len(g) for g in train] == [3, 3, 3, 1, 3, 3, 1]
    assert sum(train, []) == docs[0] + docs[1]
    assert sum(parquets_iter_batched("val", data_dir=str(tmp_path)), []) == docs[2]
    r0 = list(parquets_iter_batched("train", 0, 2, data_dir=str(tmp_path)))
    r1 = list(parquets_iter_batched("train", 1, 2, data_dir=str(tmp_path)))
    assert r0 == train[0::2] and r1 == train[1::2]
    assert list(parquets_iter_batched("train", 5, 1, data_dir=str(tmp_path))) == train[5:]


def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist.*nanochat.dataset -n 8"):
        list_parquet_files(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no .parquet shards"):
        list_parquet_files(str(tmp_path))
    make_shard(tmp_path / shard_name(0), ["a", "b"])
    with pytest.raises(UserError, match="train needs 2"):
        next(parquets_iter_batched("train", data_dir=str(tmp_path)))
    (tmp_path / shard_name(1)).write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match=f"corrupt shard .*{shard_name(1)}"):
        next(parquets_iter_batched("val", data_dir=str(tmp_path)))
    pq.write_table(pa.table({"body": ["x"]}), str(tmp_path / shard_name(1)))
    with pytest.raises(UserError, match="no `text` column"):
        next(parquets_iter_batched("val", data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="split"):
        next(parquets_iter_batched("test", data_dir=str(tmp_path)))
    with pytest.raises(UserError, match="unknown data source"):
        documents_iter_batched("c4", "train")


def test_bundled_corpus():
    b = load_bundled()
    n_train, n_val = len(b["train"]), len(b["val"])
    assert n_train > 100 and 0.03 < n_val / (n_train + n_val) < 0.1
    chars = sum(len(d["text"]) for d in b["train"] + b["val"])
    assert 1_500_000 < chars < 3_500_000
    assert not {d["title"] for d in b["train"]} & {d["title"] for d in b["val"]}, "val works are held out whole"
    assert not any("Gutenberg" in d["text"] for d in b["train"] + b["val"])
    batches = list(bundled_iter_batched("val"))
    assert [len(x) for x in batches] == [1] * n_val and all(isinstance(x[0], str) for x in batches)
    r0, r1 = list(documents_iter_batched("bundled", "train", 0, 2)), list(documents_iter_batched("bundled", "train", 1, 2))
    assert len(r0) + len(r1) == n_train and not {x[0] for x in r0} & {x[0] for x in r1}


def test_pysrc_corpus_is_large_split_by_path_and_sharded_by_rank():
    from nanochat.dataset import pysrc_files
    files = pysrc_files()
    train, val = files["train"], files["val"]
    assert not set(train) & set(val) and all(p.endswith(".py") for p in train + val)
    assert 0.005 < len(val) / (len(train) + len(val)) < 0.05
    assert sum(os.path.getsize(p) for p in train) > 10_000_000, "tens of MB: an H100 run must not overfit it"
    r0 = list(documents_iter_batched("pysrc", "val", 0, 2))
    r1 = list(documents_iter_batched("pysrc", "val", 1, 2))
    docs = [d for g in r0 + r1 for d in g]
    assert len(docs) == len(val) and all(isinstance(d, str) for d in docs)
    assert r0[0][0] == open(val[0], encoding="utf-8", errors="replace").read()
    with pytest.raises(UserError, match="unknown data source"):
        documents_iter_batched("pysource", "train")
