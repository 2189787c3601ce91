"""Validation's arithmetic and calibration's reading of a trace, on small hand-made inputs."""

from __future__ import annotations

import pytest

from bench.plan.calibrate import traced_seconds
from bench.plan.validate import summary


def _cell(name: str, pred: float, meas: float, mem: tuple[float, float], calibration: bool = False) -> dict:
    def fig(p: float, m: float) -> dict:
        return {"predicted": p, "measured": m, "error": p / m - 1}

    return {"cell": name, "step_time_s": fig(pred, meas), "peak_memory_bytes": fig(*mem),
            "exposed_comm_s": {"predicted": 0.1, "measured": 0.0, "error": None},
            "comm_time_s": {"all_gather": fig(1.0, 2.0)}, "calibration": calibration}


def test_medians_and_tau_leave_out_the_calibration_cell():
    cells = [_cell("a", 1.1, 1.0, (90, 100)), _cell("b", 1.8, 2.0, (100, 100)), _cell("c", 3.3, 3.0, (130, 100)),
             _cell("cal", 100.0, 1.0, (1, 100), calibration=True)]
    out = summary(cells)
    assert out["median_abs_error"]["step_time_s"] == pytest.approx(0.1)
    assert out["median_abs_error"]["peak_memory_bytes"] == pytest.approx(0.1)
    assert out["median_abs_error"]["exposed_comm_s"] is None  # measured 0: no relative error
    assert out["median_abs_error"]["comm_time_s"] == pytest.approx(0.5)
    assert out["kendall_tau"] == pytest.approx(1.0)
    assert len(out["cells"]) == 4  # reported, only not counted


def test_reversed_order_gives_negative_tau():
    cells = [_cell("a", 3.0, 1.0, (1, 1)), _cell("b", 2.0, 2.0, (1, 1)), _cell("c", 1.0, 3.0, (1, 1))]
    assert summary(cells)["kendall_tau"] == pytest.approx(-1.0)


def _op(name: str, ts: float, dur: float, tid: int = 1, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "cat": cat}


def test_trace_classes_count_top_level_main_thread_ops_inside_steps():
    trace = {"traceEvents": [
        _op("ProfilerStep#1", 0, 1000, cat="user_annotation"),
        _op("_WPLinearFn", 10, 100), _op("aten::mm", 20, 50),           # nested: counted once, as matmul
        _op("aten::scaled_dot_product_attention", 200, 40),
        _op("aten::cross_entropy_loss", 300, 30),
        _op("Optimizer.step#AdamW.step", 500, 100, cat="user_annotation"),
        _op("aten::mul_", 510, 20),                                       # inside Optimizer.step
        _op("aten::add", 700, 10),
        _op("aten::add", 720, 10, tid=2),                                 # another thread: not compute
        _op("aten::add", 2000, 10),                                       # outside the step
    ]}
    seconds, traced, steps = traced_seconds(trace)
    assert steps == 1 and traced == pytest.approx(1000e-6)
    assert seconds == pytest.approx({"matmul": 100e-6, "attention": 40e-6, "loss": 30e-6, "optimizer": 20e-6,
                                     "elementwise": 10e-6})


def test_curves_are_smoothed_and_net_of_the_timers_barrier():
    from bench.plan.calibrate import curves_from

    def rows(times_us):
        return {"rows": [{"size_bytes": 1024 << i, "time_us": t} for i, t in enumerate(times_us)]}

    record = {"status": "ok", "metrics": {"collectives": {
        "group_ranks": [[0, 1]], "world_size": 2, "device": "cpu",
        "ops": {"all_reduce": rows([200, 220, 240, 260]),
                "all_gather": rows([300, 9000, 320, 340])}}}}   # one disturbed size
    curves = {c["op"]: c for c in curves_from([record])}
    barrier = 100e-6  # half the smallest all-reduce
    assert curves["all_reduce"]["times_s"][0] == pytest.approx(200e-6 - barrier)
    assert max(curves["all_gather"]["times_s"]) < 400e-6  # the 9 ms outlier is gone
    assert curves["all_gather"]["group_size"] == 2
