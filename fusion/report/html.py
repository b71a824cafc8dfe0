"""HTML rendering: Jinja2 templates shipped in `fusion/report/templates/`, images as data URIs so that
every report is one self-contained file (it can be mailed, archived or printed as it is)."""

from __future__ import annotations

import base64
import math
from functools import cache

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


@cache
def environment() -> Environment:
    env = Environment(loader=PackageLoader("fusion.report", "templates"), autoescape=select_autoescape(["j2", "html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_number
    env.filters["pvalue"] = fmt_p
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def fmt_number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def fmt_p(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"
