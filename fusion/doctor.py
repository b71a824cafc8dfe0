"""`fusion doctor`: everything a run needs, checked by doing it once.

Each check exercises the real thing rather than an import: openslide opens a small tiled TIFF
written on the spot, torch runs a product on each device, Chromium starts headless and prints a
page to PDF, the working folder takes a file. With a pipeline config, the cohort is validated, each
encoder is built from its weights exactly as extraction would, and the disk is measured against
what the run will write. Prefect's check lives in `fusion/cli.py` (this package never imports Prefect).
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warn", "fail"]
GB = 1024**3
RUN_BYTES_PER_SLIDE = int(1.5 * 1024**2)  # QC picture (~1 MB at 1,024 px) + tiles and features .h5
RUN_BYTES_FIXED = GB // 2  # models, analysis, reports
DEMO_BYTES = int(1.2 * GB)  # `make demo`: 0.7 GB of synthetic slides + its run folder


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table."""

    name: str
    status: Status
    detail: str


def _guard(name: str, fn) -> Check:
    """Run one check; an exception it did not expect is that check's failure, never the doctor's."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the doctor reports, it never crashes
        return Check(name, "fail", f"{type(e).__name__}: {e}")


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", "ok" if ok else "fail",
                 f"{platform.python_version()} ({sys.executable})" + ("" if ok else "; fusion needs Python 3.11+"))


def check_openslide() -> Check:
    """Open a small tiled TIFF written here with openslide (the reader every slide goes through)."""
    import numpy as np
    import openslide
    import tifffile

    from fusion.wsi import open_slide

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "check.tiff"
        pixels = np.full((512, 512, 3), (230, 150, 190), np.uint8)
        tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="jpeg")
        with open_slide(path, mpp=0.5, backend="openslide") as slide:
            read = slide.read_rgb((100, 100), 0, (64, 64))
    if np.abs(read.astype(int) - pixels[:64, :64]).max() > 8:
        return Check("openslide", "fail", "a small JPEG-tiled TIFF read back with wrong pixels")
    return Check("openslide", "ok", f"{openslide.__library_version__} (python {openslide.__version__}); "
                                    "read a tiled JPEG TIFF")


def check_torch() -> Check:
    """torch's version and devices; a product on each CUDA device in bf16 (the extraction's precision)."""
    import torch

    x = torch.ones(64, 64)
    if float((x @ x)[0, 0]) != 64.0:
        return Check("torch", "fail", f"{torch.__version__}: a matrix product on the CPU came out wrong")
    threads = f"{torch.get_num_threads()} CPU threads"
    if not torch.cuda.is_available():
        return Check("torch", "ok", f"{torch.__version__}; no CUDA device: everything runs on the CPU ({threads})")
    names = []
    for i in range(torch.cuda.device_count()):
        y = torch.ones(64, 64, device=f"cuda:{i}", dtype=torch.bfloat16)
        float((y @ y)[0, 0])
        names.append(torch.cuda.get_device_name(i))
    return Check("torch", "ok", f"{torch.__version__}; CUDA {torch.version.cuda}: {', '.join(names)} (bf16 ok; "
                                f"{threads})")


def check_chromium(needed: bool = False) -> Check:
    """Start Chromium headless once and print a page to PDF, as `fusion report` does."""
    bad = "fail" if needed else "warn"
    why = "the config asks for PDF reports" if needed else "only PDF reports need it; HTML reports do not"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return Check("chromium", bad, f"playwright is not installed (pip install playwright; {why})")
    from fusion.report.pdf import chromium_path, launch

    start = time.perf_counter()
    with sync_playwright() as p:
        try:
            browser = launch(p)
        except Exception as e:  # noqa: BLE001 - launch's message says what to install
            return Check("chromium", bad, f"{e} ({why})")
        try:
            page = browser.new_page()
            page.set_content("<h1>fusion doctor</h1>")
            pdf = page.pdf(format="A4")
            version = browser.version
        finally:
            browser.close()
    if not pdf.startswith(b"%PDF"):
        return Check("chromium", bad, "Chromium started but printed no PDF")
    return Check("chromium", "ok", f"{version} at {chromium_path() or 'Playwright’s own browser'}: started headless "
                                   f"and printed a PDF in {time.perf_counter() - start:.1f} s")


def check_folder(name: str, folder: Path, need: int, what: str) -> Check:
    """`folder` (or the nearest parent that exists) takes a file and has `need` bytes free."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    with tempfile.NamedTemporaryFile(dir=existing, prefix=".fusion-doctor-"):
        pass
    free = shutil.disk_usage(existing).free
    detail = f"{existing}: writable, {free / GB:.1f} GB free; {what} needs about {need / GB:.1f} GB"
    return Check(name, "ok" if free >= 2 * need else "warn" if free >= need else "fail", detail)


