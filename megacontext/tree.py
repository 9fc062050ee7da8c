"""
MegaContext tree: an append-only hierarchy of gists over one token stream.

- Node (level l, index i) covers tokens [i*K^l, (i+1)*K^l). A parent exists only once all K
  children exist; the ragged tail stays at lower levels. LOD0 = uint32 token ids, LOD>=1 = gist
  vectors of width `dim`, stored as bf16 (raw uint16), fp16 or fp32.
- gist_fn(child_level, children) makes parents: one call per level per batch of up to
  `batch_size` nodes, never one per node. Children are always handed over as the *stored*
  values (gists after dtype rounding, upcast to fp32), so the tree is bit-identical however the
  stream was chunked, and a reopened tree recomputes exactly what a fresh one would.
- In RAM: growable numpy buffers with capacity doubling (amortized O(1) append).
- On disk: one file per level, `LOD{l}.ctx` = a 64-byte little-endian header, then fixed-width
  records (record i at byte 64 + i*record_bytes), read through numpy.memmap. Header:
    0 magic b"MCCT" | 4 version u16 | 6 level u16 | 8 K u16 | 10 dim u16 | 12 dtype_code u16
    (0=uint32 1=fp16 2=bf16 3=fp32) | 14 model_id char[32] utf-8 NUL-padded | 46 max_level u16
    | 48 count u64 (committed records) | 56 crc32 of bytes [0,56) u32 | 60 four zero bytes.
- Crash safety: records are written past the committed count, fsynced (when durable), and only
  then is the header rewritten with the new count; children levels commit before parents. On
  open a torn tail (file longer than its count) is truncated and reported in `recovered`;
  parents that a crash left unmade are made by the next append before anything else.
- One writer per tree: the directory is flock'ed while open (a second open is a UserError).
"""
import os
import time
import zlib
import struct
from typing import Callable

import numpy as np
import torch

from nanochat.common import fail, atomic_write_json, lock_dir

GistFn = Callable[[int, torch.Tensor], torch.Tensor]

MAGIC = b"MCCT"
VERSION = 1
HEADER_BYTES = 64
_HDR = struct.Struct("<4sHHHHH32sHQ")  # everything the CRC covers: 56 bytes
_CRC = struct.Struct("<I")
DTYPE_CODES = {"fp16": 1, "bf16": 2, "fp32": 3}  # 0 = uint32 tokens (LOD0 only)
_NP_DTYPES = {0: np.uint32, 1: np.float16, 2: np.uint16, 3: np.float32}  # bf16 kept as raw uint16


def pack_header(level, K, dim, dtype_code, model_id: bytes, max_level, count):
    body = _HDR.pack(MAGIC, VERSION, level, K, dim, dtype_code, model_id, max_level, count)
    return body + _CRC.pack(zlib.crc32(body)) + bytes(HEADER_BYTES - _HDR.size - _CRC.size)


