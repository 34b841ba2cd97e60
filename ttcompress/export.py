"""Exporting a model so it runs without ttcompress: a state dict with the source architecture's keys, TorchScript,
or ONNX — each written to a temporary file, read back and checked against the model before it takes the output
path.

The exported network is built by :func:`portable_net`: each TT layer becomes either one dense conv whose kernel is
the exact composition of its factors (``dense=True``; computed in float64 from :func:`ttcompress.tt.effective_factors`)
or ``nn.Sequential(first, core, last)`` — three plain convs, state-dict keys ``NAME.0.weight`` (1×1, Cin→r1),
``NAME.1.weight`` (k×k core, r1→r2, the layer's stride/padding/dilation) and ``NAME.2.weight`` / ``NAME.2.bias``
(1×1, r2→Cout).  Every other key is the architecture's own (e.g. the akamaster ResNet's or torchvision's names).
TorchScript and ONNX hold the normalisation; a state dict holds the network only (its statement names mean/std).

The statement written with each file (safetensors metadata, TorchScript extra file, ONNX metadata property, all
under :data:`STATEMENT_KEY`) records the architecture, normalisation, input size, layout, and — when the model's
history has a finetune bound — that bound with the exact σmax measured on the exported kernels.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ttcompress import archs
from ttcompress import kernel as K
from ttcompress.checkpoint import LoadedModel
from ttcompress.data import ImageSet
from ttcompress.errors import TTCompressError, UserError
from ttcompress.outputs import atomic_write, check_output_path
from ttcompress.tt import TTConv, apply_tt_structure, conv_layers, effective_factors, set_module

FORMATS = ("state-dict", "torchscript", "onnx")
ONNX_OPSET = 17  # LayerNorm as one op (timm ConvNeXt); onnxruntime ≥ 1.11, TensorRT, OpenVINO, ONNX.js support it
STATEMENT_KEY = "ttcompress_export"
TOLERANCE = 1e-4  # largest accepted max|ours − exported| / max|ours|
_BOUND_FLAGS = {"clip_to": "exact periodic σmax", "divide_to": "exact periodic σmax", "fastclip_to": "σmax as it runs"}


class VerificationError(TTCompressError):
    """The exported file does not reproduce the model (nothing was written to the output path)."""


@dataclass
class Check:
    """Ours against the exported file read back, on one set of inputs."""

    inputs: str  # "random" or the data set
    n: int
    max_abs_diff: float
    rel_diff: float  # max_abs_diff / max |our logits|
    accuracy_ours: float | None = None
    accuracy_exported: float | None = None


@dataclass
class ExportReport:
    format: str
    path: str
    dense: bool
    keys: int  # entries of the exported network's state dict
    statement: dict
    checks: list[Check] = field(default_factory=list)
    opset: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


# --- the network that is exported ---------------------------------------------------------------------------------

def dense_conv(layer: TTConv) -> nn.Module:
    """The ``nn.ConvNd`` computing the same map as ``layer``; its kernel is the composition of the factors, in
    float64 from the QR-folded core and orthonormal frames (so its singular values are the core's)."""
    core, frames = effective_factors(layer)
    assert frames is not None
    dtype = layer.core.weight.dtype
    conv = layer.conv_class(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                            padding=layer.padding, dilation=layer.dilation, bias=layer.bias is not None,
                            padding_mode=layer.padding_mode).to(device=layer.core.weight.device, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(K.compose_tt(frames[0], core, frames[1]).to(dtype))
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv.train(layer.training)


def portable_net(net: nn.Module, dense: bool) -> nn.Module:
    """A copy of ``net`` without ttcompress layers: each TT layer folded (``dense``) or three plain convs."""
    out = copy.deepcopy(net)
    for name, layer in list(conv_layers(out)):
        if isinstance(layer, TTConv):
            set_module(out, name, dense_conv(layer) if dense else nn.Sequential(layer.first, layer.core, layer.last))
    return out


def layout(loaded: LoadedModel, dense: bool) -> dict:
    """How the exported keys are laid out (part of the statement)."""
    if dense or not loaded.meta.tt_ranks:
        return {"tt_layers": "none" if not loaded.meta.tt_ranks else "folded into dense convs (exact composition)"}
    return {
        "tt_layers": "NAME.0 = 1x1 conv Cin->r1 (no bias); NAME.1 = kxk core r1->r2 with the original stride, "
                     "padding and dilation (no bias); NAME.2 = 1x1 conv r2->Cout with the original bias",
        "tt_ranks": loaded.meta.tt_ranks,
    }


# --- the bound the exported kernels still meet --------------------------------------------------------------------

def finetune_bound(history: Sequence[dict]) -> dict | None:
    """The conv bound the last finetune in ``history`` enforced (``clip_to``/``divide_to``/``fastclip_to``), or
    None (no finetune, or the last one controlled nothing: an earlier bound no longer applies)."""
    runs = [entry.get("args", {}) for entry in history if entry.get("command") == "finetune"]
    if not runs:
        return None
    args = runs[-1]
    for flag, measure in _BOUND_FLAGS.items():
        if args.get(flag) is not None:
            settings = {k: args[k] for k in ("clip_to", "divide_to", "fastclip_to", "clip_with_bn", "bn_to",
                                             "linear_to") if args.get(k) not in (None, False)}
            if flag == "fastclip_to" and args.get("clip_with_bn"):
                measure = "σmax of conv → BatchNorm as it runs"
            return {"flag": flag, "bound": float(args[flag]), "measure": measure, "finetune": settings}
    return None


def measure_bound(model: nn.Module, net: nn.Module, input_size: Sequence[int], bound: dict) -> dict:
    """``bound`` with the largest σmax over the 2-D convs of ``net`` (inside ``model``; TT layers folded, so each
    conv is one layer's whole map), measured as it says.  A
    bound on conv → BatchNorm (``--clip-with-bn``) is stated, not re-measured (``holds`` None): the exported convs
    compute the same maps, as the read-back check shows."""
    from ttcompress.spectral.methods import network_methods

    if "BatchNorm" in bound["measure"]:
        return {**bound, "max_sigma": None, "convs": None, "holds": None}
    method = "power" if bound["flag"] == "fastclip_to" else "exact"
    rows = network_methods(model, input_size, [method], net=net)
    values = [r.power_zero_padding if method == "power" else r.sigma_max for r in rows if len(r.stride) == 2]
    values = [float(v) for v in values if v is not None]
    worst = max(values) if values else None
    slack = 1.001 if method == "power" else 1.01  # the tolerances of finetune's final verification
    return {**bound, "max_sigma": worst, "convs": len(values),
            "holds": worst is not None and worst <= bound["bound"] * slack}


def statement(loaded: LoadedModel, fmt: str, dense: bool, measured: dict | None) -> dict:
    meta = loaded.meta
    return {"arch": meta.arch, "format": fmt, "normalization": meta.normalization,
            "normalization_inside": fmt != "state-dict", "input_size": meta.input_size,
            "num_classes": meta.num_classes, "layout": layout(loaded, dense), "bound": measured,
            "history": [h.get("command") for h in meta.history]}


# --- writing each format ------------------------------------------------------------------------------------------

def _example(loaded: LoadedModel, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *loaded.input_size), generator=gen)


def _write_state_dict(path: str, suffix: str, module: archs.Normalized, info: dict) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.net.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={STATEMENT_KEY: json.dumps(info, sort_keys=True)})
    else:
        torch.save(tensors, path)


