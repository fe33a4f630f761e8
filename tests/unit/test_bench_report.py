"""The benchmark's verdicts: the median of each ratio over rounds, judged against the targets."""

from __future__ import annotations

from typing import Any

import pytest

from bench.cli import build_parser
from bench.report import median_ratios, ratios, round_lines


def system(per_second: float, p50: float) -> dict[str, Any]:
    return {"throughput": {"per_second": per_second}, "sequential": {"client_ms": {"p50": p50}}}


def one_round(ours: float, celery: float, dbos: float, p50s: tuple[float, float]) -> dict[str, Any]:
    results = {
        "ours": system(ours, p50s[0]),
        "celery": system(celery, 5.0),
        "dbos": system(dbos, p50s[1]),
    }
    return {"order": list(results), "results": results, "ratios": ratios(results)}


def test_the_targets_are_judged_by_the_median_of_each_ratio() -> None:
    rounds = [
        one_round(100, 200, 40, (10.0, 10.0)),  # 2.5x dbos, p50 1.0x
        one_round(100, 100, 60, (12.0, 10.0)),  # 1.67x dbos, p50 1.2x
        one_round(100, 50, 45, (9.0, 10.0)),  # 2.22x dbos, 2.0x chain, p50 0.9x
    ]
    median = median_ratios([entry["ratios"] for entry in rounds])
    assert median["values"]["throughput_vs_celery"] == pytest.approx(1.0)
    assert median["values"]["throughput_vs_dbos"] == pytest.approx(100 / 45)
    assert median["values"]["p50_vs_dbos"] == pytest.approx(1.0)
    assert median["meets"] == {
        "throughput_vs_celery": True,
        "throughput_vs_dbos": True,
        "p50_vs_dbos": True,
    }
    lines = round_lines(rounds).splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("round 2 (ours, celery, dbos): ours 100.0/s p50 12.0 ms")
    assert lines[1].endswith("tp/chain 1.00x, tp/dbos 1.67x, p50/dbos 1.20x")


def test_one_round_is_its_own_verdict_and_a_missing_system_judges_nothing() -> None:
    single = one_round(100, 200, 40, (10.0, 10.0))["ratios"]
    assert median_ratios([single]) is single
    results = {"ours": system(100, 10.0)}
    assert ratios(results)["meets"]["throughput_vs_dbos"] is None


def test_rounds_must_be_at_least_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--rounds", "0"])
    assert "must be at least 1, got 0" in capsys.readouterr().err
    assert build_parser().parse_args(["--rounds", "3"]).rounds == 3


def test_the_long_run_shows_every_round_it_took_the_median_of() -> None:
    from bench.report import scale_table

    long = {
        "steps": 5000,
        "window": 100,
        "last_over_first": 1.01,
        "last_window_ms_per_step": 1.1,
        "first_window_ms_per_step": 1.09,
        "target": 1.2,
        "meets_target": True,
        "ms_per_step_by_tenth": [1.0] * 10,
        "rounds_last_over_first": [0.88, 1.01, 1.43],
        "rounds_trend_ms_per_1000_steps": [-0.01, 0.03, 0.02],
    }
    table = scale_table({"long_history": long})
    assert "last 100 / first 100 steps: 1.01x" in table
    assert "the median of 3 runs: 0.88x, 1.01x, 1.43x; trends -0.01, 0.03, 0.02" in table


def test_the_micro_benchmarks_report_reads_each_variant_and_refuses_bad_options() -> None:
    from bench import micro

    text = micro.report(
        {
            "notify": {"inside": 3209.4, "none": 4781.0, "after": 3848.2},
            "publish": {
                "engine, batches of 10": {"cpu_ms_per_message": 0.165, "wall_ms_per_message": 0.35}
            },
        }
    )
    assert "NOTIFY inside each transaction" in text and "3,209" in text
    assert "no notification" in text and "4,781" in text
    assert "engine, batches of 10" in text and "0.165" in text and "0.350" in text
    with pytest.raises(SystemExit) as exit_info:
        micro.main(["--rounds", "0"])
    assert exit_info.value.code == 2


def test_instructions_per_run_are_compared_and_shown_where_perf_counted_them() -> None:
    from bench.report import cpu_table

    results = {
        "ours": {"throughput": {"per_second": 100, "minstr_per_run": 20.0}},
        "celery": {"throughput": {"per_second": 100, "minstr_per_run": 10.0}},
        "dbos": {"throughput": {"per_second": 50, "minstr_per_run": 40.0}},
    }
    values = ratios(results)["values"]
    assert values["instructions_vs_celery"] == pytest.approx(2.0)
    assert values["instructions_vs_dbos"] == pytest.approx(0.5)
    for name, cpu in (("ours", 2.0), ("celery", 1.0), ("dbos", 3.0)):
        results[name]["throughput"]["cpu_ms_per_run"] = {"postgresql": cpu, "total": cpu}
    table = cpu_table(results).splitlines()
    assert table[0].split()[-2:] == ["total", "Minstr"]
    assert table[2].split()[-2:] == ["2.00", "20.00"]
    assert table[-1].startswith("(Minstr: millions of instructions")
    # Where perf counted nothing, neither the column nor its note is shown.
    for name in results:
        results[name]["throughput"]["minstr_per_run"] = None
    table = cpu_table(results).splitlines()
    assert table[0].split()[-1] == "total"
    assert not any("Minstr" in line for line in table)
    assert ratios(results)["values"]["instructions_vs_dbos"] is None


