"""Shared by benchmark scripts: JSON output with machine facts, and markdown tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's entries
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    # int8 and bf16 speed depends on these (VNNI: one instruction per int8 dot product; AMX: tiles)
    isa = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"})
    # a training path is one per (kernel ISA, thread count): record any pinning (tests/conftest.py)
    pinned = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    return {"cpu": cpu, "isa": isa, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_pinned": pinned,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(name: str, payload: dict[str, Any], out: str | None = None) -> Path:
    from backdoorlab.utils import atomic_path

    path = Path(out) if out else RESULTS / f"{name}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    return path


def table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
