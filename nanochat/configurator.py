"""
Run configuration: a script declares a @dataclass of settings; `--config preset.toml` fills it
and `--key value` / `--key=value` flags override. Unknown keys, bad types and missing files stop
with one clear message. TOML files may hold a [section] per script; only the script's own
section and the top level are read, and any key there must be a field of the dataclass.
"""
import os
import sys
import dataclasses

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from nanochat.common import fail

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _coerce(name, value, default):
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        fail(f"--{name} expects a boolean, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            fail(f"--{name} expects an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            fail(f"--{name} expects an integer, got {value!r}")
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            fail(f"--{name} expects a number, got {value!r}")
    if default is None or isinstance(default, str):
        return value if isinstance(value, str) or value is None else str(value)
    return value


def resolve_config_path(path):
    if os.path.exists(path):
        return path
    cand = os.path.join(CONFIG_DIR, path if path.endswith(".toml") else path + ".toml")
    if os.path.exists(cand):
        return cand
    fail(f"config file not found: {path} (presets: {', '.join(sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith('.toml')))})")


def load_toml(path, section):
    path = resolve_config_path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        fail(f"config {path} is not valid TOML: {e}")
    out = {k: v for k, v in data.items() if not isinstance(v, dict)}
    out.update(data.get(section, {}))
    return out, path


def flag_pairs(argv):
    """argv -> [(key, value)]: --key=value, --key value, or a bare --flag ("true"); dashes in
    keys become underscores."""
    pairs, i = [], 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            fail(f"unexpected argument {a!r} (flags look like --key=value)")
        a = a[2:]
        if "=" in a:
            k, v = a.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            k, v = a, argv[i + 1]
            i += 1
        else:
            k, v = a, "true"  # bare flag
        pairs.append((k.replace("-", "_"), v))
        i += 1
    return pairs


def config_preset(argv):
    """The --config preset these flags name (the last one), or None."""
    return next((v for k, v in reversed(flag_pairs(argv)) if k == "config"), None)


def parse_config(cls, argv=None, section=None):
    """Build a `cls` instance from defaults <- --config file <- CLI flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    pairs = flag_pairs(argv)
    if any(k in ("h", "help") for k, _ in pairs):
        print(f"options ({cls.__name__}):")
        for name, f in fields.items():
            print(f"  --{name.replace('_', '-')} (default: {getattr(defaults, name)!r})")
        sys.exit(0)
    values = {}
    for k, v in pairs:
        if k == "config":
            file_vals, path = load_toml(v, section or cls.__name__)
            for fk, fv in file_vals.items():
                if fk not in fields:
                    fail(f"unknown key {fk!r} in config {path} (valid: {', '.join(fields)})")
                values[fk] = _coerce(fk, fv, getattr(defaults, fk))
    for k, v in pairs:
        if k == "config":
            continue
        if k not in fields:
            fail(f"unknown option --{k.replace('_', '-')} (see --help)")
        values[k] = _coerce(k, v, getattr(defaults, k))
    return dataclasses.replace(defaults, **values)
