"""The results as a table for people, and the ratios against the targets."""

from __future__ import annotations

import statistics
from typing import Any

# Targets are reported, never asserted.
TARGETS = {
    "throughput_vs_celery": 1.0,
    "throughput_vs_dbos": 2.0,
    "p50_vs_dbos": 1.0,
}


def _get(data: dict[str, Any] | None, *path: str) -> Any:
    value: Any = data
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    ours, celery, dbos = (results.get(name) for name in ("ours", "celery", "dbos"))

    def ratio(a: Any, b: Any) -> float | None:
        return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None

    tp = ("throughput", "per_second")
    p50 = ("sequential", "client_ms", "p50")
    p99 = ("sequential", "client_ms", "p99")
    minstr = ("throughput", "minstr_per_run")
    found = {
        "throughput_vs_celery": ratio(_get(ours, *tp), _get(celery, *tp)),
        "throughput_vs_dbos": ratio(_get(ours, *tp), _get(dbos, *tp)),
        "p50_vs_celery": ratio(_get(ours, *p50), _get(celery, *p50)),
        "p50_vs_dbos": ratio(_get(ours, *p50), _get(dbos, *p50)),
        "p99_vs_dbos": ratio(_get(ours, *p99), _get(dbos, *p99)),
        "server_p50_vs_dbos": ratio(
            _get(ours, "sequential", "server_ms", "p50"),
            _get(dbos, "sequential", "server_ms", "p50"),
        ),
        "memory_vs_celery": ratio(_get(ours, "peak_worker_mb"), _get(celery, "peak_worker_mb")),
        "memory_vs_dbos": ratio(_get(ours, "peak_worker_mb"), _get(dbos, "peak_worker_mb")),
        "instructions_vs_celery": ratio(_get(ours, *minstr), _get(celery, *minstr)),
        "instructions_vs_dbos": ratio(_get(ours, *minstr), _get(dbos, *minstr)),
    }
    return {"values": found, "targets": TARGETS, "meets": _verdicts(found)}


def _verdicts(found: dict[str, float | None]) -> dict[str, bool | None]:
    verdicts: dict[str, bool | None] = {}
    for name, target in TARGETS.items():
        value = found.get(name)
        if value is None:
            verdicts[name] = None
        elif name.startswith("p50"):
            verdicts[name] = value <= target
        else:
            verdicts[name] = value >= target
    return verdicts