def test_perf_output_is_read_and_a_machine_without_perf_counts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import infra

    assert infra.parse_perf_instructions("\n123456,,instructions,2016194650,100.00,,\n") == 123456
    assert infra.parse_perf_instructions("<not supported>,,instructions,0,100.00,,") is None
    assert infra.parse_perf_instructions("<not counted>,,instructions:u,0,0.00,,") is None
    assert infra.parse_perf_instructions("") is None
    hybrid = "10,,cpu_core/instructions/,1,100.00,,\n5,,cpu_atom/instructions/,1,100.00,,"
    assert infra.parse_perf_instructions(hybrid) == 15
    infra.perf_counts_instructions.cache_clear()
    monkeypatch.setattr(infra.shutil, "which", lambda _name: None)
    try:
        counter = infra.InstructionCounter()
        counter.start()
        counter.stop()
        assert counter.count is None
    finally:
        infra.perf_counts_instructions.cache_clear()


def block(per_second: float, cpu: float | None) -> dict[str, Any]:
    return {"per_second": per_second, "cpu_ms_per_run": None if cpu is None else {"total": cpu}}


def test_side_by_side_sets_are_judged_by_their_median_ratio() -> None:
    from bench.paired import summarize
    from bench.report import paired_lines

    blocks = [
        {"order": ["ours", "celery"], "ours": block(90, 11.0), "celery": block(100, 10.0)},
        {"order": ["celery", "ours"], "ours": block(120, 10.0), "celery": block(100, 10.0)},
        {"order": ["ours", "celery"], "ours": block(80, 12.5), "celery": block(100, 10.0)},
    ]
    summary = summarize(blocks, cores=2)
    assert [pair["throughput_vs_celery"] for pair in summary["sets"]] == pytest.approx(
        [0.9, 1.2, 0.8]
    )
    median = summary["median"]
    assert median["throughput_vs_celery"] == pytest.approx(0.9)
    assert median["cpu_vs_celery"] == pytest.approx(1.1)
    assert median["throughput_vs_dbos"] is None
    # 90 runs a second at 11 ms each keep 0.99 s of CPU busy a second, of two cores.
    assert summary["sets"][0]["ours"]["busy"] == pytest.approx(0.495)
    assert median["ours_per_second"] == 90
    assert median["celery_busy"] == pytest.approx(0.5)
    lines = paired_lines(summary).splitlines()
    assert lines[1] == (
        "set 2 (celery, ours): ours 120.0/s, chain 100.0/s (1.20x); "
        "CPU a run 10.00 vs 10.00 ms; busy 60% vs 50%"
    )
    assert lines[-2] == "median of 3 sets:"
    assert lines[-1].startswith(
        "  throughput ours / chain  0.90x (target >= 1.0x); CPU a run 1.10x"
    )
    assert "dbos" not in paired_lines(summary)


def test_side_by_side_with_dbos_judges_both_targets() -> None:
    from bench.paired import summarize
    from bench.report import paired_lines

    summary = summarize(
        [
            {
                "order": ["ours", "celery", "dbos"],
                "ours": block(100, 10.0),
                "celery": block(125, 8.0),
                "dbos": block(40, 20.0),
            },
            {
                "order": ["dbos", "celery", "ours"],
                "ours": block(110, None),
                "celery": block(100, 8.0),
                "dbos": block(50, 20.0),
            },
        ],
        cores=2,
    )
    median = summary["median"]
    assert median["throughput_vs_celery"] == pytest.approx((0.8 + 1.1) / 2)
    assert median["throughput_vs_dbos"] == pytest.approx((2.5 + 2.2) / 2)
    # A block without CPU figures judges no CPU ratio.
    assert median["cpu_vs_dbos"] == pytest.approx(0.5)
    lines = paired_lines(summary).splitlines()
    assert lines[1] == (
        "set 2 (dbos, celery, ours): ours 110.0/s, chain 100.0/s (1.10x), dbos 50.0/s (2.20x); "
        "CPU a run - vs 8.00 vs 20.00 ms; busy - vs 40% vs 50%"
    )
    assert lines[-1].startswith("  throughput ours / dbos  2.35x (target >= 2.0x)")


def test_pairs_must_not_be_negative(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--paired", "-1"])
    assert "must be 0 or more, got -1" in capsys.readouterr().err
    assert build_parser().parse_args([]).paired == 0
    assert build_parser().parse_args(["--paired", "6"]).paired == 6