def environment_checks(folder: Path, pdf_needed: bool = False) -> list[Check]:
    """Python, openslide, torch/CUDA, Chromium and the working folder."""
    checks = [_guard("python", check_python), _guard("openslide", check_openslide), _guard("torch", check_torch),
              _guard("chromium", lambda: check_chromium(pdf_needed))]
    checks.append(_guard("working folder", lambda: check_folder("working folder", folder, DEMO_BYTES,
                                                                  "the demo (`make demo`)")))
    return checks


def config_checks(config) -> list[Check]:
    """What one pipeline config needs: its cohort, its models, its encoders' weights, room for its run."""
    from fusion.cohort import load_cohort
    from fusion.run import RunLayout

    checks = []
    try:
        cohort = load_cohort(config.cohort)
        n_slides = len(cohort.slides)
        checks.append(Check("cohort", "ok", f"{config.cohort}: {len(cohort.patients)} patients, {n_slides} slides"))
    except Exception as e:  # noqa: BLE001
        n_slides = 0
        checks.append(Check("cohort", "fail", str(e).splitlines()[0] if str(e) else type(e).__name__))
    checks += [_model_check(m.model) for m in config.models]
    layout = RunLayout(Path(config.run))
    checks += [_guard(f"encoder {name}", lambda name=name: _encoder_check(name, layout))
               for name in config.extract.encoders]
    need = n_slides * RUN_BYTES_PER_SLIDE + RUN_BYTES_FIXED
    checks.append(_guard("run folder", lambda: check_folder("run folder", Path(config.run), need,
                                                              f"a run of {n_slides} slides")))
    return checks


def _model_check(name: str) -> Check:
    from fusion.models import available_models
    from fusion.train.baselines import BASELINES
    from fusion.train.loop import model_inputs

    known = [*available_models(), *BASELINES]
    if name not in known:
        return Check(f"model {name}", "fail", f"unknown model; available: {', '.join(known)}")
    return Check(f"model {name}", "ok", f"reads {', '.join(model_inputs(name))}")


def _encoder_check(name: str, layout) -> Check:
    """Build the encoder as extraction will (weights loaded and matched to the architecture)."""
    from fusion.stages import build_encoders

    head, _, weights = name.partition("@")
    if weights and weights != "random" and not Path(weights).exists():  # say so before building a large network
        return Check(f"encoder {name}", "fail", f"weights not found: {weights} (nothing is downloaded: place the "
                                                "file there, or fix the path in the config)")
    start = time.perf_counter()
    encoder = build_encoders([name], layout)[0]
    return Check(f"encoder {name}", "ok", f"built in {time.perf_counter() - start:.1f} s: {encoder.dim}-D features "
                                          f"of {encoder.input_size} px tiles (version {encoder.version})")


def model_rows() -> list[tuple[str, str, str]]:
    """(name, kind, what it reads) for every registered model and every baseline."""
    from fusion.models import available_models
    from fusion.models.registry import model_options
    from fusion.train.baselines import BASELINES
    from fusion.train.loop import model_inputs

    def reads(m: str) -> str:
        options = model_options(m)
        return ", ".join(model_inputs(m)) + (f"; options: {', '.join(options)}" if options else "")

    return ([(m, "network", reads(m)) for m in available_models()]
            + [(b, "baseline", ", ".join(model_inputs(b))) for b in BASELINES])


def encoder_rows(run: Path | None = None) -> list[tuple[str, str]]:
    """(how to name it, what it needs) for every encoder fusion knows of, with those trained in `run`."""
    from fusion.features import available_encoders
    from fusion.features.pretrained import FOUNDATIONS

    rows = [(name, "built in, no weights") for name in available_encoders()]
    if run is not None and (Path(run) / "encoders").is_dir():
        rows += [(d.name, f"trained in this run by `fusion pretrain` ({d})")
                 for d in sorted((Path(run) / "encoders").iterdir()) if (d / "config.json").is_file()]
    rows += [(f"{name}@<weights file>", f"local weights of {f.arch} (never downloaded)")
             for name, f in sorted(FOUNDATIONS.items())]
    rows += [("timm:<architecture>@<weights file>", "any timm architecture, local weights"),
             ("ssl@<folder> or a name from `fusion pretrain`", "an encoder trained on the run's tiles")]
    return rows