def unpack_header(raw: bytes, path):
    """Header bytes -> dict; every way a header can be bad is a UserError naming the file."""
    if len(raw) < HEADER_BYTES:
        fail(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    if raw[:4] != MAGIC:
        fail(f"{path}: bad magic {raw[:4]!r} (expected {MAGIC!r}); not a MegaContext tree file")
    body = raw[:_HDR.size]
    (crc,) = _CRC.unpack_from(raw, _HDR.size)
    if zlib.crc32(body) != crc:
        fail(f"{path}: corrupted header (CRC mismatch)")
    _, version, level, K, dim, code, model_id, max_level, count = _HDR.unpack(body)
    if version != VERSION:
        fail(f"{path}: unsupported format version {version} (this code reads {VERSION})")
    return dict(level=level, K=K, dim=dim, code=code, model_id=model_id, max_level=max_level, count=count)


def _model_bytes(model_id: str) -> bytes:
    b = model_id.encode("utf-8")
    if len(b) > 32 or b"\0" in b:
        fail(f"model_id {model_id!r} must be at most 32 utf-8 bytes without NUL (pass a short name or hash)")
    return b


TAIL_BYTES = 1 << 16   # a file level's newest rows stay in RAM too (up to 64 KB): see _Level.read


class _Level:
    """One level's records: a growable numpy buffer (path None) or a .ctx file read via memmap."""

    def __init__(self, np_dtype, row_shape, path=None, header=None, count=0, durable=True):
        self.np_dtype, self.row_shape = np.dtype(np_dtype), tuple(row_shape)
        self.record_bytes = self.np_dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.count = count
        self.reallocs = 0  # RAM buffer growths; the O(1)-append test counts these
        self.path, self.durable = path, durable
        self.header = header  # (level, K, dim, code, model_id, max_level): count is added per commit
        self.buf = np.empty((0,) + self.row_shape, self.np_dtype)
        self.fd = None
        self.mm, self.mm_rows = None, 0
        self._tbuf, self._tlen, self.tail_start = None, 0, 0   # committed rows [tail_start, count) we appended
        self.remaps = 0
        if path is not None:
            self.fd = os.open(path, os.O_RDWR)

    def append(self, rows: np.ndarray):
        n = rows.shape[0]
        if n == 0:
            return
        if self.fd is None:
            if self.count + n > self.buf.shape[0]:
                # doubling keeps append amortized O(1): each record is copied O(1) times overall
                cap = max(1024, 2 * self.buf.shape[0], self.count + n)
                new = np.empty((cap,) + self.row_shape, self.np_dtype)
                new[:self.count] = self.buf[:self.count]
                self.buf = new
                self.reallocs += 1
            self.buf[self.count:self.count + n] = rows
            self.count += n
            return
        # payload past the committed count first; a crash here leaves a tail that open() drops
        _pwrite_all(self.fd, np.ascontiguousarray(rows, self.np_dtype), HEADER_BYTES + self.count * self.record_bytes)
        if self.durable:
            _sync(self.fd)
        self.write_header(self.count + n)  # the commit point
        self._keep_tail(rows)
        self.count += n

    def _keep_tail(self, rows):
        """The newest >= TAIL_BYTES of committed rows (fewer only when fewer exist), in a buffer of
        twice that, shifted down when full: amortized O(1) per appended row."""
        keep = max(1, TAIL_BYTES // self.record_bytes)
        if self._tbuf is None or self.tail_start + self._tlen != self.count:
            self._tbuf, self._tlen, self.tail_start = np.empty((2 * keep,) + self.row_shape, self.np_dtype), 0, self.count
        n = len(rows)
        if n >= keep:
            self._tbuf[:keep], self._tlen, self.tail_start = rows[-keep:], keep, self.count + n - keep
            return
        if self._tlen + n > 2 * keep:   # shift the newest keep - n rows down, then append
            old = keep - n
            self._tbuf[:old] = self._tbuf[self._tlen - old:self._tlen]
            self.tail_start += self._tlen - old
            self._tlen = old
        self._tbuf[self._tlen:self._tlen + n] = rows
        self._tlen += n

    @property
    def tail(self):
        return None if self._tbuf is None else self._tbuf[:self._tlen]

    def write_header(self, count):
        _pwrite_all(self.fd, pack_header(*self.header, count), 0)
        if self.durable:
            _sync(self.fd)

    def read(self, start, end) -> np.ndarray:
        if not 0 <= start <= end <= self.count:
            raise IndexError(f"range [{start}, {end}) outside [0, {self.count})")
        if start == end:
            return np.empty((0,) + self.row_shape, self.np_dtype)
        if self.fd is None:
            return self.buf[start:end].copy()
        if self.tail is not None and start >= self.tail_start:
            # rows this process just appended: a decode step reads back its own token at every
            # step, and each read past the map would remap the grown file (~0.1 ms, profiled on CPU)
            return self.tail[start - self.tail_start:end - self.tail_start].copy()
        if end > self.mm_rows:  # the file grew since we mapped it: remap lazily, only when read
            self.mm = np.memmap(self.path, self.np_dtype, mode="r", offset=HEADER_BYTES,
                                shape=(self.count,) + self.row_shape)
            self.mm_rows = self.count
            self.remaps += 1
        return np.array(self.mm[start:end])

    def close(self):
        self.mm, self.mm_rows = None, 0
        self._tbuf, self._tlen = None, 0
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_sync = getattr(os, "fdatasync", os.fsync)  # data + size, skips mtime; macOS has only fsync


def _pwrite_all(fd, data, offset):
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class MegaContextTree:
    def __init__(self, K=32, dim=768, max_level=2, dtype="bf16", model_id="", path=None, durable=True):
        """A new, empty tree; in RAM when path is None, else in the directory `path` (created)."""
        if not 2 <= K <= 65535:
            fail(f"block size K={K} must be in [2, 65535]")
        if not 1 <= dim <= 65535:
            fail(f"dim={dim} must be in [1, 65535]")
        if max_level < 1:
            fail(f"max_level={max_level} must be >= 1")
        if dtype not in DTYPE_CODES:
            fail(f"dtype {dtype!r} must be one of {sorted(DTYPE_CODES)}")
        self._mid = _model_bytes(model_id)
        self.K, self.dim, self.max_level, self.dtype, self.model_id = K, dim, max_level, dtype, model_id
        self.path, self.durable, self.recovered, self._lock_fd = path, durable, {}, None
        if path is None:
            self.levels = [self._new_level(l, None, 0) for l in range(max_level + 1)]
            return
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.startswith("LOD") and name.endswith(".ctx") and os.path.getsize(os.path.join(path, name)) > HEADER_BYTES:
                fail(f"{path} already holds a non-empty MegaContext tree ({name}); open it or pick another dir")
        self._lock()
        for l in range(max_level + 1):
            with open(self._file(l), "wb") as f:
                f.write(pack_header(l, K, dim, self._code(l), self._mid, max_level, 0))
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(os.path.join(path, "meta.json"),  # convenience only; headers are authoritative
                          dict(K=K, dim=dim, max_level=max_level, dtype=dtype, model_id=model_id, version=VERSION))
        self.levels = [self._new_level(l, self._file(l), 0) for l in range(max_level + 1)]

    @classmethod
    def create(cls, path, K=32, dim=768, max_level=2, dtype="bf16", model_id="", durable=True):
        return cls(K=K, dim=dim, max_level=max_level, dtype=dtype, model_id=model_id, path=path, durable=durable)

    @classmethod
    def open(cls, path, model_id=None, durable=True):
        """Reopen a tree on disk: validate every header, drop torn tails, report them in `recovered`."""
        if not os.path.exists(os.path.join(path, "LOD0.ctx")):
            fail(f"no MegaContext tree at {path} (LOD0.ctx missing)")
        self = cls.__new__(cls)
        self.path, self.durable, self.recovered, self._lock_fd = path, durable, {}, None
        self._lock()
        try:
            self._load(model_id)
        except BaseException:
            self.close()
            raise
        return self

    def _load(self, model_id):
        h0 = self._read_header(0)
        if h0["level"] != 0 or h0["code"] != 0:
            fail(f"{self._file(0)}: header says level {h0['level']} dtype_code {h0['code']}, expected LOD0 uint32")
        self.K, self.dim, self.max_level = h0["K"], h0["dim"], h0["max_level"]
        if self.K < 2 or self.dim < 1 or self.max_level < 1:
            fail(f"{self._file(0)}: invalid K={self.K} dim={self.dim} max_level={self.max_level}")
        self._mid = h0["model_id"].rstrip(b"\0")
        self.model_id = self._mid.decode("utf-8", errors="replace")
        if model_id is not None and model_id != self.model_id:
            fail(f"tree at {self.path} was made by model {self.model_id!r}, not {model_id!r}; its gists do not fit")
        headers = [h0] + [self._read_header(l) for l in range(1, self.max_level + 1)]
        for l, h in enumerate(headers):
            for key in ("K", "dim", "max_level", "model_id"):
                if h[key] != h0[key]:
                    fail(f"{self._file(l)}: {key}={h[key]!r} disagrees with LOD0.ctx ({h0[key]!r})")
            if h["level"] != l:
                fail(f"{self._file(l)}: header says level {h['level']}, expected {l}")
        codes = {h["code"] for h in headers[1:]}
        if len(codes) != 1 or not codes <= set(DTYPE_CODES.values()):
            fail(f"{self.path}: gist dtype codes {sorted(codes)} are inconsistent or invalid")
        self.dtype = {v: k for k, v in DTYPE_CODES.items()}[codes.pop()]
        self.levels = []
        for l, h in enumerate(headers):
            lv = self._new_level(l, self._file(l), h["count"])
            self.levels.append(lv)
            want, have = HEADER_BYTES + h["count"] * lv.record_bytes, os.path.getsize(self._file(l))
            if have < want:
                fail(f"{self._file(l)}: truncated file ({have} bytes, header commits {h['count']} records = {want} bytes)")
            if have > want:  # a torn append: payload written, header never committed it
                os.truncate(self._file(l), want)
                self.recovered[f"LOD{l}"] = {"torn_tail_bytes": have - want}
        for l in range(1, self.max_level + 1):
            limit = self.levels[l - 1].count // self.K
            if self.levels[l].count > limit:  # cannot happen with our write order; be robust anyway
                lv = self.levels[l]
                self.recovered.setdefault(f"LOD{l}", {})["dropped_orphan_nodes"] = lv.count - limit
                lv.write_header(limit)
                os.truncate(self._file(l), HEADER_BYTES + limit * lv.record_bytes)
                lv.count = limit

    def _read_header(self, l):
        if not os.path.exists(self._file(l)):
            fail(f"{self._file(l)} is missing")
        with open(self._file(l), "rb") as f:
            return unpack_header(f.read(HEADER_BYTES), self._file(l))

    def _lock(self):
        self._lock_fd = lock_dir(self.path, "MegaContext tree")

    def _file(self, l):
        return os.path.join(self.path, f"LOD{l}.ctx")

    def _code(self, l):
        return 0 if l == 0 else DTYPE_CODES[self.dtype]

    def _new_level(self, l, path, count):
        code = self._code(l)
        row = () if l == 0 else (self.dim,)
        header = (l, self.K, self.dim, code, self._mid, self.max_level)
        return _Level(_NP_DTYPES[code], row, path=path, header=header, count=count, durable=self.durable)

    # ---- gist encoding: what a stored gist is, exactly ----
    def _encode(self, g: torch.Tensor) -> np.ndarray:
        g = g.detach()
        if self.dtype == "bf16":  # round on the device (RNE), ship half the bytes, keep raw bits
            return g.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
        return g.to(torch.float16 if self.dtype == "fp16" else torch.float32).cpu().numpy()

    def _finite(self, rows: np.ndarray) -> bool:
        """Whether every encoded gist is finite (bf16/fp16: the exponent bits are not all ones)."""
        if self.dtype in ("bf16", "fp16"):
            exp = np.uint16(0x7F80 if self.dtype == "bf16" else 0x7C00)
            return not bool(((rows.view(np.uint16) & exp) == exp).any())
        return bool(np.isfinite(rows).all())

    def _decode(self, raw: np.ndarray) -> torch.Tensor:
        if self.dtype == "bf16":  # reinterpret the stored bits, then widen exactly
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(raw.astype(np.float32))

    # ---- the public API ----
    def append(self, ids, gist_fn: GistFn, batch_size=4096) -> dict:
        """Append tokens; make every parent that became complete (missing ones from a crash first).
        Work goes in chunks of batch_size*K tokens, so memory stays bounded for 1M-token inputs and
        gist_fn sees at most batch_size nodes per call."""
        t0 = time.perf_counter()
        ids = _as_token_ids(ids)
        tel = {"tokens": int(ids.size), "new_nodes": [0] * (self.max_level + 1), "gist_calls": 0, "gist_s": 0.0}
        self._fill_parents(gist_fn, batch_size, tel)
        step = batch_size * self.K
        for pos in range(0, ids.size, step):
            self.levels[0].append(ids[pos:pos + step])
            tel["new_nodes"][0] += min(step, ids.size - pos)
            self._fill_parents(gist_fn, batch_size, tel)
        tel["total_s"] = time.perf_counter() - t0
        return tel

    def _fill_parents(self, gist_fn, batch_size, tel):
        K = self.K
        for l in range(1, self.max_level + 1):
            child, lv = self.levels[l - 1], self.levels[l]
            target = child.count // K
            while lv.count < target:
                n = min(batch_size, target - lv.count)
                raw = child.read(lv.count * K, (lv.count + n) * K)
                if l == 1:
                    children = torch.from_numpy(raw.astype(np.int64)).view(n, K)
                else:
                    children = self._decode(raw).view(n, K, self.dim)
                t = time.perf_counter()
                out = gist_fn(l - 1, children)
                if tuple(out.shape) != (n, self.dim) or not out.is_floating_point():
                    fail(f"gist_fn({l - 1}, ...) returned {out.dtype} {tuple(out.shape)}, expected float ({n}, {self.dim})")
                rows = self._encode(out)  # to the host: the one device sync (so gist_s is honest on GPU)
                if not self._finite(rows):  # as stored: an fp16 tree also refuses what overflows fp16
                    fail(f"gist_fn({l - 1}, ...) returned non-finite values; refusing to store them")
                tel["gist_s"] += time.perf_counter() - t
                tel["gist_calls"] += 1
                lv.append(rows)
                tel["new_nodes"][l] += n

    @property
    def num_tokens(self) -> int:
        return self.levels[0].count

    def num_nodes(self, level) -> int:
        return self.levels[level].count

    def tokens(self, start, end) -> np.ndarray:
        """Token ids [start, end) as a uint32 copy."""
        return self.levels[0].read(start, end)

    def gists(self, level, start, end) -> torch.Tensor:
        """Gists of nodes [start, end) at `level` (>= 1), as float32 (end - start, dim)."""
        if not 1 <= level <= self.max_level:
            raise IndexError(f"gist level {level} outside [1, {self.max_level}]")
        return self._decode(self.levels[level].read(start, end))

    def gists_raw(self, level, start, end) -> np.ndarray:
        """Gists of nodes [start, end) at `level` as stored (bf16: the raw bits as uint16; fp16;
        fp32), for a reader that ships them as they are and widens on the device (gist_dtype)."""
        if not 1 <= level <= self.max_level:
            raise IndexError(f"gist level {level} outside [1, {self.max_level}]")
        return self.levels[level].read(start, end)

    @property
    def gist_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    def node_span(self, level, index):
        """(first token, number of tokens) covered by node (level, index)."""
        if level < 0 or index < 0:
            raise IndexError(f"bad node ({level}, {index})")
        w = self.K ** level
        return index * w, w

    def flush(self):
        """Make everything committed so far durable (a no-op cost when durable=True already)."""
        for lv in getattr(self, "levels", []):
            if lv.fd is not None:
                os.fsync(lv.fd)

    def close(self):
        if self.path is not None:
            self.flush()
        for lv in getattr(self, "levels", []):
            lv.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        nodes = [self.num_nodes(l) for l in range(self.max_level + 1)]
        return f"MegaContextTree(K={self.K}, dim={self.dim}, dtype={self.dtype}, nodes={nodes}, path={self.path})"


def _as_token_ids(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids)
    if a.ndim != 1:
        fail(f"token ids must be 1-D, got shape {a.shape}")
    if a.size == 0:
        return np.empty(0, np.uint32)
    if not np.issubdtype(a.dtype, np.integer):
        fail(f"token ids must be integers, got {a.dtype}")
    if a.dtype != np.uint32 and (a.min() < 0 or a.max() > 0xFFFFFFFF):
        fail("token ids must fit in uint32")
    return a.astype(np.uint32, copy=False)
