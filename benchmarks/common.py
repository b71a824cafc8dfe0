"""Shared helpers: machine description, timing in a fresh process, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"  # generated inputs (slides), ignored by git
RESULTS = HERE / "results"


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "date": time.strftime("%Y-%m-%d")}


def machine_tag() -> str:
    m = machine()
    return f"{m['cores']}cpu-{'cuda' if m['cuda'] else 'nogpu'}"


def run_isolated(code: str, baseline: str | None = None, python: str | None = None) -> dict:
    """Run `code` (which prints JSON objects, one a line) in a fresh interpreter, so that peak
    memory belongs to that measurement alone; `baseline` runs it against another version of `fusion`
    (see `baseline_arg`), `python` in another interpreter (another venv). Snippets call `reset_peak()`
    (see RESET_PEAK) after their imports and print `base_rss_mib`, so the peak reported is that of the
    work, not imports."""
    wrapper = code + (
        "\nimport json as _j, re as _re\n"
        "_hwm = int(_re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "print(_j.dumps({'peak_rss_mib': _hwm / 1024}))\n")
    # -P: no current directory on sys.path, or a run from the repository would import its `fusion`, not the
    # baseline's (PYTHONPATH comes after the current directory).
    done = subprocess.run([python or sys.executable, "-P", "-c", wrapper], capture_output=True, text=True,
                          check=False, env=baseline_env(baseline))
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = {}
    for d in lines:
        result.update(d)
    return result


def baseline_env(baseline: str | None) -> dict | None:
    """The environment of a child interpreter: with `baseline` (a folder holding another version of the
    `fusion` package), that version shadows the installed one; None keeps this one."""
    if not baseline:
        return None
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [baseline, os.environ.get("PYTHONPATH")]))}


def timed_python(code: str, baseline: str | None = None, check: bool = True) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, its stdout) of `python -P -c code` in a fresh interpreter."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-P", "-c", code], env=baseline_env(baseline), capture_output=True,
                          text=True, check=check)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stdout


# Paste into a snippet after its imports: resets the kernel's peak-RSS mark (Linux clear_refs).
RESET_PEAK = """
import re as _re
open('/proc/self/clear_refs', 'w').write('5')
_base = int(_re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024
print(json.dumps({{"base_rss_mib": _base}}))
"""


def make_slide(name: str, px: int, mpp: float, seed: int = 1) -> Path:
    """A synthetic slide with pen ink and debris under benchmarks/out/slides/, rendered once, with its
    ground-truth label map beside it (`<name>.labels.png`, one pixel per `fusion.synth.LABEL_PX` level-0 px)."""
    import cv2
    import numpy as np

    from fusion.synth import SynthConfig, render_slide

    path = OUT / "slides" / f"{name}.tiff"
    labels_path = path.with_suffix(".labels.png")
    if path.exists() and labels_path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    config = SynthConfig(slide_px=px, mpp=mpp, pen_prob=1.0, region_um=300.0)
    labels, _, _ = render_slide(path, np.array([0.3, 0.3, 0.15, 0.1, 0.15]), seed=seed, config=config)
    cv2.imwrite(str(labels_path), labels)
    print(f"rendered {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def baseline_arg(parser) -> None:
    """`--baseline DIR`: also measure, in the same rounds, the `fusion` package found in DIR, e.g. made by
    `git archive <commit> fusion | tar -x -C DIR`: before/after figures under the same load."""
    parser.add_argument("--baseline", help="folder holding another version's `fusion` package, measured alongside")


def load_average() -> float:
    """1-minute load average: other jobs on the machine, said beside every figure."""
    return round(os.getloadavg()[0], 2)


def median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values))


def write_results(name: str, rows: list[dict], columns: list[str], notes: str = "") -> Path:
    """benchmarks/results/<name>-<machine>.json and .md (a markdown table with the machine)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"{name}-{machine_tag()}"
    payload = {"machine": machine(), "rows": rows, "notes": notes}
    base.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    lines = [f"### {name}", "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
             f"{'CUDA' if m['cuda'] else 'no GPU'}, torch {m['torch']}, {m['date']}.", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    if notes:
        lines += ["", notes]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return base.with_suffix(".md")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
