"""Where the device time goes: run a callable a few times under torch.profiler and write a table.

Used by `hyperloop bench train --profile` (optimizer steps) and `hyperloop bench decode --profile`
(decode steps). The header line gives, per repeat, the wall time under the profiler, the summed GPU
kernel time and the number of kernels. Their ratio says how busy the GPU was; for a decode step,
profiled without its CUDA graph, comparing the kernel time with the graphed step's time (which the
caller puts in the title) shows how much of a step is latency between kernels rather than work.
After the table come our own Triton kernels call by call (the fused hyper-connection sites').
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch


def profile_table(run: Callable[[], None], repeats: int, device: torch.device, path: Path, title: str) -> None:
    """Call `run` `repeats` times under the profiler; write the 60 operators and kernels with the
    most self device time (CPU time on a CPU) to `path`, so nothing is counted twice."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = 1e3 * (time.perf_counter() - start) / repeats
    averages = prof.key_averages()
    # "Command Buffer Full" is the CPU waiting for room in the launch queue, not GPU work.
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA and e.key != "Command Buffer Full"]
    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / repeats
    launches = sum(e.count for e in kernels) / repeats
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    # Our own Triton kernels (named _*_kernel, e.g. the fused sites'), call by call in launch
    # order: the table's averages hide that the same kernel costs differently at different sites.
    calls: dict[str, list[str]] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and event.name.startswith("_") and event.name.endswith("_kernel"):
            calls.setdefault(event.name, []).append(f"{event.device_time_total:.0f}")
    own = "".join(f"  {name}: {' '.join(times)}\n" for name, times in calls.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{title}: {repeats} repeats; per repeat: {wall_ms:.3f} ms wall (profiled), {busy_ms:.3f} ms "
                    f"of GPU kernels, {launches:.0f} kernels\n" + averages.table(sort_by=sort, row_limit=60) + "\n"
                    + (f"Our Triton kernels, us per call in launch order:\n{own}" if own else ""))  # fmt: skip
