"""What the final verification found and did for one controlled layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["BoundReport"]


@dataclass
class BoundReport:
    """What the final verification found and did for one controlled layer."""

    name: str
    kind: str  # "conv" | "tt" | "linear" | "bn"
    bound: float
    sigma_before: float  # exact σmax (conv: periodic spectrum; linear: matrix; bn: max |γ/√(var+ε)|)
    sigma_after: float
    reprojections: int = 0  # periodic: re-projections; fastclip: FastClip rounds
    rescale: float | None = None  # factor applied as the last resort
    operator: str = "periodic"  # what σ is of: periodic | zero-padded (MODE-padded) [+bn] | matrix | bn

    @property
    def action(self) -> str:
        did = (f"FastClip ×{self.reprojections}" if "-padded" in self.operator
               else f"re-projected ×{self.reprojections}")
        if self.rescale is not None:
            return f"{did}, rescaled ×{self.rescale:.4g}" if self.reprojections else f"rescaled ×{self.rescale:.4g}"
        if self.reprojections:
            return did
        return "ok"

    def to_json(self) -> dict:
        out = asdict(self)
        out["action"] = self.action
        return out
