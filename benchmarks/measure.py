"""Timing and memory measurement helpers.

Every figure is the median of several repetitions after warm-up, reported with its min and
max, and compared as a ratio against a reference measured in the same process, so that the
conclusions hold on a noisy shared machine.
"""

import contextlib
import gc
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList


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


def timing_from_samples(samples: list) -> Timing:
    """Summarise per-repetition figures (seconds) as their median, min and max."""
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


class DecodeStepTimer(LogitsProcessor):
    """Logits processor that records when `generate` reaches each step; it leaves the scores unchanged.

    `generate` calls it once after the prefill and once after every decode step, so the gaps between
    consecutive calls are the decode steps: one forward of one new token with the KV cache, plus
    `generate`'s own per-step work.
    """

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores

    def step_seconds(self) -> list:
        return [later - earlier for earlier, later in zip(self.stamps, self.stamps[1:])]


def call_seconds(function):
    """Wrap `function` into a measurement: a function that calls it once and returns the seconds it took."""

    def measure() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return measure


def decode_step_seconds(model, inputs: dict, new_tokens: int, peak_memory=None, **generate_kwargs):
    """Wrap a greedy `generate` of `new_tokens` tokens into a measurement of its median decode step, in seconds.

    A `PeakMemory` given as `peak_memory` measures the first call only, which `alternate` makes a warm-up.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} leaves no decode step to time; use at least 2.")
    calls = []

    def measure() -> float:
        timer = DecodeStepTimer()
        measure_memory = peak_memory is not None and not calls
        calls.append(None)
        with peak_memory if measure_memory else contextlib.nullcontext(), torch.no_grad():
            model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([timer]),
                **generate_kwargs,
            )
        return statistics.median(timer.step_seconds())

    return measure


def alternate(measurements: list, repeats: int = 5, warmup: int = 1) -> list:
    """Run measurements in alternating order and return one `Timing` per measurement.

    Each measurement runs `warmup` times unrecorded, then `repeats` rounds follow. Odd rounds run the
    measurements in reverse order, so that a change of load on a shared machine hits all of them alike
    and their ratios stay meaningful.
    """
    for _ in range(warmup):
        for measure in measurements:
            measure()
    samples = [[] for _ in measurements]
    for round_index in range(repeats):
        order = list(range(len(measurements)))
        if round_index % 2:
            order.reverse()
        for index in order:
            samples[index].append(measurements[index]())
    return [timing_from_samples(values) for values in samples]


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors in a transformers KV cache (`DynamicCache` and its relatives)."""
    if cache is None:
        return 0
    tensors = []
    if hasattr(cache, "layers"):  # transformers >= 4.56: one object per layer
        for layer in cache.layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    else:
        tensors += list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if isinstance(tensor, torch.Tensor))


def ratio(numerator: Timing, denominator: Timing) -> float:
    return numerator.median / denominator.median


def row(measure: str, mmfuse_timing, reference_timing) -> dict:
    """Build a table row from two timings: medians in seconds, min-max ranges and their ratio."""
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
    """Build a table row from two derived values, which have no repetition range of their own."""
    ratio_value = mmfuse_value / reference_value if reference_value else float("nan")
    return {
        "measure": measure,
        "unit": unit,
        "mmfuse": mmfuse_value,
        "reference": reference_value,
        "ratio": ratio_value,
    }


def markdown_table(rows: list, reference_name: str, subject_name: str = "mmfuse") -> str:
    """Render rows from `row`/`value_row` as a markdown table with medians and min-max ranges."""
    lines = [
        f"| measure | {subject_name} | {reference_name} | {subject_name} / {reference_name} |",
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


def plain_table(headers: list, rows: list) -> str:
    """Render a markdown table from a header list and rows of already formatted cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in cells) + " |" for cells in rows]
    return "\n".join(lines)


def format_timing(timing: dict) -> str:
    """Format a `Timing.as_dict()` as `median (min to max)`."""
    return f"{format_value(timing['median'], 's')} ({format_value(timing['minimum'], 's')} to " + (
        f"{format_value(timing['maximum'], 's')})"
    )
