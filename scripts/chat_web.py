"""
Chat web server: a self-contained chat page, a small JSON + SSE API over persistent MegaContext
memories, and OpenAI-compatible endpoints.

  python -m scripts.chat_web --run d20                       # checkpoints in <base_dir>/runs/d20
  python -m scripts.chat_web --ckpt-dir DIR --data-dir DIR --port 8000 --num-gpus 8

Endpoints (every error is JSON {"error": {"message": ..., "type": ...}} with a 4xx for bad input):
  GET  /  |  GET /health                       the page (nanochat/ui.html)  |  {"status": "ok", ...}
  POST /api/conversations  {"title"?}          create -> {"id", ...};  GET lists them
  GET  /api/conversations/{id}                 messages + stats + focus map;  DELETE removes it
  POST /api/conversations/{id}/messages        {"content", "temperature"?, "top_k"?, "max_tokens"?,
                                               "seed"?} -> SSE: {"token"}..., then {"done", "stats",
                                               "focus_map", "message"}
  POST /api/conversations/{id}/documents       {"text", "name"?} or multipart (field "file" or
                                               "text") -> SSE: {"progress": {"done", "total"}}..., {"done"}
  POST /v1/chat/completions, /v1/completions   OpenAI-compatible (stream or not, `data: [DONE]`);
                                               extra field "conversation_id" (alias "memory_id")
  GET  /v1/models
Other SSE events: {"focus_map", "stats"} after a refocus (at most twice a second), {"error"}.
A focus map is a list of runs {"start", "end", "level"} over the token timeline [0, N).

- Storage: <data_dir>/<id>/conversation.json (messages, the latest stats and focus map; written
  atomically) and <data_dir>/<id>/memory/ (the MemorySession: a MegaContext tree on disk). The
  memory is saved at the end of every request, so a restart loses nothing.
- Workers: one model replica per GPU (one on CPU), each with its own thread. Requests wait in an
  asyncio queue for a free worker. A conversation is locked for its whole request, so two workers
  never serve it at once. A worker keeps the sessions it served recently open (LRU); when a
  conversation lands on another worker, the old copy is closed first (one writer per tree).
- Chat turns follow the tokenizer's chat format: a user turn is ingested as
  <|user_start|>..<|user_end|><|assistant_start|>, the reply is decoded into the same memory and
  closed by <|assistant_end|>. A document is a user turn "[document: name]\\n<text>" with no reply.
- Limits are flags (the Limits dataclass) and are all checked before any work starts. With a
  persistent memory, /v1/chat/completions ingests only the messages after the last assistant
  message: the memory already holds the rest.
"""
import os
import re
import json
import time
import math
import shutil
import secrets
import asyncio
import argparse
import threading
import traceback
import contextlib
import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from email.parser import BytesParser
from email.policy import default as email_policy

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse, HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat import engine  # engine.MemorySession is looked up at call time (tests may swap it)
from nanochat.common import UserError, fail, atomic_write_json, get_base_dir, autocast_ctx, \
    autodetect_device_type, main_guard
from nanochat.checkpoint_manager import load_checkpoint, build_model, find_last_step
from nanochat.tokenizer import get_tokenizer

UI_PATH = os.path.join(os.path.dirname(nanochat.__file__), "ui.html")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ROLES = ("system", "user", "assistant")


@dataclass
class Limits:
    max_request_bytes: int = 1 << 20     # any JSON body
    max_message_chars: int = 32000       # one chat message (and a /v1/completions prompt)
    max_messages: int = 256              # messages in one /v1/chat/completions request
    max_title_chars: int = 200
    max_doc_bytes: int = 16 << 20        # one document upload, JSON or multipart
    doc_rate: int = 10                   # document uploads per rate_window_s, per conversation and per client
    rate_window_s: float = 60.0
    max_tokens: int = 2048               # max_tokens must be in [1, max_tokens]
    default_max_tokens: int = 256
    max_temperature: float = 2.0         # temperature in [0, max_temperature]; 0 = greedy
    max_stop: int = 4                    # OpenAI `stop` strings, each <= 64 chars
    max_queue: int = 256                 # requests waiting or running; more get a 503
    sessions_per_worker: int = 8         # open MemorySessions a worker keeps (LRU)
    ingest_chunk: int = 8192             # document tokens per ingest call (progress + cancel points)