def _write_torchscript(path: str, module: archs.Normalized, example: torch.Tensor, info: dict) -> None:
    with warnings.catch_warnings():  # deprecation notices; Normalized's channel check is fixed at trace time
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, path, _extra_files={f"{STATEMENT_KEY}.json": json.dumps(info, sort_keys=True)})


def _write_onnx(path: str, module: archs.Normalized, example: torch.Tensor, info: dict, opset: int) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated; the dynamo one needs onnxscript
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=True)
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = STATEMENT_KEY, json.dumps(info, sort_keys=True)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("--format onnx needs onnx and onnxruntime: pip install 'ttcompress[export]'") from None


# --- reading each format back -------------------------------------------------------------------------------------

def _reader(fmt: str, path: str, suffix: str, loaded: LoadedModel,
            dense: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the exported file read back from ``path`` (logits of float [0, 1] images)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(path, map_location="cpu").eval()
        return lambda x: scripted(x)
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net = fresh_net(loaded, dense)
    net.load_state_dict(state, strict=True)
    norm = loaded.meta.normalization
    model = archs.Normalized(net, *((norm["mean"], norm["std"]) if norm else (None, None))).eval()
    return lambda x: model(x)


def fresh_net(loaded: LoadedModel, dense: bool) -> nn.Module:
    """A freshly built network of the exported layout: what a user's own module looks like for
    ``load_state_dict(strict=True)`` of an exported state dict.  A pickled module (``--trust-pickle``) has no
    architecture to rebuild: its own exported copy stands in (the file's weights overwrite it)."""
    if loaded.meta.arch.startswith("pickle:"):
        return portable_net(loaded.net, dense)
    info = archs.resolve(loaded.meta.arch)
    net = archs.build_net(info, loaded.meta.num_classes)
    apply_tt_structure(net, loaded.meta.tt_ranks)
    return portable_net(net, dense)


@torch.no_grad()
def compare(ours: Callable[[torch.Tensor], torch.Tensor], exported: Callable[[torch.Tensor], torch.Tensor],
            images: torch.Tensor, labels: torch.Tensor | None, name: str, batch_size: int = 256) -> Check:
    """Logits of both on ``images`` (float [0, 1], NC…): max abs / relative difference and accuracies."""
    diffs, peaks, hits_ours, hits_exp = [], [], 0, 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        a, b = ours(x).float(), exported(x).float()
        diffs.append(float((a - b).abs().max()))
        peaks.append(float(a.abs().max()))
        if labels is not None:
            y = labels[start:start + batch_size]
            hits_ours += int((a.argmax(1) == y).sum())
            hits_exp += int((b.argmax(1) == y).sum())
    worst = max(diffs)
    check = Check(name, len(images), worst, worst / max(max(peaks), 1e-30))
    if labels is not None:
        check.accuracy_ours, check.accuracy_exported = hits_ours / len(images), hits_exp / len(images)
    return check


# --- the whole export ---------------------------------------------------------------------------------------------

def export(
    loaded: LoadedModel,
    out: str | os.PathLike,
    fmt: str,
    *,
    dense: bool = False,
    opset: int = ONNX_OPSET,
    data: ImageSet | None = None,
    inputs: Sequence[str | os.PathLike | None] = (),
    batch_size: int = 256,
) -> ExportReport:
    """Write ``loaded`` to ``out`` in format ``fmt`` (one of :data:`FORMATS`) and verify it.

    The file is written beside ``out``, read back the way a user would (``load_state_dict(strict=True)`` into a fresh
    network, ``torch.jit.load``, onnxruntime) and run on random inputs in [0, 1] — and on the images of ``data`` when
    given (their accuracy both ways in the report).  Only when every max abs difference is within
    :data:`TOLERANCE` of the largest logit does it replace ``out``; otherwise :class:`VerificationError` and
    nothing is written.  ``inputs`` are the files ``out`` must not overwrite.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        _need_onnx()
        if not 7 <= opset <= 20:
            raise UserError(f"--opset must be between 7 and 20 (the TorchScript-based exporter), got {opset}")
    if data is not None and tuple(data.image_shape) != tuple(loaded.input_size):
        shape = "×".join(map(str, data.image_shape))
        raise UserError(f"the data's images are {shape} but the model is exported for "
                        f"{'×'.join(map(str, loaded.input_size))} inputs; pass --input-size H W")
    path = check_output_path(out, *inputs)
    suffix = path.suffix.lower()
    model = loaded.model.eval()
    exported_net = portable_net(loaded.net, dense).eval()
    norm = loaded.meta.normalization
    module = archs.Normalized(exported_net, *((norm["mean"], norm["std"]) if norm else (None, None))).eval()

    bound = finetune_bound(loaded.meta.history)
    measured = None
    if bound:  # on the composed kernels: the maps every layout computes (three convs measured apart would not be)
        folded = exported_net if dense else portable_net(loaded.net, True).eval()
        measured = measure_bound(archs.Normalized(folded, None, None), folded, loaded.input_size, bound)
    info = statement(loaded, fmt, dense, measured)
    report = ExportReport(fmt, str(path), dense, 0, info, opset=opset if fmt == "onnx" else None)

    def write(tmp: str) -> None:
        with torch.no_grad():
            if fmt == "state-dict":
                _write_state_dict(tmp, suffix, module, info)
            elif fmt == "torchscript":
                _write_torchscript(tmp, module, _example(loaded, 2, 0), info)
            else:
                _write_onnx(tmp, module, _example(loaded, 2, 0), info, opset)
        report.keys = len(exported_net.state_dict())
        run = _reader(fmt, tmp, suffix, loaded, dense)
        report.checks.append(compare(model, run, _example(loaded, 3, 1), None, "random"))
        if data is not None:
            report.checks.append(compare(model, run, data.float_images(), data.labels, data.source or "data",
                                         batch_size))
        bad = [c for c in report.checks if not np.isfinite(c.rel_diff) or c.rel_diff > TOLERANCE]
        if bad:
            c = bad[0]
            raise VerificationError(
                f"the exported {fmt} file does not reproduce the model on {c.inputs} inputs: max abs difference "
                f"{c.max_abs_diff:.3g} ({c.rel_diff:.3g} of the largest logit, above {TOLERANCE:g}); not written")

    atomic_write(path, write)
    return report


def read_statement(path: str | os.PathLike) -> dict | None:
    """The statement stored in an exported ``.safetensors``, TorchScript or ONNX file (None for a ``.pt`` state
    dict, which holds tensors only)."""
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        import onnx

        props = {e.key: e.value for e in onnx.load(str(p), load_external_data=False).metadata_props}
        return json.loads(props[STATEMENT_KEY]) if STATEMENT_KEY in props else None
    if p.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            meta = fh.metadata() or {}
        return json.loads(meta[STATEMENT_KEY]) if STATEMENT_KEY in meta else None
    extra: dict[str, Any] = {f"{STATEMENT_KEY}.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except RuntimeError:  # not TorchScript: a .pt state dict
        return None
    return json.loads(extra[f"{STATEMENT_KEY}.json"]) if extra[f"{STATEMENT_KEY}.json"] else None


__all__ = ["FORMATS", "ONNX_OPSET", "STATEMENT_KEY", "TOLERANCE", "Check", "ExportReport", "VerificationError",
           "compare", "dense_conv", "export", "finetune_bound", "fresh_net", "portable_net", "read_statement"]
