"""Reading config files and the resolved `config.json` a training run writes.

A run's `WORKDIR/config.json` is the exact config it trained with (overrides
applied), so `maskgen.bundle.load` rebuilds the same models without the
original config file or command line. Each checkpoint step also carries that
JSON (`maskgen.checkpoint`); `load` prefers the step's copy, config.json is
the fallback for steps written before steps carried one.
"""
import importlib.util
import json
import os
import time
from collections.abc import Sequence

import ml_collections
from etils import epath

from maskgen import paths

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Runs `get_config()` (or `get_config(arg)`) of a Python config file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location("_maskgen_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The config as sorted, indented JSON (tuples become lists)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


# Blocks every maskgen config has (configs/common.py); a JSON file without them is not a maskgen config.
REQUIRED_KEYS = ("image_size", "image_channels", "num_classes", "tokenizer", "transformer", "sampling")


def from_json(text: str, where: str = "config JSON") -> ml_collections.ConfigDict:
    """Inverse of `to_json`; the result is locked so typos in key names fail.

    A file that is not JSON, or JSON that is not a maskgen config, is a ValueError naming `where`
    (not a UnicodeDecodeError or an AttributeError from deep inside model building).
    """
    try:
        data = json.loads(text)
    except ValueError as err:  # JSONDecodeError
        raise ValueError(f"{where} is not valid JSON ({err}); restore it from a config.<time>.json "
                         "beside it, or pass the config file it was trained with") from None
    return from_dict(data, where)


def from_dict(data: object, where: str = "config JSON") -> ml_collections.ConfigDict:
    """A locked ConfigDict from parsed `to_json` output (config.json, a checkpoint step's `config` item)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} holds a JSON {type(data).__name__}, not a maskgen config")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{where} is not a maskgen config: it lacks {missing}")
    if isinstance(data.get("stages"), list):
        data["stages"] = tuple(data["stages"])
    cfg = ml_collections.ConfigDict(data)
    cfg.lock()
    return cfg


def _atomic_write(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes `workdir/config.json` atomically; returns its path.

    When a different config.json is already there it is kept as `config.<UTC time>.json` first, so the
    config every earlier checkpoint was written with stays in the workdir.
    """
    directory = paths.as_path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    text = to_json(cfg)
    if path.exists():
        old = path.read_bytes()
        if old == text.encode():
            return str(path)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        history = directory / f"config.{stamp}.json"
        n = 1
        while history.exists():
            history, n = directory / f"config.{stamp}.{n}.json", n + 1
        _atomic_write(history, old.decode("utf-8", errors="replace"))
    _atomic_write(path, text)
    return str(path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config.json of a workdir; a ValueError naming the file when it is missing or not a config."""
    path = paths.as_path(workdir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{workdir} has no config.json: not a maskgen training directory")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file (binary garbage?): not a maskgen config.json") from None
    return from_json(text, where=str(path))


def _config_dirs() -> list[str]:
    return [os.path.join(os.getcwd(), "configs"), os.path.join(_REPO, "configs")]


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A maskgen config from a ConfigDict, a config file path, or a name in configs/ ('imagenet256')."""
    if isinstance(config, ml_collections.ConfigDict):
        return config
    if not isinstance(config, (str, os.PathLike)):
        raise ValueError(f"config must be a name, a path or a ConfigDict, got {type(config).__name__}")
    name = os.fspath(config)
    if os.path.isfile(name):
        return load_config_file(name)
    for directory in _config_dirs():
        for candidate in (name, name + ".py"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return load_config_file(path)
    known = sorted({f[:-3] for d in _config_dirs() if os.path.isdir(d)
                    for f in os.listdir(d) if f.endswith(".py") and f != "common.py"})
    raise ValueError(f"unknown config {name!r}: not a file, and not one of {known}")


CONFIG_FLAG_PREFIX = "--config."


def split_config_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other arguments, ["a.b=value", ...]) from argv's `--config.a.b=value` arguments.

    Lets argparse-based scripts (the benches) take the same overrides as train.py's
    ml_collections flags.
    """
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith(CONFIG_FLAG_PREFIX):
            body = arg[len(CONFIG_FLAG_PREFIX):]
            if "=" not in body:
                raise ValueError(f"{arg!r}: write config overrides as --config.KEY=VALUE")
            overrides.append(body)
        else:
            rest.append(arg)
    return rest, overrides


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str],
                    flag: str = "--config.") -> ml_collections.ConfigDict:
    """`a.b=value` strings onto a config, each value parsed as the type of the key it replaces.

    Unknown keys raise (naming the flag), so a typo never benchmarks the default.
    Keys whose current value is None or a list take JSON (`null`, `[1, 2]`) or a bare string.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"{flag}{item}: expected KEY=VALUE")
        *parents, leaf = key.strip().split(".")
        node = cfg
        for name in parents:
            if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
                raise ValueError(f"{flag}{item}: the config has no key {key!r}")
            node = node[name]
        if leaf not in node:
            raise ValueError(f"{flag}{item}: the config has no key {key!r}")
        old = node[leaf]
        try:
            if isinstance(old, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1")
            elif isinstance(old, (int, float, str)):
                value = type(old)(text)
            else:
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = text
        except ValueError:
            raise ValueError(f"{flag}{item}: {text!r} is not a {type(old).__name__}") from None
        with cfg.unlocked():
            node[leaf] = value
    return cfg