class ApiError(Exception):
    def __init__(self, status, message, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type


def error_body(message, type):
    return {"error": {"message": message, "type": type}}


# -----------------------------------------------------------------------------
# Request parsing and validation: plain functions, one clear message per failure

async def read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"request body must be at most {limit} bytes", "request_too_large")
    cl = request.headers.get("content-length")
    if cl is not None and not cl.isdigit():
        raise ApiError(400, "invalid Content-Length header")
    if cl is not None and int(cl) > limit:
        raise too_big
    buf = bytearray()
    async for chunk in request.stream():  # chunked bodies have no Content-Length: count as we go
        buf += chunk
        if len(buf) > limit:
            raise too_big
    return bytes(buf)


def _finite(x):
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"number out of range: {str(x)[:40]}")
    return v


def parse_json(raw: bytes) -> dict:
    try:  # NaN, Infinity and 1e999 are not valid JSON numbers: reject them here, once
        body = json.loads(raw, parse_float=_finite, parse_constant=_finite)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"body is not valid JSON: {str(e)[:200]}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(body).__name__}")
    return body


def get_int(body, key, lo, hi, default=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be an integer in [{lo}, {hi}], got {str(v)[:40]!r}")
    return v


def get_float(body, key, lo, hi, default=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be a number in [{lo}, {hi}], got {str(v)[:40]!r}")
    return float(v)


def get_str(body, key, max_chars, required=False, default=None):
    v = body.get(key)
    if v is None:
        if required:
            raise ApiError(400, f"'{key}' is required")
        return default
    if not isinstance(v, str):
        raise ApiError(400, f"'{key}' must be a string, got {type(v).__name__}")
    return check_text(v, f"'{key}'", max_chars)


def check_text(v, what, max_chars):
    if len(v) > max_chars:
        raise ApiError(400, f"{what} is {len(v)} characters; the limit is {max_chars}", "too_long")
    if "\x00" in v:
        raise ApiError(400, f"{what} must not contain NUL characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: valid JSON, not text
        raise ApiError(400, f"{what} is not valid Unicode text") from None
    return v


def get_bool(body, key, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be true or false, got {str(v)[:40]!r}")
    return v


def message_text(m, i, limits):
    """OpenAI message content: a string or a list of {"type": "text", "text": str} parts."""
    c = m.get("content")
    if isinstance(c, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            raise ApiError(400, f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}")
        c = "".join(p["text"] for p in c)
    if not isinstance(c, str):
        raise ApiError(400, f"messages[{i}].content must be a string")
    return check_text(c, f"messages[{i}].content", limits.max_message_chars)


def get_messages(body, limits):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list")
    if len(msgs) > limits.max_messages:
        raise ApiError(400, f"at most {limits.max_messages} messages per request, got {len(msgs)}", "too_long")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {str(m.get('role'))[:40]!r}")
        out.append({"role": m["role"], "content": message_text(m, i, limits)})
    return out


def sampling_params(body, limits, vocab_size, default_max_tokens):
    """The sampling fields shared by every generating endpoint."""
    top_k = get_int(body, "top_k", 0, vocab_size)
    seed = get_int(body, "seed", -(2**63), 2**63 - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > limits.max_stop or \
            not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {limits.max_stop} non-empty strings of <= 64 chars")
    n = get_int(body, "n", 1, 1 << 30, 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported")
    return dict(max_tokens=get_int(body, "max_tokens", 1, limits.max_tokens, min(default_max_tokens, limits.max_tokens)),
                temperature=get_float(body, "temperature", 0.0, limits.max_temperature, 1.0),
                top_k=top_k or None,
                seed=secrets.randbelow(2**31) if seed is None else seed % (2**63),
                stop=stop)


def parse_multipart(raw: bytes, content_type: str):
    """-> (name, text) from a multipart/form-data body (field "file" or "text", optional "name").
    The stdlib email parser does this fine for one size-limited body; no extra dependency."""
    try:
        head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid Content-Type header") from None
    msg = BytesParser(policy=email_policy).parsebytes(head + raw)
    if not msg.is_multipart():
        raise ApiError(400, "malformed multipart body (missing boundary?)")
    name, data = None, None
    for part in msg.iter_parts():
        field = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if field == "name":
            name = payload.decode("utf-8", errors="replace")[:200]
        elif field in ("file", "text") and data is None:
            data = payload
            name = name or part.get_filename()
    if data is None:
        raise ApiError(400, "multipart body needs a 'file' or 'text' field")
    try:
        return name, data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the document must be UTF-8 text") from None


class RateLimiter:
    """At most n events per window seconds per key (sliding window)."""

    def __init__(self, n, window):
        self.n, self.window, self.hits = n, window, {}

    def check(self, *keys):
        now = time.monotonic()
        for k in keys:
            q = self.hits.get(k)
            while q and q[0] <= now - self.window:
                q.popleft()
            if q is not None and not q:
                del self.hits[k]
            elif q is not None and len(q) >= self.n:
                raise ApiError(429, f"too many documents: at most {self.n} per {self.window:g} s per conversation "
                                    f"and per client; retry in {q[0] + self.window - now:.0f} s", "rate_limit_exceeded")
        for k in keys:
            self.hits.setdefault(k, collections.deque()).append(now)


def focus_runs(focus_map):
    """Merge adjacent spans of the same level: a few runs instead of W entries."""
    runs = []
    for s in focus_map:
        start, end, level, n = int(s["start"]), int(s["end"]), int(s["level"]), int(s.get("entries", 1))
        if runs and runs[-1]["level"] == level and runs[-1]["end"] == start:
            runs[-1]["end"] = end
            runs[-1]["entries"] += n
        else:
            runs.append({"start": start, "end": end, "level": level, "entries": n})
    return runs


def plain(x):
    """Stats as JSON: numpy/torch scalars become numbers, anything unknown a string."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "tolist"):  # numpy / torch scalars and small arrays
        return plain(x.tolist())
    return str(x)


# -----------------------------------------------------------------------------
# Conversations on disk

class Store:
    def __init__(self, data_dir):
        self.root = os.path.abspath(data_dir)
        os.makedirs(self.root, exist_ok=True)

    def dir(self, cid):
        if not isinstance(cid, str) or not ID_RE.match(cid):
            raise ApiError(400, "invalid conversation id (1-64 characters of A-Z a-z 0-9 _ -)", "invalid_conversation_id")
        return os.path.join(self.root, cid)

    def memory_dir(self, cid):
        return os.path.join(self.dir(cid), "memory")

    def exists(self, cid):
        return os.path.isfile(os.path.join(self.dir(cid), "conversation.json"))

    def load(self, cid):
        path = os.path.join(self.dir(cid), "conversation.json")
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise ApiError(404, f"conversation {cid!r} not found", "not_found") from None

    def save(self, conv):
        conv["updated"] = time.time()
        atomic_write_json(os.path.join(self.dir(conv["id"]), "conversation.json"), conv)

    def create(self, title):
        cid = secrets.token_hex(8)
        now = time.time()
        conv = {"id": cid, "title": title, "created": now, "messages": [], "stats": {}, "focus_map": [], "num_tokens": 0}
        os.makedirs(self.dir(cid))
        self.save(conv)
        return conv

    def list(self):
        out = []
        for name in os.listdir(self.root):
            if ID_RE.match(name) and self.exists(name):
                with contextlib.suppress(ApiError, OSError, ValueError):
                    c = self.load(name)
                    out.append({k: c.get(k) for k in ("id", "title", "created", "updated", "num_tokens")})
        return sorted(out, key=lambda c: -(c.get("updated") or 0))

    def delete(self, cid):
        d = self.dir(cid)
        trash = os.path.join(self.root, f".deleted-{cid}-{secrets.token_hex(4)}")
        os.replace(d, trash)  # atomic: the id is gone at once, the files follow
        shutil.rmtree(trash, ignore_errors=True)


# -----------------------------------------------------------------------------
# Workers, the job queue and the turns they run

class Worker:
    def __init__(self, index, model):
        self.index, self.model = index, model
        self.device = next(model.parameters()).device
        self.autocast = autocast_ctx(self.device.type)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"chat-worker{index}")


class Job:
    """One request's work: runs on a worker thread, reports events through an asyncio queue."""

    def __init__(self, loop):
        self.loop, self.queue, self.cancel = loop, asyncio.Queue(), threading.Event()

    def emit(self, event):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self):
        try:
            while (ev := await self.queue.get()) is not None:
                yield ev
        finally:
            self.cancel.set()  # the client went away (or we are done): generation stops at the next token


class ChatServer:
    def __init__(self, models, tokenizer, data_dir, limits=None, model_name="nanochat", model_id=None, session_kw=None):
        self.tok, self.limits, self.model_name = tokenizer, limits or Limits(), model_name
        # what a stored memory is tied to; hashed once here, not at every session open
        self.model_id = model_id or engine.compute_model_id(models[0])
        self.store = Store(data_dir)
        self.workers = [Worker(i, m.eval()) for i, m in enumerate(models)]
        self.session_kw = session_kw or {}
        self.megacontext = bool(getattr(models[0].config, "megacontext", False))
        self.special = set(tokenizer.special_tokens.values())
        s = tokenizer.encode_special
        self.bos, self.user_start, self.user_end = s("<|bos|>"), s("<|user_start|>"), s("<|user_end|>")
        self.asst_start, self.asst_end = s("<|assistant_start|>"), s("<|assistant_end|>")
        self.doc_rate = RateLimiter(self.limits.doc_rate, self.limits.rate_window_s)
        self.cache = collections.OrderedDict()  # conversation id -> (worker, open MemorySession), LRU
        self.cache_lock = threading.Lock()
        self.loop, self.pending = None, 0

    # -- the queue --------------------------------------------------------------------------

    def _bind(self):
        """asyncio objects belong to one event loop: make them in the loop that serves us."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            assert self.pending == 0, "ChatServer moved to another event loop with requests in flight"
            self.loop, self.free, self.locks = loop, asyncio.Queue(), {}
            for w in self.workers:
                self.free.put_nowait(w)
        return loop

    def start(self, cid, fn, *args):
        """Queue fn(worker, job, *args) on the next free worker, holding conversation cid's lock."""
        loop = self._bind()
        if self.pending >= self.limits.max_queue:
            raise ApiError(503, f"server busy: {self.pending} requests in flight; retry shortly", "overloaded")
        job = Job(loop)
        self.pending += 1
        loop.create_task(self._run(job, cid, fn, args))
        return job

    async def _run(self, job, cid, fn, args):
        try:
            lock = self.locks.setdefault(cid, asyncio.Lock()) if cid else contextlib.AsyncExitStack()
            async with lock:
                worker = await self.free.get()
                try:
                    if not job.cancel.is_set():
                        await self.loop.run_in_executor(worker.thread, self._call, fn, worker, job, args)
                finally:
                    self.free.put_nowait(worker)
        except ApiError as e:
            job.emit({"error": error_body(e.message, e.type)["error"], "status": e.status})
        except UserError as e:
            job.emit({"error": error_body(str(e), "invalid_request_error")["error"], "status": 400})
        except Exception as e:  # a bug, not bad input: log it, tell the client without details
            traceback.print_exc()
            job.emit({"error": error_body(f"internal error ({type(e).__name__})", "internal_error")["error"], "status": 500})
        finally:
            self.pending -= 1
            job.emit(None)

    def _call(self, fn, worker, job, args):
        ctx = torch.cuda.device(worker.device) if worker.device.type == "cuda" else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            return fn(worker, job, *args)

    # -- sessions: opened on a worker, kept open there (LRU), saved after every request ----

    def _session(self, worker, cid):
        with self.cache_lock:
            hit = self.cache.pop(cid, None)
        if hit is not None and hit[0] is worker:
            return hit[1]
        if hit is not None:
            _close(hit[1])  # it was open on another worker: one writer per tree
        MS, path = engine.MemorySession, self.store.memory_dir(cid)
        if os.path.isfile(os.path.join(path, engine.STATE_FILE)):
            return MS.open(worker.model, path, model_id=self.model_id, autocast=worker.autocast)
        shutil.rmtree(path, ignore_errors=True)  # never saved: a crash during its creation
        session = MS(worker.model, path=path, model_id=self.model_id, autocast=worker.autocast, **self.session_kw)
        session.ingest([self.bos])
        return session

    def _keep(self, worker, cid, session):
        session.save()
        with self.cache_lock:
            self.cache[cid] = (worker, session)
            mine = [k for k, (w, _) in self.cache.items() if w is worker]
            victims = [self.cache.pop(k)[1] for k in mine[:max(0, len(mine) - self.limits.sessions_per_worker)]]
        for s in victims:
            _close(s)

    def evict(self, cid):
        with self.cache_lock:
            hit = self.cache.pop(cid, None)
        if hit is not None:
            _close(hit[1])

    def close(self):
        with self.cache_lock:
            hits, self.cache = list(self.cache.values()), collections.OrderedDict()
        for _, s in hits:
            _close(s)
        for w in self.workers:
            w.thread.shutdown(wait=True)

    def _with_session(self, worker, job, cid, body):
        """Run body(session, conv) on conversation cid's memory; keep the session on success."""
        conv = self.store.load(cid)  # 404 if it was deleted while we waited
        session = self._session(worker, cid)
        try:
            result = body(session, conv)
        except BaseException:
            _close(session)  # its state is unknown: the next request reopens what was saved
            raise
        self._keep(worker, cid, session)
        conv.update(num_tokens=session.num_tokens, stats=plain(session.stats()),
                    focus_map=focus_runs(session.focus_map()))
        self.store.save(conv)
        job.emit({"done": True, "stats": conv["stats"], "focus_map": conv["focus_map"],
                  "num_tokens": conv["num_tokens"], **result})

    # -- the turns (worker thread) ----------------------------------------------------------

    def decode(self, session, job, p, stop_tokens):
        """Sample into the memory, streaming text. -> (text, n_tokens, finish_reason, stop_id)."""
        ids, pending, text, sent, finish, stop_id = [], [], "", 0, "length", None
        hold = max((len(s) for s in p["stop"]), default=1) - 1  # never stream the start of a stop string
        last_map = time.monotonic()
        gen = session.generate(p["max_tokens"], temperature=p["temperature"], top_k=p["top_k"],
                               seed=p["seed"], stop_tokens=tuple(stop_tokens))
        with contextlib.closing(gen):
            for tok, tel in gen:
                if tok in stop_tokens:
                    finish, stop_id = "stop", tok
                    break
                ids.append(tok)
                if tok not in self.special:
                    pending.append(tok)
                    piece = self.tok.decode(pending)
                    if not piece.endswith("\ufffd") or len(pending) >= 8:  # wait for a whole UTF-8 character
                        text, pending = text + piece, []
                hit = min((i for i in (text.find(s) for s in p["stop"]) if i >= 0), default=-1)
                if hit >= 0:
                    text, finish = text[:hit], "stop"
                if len(text) - hold > sent or hit >= 0:
                    upto = len(text) if hit >= 0 else len(text) - hold
                    job.emit({"token": text[sent:upto]})
                    sent = upto
                if hit >= 0:
                    break
                if tel is not None and time.monotonic() - last_map > 0.5:
                    last_map = time.monotonic()
                    job.emit({"focus_map": focus_runs(session.focus_map()), "stats": plain(session.stats())})
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
        if pending:
            text += self.tok.decode(pending)
        if len(text) > sent and finish != "stop":
            job.emit({"token": text[sent:]})
        return text, len(ids), finish, stop_id

    def user_turn(self, text):
        return [self.user_start] + self.tok.encode(text) + [self.user_end]

    def chat_turn(self, worker, job, cid, user_text, p, record=None):
        """One user message -> one assistant reply, both in the conversation's memory."""
        def body(session, conv):
            start = session.num_tokens
            ids = self.user_turn(user_text) + [self.asst_start]
            session.ingest(ids)
            text, n, finish, stop_id = self.decode(session, job, p, {self.asst_end, self.bos})
            if stop_id != self.asst_end:  # close the turn so the next one starts cleanly
                session.ingest([self.asst_end])
            end = session.num_tokens
            now = time.time()
            if not conv["title"]:
                conv["title"] = user_text.strip().splitlines()[0][:60] if user_text.strip() else "untitled"
            user = {"role": "user", "content": record if record is not None else user_text, "time": now}
            reply = {"role": "assistant", "content": text, "time": time.time(), "finish_reason": finish,
                     "tokens": n, "span": [start, end]}
            conv["messages"] += [user, reply]
            return {"message": reply, "usage": {"prompt_tokens": len(ids), "completion_tokens": n}}
        self._with_session(worker, job, cid, body)

    def document(self, worker, job, cid, name, text):
        def body(session, conv):
            start = session.num_tokens
            ids = self.user_turn(f"[document: {name}]\n{text}")
            total, done, chunk = len(ids), 0, self.limits.ingest_chunk
            sent = [-1, 0.0]  # last reported count and time: at most ~10 progress events a second

            def report(n, final=False):
                if n != sent[0] and (final or time.monotonic() - sent[1] > 0.1):
                    sent[:] = [n, time.monotonic()]
                    job.emit({"progress": {"done": n, "total": total}})
            while done < total and not job.cancel.is_set():
                part = ids[done:done + chunk]
                session.ingest(part, progress=lambda d, t, base=done: report(base + int(d)))
                done += len(part)
                report(done, final=True)
            if done < total:  # cancelled half way: what is in memory stays, the turn is closed
                session.ingest([self.user_end])
            doc = {"role": "document", "name": name, "chars": len(text), "tokens": done, "complete": done == total,
                   "preview": text[:300], "time": time.time(), "span": [start, session.num_tokens]}
            conv["messages"].append(doc)
            if not conv["title"]:
                conv["title"] = name[:60]
            return {"message": doc}
        self._with_session(worker, job, cid, body)

    def completion(self, worker, job, cid, prompt_ids, p, stop_tokens, record=None):
        """Stateless (cid None: a memory in RAM for this request) or appended to cid's memory."""
        def body(session, conv):
            if prompt_ids:
                session.ingest(prompt_ids)
            text, n, finish, _ = self.decode(session, job, p, stop_tokens)
            if conv is not None and record is not None:
                conv["messages"] += record(text, finish, n)
            return {"message": {"role": "assistant", "content": text, "finish_reason": finish},
                    "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n}}
        if cid is not None:
            return self._with_session(worker, job, cid, body)
        session = engine.MemorySession(worker.model, autocast=worker.autocast, **self.session_kw)
        try:
            result = body(session, None)
        finally:
            _close(session)
        job.emit({"done": True, **result})


def _close(session):
    with contextlib.suppress(Exception):
        session.close()


# -----------------------------------------------------------------------------
# The app

def sse(event):
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(models, tokenizer, data_dir, limits=None, model_name="nanochat", model_id=None, session_kw=None):
    """models: one model per worker (each already on its device)."""
    srv = ChatServer(models, tokenizer, data_dir, limits, model_name, model_id, session_kw)
    L = srv.limits

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv._bind()
        yield
        srv.close()

    app = FastAPI(title="megacontext-nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def _api_error(request, e):
        return JSONResponse(error_body(e.message, e.type), status_code=e.status)

    @app.exception_handler(UserError)
    async def _user_error(request, e):
        return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(error_body(f"invalid request: {str(e.errors())[:300]}", "invalid_request_error"), status_code=400)

    async def collect(job):
        """Wait for a job that is not streamed: -> (done event) or raise its error as an ApiError."""
        async for ev in job.events():
            if "error" in ev:
                raise ApiError(ev["status"], ev["error"]["message"], ev["error"]["type"])
            if ev.get("done"):
                return ev
        raise ApiError(500, "the request ended without a result", "internal_error")

    def stream(job, fmt=sse):
        async def gen():
            async for ev in job.events():
                ev.pop("status", None)
                yield fmt(ev)
        return StreamingResponse(gen(), media_type="text/event-stream", headers=SSE_HEADERS)

    def existing(cid):
        if not srv.store.exists(cid):  # also validates the id
            raise ApiError(404, f"conversation {cid!r} not found", "not_found")
        return cid

    # -- pages and the chat API --------------------------------------------------------------

    @app.get("/")
    async def index():
        with open(UI_PATH, encoding="utf-8") as f:
            html = f.read()
        csp = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:"
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.model_name, "megacontext": srv.megacontext, "workers": len(srv.workers),
                "devices": [str(w.device) for w in srv.workers], "in_flight": srv.pending,
                "open_sessions": len(srv.cache), "limits": {f.name: getattr(L, f.name) for f in fields(L)}}

    @app.post("/api/conversations")
    async def new_conversation(request: Request):
        raw = await read_body(request, L.max_request_bytes)
        body = parse_json(raw) if raw.strip() else {}
        conv = srv.store.create(get_str(body, "title", L.max_title_chars, default=""))
        return JSONResponse(conv, status_code=201)

    @app.get("/api/conversations")
    async def list_conversations():
        return {"conversations": srv.store.list()}

    @app.get("/api/conversations/{cid}")
    async def get_conversation(cid: str):
        return srv.store.load(existing(cid))

    @app.delete("/api/conversations/{cid}")
    async def delete_conversation(cid: str):
        existing(cid)
        srv._bind()
        async with srv.locks.setdefault(cid, asyncio.Lock()):  # waits for a request in flight
            if not srv.store.exists(cid):
                raise ApiError(404, f"conversation {cid!r} not found", "not_found")
            srv.evict(cid)
            srv.store.delete(cid)
        srv.locks.pop(cid, None)
        return {"id": cid, "deleted": True}

    @app.post("/api/conversations/{cid}/messages")
    async def post_message(cid: str, request: Request):
        existing(cid)
        body = parse_json(await read_body(request, L.max_request_bytes))
        content = get_str(body, "content", L.max_message_chars, required=True)
        if not content.strip():
            raise ApiError(400, "'content' must not be empty")
        p = sampling_params(body, L, tokenizer.get_vocab_size(), L.default_max_tokens)
        job = srv.start(cid, srv.chat_turn, cid, content, p)
        return stream(job)

    @app.post("/api/conversations/{cid}/documents")
    async def post_document(cid: str, request: Request):
        existing(cid)
        ctype = request.headers.get("content-type", "")
        raw = await read_body(request, L.max_doc_bytes)
        if ctype.lower().startswith("multipart/form-data"):
            name, text = parse_multipart(raw, ctype)
        else:
            body = parse_json(raw)
            text = get_str(body, "text", L.max_doc_bytes, required=True)
            name = get_str(body, "name", 200, default=None)
        if not text.strip():
            raise ApiError(400, "the document is empty")
        if "\x00" in text:
            raise ApiError(400, "the document must not contain NUL characters")
        name = (name or "document").replace("\n", " ").strip()[:200] or "document"
        srv.doc_rate.check(("conversation", cid), ("client", request.client.host if request.client else "?"))
        return stream(srv.start(cid, srv.document, cid, name, text))

    # -- OpenAI-compatible -------------------------------------------------------------------

    def memory_id(body):
        cid = body.get("conversation_id", body.get("memory_id"))
        if cid is None:
            return None
        if not isinstance(cid, str):
            raise ApiError(400, "'conversation_id' must be a string")
        return existing(cid)

    @app.get("/v1/models")
    async def models_list():
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": 0, "owned_by": "megacontext-nanochat"}]}

    async def openai_response(job, streaming, kind, p, cid):
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        base = {"id": rid, "object": obj + (".chunk" if kind == "chat" and streaming else ""), "created": created,
                "model": srv.model_name}
        if cid is not None:
            base["conversation_id"] = cid

        def choice(text, finish, first=False):
            if kind == "chat":
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def usage(ev):
            u = ev["usage"]
            return {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}

        if streaming:
            include_usage = isinstance(p.get("stream_options"), dict) and p["stream_options"].get("include_usage") is True

            async def gen():
                if kind == "chat":
                    yield sse({**base, "choices": [choice("", None, first=True)]})
                async for ev in job.events():
                    if "token" in ev:
                        yield sse({**base, "choices": [choice(ev["token"], None)]})
                    elif "error" in ev:
                        yield sse({"error": ev["error"]})
                    elif ev.get("done"):
                        finish = ev["message"]["finish_reason"]
                        yield sse({**base, "choices": [choice("", "length" if finish == "length" else "stop")]})
                        if include_usage:
                            yield sse({**base, "choices": [], "usage": usage(ev)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream", headers=SSE_HEADERS)

        ev = await collect(job)
        finish = "length" if ev["message"]["finish_reason"] == "length" else "stop"
        text = ev["message"]["content"]
        c = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
             if kind == "chat" else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {**base, "choices": [c], "usage": usage(ev)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_json(await read_body(request, L.max_request_bytes))
        get_str(body, "model", 200)
        msgs = get_messages(body, L)
        streaming = get_bool(body, "stream")
        p = sampling_params(body, L, tokenizer.get_vocab_size(), L.default_max_tokens)
        p["stream_options"] = body.get("stream_options")
        cid = memory_id(body)
        if cid is None:  # stateless: the whole conversation is the prompt
            ids = tokenizer.render_for_completion({"messages": msgs})  # UserError -> 400 (roles, order)
            job = srv.start(None, srv.completion, None, ids, p, {srv.asst_end, srv.bos})
        else:  # the memory holds the past; ingest what came after the last assistant message
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
            new = msgs[last + 1:]
            if not new or new[-1]["role"] != "user":
                raise ApiError(400, "with a conversation_id the request must end with a user message")
            text = "\n\n".join(m["content"] for m in new)
            if len(text) > L.max_message_chars:
                raise ApiError(400, f"the new turn is {len(text)} characters; the limit is {L.max_message_chars}", "too_long")
            job = srv.start(cid, srv.chat_turn, cid, text, p)
        return await openai_response(job, streaming, "chat", p, cid)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_json(await read_body(request, L.max_request_bytes))
        get_str(body, "model", 200)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (or a list of one string)")
        prompt = get_str({"prompt": prompt}, "prompt", L.max_message_chars)
        streaming = get_bool(body, "stream")
        p = sampling_params(body, L, tokenizer.get_vocab_size(), 16)  # OpenAI's default max_tokens
        p["stream_options"] = body.get("stream_options")
        cid = memory_id(body)
        ids = tokenizer.encode(prompt)
        if cid is None:
            ids = [srv.bos] + ids

        def record(text, finish, n):
            now = time.time()
            return [{"role": "text", "content": prompt, "time": now},
                    {"role": "completion", "content": text, "finish_reason": finish, "tokens": n, "time": now}]
        job = srv.start(cid, srv.completion, cid, ids, p, {srv.bos}, record)
        return await openai_response(job, streaming, "text", p, cid)

    return app


# -----------------------------------------------------------------------------
# The script

def main():
    ap = argparse.ArgumentParser(description="MegaContext chat web server (FastAPI + uvicorn)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--run", default="", help="run name: checkpoints in <base_dir>/runs/<run>")
    src.add_argument("--ckpt-dir", default="", help="checkpoint directory (instead of --run)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--tokenizer-dir", default="", help="default <base_dir>/tokenizer")
    ap.add_argument("--data-dir", default="", help="conversations (default <base_dir>/chat_web/<run>)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--num-gpus", type=int, default=1, help="one worker (model replica) per GPU")
    ap.add_argument("--device", default="", help="cuda | cpu | mps (default: autodetect)")
    ap.add_argument("--W", type=int, default=None, help="working-context budget (default: the engine's)")
    ap.add_argument("--log-level", default="info")
    for f in fields(Limits):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args()

    base = get_base_dir()
    run = args.run or ("base" if not args.ckpt_dir else "")
    ckpt_dir = args.ckpt_dir or os.path.join(base, "runs", run)
    name = run or os.path.basename(os.path.normpath(ckpt_dir))
    data_dir = args.data_dir or os.path.join(base, "chat_web", name)
    device_type = args.device or autodetect_device_type()
    if args.num_gpus < 1:
        fail("--num-gpus must be >= 1")
    if device_type == "cuda":
        if args.num_gpus > torch.cuda.device_count():
            fail(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} GPUs are visible")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
    else:
        devices = [torch.device(device_type)]  # one worker: CPU threads are better spent inside torch
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    if limits.max_tokens < 1 or limits.max_temperature < 0 or limits.max_queue < 1 or limits.doc_rate < 1:
        fail("limits must be positive")

    tokenizer = get_tokenizer(args.tokenizer_dir or None)
    step = args.step if args.step is not None else find_last_step(ckpt_dir)
    ckpt = load_checkpoint(ckpt_dir, step=step, device="cpu")
    models = [build_model(ckpt, d, tokenizer) for d in devices]
    del ckpt
    session_kw = {"W": args.W} if args.W else {}
    app = create_app(models, tokenizer, data_dir, limits, model_name=name, session_kw=session_kw)
    print(f"chat_web: model {name} step {step} on {', '.join(map(str, devices))}; conversations in {data_dir}; "
          f"http://{args.host}:{args.port}/", flush=True)
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main_guard(main)
