"""
Shared plumbing: distributed init, device/dtype choice, rank-0 printing, paths, atomic writes,
and the one error type that scripts turn into a clean one-line message.
"""
import os
import gc
import sys
import json
import tempfile
import contextlib

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). Scripts print it as one line, no trace."""


def fail(msg):
    raise UserError(msg)


def main_guard(fn):
    """Run a script's main(); a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)


def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_init(device_type=None, seed=1337):
    """Init torch + (optionally) torch.distributed. Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda requested but CUDA is not available")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp:
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            device = torch.device(device_type)
            dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    """Tear down the process group. `del` DDP-wrapped modules first: a DDP Reducer that outlives
    destroy_process_group() holds the group last, and its destructor then joins gloo's worker
    thread with the GIL held while that thread waits for the GIL to free a tensor (a deadlock seen
    at the end of a 2-rank CPU torchrun test; PyTorch releases the GIL only when the group's own
    Python object goes last)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()    # modules in reference cycles go now, while the group is still registered
        dist.barrier()  # no rank tears the group down while another still talks to it (gloo hangs)
        dist.destroy_process_group()


def lock_dir(path, what):
    """Take an exclusive, non-blocking flock on directory `path` (one writer per tree/memory);
    returns the fd to os.close() when done. Another holder is a clear error."""
    import fcntl
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        fail(f"{what} at {path} is already open (one writer per {what.split()[-1]})")
    return fd


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def get_base_dir():
    """Where runs, tokenizers, data and checkpoints live. Override with NANOCHAT_BASE_DIR."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def autocast_ctx(device_type, dtype=torch.bfloat16):
    if device_type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


INFERENCE_DTYPES = ("auto", "float32", "bfloat16")


def inference_dtype(name, device_type):
    """The weight dtype for serving (--dtype of chat_cli / chat_web). auto: bfloat16 on CUDA, which
    is what bench_decode measures (no per-step weight casts under autocast, half the weight
    memory), float32 elsewhere. A memory's model id includes the dtype: memories made under one
    open only under the same."""
    if name not in INFERENCE_DTYPES:
        fail(f"--dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, name)


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def to_device(x, device):
    """A host array (numpy, a list of numpy arrays to concatenate, or a CPU tensor) on `device`.
    On CUDA through pinned memory and non_blocking: a copy from pageable memory synchronizes the
    stream, so the host would wait for all the work it queued before (a decode loop's copies then
    serialize host and device). A list is concatenated straight into the pinned block, which is
    the caching host allocator's, kept until the copy is done."""
    device = torch.device(device)
    if isinstance(x, list):
        if device.type != "cuda":
            return torch.from_numpy(np.concatenate(x)).to(device)
        buf = torch.empty((sum(map(len, x)),) + x[0].shape[1:], dtype=torch.from_numpy(x[0][:0]).dtype, pin_memory=True)
        np.concatenate(x, out=buf.numpy())
        return buf.to(device, non_blocking=True)
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _umask_chmod(fd):
    """mkstemp makes 0600 files; give them the mode a plain open() would (0666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def atomic_write_bytes(path, data: bytes):
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    _umask_chmod(fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj, path):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    _umask_chmod(fd)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# bf16 peak dense FLOP/s per GPU, for MFU. Unknown GPUs report MFU as 0 rather than a made-up number.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for k, v in PEAK_FLOPS.items():
        if k in name:
            return v
    return None
