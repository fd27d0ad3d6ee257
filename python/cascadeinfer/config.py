"""Frozen configuration dataclasses for the core's policies; Rust reads them by attribute."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BalanceConfig:
    """Within-stage balancing: start above one imbalance, stop below a lower one (hysteresis)."""

    start_imbalance: float = 0.3
    stop_imbalance: float = 0.1
    cooldown_s: float = 1.0
    kv_gap: float = 0.1
    """Also even KV usage when the fullest and emptiest caches differ by more (1: off)."""


@dataclass(frozen=True)
class RefineConfig:
    """Runtime range refinement over a decayed histogram of observed lengths."""

    half_life_s: float = 60.0
    cooldown_s: float = 30.0
    replan_divergence: float = 0.15
    nudge_imbalance: float = 0.2
    min_improvement: float = 0.05
    min_window_s: float = 30.0
    persist_s: float = 60.0
    """A trigger (arrival shift, stage imbalance) must hold this long before a change."""


@dataclass(frozen=True)
class CapacityConfig:
    """The capacity guard: move an instance to a stage whose decode steps run slower than the
    pooled fleet's by more than `margin`, once that has held `persist_s` seconds, at most one
    move per `cooldown_s`."""

    margin: float = 0.1
    persist_s: float = 10.0
    cooldown_s: float = 10.0


@dataclass(frozen=True)
class FirstTokenSlo:
    """The first-token service level a deployment promises: `base_s` plus `per_prompt_token_s`
    per prompt token (the DistServe-style TTFT target; the default is `cascade bench sim`'s
    goodput target). A new request whose first token is predicted to miss it in its own stage
    starts where it comes in time (`Router::first_token_in_time` in the core)."""

    base_s: float = 1.0
    per_prompt_token_s: float = 2e-4

    def __post_init__(self) -> None:
        for name in ("base_s", "per_prompt_token_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"first-token SLO {name} must be finite and >= 0, got {value}")


ONE_STAGE_TURNS = ("cheapest", "blind", "cache-aware")
"""The ways a one-stage layout can place a turn of a session (`CascadeConfig.one_stage_turns`)."""


@dataclass(frozen=True)
class CascadeConfig:
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    is_refine_enabled: bool = True
    is_one_stage_balanced: bool = False
    """Balance a one-stage layout too (off: one stage is least-load admission exactly)."""
    is_one_stage_kv_first: bool = False
    """Run a one-stage layout Llumnix's way instead: admission by free KV per request, moves
    that even KV usage (wins over `is_one_stage_balanced`)."""
    one_stage_turns: str = "cheapest"
    """Where a one-stage layout places a turn of a session (ONE_STAGE_TURNS): "cheapest"
    (cascade's: where it costs least counting what each instance has cached, the holder kept
    unless another is much cheaper), "blind" (as a request without a session, blind to the
    caches: least-load exactly, or Llumnix exactly with `is_one_stage_kv_first`) or
    "cache-aware" (the cache-aware baseline's rule exactly)."""
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    is_capacity_guarded: bool = True
    """Move whole instances to a stage whose decode steps run slower than the pooled fleet's
    (`scheduler_core/src/capacity.rs`); off, stage sizes change only by refinement."""
    first_token: FirstTokenSlo = field(default_factory=FirstTokenSlo)

    def __post_init__(self) -> None:
        if self.one_stage_turns not in ONE_STAGE_TURNS:
            raise ValueError(
                f"one_stage_turns {self.one_stage_turns!r}: known {', '.join(ONE_STAGE_TURNS)}"
            )


@dataclass(frozen=True)
class LlumnixConfig:
    """Llumnix baseline: migrate while the KV-usage gap between instances exceeds `usage_gap`."""

    usage_gap: float = 0.1
    max_moves_per_tick: int = 2


POLICY_NAMES = ("cascade", "round-robin", "least-load", "power-of-two", "llumnix", "cache-aware")
