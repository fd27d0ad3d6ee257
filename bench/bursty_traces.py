"""Writes the bursty JSONL traces the policy work of 2026-12-01 was checked on (docs/benchmarks.md,
"Policy changes of 2026-12-01"): reasoning-style, production-like, long-context and chat traffic
with Gamma inter-arrival gaps, independent of the presets `cascade bench sim` knows.

    python bench/bursty_traces.py OUT_DIR

Lengths are log-normal (median, sigma) and clamped; arrivals average 5 req/s (`cascade bench
sim --rate R` rescales them, keeping the burstiness): Gamma gaps with a given coefficient of
variation (a renewal process: bursts a few requests long), or, for the kinds added in the tenth
session, Poisson arrivals whose rate moves over minutes (on/off phases, or a wave over the trace),
as rate changes in real logs do (BurstGPT, Azure's traces).
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

Lengths = tuple[int, int]
Arrivals = Callable[[random.Random, float], float]
"""The next inter-arrival gap (s), given the share of the trace written so far."""
RATE = 5.0
"""Mean arrival rate of a written trace (req/s), before `--rate` rescales it."""


def _ln(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, median * math.exp(rng.gauss(0, sigma)))))


def chat(rng: random.Random) -> Lengths:
    return _ln(rng, 100, 1.0, 4, 4096), _ln(rng, 220, 0.9, 1, 2048)


def reasoning(rng: random.Random) -> Lengths:
    return _ln(rng, 300, 0.8, 16, 4000), _ln(rng, 3000, 0.9, 64, 32_000)


def documents(rng: random.Random) -> Lengths:
    return _ln(rng, 12_000, 1.0, 2048, 120_000), _ln(rng, 250, 0.8, 1, 4096)


def production(rng: random.Random) -> Lengths:
    u = rng.random()
    return chat(rng) if u < 0.55 else reasoning(rng) if u < 0.8 else documents(rng)


def summaries(rng: random.Random) -> Lengths:
    """Long inputs, short answers (summaries, extraction): prefill-heavy."""
    return _ln(rng, 4000, 0.9, 256, 32_000), _ln(rng, 150, 0.7, 1, 1024)


def code(rng: random.Random) -> Lengths:
    """Code assistants: a file or two of context, a short completion or a longer edit."""
    return _ln(rng, 1500, 1.0, 32, 16_000), _ln(rng, 120, 1.2, 1, 4096)


def code_completion(rng: random.Random) -> Lengths:
    """Code completion as Azure's 2023 code trace has it: prompts ~2,000 tokens, a few dozen out."""
    return _ln(rng, 2000, 0.8, 16, 16_000), _ln(rng, 24, 1.0, 1, 1024)


def mooncake(rng: random.Random) -> Lengths:
    """Long-document serving as Mooncake's trace has it: prompts ~8,000 tokens, answers ~300."""
    return _ln(rng, 8000, 0.9, 256, 120_000), _ln(rng, 300, 0.6, 1, 2048)


def capped_reasoning(rng: random.Random) -> Lengths:
    """Reasoning answers cut at a 16K max_tokens: a spike of requests at the cap."""
    return _ln(rng, 200, 1.0, 8, 3000), min(16_384, _ln(rng, 5000, 1.1, 32, 10**6))


def uniform(rng: random.Random) -> Lengths:
    """No tail at all: prompts and answers uniform over their ranges."""
    return rng.randint(1, 8000), rng.randint(1, 2000)


def pareto_chat(rng: random.Random) -> Lengths:
    """Chat whose answers have a Pareto tail (shape 1.3) instead of a log-normal one."""
    return _ln(rng, 150, 1.0, 4, 8000), min(16_000, int(50 * rng.paretovariate(1.3)))


