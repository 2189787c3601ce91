"""bench.worker.nvml against a FAKE pynvml (this file only), and the real no-driver case."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from bench.worker.nvml import UNSUPPORTED, NvmlSampler, integrate_power, reason_names


class FakeNVMLError(Exception):
    pass


class FakeNotSupported(FakeNVMLError):
    def __str__(self) -> str:
        return "Not Supported"


class FakeNvml:
    """Stands in for the pynvml module: the functions NvmlSampler calls, with state
    the test sets (counter, power, reasons) and a set of functions that refuse."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, unsupported=(), init_error=None, power_mw=250_000, reasons=0, event_reasons=True):
        self.unsupported = set(unsupported)
        self.init_error = init_error
        self.power_mw = power_mw
        self.reasons = reasons
        self.energy_mj = 1_000_000
        self.shutdowns = 0
        if event_reasons:
            self.nvmlDeviceGetCurrentClocksEventReasons = self._reasons
        else:
            self.nvmlDeviceGetCurrentClocksThrottleReasons = self._reasons

    def _check(self, fn: str) -> None:
        if fn in self.unsupported:
            raise FakeNotSupported()

    def nvmlInit(self):
        if self.init_error:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, i):
        if i >= 8:
            raise FakeNVMLError("Invalid Argument")
        return ("handle", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("handle", uuid)

    def nvmlDeviceGetPowerUsage(self, h):
        self._check("power")
        return self.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self._check("energy")
        return self.energy_mj

    def nvmlDeviceGetUtilizationRates(self, h):
        self._check("utilization")
        return SimpleNamespace(gpu=80, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=7 << 30, total=80 << 30, free=73 << 30)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 65

    def nvmlDeviceGetClockInfo(self, h, clock):
        assert clock == self.NVML_CLOCK_SM
        return 1980

    def _reasons(self, h):
        self._check("reasons")
        return self.reasons


def run_window(sampler: NvmlSampler, fake: FakeNvml, energy_delta_mj: int = 600_000, seconds: float = 0.04) -> None:
    sampler.start()
    time.sleep(seconds)
    fake.energy_mj += energy_delta_mj
    sampler.stop()


def test_normal_sampling_and_energy_counter_delta():
    fake = FakeNvml()
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    assert sampler.available and sampler.reason == ""
    run_window(sampler, fake)
    s = sampler.summary(steps=10, tokens=1000)
    assert s["available"] and s["num_samples"] >= 2
    assert s["power_mean_w"] == pytest.approx(250.0) and s["power_max_w"] == pytest.approx(250.0)
    assert s["energy_source"] == "counter"
    assert s["energy_j"] == pytest.approx(600.0)  # (1_600_000 - 1_000_000) mJ / 1000
    assert s["energy_per_step_j"] == pytest.approx(60.0)
    assert s["energy_per_token_j"] == pytest.approx(0.6)
    assert s["gpu_util_mean_pct"] == 80 and s["mem_util_mean_pct"] == 40
    assert s["temperature_max_c"] == 65 and s["sm_clock_mean_mhz"] == 1980
    assert s["mem_used_max_bytes"] == 7 << 30
    assert s["throttled"] is False and s["throttle_reasons"] == []
    assert s["unsupported"] == {}
    sampler.close()
    assert fake.shutdowns == 1 and not sampler.available


def test_unsupported_field_is_recorded_as_unsupported_not_zero():
    fake = FakeNvml(unsupported={"utilization"})
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    run_window(sampler, fake)
    assert all(x["gpu_util_pct"] == UNSUPPORTED and x["mem_util_pct"] == UNSUPPORTED for x in sampler.samples)
    s = sampler.summary(steps=1, tokens=1)
    assert s["gpu_util_mean_pct"] == UNSUPPORTED and s["mem_util_mean_pct"] == UNSUPPORTED
    assert s["unsupported"] == {"utilization": "Not Supported"}
    assert s["power_mean_w"] == pytest.approx(250.0)  # other fields unaffected


def test_energy_falls_back_to_integrated_power():
    fake = FakeNvml(unsupported={"energy"}, power_mw=300_000)
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    run_window(sampler, fake)
    s = sampler.summary(steps=4, tokens=400)
    assert s["energy_source"] == "power_integral"
    assert s["energy_j"] == pytest.approx(300.0 * s["window_s"])  # constant 300 W over the window
    assert s["energy_per_step_j"] == pytest.approx(s["energy_j"] / 4)
    assert "energy_mj" in s["unsupported"]


def test_no_power_and_no_counter_means_unsupported_energy():
    fake = FakeNvml(unsupported={"energy", "power"})
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    run_window(sampler, fake)
    s = sampler.summary(steps=1, tokens=1)
    assert s["energy_j"] == s["energy_per_step_j"] == s["energy_per_token_j"] == UNSUPPORTED
    assert s["power_mean_w"] == UNSUPPORTED


def test_integrate_power_trapezoid():
    # 100 W then 300 W one second apart: mean 200 W; over a 2 s window 400 J.
    assert integrate_power([(1.0, 300.0), (0.0, 100.0)], 2.0) == pytest.approx(400.0)
    assert integrate_power([(0.0, 50.0)], 3.0) == pytest.approx(150.0)


@pytest.mark.parametrize("event_reasons", [True, False])  # ClocksEvent vs older ClocksThrottle API
def test_throttle_reasons(event_reasons):
    fake = FakeNvml(reasons=0x4 | 0x1, event_reasons=event_reasons)  # SwPowerCap + GpuIdle
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    run_window(sampler, fake)
    s = sampler.summary(steps=1, tokens=1)
    assert s["throttled"] is True
    assert s["throttle_reasons"] == ["GpuIdle", "SwPowerCap"]


def test_idle_is_not_throttling_and_unsupported_reasons():
    assert reason_names(0x1) == ["GpuIdle"] and reason_names(0x1000) == ["0x1000"]
    fake = FakeNvml(reasons=0x1)
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    run_window(sampler, fake)
    assert sampler.summary(1, 1)["throttled"] is False
    fake = FakeNvml(unsupported={"reasons"})
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    run_window(sampler, fake)
    assert sampler.summary(1, 1)["throttled"] == UNSUPPORTED


def test_two_devices_sum_power_and_energy():
    fake = FakeNvml()
    sampler = NvmlSampler([0, "GPU-abc"], interval_ms=5, nvml_module=fake)
    run_window(sampler, fake)
    s = sampler.summary(steps=1, tokens=1)
    assert s["power_mean_w"] == pytest.approx(500.0)
    assert s["energy_j"] == pytest.approx(1200.0)  # each counter moved 600 J
    assert [d["device"] for d in s["devices"]] == [0, "GPU-abc"]


def test_init_failure_gives_reason_and_no_numbers():
    fake = FakeNvml(init_error="Driver Not Loaded")
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    assert not sampler.available
    sampler.start()
    sampler.stop()
    assert sampler.summary(steps=1, tokens=1) == {"available": False, "reason": "Driver Not Loaded"}


def test_bad_device_gives_reason_and_releases_nvml():
    fake = FakeNvml()
    sampler = NvmlSampler([9], interval_ms=5, nvml_module=fake)
    assert not sampler.available and sampler.reason == "Invalid Argument"
    assert fake.shutdowns == 1
    assert sampler.summary(1, 1) == {"available": False, "reason": "Invalid Argument"}
    sampler = NvmlSampler([], interval_ms=5, nvml_module=fake)  # e.g. a CPU cell
    assert not sampler.available and sampler.reason == "no device ids given" and fake.shutdowns == 2


def test_summary_before_window_is_an_error():
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=FakeNvml())
    with pytest.raises(RuntimeError):
        sampler.summary(1, 1)


def test_real_pynvml_without_driver():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        expected = str(err)
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")
    sampler = NvmlSampler([0], interval_ms=50)
    assert sampler.available is False
    assert sampler.reason == expected
    sampler.start()
    sampler.stop()
    assert sampler.summary(steps=1, tokens=1) == {"available": False, "reason": expected}


def test_worker_energy_per_token_is_window_energy_over_window_tokens() -> None:
    from bench.worker.cell import window_summary

    fake = FakeNvml()
    sampler = NvmlSampler([0], interval_ms=5, nvml_module=fake)
    run_window(sampler, fake, energy_delta_mj=600_000)  # 600 J over the window
    steps, tokens_per_step = 10, 4096
    out = window_summary(sampler, steps, tokens_per_step)
    assert out["energy_per_step_j"] == pytest.approx(60.0)
    # energy/token = energy/step / tokens/step; the old call divided all steps' energy by one step's tokens.
    assert out["energy_per_token_j"] == pytest.approx(out["energy_per_step_j"] / tokens_per_step)
