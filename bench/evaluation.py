"""The headline comparison (`make evaluation`): every policy on 16 simulated instances, for the
long-context-mixed and agentic presets, on the GPU-class profile and the CPU profile, at rates
from light load to past saturation, plus the highest rate each sustains within one SLO.

Writes docs/evaluation/<workload>-<profile>/{compare.md,*.png} and docs/evaluation/results.md
(the ratios of cascade against the strongest baseline, gathered). docs/evaluation.md discusses
them; it is written by hand from these files.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascadeinfer.evaluation.compare import compare
from cascadeinfer.evaluation.simbench import SimSetup, Slo, default_rate
from cascadeinfer.planning import load_profile

OUT = Path(__file__).resolve().parents[1] / "docs" / "evaluation"
CPU_PROFILE = str(
    Path(__file__).resolve().parent / "profiles" / "cpu-vllm-tiny-llama-calibrated-32k.json"
)
"""The profile calibrated here on vLLM for CPU, with its context limit raised from 2K to 32K
(extrapolated; see the file's description): at 2K the long-context and agentic presets
collapse into prompts clamped at the limit."""
SLOS = {
    "gpu-h100-llama3-8b": Slo(p99_ttft_s=30.0, p99_tpot_s=0.1),
    "cpu-vllm-tiny-llama-calibrated-32k": Slo(p99_ttft_s=15.0, p99_tpot_s=0.1),
}
"""Per profile: long prompts (128K tokens on the GPU profile, 32K on the CPU one) take seconds
to prefill alone, so TTFT gets a bound each profile can meet at low load; TPOT is what a
reader of the stream feels."""
REQUESTS = 3000
"""Requests a run (the SLO search runs dozens of runs per policy)."""
RATE_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
"""Multiples of the rate `cascade plan` plans for by default (60% of estimated capacity)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, help="requests a run (default: per profile)")
    p.add_argument("--instances", type=int, default=16)
    p.add_argument("--profiles", default=f"gpu-h100-llama3-8b,{CPU_PROFILE}")
    p.add_argument("--workloads", default="long-context-mixed,agentic")
    p.add_argument("--gather-only", action="store_true", help="only rebuild results.md")
    args = p.parse_args()
    if args.gather_only:
        gather()
        return
    for profile_name in args.profiles.split(","):
        profile = load_profile(profile_name)
        for workload in args.workloads.split(","):
            requests = args.requests or REQUESTS
            base = SimSetup("cascade", profile, workload, args.instances, requests)
            planned = default_rate(base)
            rates = [f * planned for f in RATE_FACTORS]
            out = OUT / f"{workload}-{Path(profile_name).stem}"
            slo = SLOS.get(profile.name, SLOS["gpu-h100-llama3-8b"])
            print(compare(base, rates, slo, str(out)).read_text(), flush=True)
    gather()


def gather() -> None:
    """docs/evaluation/results.md: the ratio tables of every comparison on disk."""
    lines = ["# Headline comparison: gathered results", ""]
    for table in sorted(OUT.glob("*/compare.md")):
        text = table.read_text()
        title = text.splitlines()[0].removeprefix("## ")
        ratios = text[text.index("Cascade against the strongest") :]
        ratios = re.sub(r"\nPlots: .*", "", ratios).strip()
        lines += [
            f"## {title}",
            "",
            f"Full table and plots: `{table.parent.name}/`.",
            "",
            ratios,
            "",
        ]
    (OUT / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