def three_clusters(rng: random.Random) -> Lengths:
    """Equal shares of short chat, 30K-token documents with short answers, and short prompts
    with 8K-token answers: three length classes far apart, none the majority."""
    u = rng.random()
    if u < 1 / 3:
        return _ln(rng, 80, 0.6, 4, 1000), _ln(rng, 150, 0.6, 1, 1000)
    if u < 2 / 3:
        return _ln(rng, 30_000, 0.4, 8000, 100_000), _ln(rng, 100, 0.6, 1, 600)
    return _ln(rng, 100, 0.6, 4, 1000), _ln(rng, 8000, 0.4, 1000, 30_000)


def agent_steps(rng: random.Random) -> Lengths:
    """Agent steps: a long context (tools, history) and a short tool call or reply."""
    return _ln(rng, 6000, 0.7, 500, 60_000), _ln(rng, 60, 0.8, 1, 800)


def prefill_only(rng: random.Random) -> Lengths:
    """Prompts with a one-token answer (classification, scoring, embedding-like use)."""
    return _ln(rng, 2000, 1.0, 16, 32_000), 1


def long_documents(rng: random.Random) -> Lengths:
    """Every prompt 40-120K tokens: one length class, all of it long."""
    return _ln(rng, 80_000, 0.2, 40_000, 120_000), _ln(rng, 200, 0.8, 1, 2000)


def rare_documents(rng: random.Random) -> Lengths:
    """Chat with one request in twenty a 20-120K-token document."""
    if rng.random() < 0.05:
        return _ln(rng, 60_000, 0.3, 20_000, 120_000), _ln(rng, 200, 0.6, 1, 1000)
    return chat(rng)


def identical(_rng: random.Random) -> Lengths:
    """Every request alike (a synthetic load test): only growth during decode differs."""
    return 1000, 500


def long_prompt_reasoning(rng: random.Random) -> Lengths:
    """Retrieval-augmented reasoning: prompts around 2,000 tokens, answers around 4,000."""
    return _ln(rng, 2000, 1.0, 16, 30_000), _ln(rng, 4000, 0.5, 64, 16_000)


def chat_and_reasoning(rng: random.Random) -> Lengths:
    """Chat with three requests in ten reasoning-style (no documents)."""
    return chat(rng) if rng.random() < 0.7 else reasoning(rng)


def pareto_prompts(rng: random.Random) -> Lengths:
    """Prompts with a Pareto tail (shape 1.2 from 200 tokens, up to 100K), answers ~300."""
    return min(100_000, int(200 * rng.paretovariate(1.2))), _ln(rng, 300, 0.8, 1, 4096)


def shrinking(rng: random.Random, progress: float) -> Lengths:
    """Production traffic for the first half of the trace, then chat: the reverse shift."""
    return production(rng) if progress < 0.5 else chat(rng)


def long_answers(rng: random.Random) -> Lengths:
    """Short prompts, answers uniform up to 16K tokens (no tail, a wide flat spread)."""
    return _ln(rng, 100, 0.8, 4, 2000), rng.randint(1, 16_000)


def retrieval(rng: random.Random) -> Lengths:
    """Retrieval-augmented chat: prompts uniform over 3-6K tokens, answers ~400."""
    return rng.randint(3000, 6000), _ln(rng, 400, 0.7, 1, 4096)


def shifting(rng: random.Random, progress: float) -> Lengths:
    """Chat for the first half of the trace, then production traffic (reasoning, documents)."""
    return chat(rng) if progress < 0.5 else production(rng)


def chat_then_documents(rng: random.Random, progress: float) -> Lengths:
    """Chat for the first half of the trace, then long documents (`long_context` without its
    chat): with `phased` arrivals, many short requests, then few long ones."""
    if progress < 0.5:
        return chat(rng)
    while True:
        prompt, output = long_context(rng)
        if prompt > 4096:
            return prompt, output


def documents_then_chat(rng: random.Random, progress: float) -> Lengths:
    return chat_then_documents(rng, 1.0 - progress)


