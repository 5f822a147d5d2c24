"""The markdown of one experiment's section: what was run, tables, figures, exact commands."""

from __future__ import annotations

import json
from collections.abc import Sequence

from lightning_bn.report.claims import claims_table
from lightning_bn.report.keskar import sharpness_table
from lightning_bn.report.runs import Experiment
from lightning_bn.report.summary import Column, format_mean_std, format_number


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _value_text(value: object) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def runs_table(exp: Experiment, columns: Sequence[Column]) -> list[str]:
    """One row per run: its varying grid values, then every measured column."""
    keys = exp.varying
    derived = list(exp.sweep.get("derived", {}))  # e.g. lr = base_lr * batch_size: worth a column
    header = [exp.short[k] for k in keys] if keys else ["run"]
    header += [k.split(".")[-1] for k in derived]
    incomplete = any(r.record and not r.record.get("complete") for r in exp.runs)
    header += (["status"] if incomplete else []) + [c.name for c in columns]
    rows = []
    for run in exp.runs:
        row: list[object] = [_value_text(run.values.get(k)) for k in keys] if keys else [run.name]
        row += [_value_text(run.get(k)) for k in derived]
        if incomplete:
            row.append(run.record.get("status", "?") if run.record else "–")
        row += [format_number(c.value(run.events), c.percent) for c in columns]
        rows.append(row)
    return _table(header, rows)


def seeds_table(exp: Experiment, columns: Sequence[Column]) -> list[str]:
    """Mean ± standard deviation over seeds per configuration (empty if there is one seed)."""
    if exp.seed_key is None:
        return []
    keys = [k for k in exp.varying if k != exp.seed_key]
    header = [exp.short[k] for k in keys] + ["seeds"] + [c.name for c in columns]
    rows = []
    for runs in exp.configurations().values():
        row: list[object] = [_value_text(runs[0].values.get(k)) for k in keys] + [len(runs)]
        row += [format_mean_std([c.value(r.events) for r in runs], c.percent) for c in columns]
        rows.append(row)
    return _table(header, rows)


def section(exp: Experiment, columns: Sequence[Column], figures: Sequence[tuple[str, str, str]]) -> str:
    """``figures``: (title, caption, path relative to report.md)."""
    lines = [f"## {exp.name}", ""]
    sweep = exp.sweep
    if sweep.get("description"):
        lines += [sweep["description"], ""]
    if sweep.get("command"):
        scale = "paper scale (--full)" if sweep.get("full") else "CPU scale"
        runs = f"{len(exp.runs)} run{'' if len(exp.runs) == 1 else 's'}"
        lines += [f"Made by `{sweep['command']}` from `{sweep.get('source', '?')}` ({scale}), {runs}.", ""]
        derived = [f"Derived: `{key} = {text}`." for key, text in sweep.get("derived", {}).items()]
        lines += [*derived, ""] if derived else []
    elif not any(run.record for run in exp.runs):
        lines += [f"{len(exp.runs)} TensorBoard run(s) under `{exp.dir.name}/` (not made by a sweep).", ""]
    claims = claims_table(exp)
    if claims:
        lines += [
            "### Claims",
            "",
            "Each claim of the papers this experiment can answer, from its runs (lightning_bn/report/claims.py): "
            "*holds* / *does not hold* when the difference of the means exceeds twice its standard error over the "
            "seeds, *within the seeds' spread* when it does not; with one run per configuration only a direction.",
            "",
            *claims,
            "",
        ]
    keskar = sharpness_table(exp)
    if keskar:  # the sharpness values are in their own table: keep the run tables narrow
        columns = [c for c in columns if not c.name.startswith("Keskar sharpness")]
    groups: dict[str, list[Column]] = {}
    for column in columns:
        groups.setdefault(column.group, []).append(column)
    if groups:
        lines += ["### Runs", ""]
        for group, group_columns in groups.items():
            lines += [f"**{group}**", "", *runs_table(exp, group_columns), ""]
        if exp.seed_key is not None:
            lines += ["### Mean ± std over seeds", ""]
            for group, group_columns in groups.items():
                lines += [f"**{group}**", "", *seeds_table(exp, group_columns), ""]
    else:
        lines += ["No known measurement was logged yet.", ""]
    if keskar:
        lines += [
            "### Keskar sharpness (Keskar et al. Tables 3/4)",
            "",
            "Final φ (Metric 2.1) per protocol, mean ± std over seeds; ratio: of the means, larger batch / "
            "smaller batch. The paper (network F1, MNIST, ε = 1e-3, full space): 1.23 ± 0.83 vs 205.14 ± 69.52.",
            "",
            *keskar,
            "",
        ]
    if figures:
        lines += ["### Figures", ""]
        for title, caption, path in figures:
            lines += [f"**{title}.** {caption}", "", f"![{title}]({path})", ""]
    commands = [(run.name, run.commands) for run in exp.runs if run.commands]
    if commands:
        lines += ["### Commands", "", "Every training command, as executed (resumed runs list each attempt):", ""]
        lines += ["<details><summary>show</summary>", "", "```bash"]
        for name, run_commands in commands:
            lines += [f"# {name}", *run_commands]
        lines += ["```", "", "</details>", ""]
    return "\n".join(lines)
