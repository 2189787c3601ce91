"""Background NVML sampling of this rank's GPU(s): power, energy, utilisation,
memory, temperature, SM clock, clock-throttle reasons. (Longer than 300 lines because the
sampler thread, the NVML field readers and the summary share one honesty contract below.)

    sampler = NvmlSampler(local_device_ids(), interval_ms=100)
    sampler.start(); <measured steps>; sampler.stop()
    record["nvml"] = sampler.summary(steps, tokens)

Honesty rules: a field that NVML refuses (NVMLError_NotSupported, NoPermission,
... as under MIG or in some containers) is stored as "unsupported", never 0, and
the error text is kept in `errors`; without NVML (no pynvml, no driver library,
nvmlInit failing, no such GPU) `available` is False and summary() returns
{"available": False, "reason": <the error text>}, never made-up numbers.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

UNSUPPORTED = "unsupported"

#: Clock event ("throttle") reason bits, as in nvml.h. The slowdown ones lower
#: clocks below what the workload asks for; the others are states or settings.
SLOWDOWN_REASONS = {
    0x4: "SwPowerCap",
    0x8: "HwSlowdown",
    0x20: "SwThermalSlowdown",
    0x40: "HwThermalSlowdown",
    0x80: "HwPowerBrakeSlowdown",
}
OTHER_REASONS = {0x1: "GpuIdle", 0x2: "ApplicationsClocksSetting", 0x10: "SyncBoost", 0x100: "DisplayClockSetting"}


def reason_names(mask: int) -> list[str]:
    """Names of the reason bits set in `mask` (unknown bits as hex)."""
    known = {**SLOWDOWN_REASONS, **OTHER_REASONS}
    names = [name for bit, name in sorted(known.items()) if mask & bit]
    unknown = mask & ~sum(known)
    return names + ([hex(unknown)] if unknown else [])


def is_slowdown(mask: int) -> bool:
    """True when any slowdown bit (power cap, thermal, hardware slowdown) is set."""
    return bool(mask & sum(SLOWDOWN_REASONS))


def local_device_ids() -> list[int | str]:
    """The NVML id of the GPU this rank uses: "GPU-<uuid>" of torch's current
    device when CUDA is up (immune to CUDA_VISIBLE_DEVICES renumbering), else the
    LOCAL_RANK index."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            return [f"GPU-{uuid}"]
        return [torch.cuda.current_device()]
    return [int(os.environ.get("LOCAL_RANK", "0"))]


def _reduce(values: Sequence[Any], fn: Callable[[list[float]], float]) -> float | str:
    """fn over the numeric values; "unsupported" when no sample had the field."""
    nums = [float(v) for v in values if v != UNSUPPORTED]
    return fn(nums) if nums else UNSUPPORTED


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def integrate_power(points: Sequence[tuple[float, float]], window_s: float) -> float:
    """Energy (J) from sampled power: time-weighted mean power times the window.

    mean_P = sum_i (P_i + P_{i+1}) / 2 * (t_{i+1} - t_i) / (t_last - t_first)
    (trapezoid rule; the plain mean for one sample or zero span); E = mean_P * window_s.
    """
    if not points:
        raise ValueError("no power samples to integrate")
    pts = sorted(points)
    span = pts[-1][0] - pts[0][0]
    if len(pts) == 1 or span <= 0:
        mean_p = sum(p for _, p in pts) / len(pts)
    else:
        area = sum((p0 + p1) / 2 * (t1 - t0) for (t0, p0), (t1, p1) in zip(pts, pts[1:]))
        mean_p = area / span
    return mean_p * window_s