def reasoning_then_chat(rng: random.Random, progress: float) -> Lengths:
    return reasoning(rng) if progress < 0.5 else chat(rng)


def long_context(rng: random.Random) -> Lengths:
    u = rng.random()
    if u < 0.6:
        return chat(rng)
    if u < 0.9:
        prompt = _ln(rng, 6000, 0.8, 4, 131_000)
    else:
        prompt = int(math.exp(math.log(32_768) + rng.random() * math.log(120_000 / 32_768)))
    return prompt, _ln(rng, 200, 0.8, 1, 4096)


def _steady(
    lengths: Callable[[random.Random], Lengths],
) -> Callable[[random.Random, float], Lengths]:
    return lambda rng, _progress: lengths(rng)


def gamma(cv: float) -> Callable[[], Arrivals]:
    """Gamma gaps with coefficient of variation `cv` (1: Poisson)."""
    shape = 1.0 / cv**2
    return lambda: lambda rng, _progress: rng.gammavariate(shape, 1.0 / (RATE * shape))


def on_off(
    high: float = 1.8, low: float = 0.2, mean_phase_s: float = 40.0
) -> Callable[[], Arrivals]:
    """Poisson arrivals at `high` or `low` times the mean rate, in phases of exponential length
    (a two-state Markov-modulated Poisson process): bursts that last tens of seconds."""

    def arrivals() -> Arrivals:
        state = {"high": True, "left_s": mean_phase_s}

        def gap(rng: random.Random, _progress: float) -> float:
            waited = 0.0
            while True:
                g = rng.expovariate(RATE * (high if state["high"] else low))
                if g < state["left_s"]:
                    state["left_s"] -= g
                    return waited + g
                # Memoryless: the wait starts over at the next phase's rate.
                waited += state["left_s"]
                state["high"] = not state["high"]
                state["left_s"] = rng.expovariate(1.0 / mean_phase_s)

        return gap

    return arrivals


def wave(depth: float = 0.6) -> Callable[[], Arrivals]:
    """Poisson arrivals whose rate follows one sine period over the trace, between 1 - `depth`
    and 1 + `depth` times the mean (a day's rise and fall, compressed)."""
    return lambda: (
        lambda rng, progress: rng.expovariate(
            RATE * (1.0 + depth * math.sin(2 * math.pi * progress))
        )
    )


def phased(first: float, second: float, cv: float = 1.5) -> Callable[[], Arrivals]:
    """Gamma gaps (coefficient of variation `cv`) at `first` times the mean rate for the first
    half of the trace, then at `second` times it: the rate moves with the kind of traffic, as
    when a chat front end's daytime load gives way to batch document jobs."""
    shape = 1.0 / cv**2

    def arrivals() -> Arrivals:
        def gap(rng: random.Random, progress: float) -> float:
            rate = RATE * (first if progress < 0.5 else second)
            return rng.gammavariate(shape, 1.0 / (rate * shape))

        return gap

    return arrivals


def ramp(low: float = 0.3, high: float = 1.7) -> Callable[[], Arrivals]:
    """Poisson arrivals whose rate climbs linearly from `low` to `high` times the mean over the
    trace: load that only grows."""
    return lambda: lambda rng, progress: rng.expovariate(RATE * (low + (high - low) * progress))


