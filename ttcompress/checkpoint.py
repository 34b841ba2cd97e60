"""Reading checkpoints safely in every common form, and writing ttcompress's own safetensors files atomically.

Read: torch zip files and legacy (pre-1.6) files via ``torch.load(weights_only=True)``, safetensors; a bare state
dict or one nested under ``state_dict`` / ``model``; ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile)
prefixes stripped; missing BatchNorm ``num_batches_tracked`` tolerated.  A file that needs full unpickling (a
pickled ``nn.Module``, custom classes) is refused unless the caller opts in with ``trust_pickle=True`` — unpickling
can execute arbitrary code.

Write: ``.safetensors`` with one metadata entry ``ttcompress`` holding JSON (:class:`ModelMeta`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import pickle
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ttcompress import archs
from ttcompress.errors import CheckpointError, UserError
from ttcompress.outputs import atomic_write
from ttcompress.tt import apply_tt_structure, tt_ranks

FORMAT_VERSION = 1
META_KEY = "ttcompress"
_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")  # wrappers: DataParallel, torch.compile, Lightning
_CONTAINERS = ("state_dict", "model", "model_state_dict", "net")
_EMA_CONTAINERS = ("state_dict_ema", "model_ema")
_EMA_HEADS = ("model_ema", "ema_model", "ema")


@dataclass
class ModelMeta:
    """What a ttcompress output file says about its model (stored as JSON in the safetensors metadata)."""

    arch: str
    normalization: dict | None
    input_size: list[int]
    num_classes: int
    tt_ranks: dict[str, list[int]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelMeta":
        """Parse and validate the stored JSON: every field's type and range is checked here, before anything is
        built from it (a file's metadata is as untrusted as its tensors)."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(f"malformed ttcompress metadata: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError("malformed ttcompress metadata: expected a JSON object")
        version = data.get("format_version", 1)
        if not _is_int(version) or version < 1:
            raise CheckpointError(f"malformed ttcompress metadata: format_version {version!r} is not a positive integer")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"file was written by a newer ttcompress (format {version}); upgrade ttcompress")
        for key in ("arch", "input_size", "num_classes"):
            if key not in data:
                raise CheckpointError(f"malformed ttcompress metadata: no {key!r}")
        return cls(
            arch=_meta_arch(data["arch"]),
            normalization=_meta_normalization(data.get("normalization")),
            input_size=_meta_input_size(data["input_size"]),
            num_classes=_meta_int(data["num_classes"], "num_classes", 1, MAX_CLASSES),
            tt_ranks=_meta_ranks(data.get("tt_ranks", {})),
            history=_meta_history(data.get("history", [])),
            format_version=version,
        )


# --- metadata schema ------------------------------------------------------------------------------------------------

MAX_CLASSES = 1_000_000
MAX_SIDE = 65_536          # one spatial side of the input
MAX_INPUT_ELEMENTS = 2**28  # one input (C·H·W…): 1 GiB in float32
MAX_HISTORY = 100_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(what: str) -> CheckpointError:
    return CheckpointError(f"malformed ttcompress metadata: {what}")


