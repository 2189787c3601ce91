"""nightly.md for people and the text of `history detect`; nightly.json is NightlyResult.to_json()."""

from __future__ import annotations

from typing import Any

from bench.results.nightly import EXIT_BAD_INPUT, NightlyResult, SeriesVerdict
from bench.results.straggler_line import slowest_rank_line
from bench.results.verdict import METRICS_BY_NAME

MEANING = {0: "nothing regressed", 1: "regression", EXIT_BAD_INPUT: "bad input",
           3: "no code regression, but not enough to judge the whole night"}


def fmt(metric: str, value: float | None) -> str:
    spec = METRICS_BY_NAME.get(metric)
    if value is None:
        return "-"
    return spec.format(value) if spec else f"{value:.6g}"


def what_changed(changed: dict[str, list[Any]]) -> str:
    """'git_commit 1111111111 -> 2222222222; torch 2.6 -> 2.7', or '-'."""
    def short(key: str, value: Any) -> str:
        return str(value)[:10] if key == "git_commit" and value else str(value)

    parts = [f"{k} {short(k, a)} -> {short(k, b)}" for k, (a, b) in changed.items()]
    return "; ".join(parts) or "-"


def confidence(value: float) -> str:
    """1 - p, written so a p of 1e-7 does not print as a bare 1.0000."""
    p = 1.0 - value
    return f"{value:.4f}" if p >= 1e-4 else f"1 - {p:.1e}"


def _change_cells(v: SeriesVerdict) -> list[str]:
    c = v.change
    if c is None:
        return ["-", "-", "-", "-", "-"]
    level = f"{fmt(v.metric, c.before)} -> {fmt(v.metric, c.after)}"
    sure = "exact" if v.check in ("exact", "loss curve") else confidence(c.confidence)
    return [c.start_run, level, f"{c.rel_change:+.1%}", sure, what_changed(c.changed)]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _section(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    return [f"## {title}", "", *_md_table(head, rows), ""] if rows else []


def _series_sections(result: NightlyResult) -> list[str]:
    head = ["cell", "metric", "started at run", "level", "change", "confidence", "what else changed that night",
            "verdict"]
    lines: list[str] = []
    for title, status in (("Regressions", "regression"), ("Explained by the machine (not the code)", "machine change"),
                          ("Straggler nights (not the code)", "straggler"), ("Improvements", "improvement")):
        picked = [v for v in result.verdicts if v.status == status]
        lines += _section(title, head, [[v.cell, v.metric, *_change_cells(v), v.note or "-"] for v in picked])
    return lines


def _cell_sections(result: NightlyResult) -> list[str]:
    lines = _section("Failed cells", ["cell", "status", "ok before"],
                     [[c, st, "yes (regression)" if ok else "no"] for c, st, ok in result.failed_cells])
    lines += _section("Interrupted cells (stopped by the scheduler: not judged)", ["cell"],
                      [[c] for c in result.interrupted])
    lines += _section("Missing cells (planned in cells.json, never ran: not judged)", ["cell"],
                      [[c] for c in result.missing])
    young = [v for v in result.verdicts if v.status == "too little history"]
    lines += _section("Not judged: too little history", ["cell", "metric", "earlier runs"],
                      [[v.cell, v.metric, v.note if v.check == "loss curve" else str(v.earlier_runs)] for v in young])
    lines += _section("Slowest rank (compute time against the median rank's)", ["cell", "slowest rank", "threshold"],
                      [[c, slowest_rank_line({"straggler": s}) or "-", f"{s.get('threshold_pct', '-')}%"]
                       for c, s in result.stragglers.items()])
    return lines


def render_md(result: NightlyResult) -> str:
    code = result.exit_code
    s = result.settings
    lines = [f"# Nightly: {result.run}", "",
             f"**{MEANING[code]}** (exit {code}). Config `{result.config_name}`; a series is judged after "
             f"K = {s.min_history} earlier runs; a regression stays open until the series is back at its old level "
             f"or acknowledged (`run_bench.py history ack CELL METRIC --note TEXT`); change points need "
             f"p < {s.detector.alpha:g} against the series' own between-run noise and at least "
             f"{s.detector.min_effect:.0%} change; the loss curve must match earlier nights within its dtype's "
             "tolerance.", ""]
    if result.canaries:
        lines += [f"Canaries (judged first): {', '.join(result.canaries)}.", ""]
    if result.machine:
        lines += ["**Machine changed tonight:** " + "; ".join(result.machine) + ".", ""]
    lines += _series_sections(result) + _cell_sections(result)
    rest = [v for v in result.verdicts if v.status == "no change"]
    lines += [f"{len(rest)} series without a change, {len(result.verdicts)} judged in all.", ""]
    return "\n".join(lines)


def render_detect_table(found: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    if not found:
        return "no change points"
    rows = [[f["config_name"], f["cell"], f["metric"], f["kind"], f["start_run"],
             f"{fmt(f['metric'], f['before'])} -> {fmt(f['metric'], f['after'])}",
             f"{f['rel_change']:+.1%}", "exact" if f["check"] == "exact" else confidence(f["confidence"]), what_changed(f["changed"])] for f in found]
    return tabulate(rows, headers=["config", "cell", "metric", "kind", "started at run", "level", "change",
                                   "confidence", "what else changed"], disable_numparse=True)
