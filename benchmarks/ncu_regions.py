"""Where a kernel's time goes, by code region, from Nsight Compute's warp-state sampling (runs anywhere, no GPU).

Input: the SASS source page of an ``ncu`` report with the SourceCounters section, as CSV. On the GPU machine:

    ncu --section SourceCounters --section WarpStateStats -k regex:_headwise_attention_kernel --launch-skip 2 \\
        --launch-count 1 -o prof python benchmarks/kernel_ab.py --baseline FILE --profile shipped
    ncu -i prof.ncu-rep --page source --csv --print-source sass > source.csv

Then ``python benchmarks/ncu_regions.py source.csv``. The SASS is cut at its loops (backward branches before the
kernel's last EXIT): the prologue before the first loop, each loop, the code between loops and the epilogue after
the last. The retry stubs placed after EXIT (``mbarrier`` try-wait spins) count with the loop they branch back into.
Each region's share of the warp samples is its share of the warps' time; with one program per SM and every warp in
the same phase, that is its share of the kernel's time. The top stall reasons say why the warps waited there.
"""

from __future__ import annotations

import csv
import re
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def read(path: str) -> list[dict]:
    rows = list(csv.reader(open(path, newline="")))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    return [dict(zip(rows[head], r)) for r in rows[head + 1:] if len(r) == len(rows[head])]


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def branch_target(source: str) -> int | None:
    if "BRA" not in source:
        return None
    match = re.search(r"0x[0-9a-f]+", source.split("BRA", 1)[1])
    return int(match.group(0), 16) if match else None


def regions(rows: list[dict]) -> list[str]:
    """The region name of every instruction."""
    addr = [int(r["Address"], 16) for r in rows]
    last_exit = max(a for a, r in zip(addr, rows) if "EXIT" in r["Source"])
    loops = sorted((t, a) for a, r in zip(addr, rows)
                   if (t := branch_target(r["Source"])) is not None and t < a <= last_exit)
    outer = []  # loops not nested in an earlier one (the try-wait spins inside a loop body are nested)
    for lo, hi in loops:
        if not any(o_lo <= lo and hi <= o_hi for o_lo, o_hi in outer):
            outer = [(o_lo, o_hi) for o_lo, o_hi in outer if not (lo <= o_lo and o_hi <= hi)] + [(lo, hi)]
    outer.sort()

    def name(a: int) -> str:
        for k, (lo, hi) in enumerate(outer):
            if lo <= a <= hi:
                return f"loop {k + 1}"
            if a < lo:
                return "prologue" if k == 0 else f"between loops {k} and {k + 1}"
        return "epilogue"

    names = []
    for i, a in enumerate(addr):
        if a > last_exit:  # a retry stub: the region its next branch back into the kernel body lands in
            back = next((t for r in rows[i:] if (t := branch_target(r["Source"])) is not None and t <= last_exit),
                        None)
            names.append(name(back) if back is not None else "stubs")
        else:
            names.append(name(a))
    return names


def main(path: str) -> None:
    rows = read(path)
    stalls = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    total = sum(number(r[SAMPLES]) for r in rows)
    summary: dict[str, dict] = {}
    for region, row in zip(regions(rows), rows):
        entry = summary.setdefault(region, {"samples": 0.0, **{k: 0.0 for k in stalls}})
        entry["samples"] += number(row[SAMPLES])
        for k in stalls:
            entry[k] += number(row[k])
    print(f"{path}: {total:.0f} warp samples")
    for region, entry in summary.items():
        top = sorted(((entry[k], k) for k in stalls), reverse=True)[:4]
        print(f"{region:22s} {entry['samples'] / total * 100:5.1f}%   " +
              ", ".join(f"{k.removeprefix('stall_')} {v / total * 100:.1f}%" for v, k in top if v))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
