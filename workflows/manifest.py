"""The render manifest: an append-only JSON-lines record shared by every job file rendered into one folder.

``manifest.jsonl`` only ever grows: nothing in it is rewritten or dropped, whichever job file added it. While a
render runs, each process appends its records to its own file in ``manifest.parts/`` (whole lines, fsynced; a
torn last line from a kill is ignored); :func:`fold_parts` then appends every record the manifest lacks (records
carry a unique ``record_id``, so folding twice after a kill adds nothing twice) and removes the parts. A config
hash is finished when some ``done`` record for it names an output that is on disk; the newest record of a hash
is its current state.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.jsonl"
PARTS = "manifest.parts"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a torn line from a killed writer
            continue
        if isinstance(rec, dict) and "hash" in rec:
            records.append(rec)
    return records


def read_records(out_dir: Path) -> list[dict]:
    """Every record in ``manifest.jsonl`` and in the per-process parts not folded in yet, oldest first."""
    out_dir = Path(out_dir)
    records = _read_jsonl(out_dir / MANIFEST)
    parts = out_dir / PARTS
    if parts.is_dir():
        seen = {r.get("record_id") for r in records}
        for p in sorted(parts.glob("*.jsonl")):
            records += [r for r in _read_jsonl(p) if r.get("record_id") not in seen]
    return records


def finished(records: list[dict], out_dir: Path, compare: str | None = None) -> dict[str, dict]:
    """Config hash -> its newest ``done`` record whose output exists (with a comparison to ``compare`` if asked)."""
    done = {}
    for rec in records:
        if rec.get("status") != "done" or not (Path(out_dir) / rec.get("output", "\0")).exists():
            continue
        if compare and (rec.get("compare") or {}).get("method") != compare:
            continue
        done[rec["hash"]] = rec
    return done


def append_record(path: Path, record: dict) -> None:
    """Append one record as one whole, fsynced line (starting a fresh line if a killed writer left a torn one)."""
    append_records(path, [record])


def append_records(path: Path, records: list[dict]) -> None:
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, default=str, allow_nan=False) + "\n" for r in records)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def fold_parts(out_dir: Path) -> int:
    """Append the parts' records that ``manifest.jsonl`` lacks, then remove the parts; returns how many."""
    out_dir = Path(out_dir)
    parts = out_dir / PARTS
    if not parts.is_dir():
        return 0
    known = {r.get("record_id") for r in _read_jsonl(out_dir / MANIFEST)}
    files = sorted(parts.glob("*.jsonl"))
    new = []
    for p in files:
        for rec in _read_jsonl(p):
            if rec.get("record_id") not in known:
                known.add(rec.get("record_id"))
                new.append(rec)
    append_records(out_dir / MANIFEST, new)
    for p in files:
        p.unlink(missing_ok=True)
    try:
        parts.rmdir()
    except OSError:  # another process is still writing its part
        pass
    return len(new)


def current(records: list[dict], out_dir: Path) -> dict[str, dict]:
    """Config hash -> its current record: the newest finished one, else the newest one (an error)."""
    latest = {r["hash"]: r for r in records}
    return {**latest, **finished(records, out_dir)}
