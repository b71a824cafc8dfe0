"""Reviewer sign-off of a patient report, and the append-only audit log.

A report is written as a draft (`reports/<patient>.html`) with an empty sign-off block.
`sign_report` fills the block (reviewer, role, date, decision, comment) into a *copy*,
`reports/<patient>.v<n>.signed.html`, numbered after the versions already signed, and appends one
line to `reports/audit.jsonl`: who, when, which version, and the sha256 of both the draft and the
signed file. A signed file is never overwritten: signing again makes version n + 1, and a draft
rewritten after a signature says which signed versions exist (and the log records it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import re
from pathlib import Path

from fusion.errors import RunError
from fusion.storage import Ledger, atomic_path

AUDIT = "audit.jsonl"
SIGN_OFF = re.compile(r"<!-- sign-off -->.*?<!-- /sign-off -->", re.S)
STATUS = re.compile(r"<!-- status -->.*?<!-- /status -->", re.S)  # the header's "draft, not yet reviewed"
DECISIONS = ("agree", "agree with comment", "disagree", "not assessable")


def signed_versions(reports: Path, patient_id: str) -> list[Path]:
    """The signed copies of a patient's report, oldest first (v2 before v10)."""
    found = []
    for path in reports.glob(f"{patient_id}.v*.signed.html"):
        number = path.name[len(patient_id) + 2:-len(".signed.html")]
        if number.isdigit():
            found.append((int(number), path))
    return [p for _, p in sorted(found)]


def sign_off_block(reviewer: str | None = None, role: str | None = None, date: str | None = None,
                   decision: str | None = None, comment: str | None = None, version: int | None = None) -> str:
    """The HTML of the sign-off block: blank lines to fill by hand, or the reviewer's entries."""
    def cell(value: str | None) -> str:
        return html.escape(value) if value else '<span class="blank"></span>'

    title = f"Reviewed and signed (version {version})" if version else "Review (to be completed by the reviewer)"
    rows = (f"<tr><th>Reviewer</th><td>{cell(reviewer)}</td><th>Role</th><td>{cell(role)}</td></tr>"
            f"<tr><th>Date</th><td>{cell(date)}</td><th>Decision</th><td>{cell(decision)}</td></tr>"
            f'<tr><th>Comment</th><td colspan="3">{cell(comment)}</td></tr>')
    state = "signed" if version else "unsigned"
    return (f'<!-- sign-off --><section id="sign-off" class="sign-off" data-state="{state}"><h2>{title}</h2>'
            f"<table>{rows}</table></section><!-- /sign-off -->")


def sign_report(reports: str | Path, patient_id: str, reviewer: str, role: str = "", decision: str = "agree",
                comment: str = "", pdf: bool = False) -> Path:
    """Write the next signed version of the patient's draft report and log it; returns its path."""
    reports = Path(reports)
    draft = reports / f"{patient_id}.html"
    if not draft.exists():
        raise RunError(f"no draft report for patient {patient_id} in {reports}; write it first "
                       f"(`fusion report RUN --patient {patient_id}`)")
    if not reviewer.strip():
        raise ValueError("--sign needs the reviewer's name")
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of: {', '.join(DECISIONS)}; got '{decision}'")
    text = draft.read_text()
    if not SIGN_OFF.search(text):
        raise RunError(f"{draft} has no sign-off block (written by an older version): rewrite the report first")
    version = len(signed_versions(reports, patient_id)) + 1
    target = reports / f"{patient_id}.v{version}.signed.html"
    if target.exists():  # never overwrite a signed report
        raise RunError(f"{target} already exists; refusing to overwrite a signed report")
    now = dt.datetime.now(dt.UTC)
    block = sign_off_block(reviewer.strip(), role.strip(), now.strftime("%Y-%m-%d %H:%M UTC"), decision,
                           comment.strip(), version)
    status = (f"<!-- status --><strong>signed, version {version}</strong>: {html.escape(reviewer.strip())}, "
              f"{now.strftime('%Y-%m-%d %H:%M UTC')}, {html.escape(decision)}<!-- /status -->")
    with atomic_path(target) as tmp:  # the header must not still call the signed copy a draft
        tmp.write_text(STATUS.sub(lambda _: status, SIGN_OFF.sub(lambda _: block, text, count=1), count=1))
    Ledger(reports / AUDIT).record("sign", patient_id, "signed", version=version, reviewer=reviewer.strip(),
                                   role=role.strip(), decision=decision, comment=comment.strip(),
                                   draft_sha256=_sha256(draft), signed_sha256=_sha256(target), file=target.name)
    if pdf:
        from fusion.report.pdf import print_pdfs

        print_pdfs([target])
    return target


def note_new_draft(reports: Path, patient_id: str, draft: Path) -> None:
    """Log that a draft was rewritten for a patient whose report had been signed."""
    versions = signed_versions(reports, patient_id)
    if versions:
        Ledger(reports / AUDIT).record("draft", patient_id, "rewritten-after-signature",
                                       signed_versions=[p.name for p in versions], draft_sha256=_sha256(draft))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


__all__ = ["sign_report", "signed_versions", "sign_off_block", "note_new_draft", "AUDIT", "DECISIONS"]
