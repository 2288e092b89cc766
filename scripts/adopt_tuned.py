#!/usr/bin/env python3
"""Merges tuned entries into the shipped tables (Sources/MoEConfigs/configs.json), entry by entry.

Usage: python3 scripts/adopt_tuned.py TUNED.json... [--only NAME:M[,M...]]...

TUNED.json is what `fused-moe tune --out` writes ({table file name: {batch size: entry}}); `tune
--out` merges whole tables, this replaces only the batch sizes a tuned file holds (the others stay
as shipped). --only limits it to the named batch sizes of tables whose file name starts with NAME
(e.g. E=128,N=384); without it every tuned entry is taken. Prints each change.
"""
import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
shipped_path = root / "Sources" / "MoEConfigs" / "configs.json"
args = sys.argv[1:]
files, only = [], []
while args:
    arg = args.pop(0)
    if arg == "--only":
        if not args:
            sys.exit("adopt_tuned.py: --only needs NAME:M[,M...]")
        name, _, ms = args.pop(0).partition(":")
        if not name or not ms:
            sys.exit(f"adopt_tuned.py: --only expects NAME:M[,M...], got {name}:{ms}")
        only.append((name, set(ms.split(","))))
    else:
        files.append(Path(arg))
if not files:
    sys.exit(__doc__)
shipped = json.loads(shipped_path.read_text())


def wanted(table, m):
    return not only or any(table.startswith(name) and m in ms for name, ms in only)


changes = 0
for path in files:
    tuned = json.loads(path.read_text())
    for table, entries in tuned.items():
        for m, entry in entries.items():
            if not wanted(table, m):
                continue
            old = shipped.setdefault(table, {}).get(m)
            if old == entry:
                continue
            shipped[table][m] = entry
            changes += 1
            print(f"{table} M={m}:\n  was {json.dumps(old)}\n  now {json.dumps(entry)}")
for table in shipped:
    shipped[table] = dict(sorted(shipped[table].items(), key=lambda kv: int(kv[0])))
shipped_path.write_text(json.dumps(shipped, indent=1) + "\n")
print(f"{changes} entries changed in {shipped_path.relative_to(root)}")