def _meta_int(value: Any, name: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise _bad(f"{name} must be an integer in {low}..{high}, got {value!r:.60}")
    return value


def _meta_arch(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 4096 or any(ord(c) < 32 for c in value):
        raise _bad(f"arch must be a non-empty one-line string, got {value!r:.60}")
    return value


def _finite_list(value: Any, name: str) -> list[float]:
    if not isinstance(value, list) or not 1 <= len(value) <= 4096:
        raise _bad(f"normalization {name} must be a list of 1..4096 numbers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _bad(f"normalization {name} holds {v!r:.40}, not a finite number")
        out.append(float(v))
    return out


def _meta_normalization(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise _bad("normalization must be null or an object with exactly 'mean' and 'std'")
    mean, std = _finite_list(value["mean"], "mean"), _finite_list(value["std"], "std")
    if len(mean) != len(std):
        raise _bad(f"normalization mean has {len(mean)} values and std {len(std)}")
    if any(s <= 0 for s in std):
        raise _bad("normalization std values must be positive")
    return {"mean": mean, "std": std}


def _meta_input_size(value: Any) -> list[int]:
    if not isinstance(value, list) or not 2 <= len(value) <= 4:
        raise _bad(f"input_size must be a list of 2 to 4 integers (C, *spatial), got {value!r:.60}")
    size = [_meta_int(v, "input_size", 1, MAX_SIDE) for v in value]
    if math.prod(size) > MAX_INPUT_ELEMENTS:
        raise _bad(f"input_size {size} has more than {MAX_INPUT_ELEMENTS} elements")
    return size


def _meta_ranks(value: Any) -> dict[str, list[int]]:
    if not isinstance(value, dict):
        raise _bad("tt_ranks must be an object {layer: [r1, r2]}")
    out = {}
    for name, ranks in value.items():
        if not name or len(name) > 1024 or not isinstance(ranks, list) or len(ranks) != 2:
            raise _bad(f"tt_ranks entry {name!r:.60} must be [r1, r2]")
        out[name] = [_meta_int(r, f"TT rank of {name}", 1, 2**20) for r in ranks]
    return out


def _meta_history(value: Any) -> list[dict]:
    if not isinstance(value, list) or len(value) > MAX_HISTORY or not all(isinstance(e, dict) for e in value):
        raise _bad("history must be a list of objects")
    return value


@dataclass
class LoadedModel:
    """A network behind its normalisation, with the metadata that travels with it."""

    model: archs.Normalized
    meta: ModelMeta
    source: Path | None = None

    @property
    def net(self) -> nn.Module:
        return self.model.net

    @property
    def input_size(self) -> tuple[int, ...]:
        """Shape of one input without the batch dim: ``(C, H, W)`` for images, ``(C, L)`` / ``(C, D, H, W)`` for
        1-D / 3-D models."""
        return tuple(int(v) for v in self.meta.input_size)


# --- reading ------------------------------------------------------------------------------------------------------

def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 100 * 2**20 and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], ModelMeta | None]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc
    meta = ModelMeta.from_json(metadata[META_KEY]) if META_KEY in metadata else None
    return tensors, meta


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not trust_pickle and ("Unsupported global" in text or "GLOBAL" in text):
            raise CheckpointError(
                f"{path} contains pickled Python objects beyond tensors (e.g. a whole nn.Module); refusing to "
                "unpickle it because that can run arbitrary code. If you trust its source, pass --trust-pickle"
            ) from exc
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
        raise CheckpointError(
            f"cannot read {path}: not a valid PyTorch checkpoint, corrupt or truncated ({_first_line(detail)})"
        ) from exc
    except Exception as exc:  # garbage bytes surface as any of RuntimeError, EOFError, KeyError, IndexError, …
        raise CheckpointError(
            f"cannot read {path}: not a valid PyTorch or safetensors checkpoint, or truncated ({_first_line(str(exc))})"
        ) from exc


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no detail"
    return line[:160]


def _wrapper_chain(keys: Sequence[str]) -> str:
    """The wrapper prefixes (:data:`_PREFIXES`, e.g. ``model.module.``) that every key shares, outermost first."""
    chain, keys = "", list(keys)
    while keys and all("." in k for k in keys):
        heads = {k.split(".", 1)[0] + "." for k in keys}
        if len(heads) != 1 or not heads <= set(_PREFIXES):
            break
        head = heads.pop()
        chain += head
        keys = [k[len(head):] for k in keys]
    return chain


def _strip_prefixes(state: Mapping[str, Any], key_prefix: str | None = None, where: str = "") -> dict[str, Any]:
    """The keys of ``state`` without their wrapper prefix.

    ``key_prefix`` given: keep exactly the keys that start with it, stripped of it (``""`` keeps every key as it
    is).  Otherwise guess: strip the wrappers every key shares (``module.`` of DataParallel, ``_orig_mod.`` of
    torch.compile, ``model.`` / ``net.`` of a Lightning module); keys split between wrappers and EMA copies
    (``model.`` and ``model_ema.``) are ambiguous and need ``key_prefix`` (``where``: the keys' own prefix in the
    file, for the message).
    """
    if key_prefix is not None:
        out = {k[len(key_prefix):]: v for k, v in state.items() if k.startswith(key_prefix)}
        if not out:
            heads = sorted({k.split(".", 1)[0] + "." for k in state})
            raise CheckpointError(f"no key starts with --key-prefix {key_prefix!r}; the checkpoint's keys start with "
                                  f"{', '.join(heads[:8])}{' …' if len(heads) > 8 else ''}")
        return out
    heads = sorted({k.split(".", 1)[0] for k in state})
    if len(heads) > 1 and all(h + "." in _PREFIXES or h in _EMA_HEADS for h in heads):
        choices = [f"{where}{h}.{_wrapper_chain([k[len(h) + 1:] for k in state if k.startswith(h + '.')])}"
                   for h in heads]
        raise CheckpointError(f"the checkpoint holds several weight sets ({', '.join(heads)}); choose one with "
                              + " or ".join(f"--key-prefix {c}" for c in choices))
    chain = _wrapper_chain(list(state))
    return {k[len(chain):]: v for k, v in state.items()}


def extract_state_dict(
    obj: Any, key_prefix: str | None = None
) -> tuple[dict[str, torch.Tensor] | None, nn.Module | None]:
    """Find the state dict inside whatever ``torch.load`` returned; or the module, for a pickled nn.Module.

    Without ``key_prefix`` the weights are looked for at the top level or under ``state_dict`` / ``model`` /
    ``model_state_dict`` / ``net`` (a Lightning checkpoint, timm's ``checkpoint-N.pth.tar``, torchvision's reference
    scripts), else under an EMA copy (``state_dict_ema`` / ``model_ema``); a file holding both the weights and their
    EMA copy is ambiguous.  ``key_prefix`` addresses nested entries with dots, e.g. ``state_dict_ema.`` or
    ``state_dict.model.`` (a Lightning module's ``self.model``).
    """
    if isinstance(obj, nn.Module):
        return None, obj
    if isinstance(obj, Mapping) and key_prefix is not None:
        flat: dict[str, torch.Tensor] = {}
        pending: list[tuple[str, Any]] = [("", obj)]
        while pending:
            head, node = pending.pop()
            for k, v in node.items():
                if isinstance(v, torch.Tensor):
                    flat[f"{head}{k}"] = v
                elif isinstance(v, Mapping):
                    pending.append((f"{head}{k}.", v))
        return _strip_prefixes(flat, key_prefix), None
    if isinstance(obj, Mapping):
        def weights(key: str) -> Any:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or (
                isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                return inner
            return None

        plain = [k for k in _CONTAINERS if weights(k) is not None]
        ema = [k for k in _EMA_CONTAINERS if weights(k) is not None]
        if plain and ema:
            choices = [f"{k}.{_wrapper_chain(list(obj[k]))}" for k in (plain[0], ema[0])
                       if isinstance(obj[k], Mapping)]
            raise CheckpointError(f"the checkpoint holds the weights ({plain[0]}) and an EMA copy ({ema[0]}); choose "
                                  "one with " + " or ".join(f"--key-prefix {c}" for c in choices))
        for key in plain + ema:
            inner = weights(key)
            if isinstance(inner, nn.Module):
                return None, inner
            tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
            return _strip_prefixes(tensors, where=f"{key}."), None
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return _strip_prefixes(tensors), None
    raise CheckpointError(
        "no state dict found: expected tensors at the top level or under 'state_dict' / 'model' / 'state_dict_ema'"
    )


@dataclass
class RawCheckpoint:
    state_dict: dict[str, torch.Tensor] | None
    module: nn.Module | None
    meta: ModelMeta | None


def read(path: str | os.PathLike, *, trust_pickle: bool = False, key_prefix: str | None = None) -> RawCheckpoint:
    """Read a checkpoint file into tensors (and ttcompress metadata when present); ``key_prefix`` as in
    :func:`extract_state_dict`."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such checkpoint file: {p}")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory, not a checkpoint file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty")
    if _is_safetensors(p):
        tensors, meta = _read_safetensors(p)
        exact = "" if meta is not None and key_prefix is None else key_prefix  # our own files: keys as written
        return RawCheckpoint(_strip_prefixes(tensors, exact), None, meta)
    with torch.serialization.safe_globals([argparse.Namespace]):  # timm / torchvision scripts store their args
        obj = _torch_load(p, trust_pickle)
    state, module = extract_state_dict(obj, key_prefix)
    return RawCheckpoint(state, module, None)


def _mismatch_message(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], arch: str) -> str | None:
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in given and k not in optional]
    unexpected = [k for k in given if k not in expected]
    misshaped = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or misshaped):
        return None

    def few(items: list[str]) -> str:
        more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
        return ", ".join(items[:3]) + more

    parts = []
    if missing:
        parts.append(f"missing {few(missing)}")
    if unexpected:
        parts.append(f"unexpected {few(unexpected)}")
    if misshaped:
        parts.append(f"misshaped (checkpoint vs arch) {few(misshaped)}")
    return f"checkpoint does not match --arch {arch}: " + "; ".join(parts)


def load_state_into(net: nn.Module, state: Mapping[str, torch.Tensor], arch: str) -> None:
    """Copy ``state`` into ``net`` bit-exactly after checking keys and shapes (clear error otherwise)."""
    expected = net.state_dict()
    problem = _mismatch_message(expected, state, arch)
    if problem:
        raise CheckpointError(problem)
    with torch.no_grad():
        for key, target in expected.items():
            if key in state:
                target.copy_(state[key].to(target.dtype))


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or ±Inf, naming the first such tensor."""
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value).all()):
                bad = "NaN" if bool(torch.isnan(value).any()) else "an infinite value"
                raise CheckpointError(f"the weights hold {bad}: {key} is not finite; refusing to use them")


def check_ranks_present(ranks: Mapping[str, Sequence[int]], state: Mapping[str, torch.Tensor]) -> None:
    """The TT ranks the metadata claims must be those of the tensors actually stored (so nothing larger than the
    file's own tensors is ever built from metadata)."""
    for name, (r1, r2) in ranks.items():
        first, core, last = (state.get(f"{name}.{part}.weight") for part in ("first", "core", "last"))
        if first is None or core is None or last is None:
            raise CheckpointError(f"metadata names TT layer {name!r}, but the file has no {name}.first/core/last "
                                  "weights")
        if (first.ndim < 2 or core.ndim < 2 or last.ndim < 2 or first.shape[0] != r1 or
                tuple(core.shape[:2]) != (r2, r1) or last.shape[1] != r2):
            raise CheckpointError(f"metadata gives TT layer {name!r} ranks ({r1}, {r2}), which its stored weights "
                                  f"do not have ({tuple(first.shape)}, {tuple(core.shape)}, {tuple(last.shape)})")


def _num_classes_in(info: archs.ArchInfo, state: Mapping[str, torch.Tensor]) -> int | None:
    if not info.takes_num_classes:
        return None
    probe = archs.build_net(info)
    key = archs.last_linear_key(probe)
    if key and key in state and state[key].ndim == 2:
        return int(state[key].shape[0])
    return None


def load(
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | None = None,
    trust_pickle: bool = False,
    key_prefix: str | None = None,
) -> LoadedModel:
    """Load any supported checkpoint as a :class:`LoadedModel` (network + normalisation + metadata).

    ``arch`` is needed for foreign checkpoints and optional for ttcompress outputs (their metadata names it);
    ``key_prefix`` chooses the weights inside the file (:func:`extract_state_dict`).
    """
    raw = read(path, trust_pickle=trust_pickle, key_prefix=key_prefix)
    if raw.module is not None:
        net = raw.module.float().eval()
        check_finite(net.state_dict())
        meta = ModelMeta(arch=f"pickle:{Path(path).resolve()}", normalization=None,
                         input_size=list(input_size or (3, 32, 32)),
                         num_classes=archs.classifier_out_features(net) or 0, tt_ranks=tt_ranks(net))
        if mean is not None or std is not None:
            meta.normalization = {"mean": list(mean or []), "std": list(std or [])}
        model = archs.Normalized(net, mean, std)
        return LoadedModel(model, meta, Path(path))

    assert raw.state_dict is not None
    check_finite(raw.state_dict)
    stored = raw.meta
    spec = arch or (stored.arch if stored else None)
    if spec is None:
        raise UserError(f"{path} is not a ttcompress file: pass --arch to say which network it holds")
    if arch is None and archs.names_code(spec):
        raise UserError(f"{path} was made from the architecture file {spec!r}; a checkpoint never makes ttcompress run "
                        f"code: if you trust that file, pass --arch {spec}")
    info = archs.resolve(spec)
    num_classes = (stored.num_classes if stored and stored.arch == spec else None) or _num_classes_in(info, raw.state_dict)
    net = archs.build_net(info, num_classes)
    if stored and stored.tt_ranks:
        check_ranks_present(stored.tt_ranks, raw.state_dict)
        apply_tt_structure(net, stored.tt_ranks)
    load_state_into(net, raw.state_dict, spec)
    net.eval()

    if mean is not None or std is not None:
        norm_mean, norm_std = mean, std
    elif stored is not None:
        norm = stored.normalization
        norm_mean, norm_std = (norm["mean"], norm["std"]) if norm else (None, None)
    else:
        norm_mean, norm_std = info.mean, info.std
    model = archs.Normalized(net, norm_mean, norm_std).eval()
    size = list(input_size or (stored.input_size if stored else info.input_size))
    meta = ModelMeta(
        arch=spec,
        normalization=model.normalization,
        input_size=size,
        num_classes=archs.classifier_out_features(net) or (num_classes or info.num_classes),
        tt_ranks=tt_ranks(net),
        history=list(stored.history) if stored else [],
    )
    return LoadedModel(model, meta, Path(path))


def initialize(
    arch: str,
    *,
    seed: int = 0,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LoadedModel:
    """A freshly initialised ``arch`` (registry name, ``torchvision:NAME`` or ``file.py:Class``) as a
    :class:`LoadedModel`, its weights drawn from ``torch``'s default initialisers under ``seed`` — the start of a
    run trained from scratch (e.g. the paper's LipConvNet / SOC-TT rows)."""
    if num_classes is not None and num_classes < 1:
        raise UserError(f"--num-classes must be a positive integer, got {num_classes}")
    info = archs.resolve(arch)
    state = torch.random.get_rng_state()  # the caller's random stream is left as it was
    try:
        torch.manual_seed(seed)
        model = archs.build(arch, num_classes=num_classes, mean=mean, std=std)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    meta = ModelMeta(
        arch=arch,
        normalization=model.normalization,
        input_size=list(info.input_size),
        num_classes=archs.classifier_out_features(model.net) or (num_classes or info.num_classes),
        tt_ranks=tt_ranks(model.net),
    )
    return LoadedModel(model, meta, None)


# --- writing ------------------------------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_args(path: str | os.PathLike, arch: str | None) -> dict[str, Any]:
    """What a history entry records of the checkpoint a model came from: its absolute path, its SHA-256 (so that
    ``finetune --teacher auto`` can find it again and refuse it when it changed) and the ``--arch`` it was read
    with."""
    p = Path(path)
    return {"checkpoint": str(p.absolute()), "checkpoint_sha256": file_sha256(p), "arch": arch}


def history_entry(command: str, **args: Any) -> dict:
    from ttcompress import __version__

    clean = {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()}
    return {
        "command": command,
        "args": clean,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ttcompress": __version__,
    }


def save(loaded: LoadedModel, path: str | os.PathLike, entry: dict | None = None) -> Path:
    """Write ``loaded`` as safetensors + metadata (atomically), appending ``entry`` to its history."""
    from safetensors.torch import save_file

    net = loaded.net
    loaded.meta.tt_ranks = tt_ranks(net)
    loaded.meta.normalization = loaded.model.normalization
    if entry is not None:
        loaded.meta.history.append(entry)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    metadata = {META_KEY: loaded.meta.to_json()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
