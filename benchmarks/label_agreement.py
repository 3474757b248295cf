"""Label agreement between two ``rmt-fast evaluate`` runs of the same samples (e.g. float32 and bfloat16).

Each row of ``accuracy.json`` lists every sample's predicted label (``predicted``); rows are matched by
(task, segments). Sample i is the same document in both runs when seed and split are the same (else this
stops and says so), so a row with fewer samples is compared with the other's first ones. Prints a markdown table and writes it with the JSON beside --out.

    rmt-fast evaluate --task memorize --lengths 4096 --samples 40 --out fp32
    rmt-fast evaluate --task memorize --lengths 4096 --samples 40 --dtype bfloat16 --out bf16
    python benchmarks/label_agreement.py fp32/accuracy.json bf16/accuracy.json --out agreement
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rmt_fast import files


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    rows = {}
    for r in data["rows"]:
        if r.get("predicted") is None:
            raise SystemExit(f"{path}: row {r['task']} {r['n_segments']} has no 'predicted' labels "
                             "(written before rmt-fast evaluate recorded them)")
        rows[(r["task"], r["n_segments"])] = r
    return {"meta": data.get("meta", {}), "rows": rows}


def agreement(a: dict, b: dict) -> list:
    if a["meta"].get("seed") != b["meta"].get("seed") or a["meta"].get("split") != b["meta"].get("split"):
        raise SystemExit(f"the runs used other samples: seed/split {a['meta'].get('seed')}/{a['meta'].get('split')} "
                         f"vs {b['meta'].get('seed')}/{b['meta'].get('split')}")
    out = []
    for key in sorted(set(a["rows"]) & set(b["rows"])):
        ra, rb = a["rows"][key], b["rows"][key]
        n = min(len(ra["predicted"]), len(rb["predicted"]))   # the first n samples: the same documents
        pa, pb = ra["predicted"][:n], rb["predicted"][:n]
        differ = [i for i, (x, y) in enumerate(zip(pa, pb)) if x != y]
        out.append({"task": key[0], "segments": key[1], "samples": n, "agree": n - len(differ),
                    "differ_at": differ, "samples_a": len(ra["predicted"]), "samples_b": len(rb["predicted"]),
                    "accuracy_a": ra["accuracy"], "accuracy_b": rb["accuracy"]})
    if not out:
        raise SystemExit("no (task, segments) row is in both runs")
    return out


def table(rows: list, name_a: str, name_b: str) -> str:
    lines = [f"| task | segments | samples compared | labels agree | accuracy {name_a} (samples) | "
             f"accuracy {name_b} (samples) | samples that differ |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['segments']} | {r['samples']} | {r['agree']}/{r['samples']} | "
                     f"{100 * r['accuracy_a']:.1f}% ({r['samples_a']}) | {100 * r['accuracy_b']:.1f}% ({r['samples_b']}) | "
                     f"{', '.join(map(str, r['differ_at'])) or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="accuracy.json of the first run (e.g. float32)")
    p.add_argument("b", type=Path, help="accuracy.json of the second run (e.g. bfloat16)")
    p.add_argument("--out", type=Path, default=None, help="folder for agreement.md and agreement.json")
    args = p.parse_args(argv)
    a, b = load(args.a), load(args.b)
    rows = agreement(a, b)
    name_a, name_b = a["meta"].get("dtype", "a"), b["meta"].get("dtype", "b")
    text = table(rows, name_a, name_b)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        files.write_text(args.out / "agreement.md", text + "\n")
        files.write_text(args.out / "agreement.json", json.dumps({"a": str(args.a), "b": str(args.b), "rows": rows},
                                                                 indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
