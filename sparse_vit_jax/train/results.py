"""Results files, written atomically (temp file + rename) by process 0 only."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import jax

from sparse_vit_jax.checkpoints.io import atomic_write_bytes


def write_json(path: str | Path, obj: Any) -> None:
    if jax.process_index() == 0:
        atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + '\n').encode())



def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    if jax.process_index() != 0 or not rows:
        return
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator='\n')
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def write_text(path: str | Path, text: str) -> None:
    if jax.process_index() == 0:
        atomic_write_bytes(path, text.encode())
