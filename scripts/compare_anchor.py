"""Compares a bench JSON with the SGLang anchor: per (shape, M) our best row against sglang_triton_ms.

The two route their tokens with different random ids, so at small M they can touch different numbers
of experts (bytes of weights): `touched` gives ours (the mean over the timed input sets, when the bench
recorded it) and the anchor's, and `%fl_sgl` the anchor's own percent of its floor beside ours.
`%burst` is ours against the floor at the burst matrix rate, for benches that recorded it (NOTES v30).

Usage: python3 scripts/compare_anchor.py bench.json [anchor.json]
"""
import json
import sys

bench = json.load(open(sys.argv[1]))
anchor_path = sys.argv[2] if len(sys.argv) > 2 else "../shared/anchors/h200-sglang.json"
anchor = {(r["shape"], r["M"]): r for r in json.load(open(anchor_path))["rows"]}
best = {}
split1 = {}
for row in bench["rows"]:
    key = (row["shape"], row["M"])
    if key not in best or row["ms"] < best[key]["ms"]:
        best[key] = row
    if row["split_mode"] == "none":
        split1[key] = row
print(f"{'shape':12} {'M':>5} {'ours_ms':>8} {'best setting':>14} {'split1_ms':>9} {'sglang_ms':>9} {'speed':>6} {'%floor':>6} {'%burst':>6} {'%fl_sgl':>7} {'touched':>11}")
for key in sorted(best, key=lambda k: (k[0], k[1])):
    row = best[key]
    a = anchor.get(key)
    ratio = a["sglang_triton_ms"] / row["ms"] if a else float("nan")
    s1 = split1.get(key, {}).get("ms", float("nan"))
    sgl_floor = 100 * a["floor_ms"] / a["sglang_triton_ms"] if a else float("nan")
    touched = f"{row.get('experts_touched', float('nan')):.2f}/{a['experts_touched'] if a else '-'}"
    burst = 100 * row["floor_ms_burst"] / row["ms"] if "floor_ms_burst" in row else float("nan")
    print(f"{key[0]:12} {key[1]:>5} {row['ms']:8.4f} {row['split_mode'][:14]:>14} {s1:9.4f} {a['sglang_triton_ms'] if a else float('nan'):9.4f} {ratio:6.2f} {100 * row['floor_ms'] / row['ms']:6.1f} {burst:6.1f} {sgl_floor:7.1f} {touched:>11}")
