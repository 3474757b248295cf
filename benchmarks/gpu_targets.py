"""Issue 12's targets on the H200 (bfloat16), and issue 16's on the emulated 1080 Ti, judged from a GPU check's results: one line each.

Every target reads MET, NOT MET with the measured figure, or NOT MEASURED with what is missing, so an
unfinished run never reads as a pass. Standard library only (the driver runs before any install).
"""
from __future__ import annotations

MIB = 2**20


def _data(results: dict, step: str) -> dict:
    for r in results.get("steps", []):
        if r["name"] == step:
            return r.get("data") or {}
    return {}


def _verdict(ok: bool) -> str:
    return "MET    " if ok else "NOT MET"


def _bench_rows(results: dict) -> dict:
    """{(case, batch): row} of the segment benchmark."""
    return {(r["case"], r["batch"]): r for r in _data(results, "bench").get("rows", [])}


def _graphs_ms(rows: dict, batch: int):
    row = rows.get(("engine_graphs", batch))
    return row["ms_per_segment"] if row else None


def per_segment_targets(results: dict) -> list:
    rows = _bench_rows(results)
    lines = []
    ms1 = _graphs_ms(rows, 1)
    lines.append(f"{_verdict(ms1 <= 0.5)} Engine with graphs, B=1: {ms1:.3f} ms/segment (target <= 0.5)"
                 if ms1 is not None else "NOT MEASURED Engine with graphs, B=1 <= 0.5 ms/segment")
    ref = rows.get(("reference", 1))
    if ms1 is not None and ref:
        x = ref["ms_per_segment"] / ms1
        lines.append(f"{_verdict(x >= 10)} {x:.1f}x the reference's way at B=1 (target >= 10x)")
    else:
        lines.append("NOT MEASURED >= 10x the reference's way (B=1)")
    ms32 = _graphs_ms(rows, 32)
    if ms32 is not None:
        share = rows[("engine_graphs", 32)]["floor_ms"] / ms32
        lines.append(f"{_verdict(share >= 0.5)} B=32: {100 * share:.0f}% of this run's bf16 GEMM rate "
                     f"(target >= 50%)")
    else:
        lines.append("NOT MEASURED B=32 at >= 50% of the bf16 GEMM rate")
    return lines


def attention_target(results: dict) -> list:
    data = _data(results, "attention_bench")
    by = {(r["T"], r["batch"], r["mode"], r["provider"]): r.get("ms") for r in data.get("rows", [])}
    tri, flash = by.get((512, 32, "full", "triton")), by.get((512, 32, "full", "sdpa_flash"))
    if tri and flash:
        return [f"{_verdict(tri <= flash)} Triton attention B=32, T=512: {tri:.4f} ms vs SDPA flash "
                f"{flash:.4f} ms ({flash / tri:.2f}x; target >= 1.00x)"]
    return ["NOT MEASURED Triton attention at least as fast as SDPA flash at B=32"]


def vram_targets(results: dict) -> list:
    """Flatness from the VRAM tests' recorded properties; B=1 peak from the long run."""
    props = _data(results, "vram").get("properties", {})
    growth = {}
    for test, p in props.items():
        for key, value in p.items():
            if key.startswith("growth_") and isinstance(value, (int, float)):
                growth[f"{test.split('::')[-1]} {key[7:]}"] = value
    lines = []
    if growth:
        worst = max(growth, key=growth.get)
        lines.append(f"{_verdict(growth[worst] <= MIB)} flat VRAM 16 -> 4096 segments: worst growth "
                     f"{growth[worst] / MIB:+.3f} MiB ({worst}; {len(growth)} measures; target <= 1 MiB)")
    else:
        lines.append("NOT MEASURED flat VRAM from 16 to 4096 segments")
    long_run = _data(results, "long_run")
    peak = long_run.get("peak_absolute_mib")
    if peak:
        worst = max(peak["allocated"], peak["reserved"])
        lines.append(f"{_verdict(worst <= 1024)} peak at B=1 over {long_run['segments']} segments: allocated "
                     f"{peak['allocated']:.0f} MiB, reserved {peak['reserved']:.0f} MiB (target <= 1024 MiB; "
                     f"device-wide incl. context {peak['device']:.0f} MiB); {long_run['seconds']:.2f} s")
    else:
        lines.append("NOT MEASURED peak VRAM at B=1 <= 1 GiB (4,096-segment run)")
    return lines


def pascal_targets(results: dict) -> list:
    """Issue 16 on the emulated 1080 Ti: the max_memory choice fits, and the fp32 B=1 peak beside the report's."""
    d = _data(results, "pascal_budget")
    lines = []
    peak = d.get("b1_peak_absolute_mib")
    if peak:
        lines.append(f"MEASURED fp32 B=1 peak over {d['segments']} segments, sm_61 dispatch ({d['attention_sm61']}): "
                     f"allocated {peak['allocated']:.0f} MiB, reserved {peak['reserved']:.0f} MiB (computed "
                     f"{d['estimate_b1_mib']:.0f} MiB; the report's base model: 3.6 GB); {d['seconds']:.1f} s")
    else:
        lines.append("NOT MEASURED fp32 B=1 peak at 4,096 segments under the 11 GiB cap")
    if "fits" in d:
        got = d["slots_peak_absolute_mib"]
        lines.append(f"{_verdict(d['fits'])} max_memory=10GiB chose {d['chosen_slots']} slots: reserved "
                     f"{got['reserved']:.0f} MiB (computed {d['estimate_mib']:.0f} MiB; target <= 10240 MiB)")
    else:
        lines.append("NOT MEASURED max_memory=10GiB's slots fit the budget")
    return lines


def lines(results: dict) -> list:
    if results.get("meta", {}).get("dry_run"):
        return ["targets: not judged in a dry run (CPU, tiny sizes)"]
    return ["targets (H200, bfloat16):", *per_segment_targets(results), *attention_target(results),
            *vram_targets(results), "targets (GTX 1080 Ti emulated, issue 16):", *pascal_targets(results)]
