"""
Request parsing and validation for the chat web server (scripts/chat_web.py): the limits, the
API error type, and plain functions that turn a raw request body into checked values, each with
one clear 4xx message per failure. Also the small helpers that shape responses (focus-map runs,
JSON-safe stats). No FastAPI import: `read_body` only needs an object with `.headers` and an
async `.stream()` (a Starlette Request).
"""
import math
import json
import time
import secrets
import collections
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import default as email_policy

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

async def read_body(request, limit: int) -> bytes:
    too_big = ApiError(413, f"request body must be at most {limit} bytes", "request_too_large")
    cl = request.headers.get("content-length")
    if cl is not None and not (cl.isascii() and cl.isdigit()):  # "²".isdigit() is True too
        raise ApiError(400, "invalid Content-Length header")
    digits = None if cl is None else cl.lstrip("0") or "0"
    if digits is not None and (len(digits) > len(str(limit)) or int(digits) > limit):  # no int() of 5000 digits
        raise too_big
    buf = bytearray()
    async for chunk in request.stream():  # chunked bodies have no Content-Length: count as we go
        buf += chunk
        if len(buf) > limit:
            raise too_big
    return bytes(buf)


class _NotANumber:
    """What the JSON parser makes of a number literal that has no finite value (NaN, Infinity,
    -Infinity, 1e999) or too many digits for int(): parse_json rejects the body, naming the field."""

    def __init__(self, what):
        self.what = what  # "NaN, which is not a finite number", for the error message


_MAX_INT_DIGITS = 4300  # CPython's default int-from-string limit; json.loads would raise past it


def _float_literal(tok):
    v = float(tok)
    return v if math.isfinite(v) else _NotANumber(f"{tok[:40]}, which is not a finite number")


def _int_literal(tok):
    digits = len(tok) - tok.startswith("-")
    if digits > _MAX_INT_DIGITS:
        return _NotANumber(f"an integer of {digits} digits, more than {_MAX_INT_DIGITS}")
    return int(tok)


def _find_nan(v):
    """The first _NotANumber in v or in the lists nested in it (objects were checked by their own hook)."""
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, _NotANumber):
            return x
        if isinstance(x, list):
            stack.extend(x)
    return None


def _json_object(pairs):
    for k, v in pairs:
        bad = _find_nan(v)
        if bad is not None:
            raise ValueError(f"'{str(k)[:40]}' holds {bad.what}")
    return dict(pairs)


def parse_json(raw: bytes) -> dict:
    try:  # NaN, Infinity, 1e999 and 5000-digit integers are no numbers we accept: reject them here, once
        body = json.loads(raw, parse_float=_float_literal, parse_constant=_float_literal, parse_int=_int_literal,
                          object_pairs_hook=_json_object)
        bad = _find_nan(body)  # a bare top-level value or one in a top-level array
        if bad is not None:
            raise ValueError(f"the body holds {bad.what}")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"body is not valid JSON: {str(e)[:200]}", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(body).__name__}")
    return body


def _shown(v):
    """A request value, short, as JSON spells it, for an error message."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        try:
            t = str(abs(v))
        except ValueError:  # more digits than sys.get_int_max_str_digits()
            return f"a {v.bit_length()}-bit integer"
        return str(v) if len(t) <= 40 else f"an integer of {len(t)} digits"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity")
    if isinstance(v, str):
        return json.dumps(v[:40] + ("..." if len(v) > 40 else ""))
    return {list: "an array", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def get_number(body, key, lo, hi, default=None, integer=False):
    """The one validator of every numeric request field: `key` absent or null -> default; else it
    must be a finite JSON number in [lo, hi] (integer=True: an integral one, 3.0 passing as 3) ->
    int or float. A bool is no number here (True is an int in Python), and a huge int is compared
    exactly, never passed through float(). Anything else: a 400 naming the field and the range."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        ok = False
    elif isinstance(v, int):  # int vs int/float comparisons are exact in Python: no OverflowError
        ok = lo <= v <= hi
    else:
        ok = math.isfinite(v) and lo <= v <= hi and (v.is_integer() or not integer)
    if not ok:
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'} in [{lo}, {hi}], got {_shown(v)}")
    return int(v) if integer else float(v)


def get_int(body, key, lo, hi, default=None):
    return get_number(body, key, lo, hi, default, integer=True)


def get_float(body, key, lo, hi, default=None):
    return get_number(body, key, lo, hi, default)


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
        raise ApiError(400, f"'{key}' must be true or false, got {_shown(v)}")
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
