"""The tables `tunelab advise` prints: one run's breakdown (`advise_table`), or every method
(`methods_table`), from the dictionaries recipes/advise.py returns."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def human(n: float) -> str:
    """Bytes in binary units (the units --memory takes), 3 significant digits: 1.5 GiB, 794 KiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def count(n: int) -> str:
    """67.7K, 4.72M, 6.74B."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _optimizer_note(kind: str) -> str:
    return {"adamw": "AdamW: exp_avg + exp_avg_sq in the parameter's dtype",
            "paged_adamw_32bit": "paged AdamW 32-bit: two fp32 states (may spill to host memory)",
            "paged_adamw_8bit": "paged AdamW 8-bit: two uint8 states + block absmax (may spill to host memory)",
            }.get(kind, kind)


def advise_table(r: dict[str, Any]) -> Any:
    """The rich table of one `advise` result."""
    b, p, a = r["bytes"], r["parameters"], r["bytes"]["activations"]
    title = (f"{r['method']['name']} on {r['model']['type']} ({p['total']:,} parameters, {r['model']['layers']} "
             f"blocks), {r['objective']['name']}, batch {r['batch']} x seq {r['seq']}, {r['precision']}, {r['device']}")
    t = Table(title=title, title_justify="left")
    for col, just in (("component", "left"), ("memory", "right"), ("detail", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for kind, n in b["weights"].items():
        detail = "4-bit codes + block absmax + double-quantisation constants" if kind == "nf4" else ""
        t.add_row(f"weights ({kind})", human(n), detail)
    share = 100 * p["trainable"] / max(p["total"], 1)
    t.add_row("trainable parameters", f"{p['trainable']:,}", f"{share:.3g} % of the model")
    t.add_row("gradients", human(b["gradients"]), "one per trainable parameter, in its dtype")
    t.add_row("optimizer states", human(b["optimizer"]), _optimizer_note(r["optimizer"]))
    ckpt = r["gradient_checkpointing"]
    t.add_row("activations" + (" (checkpointed)" if ckpt else ""), human(a["used"]),
              f"without checkpointing {human(a['without_checkpointing'])}; with {human(a['with_checkpointing'])} "
              f"(+ {human(a['recompute'])} while one block is recomputed)")
    if a["autocast_weight_copies"] and not ckpt:
        t.add_row("  of which weight copies", human(a["autocast_weight_copies"]), "2-byte copies autocast saves for "
                  "backward (set model.dtype=bfloat16 to avoid)")
    for x in b["extras"]:
        t.add_row(x["name"], human(x["bytes"]), x["note"])
    t.add_row("[bold]peak[/bold]", f"[bold]{human(b['peak'])}[/bold]", f"at {b['peak_phase']}; "
              f"{human(b['peak_other_checkpointing'])} {'without' if ckpt else 'with'} gradient checkpointing")
    if r["fit"] is not None:
        f = r["fit"]
        verdict = "[green]fits[/green]" if f["fits"] else "[red]does not fit[/red]"
        limit = " (the model's limit)" if f["max_seq"] == f["max_seq_limit"] else ""
        t.add_row("memory budget", human(f["memory"]), f"{verdict}; largest batch {f['max_batch']} at seq "
                  f"{r['seq']}, largest seq {f['max_seq']}{limit} at batch {r['batch']}")
    tm = r["time"]
    t.add_row("time per step", f"{tm['seconds_per_step']:.3g} s", f"{tm['tokens_per_second']:,.0f} tokens/s, "
              f"{tm['flops_per_step']:.3g} flops ({tm['basis']})")
    return t


def methods_table(r: dict[str, Any]) -> Any:
    """The rich table of `advise` over every method."""
    budget = r["memory"]
    t = Table(title=f"every method on {r['model']} ({r['device']})" + (f", budget {human(budget)}" if budget else ""),
              title_justify="left")
    extras = any(row.get("extras") for row in r["methods"])
    cols = ["method", "trainable", "weights", "grads+opt", "activations"] + (["extras"] if extras else [])
    cols += ["peak"] + (["fits", "max batch"] if budget else [])
    for c in cols:
        t.add_column(c, justify="left" if c == "method" else "right", no_wrap=True)
    for row in r["methods"]:
        if "error" in row:  # listed in the notes
            continue
        cells = [row["method"], count(row["trainable"]), human(row["weights"]),
                 human(row["gradients"] + row["optimizer"]), human(row["activations"])]
        cells += ([human(row["extras"])] if extras else []) + [human(row["peak"])]
        if budget:
            cells += ["[green]yes[/green]" if row["fits"] else "[red]no[/red]", str(row["max_batch"])]
        t.add_row(*cells)
    return t
