"""`ttcompress archs` and `ttcompress recipes`."""

from __future__ import annotations

from ttcompress.cli import app, handles_errors
from ttcompress.cli.common import JsonOpt


@app.command("archs")
@handles_errors
def archs_command(as_json: bool = JsonOpt) -> None:
    """List what --arch accepts: names, input size, classes, normalisation.

    Example: ttcompress archs --json
    """
    from ttcompress.catalog import arch_catalog
    from ttcompress.ui import out_console, print_json, table

    rows = arch_catalog()
    if as_json:
        print_json({"archs": rows})
        return

    def norm(row: dict) -> str:
        n = row["normalization"]
        if n is None:
            return "none" if row["kind"] == "registry" else "per model"
        return "mean " + ", ".join(f"{v:.4g}" for v in n["mean"]) + " / std " + ", ".join(f"{v:.4g}" for v in n["std"])

    out_console.print(table("--arch", ["name", "input", "classes", "normalisation", "description"], [
        [r["name"], "×".join(map(str, r["input_size"])) if r["input_size"] else "per model",
         str(r["num_classes"]) if r["num_classes"] else "from checkpoint", norm(r), r["description"]]
        for r in rows
    ], justify_numbers=False))


@app.command("recipes")
@handles_errors
def recipes_command(as_json: bool = JsonOpt) -> None:
    """List the shipped finetune recipes (--recipe NAME): data, length, control, description.

    Example: ttcompress recipes --json
    """
    from ttcompress.catalog import recipe_catalog
    from ttcompress.ui import out_console, print_json, table

    rows = recipe_catalog()
    if as_json:
        print_json({"recipes": rows})
        return
    out_console.print(table("--recipe", ["name", "arch", "data", "length", "control", "description"], [
        [r["name"], r["arch"] or "", r["data"] or "",
         f"{r['epochs']} epochs" if r["epochs"] else f"{r['steps']} steps",
         ", ".join(f"{k}={v:g}" for k, v in r["control"].items()), r["description"] or ""]
        for r in rows
    ], justify_numbers=False))
