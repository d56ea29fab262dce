"""Kernels of a Chrome trace (torch.profiler's, as `bench/gpu_profile.py` writes them) grouped by kind: count and
GPU time. `python bench/trace_kernels.py bench/results/traces/*.json.gz`"""

from __future__ import annotations

import collections
import gzip
import json
import sys


def group(name: str) -> str:
    if "paged_decode_split" in name:
        return "decode attention (split-K)"
    if "paged_decode_merge" in name:
        return "decode attention (merge)"
    if "sdpa" in name or "flash" in name:
        return "attention (SDPA)"
    if "nvjet" in name or "gemm" in name or "xmma" in name:
        return "matrix products"
    if "reduce_kernel" in name:
        return "reductions"
    if "copy" in name.lower():
        return "copies and casts"
    return "other elementwise (incl. cat)"


def main() -> int:
    for path in sys.argv[1:]:
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
        kernels = [e for e in events if e.get("cat") == "kernel"]
        count: collections.Counter[str] = collections.Counter()
        micros: collections.Counter[str] = collections.Counter()
        for e in kernels:
            count[group(e["name"])] += 1
            micros[group(e["name"])] += e["dur"]
        print(f"{path}: {len(kernels)} kernels, {sum(micros.values()) / 1e3:.1f} ms")
        for name, us in micros.most_common():
            print(f"  {name:32s} {count[name]:6d} kernels {us / 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
