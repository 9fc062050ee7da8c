"""
Chat with a checkpoint in the terminal, through the same MemorySession as the web UI: an MC model
keeps the whole conversation (and any loaded document) in its MegaContext memory; a plain model
keeps a sliding window.

    python -m scripts.chat_cli --run sft                            # interactive
    python -m scripts.chat_cli --ckpt-dir DIR --prompt "Hi"         # one shot
    python -m scripts.chat_cli --run sft --memory mem/ --load-file book.txt

Memory is one token stream: a loaded document is `<|bos|> text`, the conversation follows as
`<|bos|> <|user_start|> .. <|user_end|> <|assistant_start|> .. <|assistant_end|> ...`, exactly
the tokenizer's chat rendering. With --memory DIR it persists (reopened on the next run; each
run starts a new conversation after what is already there). Commands: /stats, /focus, /quit.
"""
import os
import sys
import json
import argparse

import torch

from nanochat.common import main_guard, fail, get_base_dir, autodetect_device_type, autocast_ctx, inference_dtype, \
    INFERENCE_DTYPES
from nanochat.checkpoint_manager import load_checkpoint, build_model
from nanochat.tokenizer import get_tokenizer
from nanochat.engine import MemorySession, STATE_FILE, DECODE_MODES, check_decode
from megacontext.focus import FOCUS_POLICIES, DEFAULT_FOCUS, FOCUS_HELP


def reply(session, tok, ids, args):
    """Ingest a turn's prompt ids, refocus, stream the assistant's answer; returns its text."""
    session.ingest(ids)
    session.refocus()
    end = tok.encode_special("<|assistant_end|>")
    if args.raw:  # a plain continuation: nothing to close
        end = tok.get_bos_token_id()
    stop = (end, tok.get_bos_token_id())
    out, printed = [], ""
    for t, _ in session.generate(args.max_tokens, args.temperature, args.top_k, args.seed, stop_tokens=stop):
        if t in stop:
            break
        out.append(t)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            print(text[len(printed):], end="", flush=True)
            printed = text
    else:
        if not args.raw:
            session.ingest([end])  # cut off by max_tokens: close the turn so the rendering stays valid
    print(tok.decode(out)[len(printed):], flush=True)
    return tok.decode(out)


def main():
    ap = argparse.ArgumentParser(description="chat with a checkpoint (MegaContext memory if the model has it)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run name: checkpoints in <base_dir>/runs/<run>")
    src.add_argument("--ckpt-dir", help="checkpoint directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--memory", default=None, help="persist the memory in this directory (reopened if present)")
    ap.add_argument("--load-file", default=None, help="ingest this text file into memory first")
    ap.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--W", type=int, default=None, help="working-context budget (default: the model's sequence_len)")
    ap.add_argument("--focus", default=DEFAULT_FOCUS, choices=FOCUS_POLICIES,
                    help=FOCUS_HELP)
    ap.add_argument("--decode", default="static", choices=DECODE_MODES,
                    help="one-token steps: static (a CUDA graph on CUDA), compiled (torch.compile'd step and "
                    "whole-window recompute: faster on a GPU after ~10-20 s of compiling at the first reply), fused (the "
                    "step as Triton kernels, the recompute compiled; CUDA), dynamic")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--raw", action="store_true", help="base models: continue the prompt as plain text (no chat turns)")
    ap.add_argument("--device", default=None, help="cuda | cpu | mps (default: autodetect)")
    ap.add_argument("--dtype", default="auto", choices=INFERENCE_DTYPES,
                    help="weights: auto = bfloat16 on CUDA, float32 elsewhere (a memory reopens under the dtype that made it)")
    args = ap.parse_args()
    if args.max_tokens < 1:
        fail("--max-tokens must be >= 1")
    if args.temperature < 0:
        fail("--temperature must be >= 0")

    device_type = args.device or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda requested but CUDA is not available")
    device = torch.device(device_type)
    try:
        check_decode(args.decode, device)
    except ValueError as e:
        fail(str(e))
    tok = get_tokenizer()
    ckpt_dir = args.ckpt_dir or os.path.join(get_base_dir(), "runs", args.run)
    model = build_model(load_checkpoint(ckpt_dir, args.step, device="cpu"), device, tok,
                        dtype=inference_dtype(args.dtype, device_type))
    model.eval()
    try:   # a model the mode cannot run (decode fused: its head dim), in one line
        check_decode(args.decode, device, model)
    except ValueError as e:
        fail(str(e))
    autocast = autocast_ctx(device_type)

    if args.memory and os.path.exists(os.path.join(args.memory, STATE_FILE)):
        session = MemorySession.open(model, args.memory, autocast=autocast, focus=args.focus, decode=args.decode)
        print(f"[memory] reopened {args.memory}: {session.num_tokens} tokens", file=sys.stderr)
    else:
        session = MemorySession(model, W=args.W, path=args.memory, autocast=autocast, focus=args.focus,
                                decode=args.decode)
    try:
        if args.load_file:
            try:
                with open(args.load_file, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError as e:
                fail(f"cannot read --load-file {args.load_file}: {e}")
            ids = [tok.get_bos_token_id()] + tok.encode(text)
            progress = lambda done, total: print(f"\r[memory] ingesting {done}/{total} tokens", end="",  # noqa: E731
                                                 file=sys.stderr, flush=True)
            tel = session.ingest(ids, progress=progress)
            print(f"\n[memory] loaded {args.load_file}: {tel['tokens']} tokens in {tel['ms'] / 1e3:.1f}s, "
                  f"{session.num_tokens} in memory, {len(session)} entries", file=sys.stderr)
        first = True
        while True:
            text = args.prompt if args.prompt is not None else _read_user()
            if text is None or text.strip() in ("/quit", "/exit"):
                break
            if text.strip() == "/stats":
                print(json.dumps(session.stats(), indent=1))
                continue
            if text.strip() == "/focus":
                print(json.dumps(session.focus_map()))
                continue
            if args.raw:
                ids = ([tok.get_bos_token_id()] if first else []) + tok.encode(text)
            else:
                ids = tok.render_for_completion({"messages": [{"role": "user", "content": text}]})
            if not first and not args.raw:
                ids = ids[1:]  # one <|bos|> per conversation
            first = False
            if args.prompt is None:
                print("assistant: ", end="", flush=True)
            elif args.raw:
                print(text, end="", flush=True)
            reply(session, tok, ids, args)
            if args.memory:
                session.save()
            if args.prompt is not None:
                s = session.stats()
                print(f"[memory] {s['tokens']} tokens, {s['entries']}/{s['W']} entries, per level {s['per_level']}, "
                      f"cache reuse {s['cache_reuse']:.2f}", file=sys.stderr)
                break
    finally:
        session.close()


def _read_user():
    try:
        return input("\nuser: ")
    except EOFError:
        return None


if __name__ == "__main__":
    main_guard(main)
