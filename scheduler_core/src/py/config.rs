//! Reads the Python frozen config dataclasses (`cascadeinfer.config`) by attribute.

use pyo3::prelude::*;

use crate::balance::BalanceConfig;
use crate::baselines::LlumnixConfig;
use crate::capacity::CapacityConfig;
use crate::cascade::{CascadeConfig, OneStageTurns};
use crate::error::CoreError;
use crate::refine::RefineConfig;
use crate::router::FirstTokenSlo;

#[derive(FromPyObject)]
pub(crate) struct PyBalanceConfig {
    start_imbalance: f64,
    stop_imbalance: f64,
    cooldown_s: f64,
    kv_gap: f64,
}

#[derive(FromPyObject)]
pub(crate) struct PyRefineConfig {
    half_life_s: f64,
    cooldown_s: f64,
    replan_divergence: f64,
    nudge_imbalance: f64,
    min_improvement: f64,
    min_window_s: f64,
    persist_s: f64,
}

#[derive(FromPyObject)]
pub(crate) struct PyCapacityConfig {
    margin: f64,
    persist_s: f64,
    cooldown_s: f64,
}

#[derive(FromPyObject)]
pub(crate) struct PyFirstTokenSlo {
    base_s: f64,
    per_prompt_token_s: f64,
}

#[derive(FromPyObject)]
pub(crate) struct PyCascadeConfig {
    balance: PyBalanceConfig,
    refine: PyRefineConfig,
    is_refine_enabled: bool,
    is_one_stage_balanced: bool,
    is_one_stage_kv_first: bool,
    one_stage_turns: String,
    capacity: PyCapacityConfig,
    is_capacity_guarded: bool,
    first_token: PyFirstTokenSlo,
}

#[derive(FromPyObject)]
pub(crate) struct PyLlumnixConfig {
    usage_gap: f64,
    max_moves_per_tick: u32,
}

impl TryFrom<PyCascadeConfig> for CascadeConfig {
    type Error = CoreError;

    fn try_from(c: PyCascadeConfig) -> Result<Self, CoreError> {
        Ok(CascadeConfig {
            balance: BalanceConfig {
                start_imbalance: c.balance.start_imbalance,
                stop_imbalance: c.balance.stop_imbalance,
                cooldown_s: c.balance.cooldown_s,
                kv_gap: c.balance.kv_gap,
            },
            refine: RefineConfig {
                half_life_s: c.refine.half_life_s,
                cooldown_s: c.refine.cooldown_s,
                replan_divergence: c.refine.replan_divergence,
                nudge_imbalance: c.refine.nudge_imbalance,
                min_improvement: c.refine.min_improvement,
                min_window_s: c.refine.min_window_s,
                persist_s: c.refine.persist_s,
            },
            is_refine_enabled: c.is_refine_enabled,
            is_one_stage_balanced: c.is_one_stage_balanced,
            is_one_stage_kv_first: c.is_one_stage_kv_first,
            one_stage_turns: OneStageTurns::from_name(&c.one_stage_turns)?,
            capacity: CapacityConfig {
                margin: c.capacity.margin,
                persist_s: c.capacity.persist_s,
                cooldown_s: c.capacity.cooldown_s,
            },
            is_capacity_guarded: c.is_capacity_guarded,
            first_token: FirstTokenSlo {
                base_s: c.first_token.base_s,
                per_prompt_token_s: c.first_token.per_prompt_token_s,
            },
        })
    }
}

impl From<PyLlumnixConfig> for LlumnixConfig {
    fn from(c: PyLlumnixConfig) -> Self {
        LlumnixConfig { usage_gap: c.usage_gap, max_moves_per_tick: c.max_moves_per_tick }
    }
}
