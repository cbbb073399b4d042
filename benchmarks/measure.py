"""Timing and memory measurement helpers.

Every figure is the median of several repetitions after warm-up, reported with its min and
max, and compared as a ratio against a reference measured in the same process, so that the
conclusions hold on a noisy shared machine.
"""

import gc
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    median: float
    minimum: float
    maximum: float
    repeats: int

    def as_dict(self):
        return asdict(self)


def time_call(function, repeats: int = 5, warmup: int = 1) -> Timing:
    """Run `function` `warmup` times unmeasured, then `repeats` times; return seconds per call."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), min(samples), max(samples), repeats)


def ratio(numerator: Timing, denominator: Timing) -> float:
    return numerator.median / denominator.median


def row(measure: str, mmfuse_timing, reference_timing) -> dict:
    """A table row from two timings: medians in seconds, min-max ranges and their ratio."""
    return {
        "measure": measure,
        "unit": "s",
        "mmfuse": mmfuse_timing.median,
        "mmfuse_range": [mmfuse_timing.minimum, mmfuse_timing.maximum],
        "reference": reference_timing.median,
        "reference_range": [reference_timing.minimum, reference_timing.maximum],
        "ratio": ratio(mmfuse_timing, reference_timing),
    }


def value_row(measure: str, unit: str, mmfuse_value: float, reference_value: float) -> dict:
    """A table row from two derived values (no repetition range of their own)."""
    ratio_value = mmfuse_value / reference_value if reference_value else float("nan")
    return {
        "measure": measure,
        "unit": unit,
        "mmfuse": mmfuse_value,
        "reference": reference_value,
        "ratio": ratio_value,
    }


def markdown_table(rows: list, reference_name: str) -> str:
    """Render rows from `row`/`value_row` as a markdown table with medians and min-max ranges."""
    lines = [
        f"| measure | mmfuse | {reference_name} | mmfuse / {reference_name} |",
        "|---|---|---|---|",
    ]
    for entry in rows:
        cells = []
        for key in ("mmfuse", "reference"):
            value = format_value(entry[key], entry["unit"])
            if f"{key}_range" in entry:
                low, high = entry[f"{key}_range"]
                value += f" ({format_value(low, entry['unit'])} to {format_value(high, entry['unit'])})"
            cells.append(value)
        lines.append(f"| {entry['measure']} | {cells[0]} | {cells[1]} | {entry['ratio']:.2f} |")
    return "\n".join(lines)


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.1f} {unit}"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory growth while the block runs.

    On a GPU this is `torch.cuda.max_memory_allocated`; on the CPU the resident set size is
    sampled every 2 ms, so it is an estimate that also counts allocator caching.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_bytes = 0

    def __enter__(self):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self
        self.baseline = _resident_bytes()
        self._peak = self.baseline
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self._peak = max(self._peak, _resident_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.baseline
            return False
        self._running = False
        self._thread.join()
        self._peak = max(self._peak, _resident_bytes())
        self.peak_bytes = self._peak - self.baseline
        return False


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