def median_ratios(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each ratio over rounds of :func:`ratios`, judged against the targets."""
    if len(rounds) == 1:
        return rounds[0]
    found: dict[str, float | None] = {}
    for name in rounds[0]["values"]:
        values = sorted(v for entry in rounds if (v := entry["values"].get(name)) is not None)
        found[name] = statistics.median(values) if values else None
    return {"values": found, "targets": TARGETS, "meets": _verdicts(found)}


def round_lines(rounds: list[dict[str, Any]]) -> str:
    """One line per round: each system's throughput and p50, and the target ratios."""
    lines = []
    for index, entry in enumerate(rounds, 1):
        results, values = entry["results"], entry["ratios"]["values"]
        systems = "; ".join(
            f"{name} {_num(_get(result, 'throughput', 'per_second'))}/s "
            f"p50 {_num(_get(result, 'sequential', 'client_ms', 'p50'))} ms"
            for name, result in results.items()
        )
        shown = ", ".join(
            f"{label} {_num(values.get(name), 2)}x"
            for name, label in (
                ("throughput_vs_celery", "tp/chain"),
                ("throughput_vs_dbos", "tp/dbos"),
                ("p50_vs_dbos", "p50/dbos"),
            )
        )
        lines.append(f"round {index} ({', '.join(entry['order'])}): {systems}; {shown}")
    return "\n".join(lines)


def comparison_table(results: dict[str, Any]) -> str:
    header = (
        f"{'system':<28} {'throughput/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'srv p50':>8} {'srv p99':>8} {'peak MB':>8}"
    )
    lines = [header, "-" * len(header)]
    for name in ("ours", "celery", "dbos"):
        data = results.get(name)
        if data is None:
            continue
        label = data.get("label", name)
        if "error" in data:
            lines.append(f"{label:<28} not measured: {data['error'].splitlines()[0][:60]}")
            continue
        lines.append(
            f"{label:<28} {_num(_get(data, 'throughput', 'per_second')):>12} "
            f"{_num(_get(data, 'sequential', 'client_ms', 'p50')):>8} "
            f"{_num(_get(data, 'sequential', 'client_ms', 'p99')):>8} "
            f"{_num(_get(data, 'sequential', 'server_ms', 'p50')):>8} "
            f"{_num(_get(data, 'sequential', 'server_ms', 'p99')):>8} "
            f"{_num(data.get('peak_worker_mb')):>8}"
        )
    ours = results.get("ours")
    result_p50 = _get(ours, "sequential", "client_result_ms", "p50")
    if result_p50 is not None:
        lines.append(
            f"(ours through handle.result(), woken by the close's notification: "
            f"p50 {_num(result_p50)} ms, p99 "
            f"{_num(_get(ours, 'sequential', 'client_result_ms', 'p99'))} ms)"
        )
    return "\n".join(lines)


def cpu_table(results: dict[str, Any]) -> str:
    """CPU milliseconds per run in the throughput phase, by process group."""
    rows = []
    columns: list[str] = []
    for name in ("ours", "celery", "dbos"):
        figures = _get(results.get(name), "throughput", "cpu_ms_per_run")
        if not figures:
            continue
        minstr = _get(results[name], "throughput", "minstr_per_run")
        rows.append((results[name].get("label", name), {**figures, MINSTR: minstr}))
        columns += [column for column in figures if column not in columns and column != "total"]
    if not rows:
        return ""
    if any(figures[MINSTR] is not None for _, figures in rows):
        columns.append(MINSTR)
    short = {
        "client (bench process)": "client",
        "dbos process (workflows and client)": "dbos proc",
        "postgresql": "postgres",
        "worker main": "wrk main",
        "worker pool": "wrk pool",
    }
    shown = [column for column in columns if column != MINSTR] + ["total"]
    if MINSTR in columns:
        shown.append(MINSTR)
    heads = [short.get(column, column) for column in shown]
    header = f"{'CPU ms per run':<28} " + " ".join(f"{h:>10}" for h in heads)
    lines = [header, "-" * len(header)]
    for label, figures in rows:
        cells = [_num(figures.get(column), 2) for column in shown]
        lines.append(f"{label:<28} " + " ".join(f"{cell:>10}" for cell in cells))
    if MINSTR in columns:
        lines.append(
            f"({MINSTR}: millions of instructions the whole machine retired per run, counted"
            " by perf; unlike CPU time they do not move with the machine's speed)"
        )
    return "\n".join(lines)


MINSTR = "Minstr"


def ratio_lines(summary: dict[str, Any]) -> str:
    values, meets = summary["values"], summary["meets"]

    def show(name: str, text: str, target: str | None = None) -> str | None:
        value = values.get(name)
        if value is None:
            return None
        line = f"{text:<34} {value:6.2f}x"
        if target is not None:
            verdict = meets.get(name)
            line += f"   target {target}: {'meets' if verdict else 'misses'}"
        return line

    lines = [
        show("throughput_vs_celery", "throughput ours / celery chain", ">= 1.0x"),
        show("throughput_vs_dbos", "throughput ours / dbos", ">= 2.0x"),
        show("p50_vs_dbos", "sequential p50 ours / dbos", "<= 1.0x"),
        show("p50_vs_celery", "sequential p50 ours / celery chain"),
        show("p99_vs_dbos", "sequential p99 ours / dbos"),
        show("server_p50_vs_dbos", "server-side p50 ours / dbos"),
        show("memory_vs_celery", "peak memory ours / celery chain"),
        show("memory_vs_dbos", "peak memory ours / dbos"),
        show("instructions_vs_celery", "instructions/run ours / chain"),
        show("instructions_vs_dbos", "instructions/run ours / dbos"),
    ]
    return "\n".join(line for line in lines if line)


def scale_table(scale: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    long = scale.get("long_history") or {}
    if "error" in long:
        rows.append(("long history", f"not measured: {long['error'][:60]}", "", ""))
    elif long:
        ratio = long.get("last_over_first")
        rows.append(
            (
                f"long history, {long['steps']:,} steps",
                f"last {long['window']} / first {long['window']} steps: {_num(ratio, 2)}x "
                f"({_num(long['last_window_ms_per_step'], 2)} vs "
                f"{_num(long['first_window_ms_per_step'], 2)} ms/step)",
                f"<= {long['target']}x",
                "meets" if long.get("meets_target") else "misses",
            )
        )
        rows.append(
            (
                "",
                f"medians {_num(long.get('last_window_median_ms'), 2)} vs "
                f"{_num(long.get('first_window_median_ms'), 2)} ms "
                f"({_num(long.get('last_over_first_median'), 2)}x); "
                f"trend {_num(long.get('trend_ms_per_1000_steps'), 2)} ms per 1,000 steps; "
                f"{_num(long.get('steps_per_second'))} steps/s; ms/step by tenth: "
                + " ".join(f"{value:.1f}" for value in long.get("ms_per_step_by_tenth", [])),
                "",
                "",
            )
        )
        rounds = long.get("rounds_last_over_first")
        if rounds:
            trends = long.get("rounds_trend_ms_per_1000_steps") or []
            rows.append(
                (
                    "",
                    f"the median of {len(rounds)} runs: "
                    + ", ".join(f"{_num(value, 2)}x" for value in rounds)
                    + "; trends "
                    + ", ".join(f"{_num(value, 2)}" for value in trends)
                    + " ms per 1,000 steps",
                    "",
                    "",
                )
            )
        replay = long.get("cold_replay") or {}
        if replay.get("available"):
            rows.append(
                (
                    f"cold replay, {replay['events']:,} events",
                    f"read {_num(replay['load_ms'])} ms + replay {_num(replay['replay_ms'])} ms "
                    f"({_num(replay['replay_us_per_event'])} us/event)",
                    "",
                    "",
                )
            )
        elif replay:
            rows.append(("cold replay", f"not available: {replay.get('reason')}", "", ""))
    lag = scale.get("outbox_lag") or {}
    if "error" in lag:
        rows.append(("outbox lag", f"not measured: {lag['error'][:60]}", "", ""))
    for mode in (lag.get("modes") or {}).values():
        name = f"outbox lag, {mode['label']}"
        if "error" in mode:
            rows.append((name, f"not measured: {mode['error'][:60]}", "", ""))
            continue
        rows.append(
            (
                name,
                f"{lag['rate_per_second']:g} starts/s for {lag['seconds']:g}s; "
                f"run p50 {_num(_get(mode, 'run_ms', 'p50'))} ms, "
                f"p99 {_num(_get(mode, 'run_ms', 'p99'))} ms",
                "",
                "",
            )
        )
        kinds = mode.get("lag_ms_by_kind") or {"all": mode.get("lag_ms")}
        for kind, figures in sorted(kinds.items()):
            rows.append(
                (
                    f"  {kind} messages ({_get(figures, 'count')})",
                    f"lag p50 {_num(_get(figures, 'p50'))} ms, p99 {_num(_get(figures, 'p99'))}"
                    f" ms, max {_num(_get(figures, 'max'))} ms",
                    "reported",
                    "",
                )
            )
    waiting = scale.get("waiting_on_signal") or {}
    if "error" in waiting:
        rows.append(("open runs on a signal", f"not measured: {waiting['error'][:60]}", "", ""))
    elif waiting:
        rss = waiting["worker_rss_mb"]
        rows.append(
            (
                f"{waiting['open_runs']:,} open runs on a signal",
                f"worker RSS {_num(rss['idle'])} MB idle, {_num(rss['all_open'])} MB with all "
                f"open, {_num(rss['after'])} MB after {waiting['signalled']:,} signalled runs "
                f"closed: {_num(waiting['after_over_idle'])}x",
                f"<= {waiting['target']}x",
                "meets" if waiting["meets_target"] else "misses",
            )
        )
        rows.append(
            (
                "",
                f"started at {_num(waiting['starts_per_second'])}/s; signal to close p50 "
                f"{_num(_get(waiting, 'signal_to_close_ms', 'p50'))} ms, p99 "
                f"{_num(_get(waiting, 'signal_to_close_ms', 'p99'))} ms; database "
                f"{_num(waiting['database_mb'])} MB",
                "",
                "",
            )
        )
    width = max((len(row[0]) for row in rows), default=10)
    return "\n".join(
        f"{a:<{width}}  {b}" + (f"  [{c}{': ' + d if d else ''}]" if c else "")
        for a, b, c, d in rows
    )


def paired_lines(paired: dict[str, Any]) -> str:
    """The sets of blocks side by side, one line each, and the medians."""

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    others = [name for name in ("celery", "dbos") if f"{name}_per_second" in paired["median"]]
    label = {"celery": "chain", "dbos": "dbos"}
    lines = []
    for index, row in enumerate(paired["sets"], 1):
        parts = [f"ours {_num(row['ours']['per_second'])}/s"]
        for name in others:
            parts.append(
                f"{label[name]} {_num(row[name]['per_second'])}/s "
                f"({ratio(row.get(f'throughput_vs_{name}'))})"
            )
        cpu = " vs ".join(_num(row[name]["cpu_ms_per_run"], 2) for name in ["ours", *others])
        busy = " vs ".join(share(row[name]["busy"]) for name in ["ours", *others])
        lines.append(
            f"set {index} ({', '.join(row['order'])}): {', '.join(parts)}; "
            f"CPU a run {cpu} ms; busy {busy}"
        )
    median = paired["median"]
    lines.append(f"median of {len(paired['sets'])} sets:")
    for name in others:
        target = TARGETS[f"throughput_vs_{name}"]
        lines.append(
            f"  throughput ours / {label[name]}  {ratio(median[f'throughput_vs_{name}'])} "
            f"(target >= {target:.1f}x); CPU a run {ratio(median[f'cpu_vs_{name}'])}; "
            f"machine busy {share(median['ours_busy'])} vs {share(median[f'{name}_busy'])}"
        )
    return "\n".join(lines)
