"""Which machine a benchmark run measured: device, versions, date (into every saved run's
machine_info) and the folder name of its results (benchmarks/results/<slug>/)."""
import datetime
import platform
import re

import torch


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu {_cpu_model()}"


def stamp():
    import triton

    info = {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "date": datetime.date.today().isoformat()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1))
    return info


def slug(name=None):
    """'NVIDIA H200' -> 'NVIDIA_H200': a folder name."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name or device_name()).strip("_")