class NvmlSampler:
    """Samples every `interval_ms` on a daemon thread between start() and stop().

    `device_ids`: NVML indices (int) or UUIDs (str); None means `local_device_ids()`.
    `nvml_module`: the pynvml module to use (tests inject a fake); None imports pynvml.
    """

    def __init__(
        self,
        device_ids: Sequence[int | str] | None = None,
        interval_ms: float = 100.0,
        nvml_module: Any = None,
    ) -> None:
        self.interval_ms = float(interval_ms)
        self.available = False
        self.reason = ""
        self.samples: list[dict] = []  # {"t", "device", field: value | "unsupported"}
        self.errors: dict[str, str] = {}  # field -> first NVML error text
        self._nvml: Any = None
        self._handles: dict[int | str, Any] = {}
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._window: tuple[float, float] | None = None
        self._energy: dict[str, dict[int | str, Any]] = {}
        self._init(device_ids, nvml_module)

    # -- setup ---------------------------------------------------------------

    def _init(self, device_ids: Sequence[int | str] | None, nvml_module: Any) -> None:
        """nvmlInit and one handle per device; on failure `reason` keeps the error text."""
        try:
            nvml = nvml_module if nvml_module is not None else importlib.import_module("pynvml")
            nvml.nvmlInit()
        except Exception as err:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
            self.reason = str(err) or type(err).__name__
            return
        try:
            ids = list(device_ids) if device_ids is not None else local_device_ids()
            by_uuid, by_index = nvml.nvmlDeviceGetHandleByUUID, nvml.nvmlDeviceGetHandleByIndex
            if not ids:
                raise ValueError("no device ids given")
            self._handles = {i: by_uuid(i) if isinstance(i, str) else by_index(i) for i in ids}
        except Exception as err:
            self.reason = str(err) or type(err).__name__
            nvml.nvmlShutdown()
            return
        self._nvml = nvml
        self.available = True

    def close(self) -> None:
        """Stop sampling and release NVML."""
        if self._thread is not None:
            self.stop()
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
            self.available = False
            self.reason = "closed"

    # -- sampling ------------------------------------------------------------

    def _query(self, field: str, fn: Callable[..., Any] | None, *args: Any) -> Any:
        """fn(*args), or "unsupported" (remembering the error) when NVML refuses."""
        if fn is None:
            self.errors.setdefault(field, "function not provided by this NVML binding")
            return UNSUPPORTED
        try:
            return fn(*args)
        except self._nvml.NVMLError as err:
            self.errors.setdefault(field, str(err) or type(err).__name__)
            return UNSUPPORTED

    def _read_device(self, device_id: int | str, handle: Any) -> dict:
        nvml = self._nvml
        q = self._query
        power = q("power_w", nvml.nvmlDeviceGetPowerUsage, handle)
        util = q("utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
        mem = q("mem_used_bytes", nvml.nvmlDeviceGetMemoryInfo, handle)
        temp_sensor, sm_clock = getattr(nvml, "NVML_TEMPERATURE_GPU", 0), getattr(nvml, "NVML_CLOCK_SM", 1)
        # Newer bindings name it ClocksEventReasons, older ones ClocksThrottleReasons.
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        return {
            "t": time.perf_counter(),
            "device": device_id,
            "power_w": power if power == UNSUPPORTED else power / 1000.0,  # NVML: milliwatts
            "energy_mj": q("energy_mj", nvml.nvmlDeviceGetTotalEnergyConsumption, handle),
            "gpu_util_pct": util if util == UNSUPPORTED else util.gpu,
            "mem_util_pct": util if util == UNSUPPORTED else util.memory,
            "mem_used_bytes": mem if mem == UNSUPPORTED else mem.used,
            "temperature_c": q("temperature_c", nvml.nvmlDeviceGetTemperature, handle, temp_sensor),
            "sm_clock_mhz": q("sm_clock_mhz", nvml.nvmlDeviceGetClockInfo, handle, sm_clock),
            "throttle_reasons": q("throttle_reasons", reasons, handle),
        }

    def _sample_all(self) -> None:
        self.samples += [self._read_device(i, h) for i, h in self._handles.items()]

    def _read_energy(self) -> dict[int | str, Any]:
        fn = self._nvml.nvmlDeviceGetTotalEnergyConsumption
        return {i: self._query("energy_mj", fn, h) for i, h in self._handles.items()}

    def _run(self) -> None:
        while True:
            self._sample_all()
            if self._stop_event.wait(self.interval_ms / 1000.0):
                break
        self._sample_all()  # one last sample at stop()

    def start(self) -> None:
        """Read the energy counters and start the sampling thread (no-op without NVML)."""
        if not self.available:
            return
        if self._thread is not None:
            raise RuntimeError("NvmlSampler already started")
        self.samples = []
        self._stop_event.clear()
        self._energy = {"start": self._read_energy()}
        t0 = time.perf_counter()
        self._window = (t0, t0)
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after its final sample) and read the energy counters again."""
        if self._thread is None:
            return
        self._stop_event.set()
        self._thread.join()
        self._thread = None
        self._window = (self._window[0], time.perf_counter())
        self._energy["stop"] = self._read_energy()

    # -- summary -------------------------------------------------------------

    def _device_energy(self, device_id: int | str, samples: list[dict]) -> tuple[float | str, str | None]:
        """(joules, source): the counter delta (stop - start) / 1000 when both reads
        succeeded, else `integrate_power` over the samples, else unsupported."""
        e0, e1 = self._energy["start"][device_id], self._energy["stop"][device_id]
        if UNSUPPORTED not in (e0, e1):
            return (e1 - e0) / 1000.0, "counter"
        points = [(s["t"], s["power_w"]) for s in samples if s["power_w"] != UNSUPPORTED]
        if not points:
            return UNSUPPORTED, None
        t0, t1 = self._window
        return integrate_power(points, t1 - t0), "power_integral"

    def _device_summary(self, device_id: int | str) -> dict:
        samples = [s for s in self.samples if s["device"] == device_id]
        col = lambda field: [s[field] for s in samples]  # noqa: E731
        energy, source = self._device_energy(device_id, samples)
        masks = [int(m) for m in col("throttle_reasons") if m != UNSUPPORTED]
        seen = sorted({name for m in masks for name in reason_names(m)})
        return {
            "device": device_id,
            "samples": len(samples),
            "power_mean_w": _reduce(col("power_w"), _mean),
            "power_max_w": _reduce(col("power_w"), max),
            "energy_j": energy,
            "energy_source": source,
            "gpu_util_mean_pct": _reduce(col("gpu_util_pct"), _mean),
            "mem_util_mean_pct": _reduce(col("mem_util_pct"), _mean),
            "mem_used_max_bytes": _reduce(col("mem_used_bytes"), max),
            "temperature_max_c": _reduce(col("temperature_c"), max),
            "sm_clock_mean_mhz": _reduce(col("sm_clock_mhz"), _mean),
            "throttled": any(is_slowdown(m) for m in masks) if masks else UNSUPPORTED,
            "throttle_reasons": seen,
        }

    def summary(self, steps: int, tokens: int) -> dict:
        """Summary of the last start()/stop() window, summed or combined over devices.

        power_mean_w = sum over devices of the mean sampled power; power_max_w = sum
        of the devices' maxima (exact for one device, an upper bound otherwise);
        energy_j = sum of the devices' energy (`_device_energy`);
        energy_per_step_j = energy_j / steps; energy_per_token_j = energy_j / tokens;
        utilisations and SM clock: mean of the devices' means; temperature_max_c and
        mem_used_max_bytes: maxima; throttled: a slowdown reason was seen on any
        device. A combined field is "unsupported" when any device lacks it.
        """
        if not self.available:
            return {"available": False, "reason": self.reason}
        if self._window is None or self._thread is not None:
            raise RuntimeError("summary() needs a completed start()/stop() window")
        if steps <= 0 or tokens <= 0:
            raise ValueError(f"steps and tokens must be > 0, got {steps}, {tokens}")
        devices = [self._device_summary(i) for i in self._handles]
        combined = _combine(devices)
        energy = combined.pop("energy_j")
        per = (lambda n: energy / n) if energy != UNSUPPORTED else (lambda n: UNSUPPORTED)
        return {
            "available": True,
            "interval_ms": self.interval_ms,
            "window_s": self._window[1] - self._window[0],
            "num_samples": len(self.samples),
            **combined,
            "energy_j": energy,
            "energy_per_step_j": per(steps),
            "energy_per_token_j": per(tokens),
            "unsupported": dict(self.errors),
            "devices": devices,
        }


def _combine(devices: list[dict]) -> dict:
    """Combine per-device summaries; "unsupported" if any device lacks the field."""

    def over(field: str, fn: Callable[[list[float]], float]) -> float | str:
        values = [d[field] for d in devices]
        return UNSUPPORTED if UNSUPPORTED in values else fn(values)

    throttled = [d["throttled"] for d in devices]
    return {
        "power_mean_w": over("power_mean_w", sum),
        "power_max_w": over("power_max_w", sum),
        "energy_j": over("energy_j", sum),
        "energy_source": "+".join(sorted({d["energy_source"] or UNSUPPORTED for d in devices})),
        "gpu_util_mean_pct": over("gpu_util_mean_pct", _mean),
        "mem_util_mean_pct": over("mem_util_mean_pct", _mean),
        "sm_clock_mean_mhz": over("sm_clock_mean_mhz", _mean),
        "mem_used_max_bytes": over("mem_used_max_bytes", max),
        "temperature_max_c": over("temperature_max_c", max),
        "throttled": UNSUPPORTED if UNSUPPORTED in throttled else any(throttled),
        "throttle_reasons": sorted({r for d in devices for r in d["throttle_reasons"]}),
    }
