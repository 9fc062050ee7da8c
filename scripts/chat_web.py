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
- Request parsing and validation (Limits, ApiError, get_*, sampling_params, parse_multipart,
  RateLimiter) live in nanochat/web_api.py; this file holds the server, its storage and routes.
"""
import os
import re
import json
import time
import shutil
import secrets
import asyncio
import argparse
import threading
import traceback
import contextlib
import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse, HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat import engine  # engine.MemorySession is looked up at call time (tests may swap it)
from nanochat.common import UserError, fail, atomic_write_json, get_base_dir, autocast_ctx, \
    autodetect_device_type, main_guard, inference_dtype, INFERENCE_DTYPES
from nanochat.checkpoint_manager import load_checkpoint, build_model, find_last_step
from nanochat.tokenizer import get_tokenizer
from megacontext.focus import FOCUS_POLICIES, DEFAULT_FOCUS, FOCUS_HELP
from nanochat.web_api import (  # request parsing + validation
    Limits, ApiError, error_body, read_body, parse_json, get_str, get_bool, get_messages, sampling_params,
    parse_multipart, RateLimiter, plain)

UI_PATH = os.path.join(os.path.dirname(nanochat.__file__), "ui.html")
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
            return MS.open(worker.model, path, model_id=self.model_id, autocast=worker.autocast,
                           **{k: v for k, v in self.session_kw.items() if k in ("focus", "decode")})   # W is the saved one
        shutil.rmtree(path, ignore_errors=True)  # never saved: a crash during its creation
        session = MS(worker.model, path=path, model_id=self.model_id, autocast=worker.autocast, **self.session_kw)
        session.ingest([self.bos])
        return session

    def _keep(self, worker, cid, session):
        session.save()
        with self.cache_lock:
            self.cache[cid] = (worker, session)
            mine = [k for k, (w, _) in self.cache.items() if w is worker]
            # close evicted sessions before the lock is released: another worker that misses one
            # in the cache reopens it from disk, and must not find it still open (its memory's
            # file lock held: "in use"), which a CI run of the crosstalk test once hit
            for k in mine[:max(0, len(mine) - self.limits.sessions_per_worker)]:
                _close(self.cache.pop(k)[1])

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
                    focus_map=session.focus_map())
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
                    job.emit({"focus_map": session.focus_map(), "stats": plain(session.stats())})
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
        session = engine.MemorySession(worker.model, model_id=self.model_id, autocast=worker.autocast, **self.session_kw)
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
                "devices": [str(w.device) for w in srv.workers],
                "dtype": str(next(srv.workers[0].model.parameters()).dtype).removeprefix("torch."),
                "decode": srv.session_kw.get("decode", "static"), "focus": srv.session_kw.get("focus", DEFAULT_FOCUS),
                "in_flight": srv.pending,
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
    ap.add_argument("--focus", default=DEFAULT_FOCUS, choices=FOCUS_POLICIES,
                    help=FOCUS_HELP)
    ap.add_argument("--dtype", default="auto", choices=INFERENCE_DTYPES,
                    help="weights: auto = bfloat16 on CUDA, float32 elsewhere (conversations reopen under the dtype that made them)")
    ap.add_argument("--decode", default="static", choices=engine.DECODE_MODES,
                    help="one-token steps: static (a CUDA graph on CUDA), compiled (torch.compile'd step and "
                    "whole-window recompute; one GPU only: each worker would compile in its own thread), fused "
                    "(the step as Triton kernels, the recompute compiled; CUDA, one GPU), dynamic")
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
    if args.decode in ("compiled", "fused") and args.num_gpus > 1:
        fail(f"--decode {args.decode} serves one GPU (--num-gpus 1): torch.compile is not safe to run in several worker threads")
    if device_type == "cuda":
        if args.num_gpus > torch.cuda.device_count():
            fail(f"--num-gpus {args.num_gpus} but only {torch.cuda.device_count()} GPUs are visible")
        devices = [torch.device("cuda", i) for i in range(args.num_gpus)]
    else:
        devices = [torch.device(device_type)]  # one worker: CPU threads are better spent inside torch
    try:
        engine.check_decode(args.decode, devices[0])
    except ValueError as e:
        fail(str(e))
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    if limits.max_tokens < 1 or limits.max_temperature < 0 or limits.max_queue < 1 or limits.doc_rate < 1:
        fail("limits must be positive")

    tokenizer = get_tokenizer(args.tokenizer_dir or None)
    step = args.step if args.step is not None else find_last_step(ckpt_dir)
    ckpt = load_checkpoint(ckpt_dir, step=step, device="cpu")
    models = [build_model(ckpt, d, tokenizer, dtype=inference_dtype(args.dtype, device_type)) for d in devices]
    del ckpt
    try:   # a model the mode cannot run (decode fused: its head dim) is refused here, not at the first reply
        engine.check_decode(args.decode, devices[0], models[0])
    except ValueError as e:
        fail(str(e))
    session_kw = {"focus": args.focus, "decode": args.decode, **({"W": args.W} if args.W else {})}
    app = create_app(models, tokenizer, data_dir, limits, model_name=name, session_kw=session_kw)
    print(f"chat_web: model {name} step {step} on {', '.join(map(str, devices))}; conversations in {data_dir}; "
          f"http://{args.host}:{args.port}/", flush=True)
    import uvicorn
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main_guard(main)
