"""The public trace statistics docs/design/workloads.md quotes for the reasoning and
production-mix presets, computed from the traces themselves (standard library only):

    git clone https://github.com/Azure/AzurePublicDataset
    git clone https://github.com/kvcache-ai/Mooncake
    git clone https://github.com/alibaba/ServeGen
    python scripts/public_trace_stats.py --azure AzurePublicDataset/data \\
        --mooncake Mooncake/FAST25-release/traces --servegen ServeGen/data/reason/deepseek-r1

Azure: the 2023 LLM inference traces of Splitwise (Patel et al., ISCA 2024), one request a CSV
row. Mooncake: the FAST'25 traces of Kimi (Qin et al.), one request a JSON line. ServeGen (Xiang
et al., 2025): per client and window, length distributions (PDFs) and arrival rates; the
distributions are mixed weighted by each window's requests (rate x 600 s).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

Histogram = dict[int, float]
"""Length -> weight (a count, or a probability mass times a number of requests)."""

WINDOW_S = 600


def summary(h: Histogram) -> str:
    items = sorted(h.items())
    total = sum(w for _, w in items)

    def quantile(q: float) -> int:
        acc = 0.0
        for x, w in items:
            acc += w
            if acc >= q * total:
                return x
        return items[-1][0]

    mean = sum(x * w for x, w in items) / total
    return (
        f"mean {mean:8.0f}  median {quantile(0.5):7d}  p90 {quantile(0.9):7d}  "
        f"p99 {quantile(0.99):7d}  max {items[-1][0]:7d}"
    )


def count(values: list[int]) -> Histogram:
    h: Histogram = defaultdict(float)
    for v in values:
        h[v] += 1
    return h


def azure(directory: Path) -> None:
    for name in ("conv", "code"):
        with open(directory / f"AzureLLMInferenceTrace_{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        print(f"azure-2023 {name} ({len(rows)} requests)")
        print(f"  prompt  {summary(count([int(r['ContextTokens']) for r in rows]))}")
        print(f"  output  {summary(count([int(r['GeneratedTokens']) for r in rows]))}")


def mooncake(directory: Path) -> None:
    for path in sorted(directory.glob("*_trace.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        print(f"mooncake {path.stem} ({len(rows)} requests)")
        print(f"  prompt  {summary(count([r['input_length'] for r in rows]))}")
        print(f"  output  {summary(count([r['output_length'] for r in rows]))}")


def servegen(directory: Path) -> dict[str, Histogram]:
    mixed: dict[str, Histogram] = defaultdict(lambda: defaultdict(float))
    cvs: Histogram = defaultdict(float)
    requests = 0.0
    for dataset in sorted(directory.glob("chunk-*-dataset.json")):
        client = dataset.name.split("-")[1]
        rates = []
        for line in (directory / f"chunk-{client}-trace.csv").read_text().splitlines():
            start, rate, cv, *_ = line.split(",")
            rates.append((int(start), float(rate)))
            if float(rate) > 0:
                cvs[round(float(cv) * 100)] += float(rate) * WINDOW_S
        windows = {int(k): v for k, v in json.loads(dataset.read_text()).items()}
        starts = sorted(windows)
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else math.inf
            weight = sum(r * WINDOW_S for t, r in rates if start <= t < end)
            if weight <= 0:
                continue
            requests += weight
            for field in ("input_tokens", "output_tokens"):
                for x, p in ast.literal_eval(windows[start][field]).items():
                    mixed[field][int(x)] += weight * p
    print(f"servegen {directory.name} (~{requests:.0f} requests)")
    print(f"  prompt  {summary(mixed['input_tokens'])}")
    print(f"  output  {summary(mixed['output_tokens'])}")
    fit = lognormal_mixture(mixed["output_tokens"], [(0.5, 400.0, 0.5), (0.5, 1500.0, 0.8)])
    print("  output as a two-component log-normal mixture (weight, median, sigma): " + str(fit))
    print(f"  inter-arrival CV x 100 of a client's 10-minute window, per request: {summary(cvs)}")
    return mixed


def lognormal_mixture(
    h: Histogram, start: list[tuple[float, float, float]], iterations: int = 300
) -> list[tuple[float, int, float]]:
    """Expectation-maximization for a mixture of normals in log length."""
    points = [(math.log(x), w) for x, w in h.items() if x > 0]
    total = sum(w for _, w in points)
    weights = [c[0] for c in start]
    means = [math.log(c[1]) for c in start]
    sds = [c[2] for c in start]
    for _ in range(iterations):
        resp = []
        for x, w in points:
            d = [
                weights[j] * math.exp(-0.5 * ((x - means[j]) / sds[j]) ** 2) / sds[j]
                for j in range(len(start))
            ]
            s = sum(d) or 1e-300
            resp.append([w / total * dj / s for dj in d])
        for j in range(len(start)):
            nj = sum(r[j] for r in resp)
            weights[j] = nj
            means[j] = sum(r[j] * x for r, (x, _) in zip(resp, points, strict=True)) / nj
            var = sum(r[j] * (x - means[j]) ** 2 for r, (x, _) in zip(resp, points, strict=True))
            sds[j] = math.sqrt(var / nj)
    return [
        (round(weights[j], 3), round(math.exp(means[j])), round(sds[j], 3))
        for j in range(len(start))
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--azure", type=Path, help="AzurePublicDataset/data")
    p.add_argument("--mooncake", type=Path, help="Mooncake/FAST25-release/traces")
    p.add_argument("--servegen", type=Path, help="ServeGen/data/reason/deepseek-r1")
    args = p.parse_args()
    if args.azure:
        azure(args.azure)
    if args.mooncake:
        mooncake(args.mooncake)
    if args.servegen:
        servegen(args.servegen)


if __name__ == "__main__":
    main()
