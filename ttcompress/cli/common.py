"""Options and helpers shared by the commands."""

from __future__ import annotations

from pathlib import Path

import typer

from ttcompress.errors import UserError

ArchOpt = typer.Option(None, "--arch", help="Architecture of a foreign checkpoint: resnet20…110, resnet18-cifar, "
                       "wrn16-10, vgg19, torchvision:NAME, timm:NAME or path/to/file.py:Class (see `ttcompress "
                       "archs`). Not needed for ttcompress files.")
MeanOpt = typer.Option(None, "--mean", help="Input normalisation mean, comma-separated (overrides the default).")
StdOpt = typer.Option(None, "--std", help="Input normalisation std, comma-separated (overrides the default).")
TrustOpt = typer.Option(False, "--trust-pickle", help="UNSAFE: allow full unpickling (runs code from the file). "
                        "Only for checkpoints from a source you trust that hold a whole pickled nn.Module.")
KeyPrefixOpt = typer.Option(None, "--key-prefix", help="Where the weights sit in the file, dotted through nested "
                            "entries (e.g. state_dict_ema. or state_dict.model.); stripped from the keys. '' keeps "
                            "the keys as they are. Default: guessed (module., model., state_dict, …).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{what} is empty")
    return values  # finite and positive: checked where the normalisation is built (archs.Normalized)


def load_model(checkpoint: Path, arch: str | None, mean: str | None, std: str | None, trust: bool,
               input_size: list[int] | None = None, key_prefix: str | None = None):
    from ttcompress.checkpoint import load

    if input_size and (len(input_size) != 2 or min(input_size) <= 0):
        raise UserError("--input-size takes two positive integers: H W")
    loaded = load(checkpoint, arch=arch, mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"),
                  trust_pickle=trust, key_prefix=key_prefix)
    if input_size:
        loaded.meta.input_size = [loaded.meta.input_size[0], int(input_size[0]), int(input_size[1])]
    return loaded




def arch_file(arch: str | None) -> Path | None:
    """The Python file an ``--arch file.py:Class`` names: an input no output may replace."""
    from ttcompress.archs import source_file

    return source_file(arch) if arch else None