TRACES: dict[str, tuple[Callable[[random.Random, float], Lengths], Callable[[], Arrivals], int]] = {
    # name: (lengths at a share of the trace done, arrival process, seed). The first seven
    # are those the policy work was checked on; the rest (added 2026-12-02) are kinds it was
    # never tuned on, to check that it generalizes.
    "reasoning": (_steady(reasoning), gamma(2.0), 11),
    "prod": (_steady(production), gamma(2.0), 11),
    "lc": (_steady(long_context), gamma(2.0), 11),
    "r2": (_steady(reasoning), gamma(3.0), 23),
    "p2": (_steady(production), gamma(2.5), 29),
    "l2": (_steady(long_context), gamma(1.5), 31),
    "c2": (_steady(chat), gamma(2.0), 37),
    "sum": (_steady(summaries), gamma(1.5), 41),
    "code": (_steady(code), gamma(2.0), 43),
    "prod1": (_steady(production), gamma(1.0), 47),
    "shift": (shifting, gamma(2.0), 53),
    "pmmpp": (_steady(production), on_off(), 59),
    "lwave": (_steady(long_context), wave(), 61),
    "rmmpp": (_steady(reasoning), on_off(2.5, 0.4, 60.0), 67),
    "azcode": (_steady(code_completion), gamma(2.0), 71),
    "moon": (_steady(mooncake), gamma(1.5), 73),
    # Added in the fourteenth session, again never tuned on: other shapes of length
    # distribution (a cap, no tail, a power-law tail, three far-apart classes) and agent steps
    # under minute-long bursts.
    "rcap": (_steady(capped_reasoning), gamma(2.0), 79),
    "uni": (_steady(uniform), gamma(1.0), 83),
    "pareto": (_steady(pareto_chat), gamma(2.5), 89),
    "mix3": (_steady(three_clusters), gamma(2.0), 97),
    "agent": (_steady(agent_steps), on_off(), 101),
    # Added in the fifteenth session, never tuned on: prefill-only traffic, a single class of
    # very long prompts, extreme burstiness, rare huge documents, identical requests, long
    # prompts with long answers (rates in docs/benchmarks.md follow each kind's capacity).
    "prefill": (_steady(prefill_only), gamma(2.0), 103),
    "huge": (_steady(long_documents), gamma(1.0), 107),
    "cv6": (_steady(production), gamma(6.0), 109),
    "docmix": (_steady(rare_documents), gamma(2.0), 113),
    "flat": (_steady(identical), gamma(1.0), 127),
    "longout": (_steady(long_prompt_reasoning), gamma(1.5), 131),
    # Added in the sixteenth session, never tuned on: a load ramp, chat with reasoning, a
    # power-law tail of prompts, the shift reversed, reasoning in 20-second bursts, a flat
    # spread of long answers, retrieval-sized prompts under heavy burstiness.
    "ramp": (_steady(production), ramp(), 1201),
    "chatr": (_steady(chat_and_reasoning), gamma(2.5), 1203),
    "pprompt": (_steady(pareto_prompts), gamma(2.0), 1207),
    "rshift": (shrinking, gamma(2.0), 1211),
    "spiky": (_steady(reasoning), on_off(4.0, 0.25, 20.0), 1213),
    "bigout": (_steady(long_answers), gamma(1.0), 1217),
    "rag": (_steady(retrieval), gamma(3.0), 1223),
    # Added in the twenty-fourth session: traffic whose rate moves with its lengths (the
    # selection traces had drawn a trace's lengths and gaps apart, which these expose).
    "tshift": (chat_then_documents, phased(1.7, 0.3), 1301),
    "tshiftr": (documents_then_chat, phased(0.3, 1.7), 1303),
    "rchat": (reasoning_then_chat, phased(0.4, 1.6, 2.0), 1307),
}


def write(
    path: Path,
    lengths: Callable[[random.Random, float], Lengths],
    arrivals: Callable[[], Arrivals],
    seed: int,
    count: int = 3000,
) -> None:
    rng, now, gap = random.Random(seed), 0.0, arrivals()
    with path.open("w") as f:
        for i in range(count):
            now += gap(rng, i / count)
            prompt, output = lengths(rng, i / count)
            row = {"arrival_s": round(now, 4), "prompt_len": prompt, "output_len": output}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bursty-traces")
    out.mkdir(parents=True, exist_ok=True)
    for name, (lengths, arrivals, seed) in TRACES.items():
        write(out / f"{name}.jsonl", lengths, arrivals, seed)


if __name__ == "__main__":
    main()
