"""Start-up: the CLI and the slide-side library load without the heavy libraries (issue 17)."""

import subprocess
import sys

HEAVY = ("torch", "sksurv", "lifelines", "prefect", "timm", "matplotlib")


def _imported_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint('imported:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("imported:"), done.stdout[-500:]
    return [m for m in last.removeprefix("imported:").split(",") if m]


def test_help_and_tiling_import_no_heavy_library():
    """`fusion --help` and the tiling library need none of torch, scikit-survival, lifelines or Prefect."""
    assert _imported_after("from fusion.cli import app\n"
                           "try:\n    app(['--help'])\nexcept SystemExit:\n    pass") == []
    assert _imported_after("from fusion.wsi import open_slide, tile_slide\nimport fusion.cohort") == []


def test_the_tiling_stage_and_its_flow_import_neither_torch_nor_scikit_survival():
    """`fusion tile` runs `fusion.stages` (and, under Prefect, `flows.tiling`): features and training
    are imported by the functions that need them, not at module top (issue 17, item 3)."""
    assert _imported_after("import fusion.stages, fusion.run, fusion.preflight") == []
    assert _imported_after("import flows.tiling") == ["prefect"]


def test_version_is_still_there():
    import fusion

    assert fusion.__version__ and isinstance(fusion.__version__, str)
