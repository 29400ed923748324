"""Results files, written atomically (temp file + rename) by process 0 only; a write that
fails there ends every process (`on_process0`).

JSON is strict: non-finite numbers are written as null (Python's json would write
a bare NaN, which no other parser accepts).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from sparse_vit_jax.checkpoints.io import atomic_write_bytes
from sparse_vit_jax.multihost import on_process0


def finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(finite_or_none(obj), indent=1, sort_keys=True, allow_nan=False)
    write_bytes(path, (text + '\n').encode())


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator='\n')
    w.writeheader()
    w.writerows(rows)
    write_bytes(path, buf.getvalue().encode())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: str | Path, data: bytes) -> None:
    """`data` to `path` by process 0 (called by every process)."""
    on_process0(lambda: atomic_write_bytes(path, data))
