//! The cluster simulator and the trace generator for Python.

use std::collections::BTreeMap;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::model::PyCostProfile;
use super::scheduler::PyScheduler;
use super::to_py;
use crate::arrivals::{
    arrival_times as make_arrival_times, generate_trace as make_trace, ArrivalProcess, TraceRequest,
};
use crate::ids::InstanceId;
use crate::presets::Preset;
use crate::session::{session_arrival_times as make_session_arrival_times, SessionId, SessionTurn};
use crate::sim::{simulate as run, RequestRecord, SimConfig, SimReport};

#[pyclass(name = "SimReport", module = "cascadeinfer._core", frozen)]
pub(crate) struct PySimReport {
    inner: SimReport,
}

fn or_nan(x: Option<f64>) -> f64 {
    x.unwrap_or(f64::NAN)
}

#[pymethods]
impl PySimReport {
    /// mean/p99 of e2e, TTFT and TPOT (seconds), throughput_tok_s, completed, migrations,
    /// prefix_cache_hit_rate (prompt tokens served from prefix caches over all prompt tokens)
    /// and sim_wall_s (the simulator's own wall time).
    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.inner.summary;
        let d = PyDict::new(py);
        for (key, value) in [
            ("mean_e2e_s", s.mean_e2e_s),
            ("p99_e2e_s", s.p99_e2e_s),
            ("mean_ttft_s", s.mean_ttft_s),
            ("p99_ttft_s", s.p99_ttft_s),
            ("mean_tpot_s", s.mean_tpot_s),
            ("p99_tpot_s", s.p99_tpot_s),
            ("throughput_tok_s", s.throughput_tok_s),
            ("prefix_cache_hit_rate", s.prefix_cache_hit_rate),
        ] {
            d.set_item(key, value)?;
        }
        d.set_item("completed", s.completed)?;
        d.set_item("migrations", s.migrations)?;
        d.set_item("sim_wall_s", s.sim_wall_s)?;
        Ok(d)
    }

    /// Per-request lists in trace order; times in seconds, NaN where a request never got there
    /// (and tpot_s for single-token outputs).
    fn requests<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = &self.inner.requests;
        let times = |f: fn(&RequestRecord) -> Option<f64>| r.iter().map(|x| or_nan(f(x))).collect::<Vec<f64>>();
        let counts = |f: fn(&RequestRecord) -> u32| r.iter().map(f).collect::<Vec<u32>>();
        let d = PyDict::new(py);
        d.set_item("arrival_s", r.iter().map(|x| x.arrival_s).collect::<Vec<f64>>())?;
        d.set_item("queue_s", times(RequestRecord::queue_s))?;
        d.set_item("ttft_s", times(RequestRecord::ttft_s))?;
        d.set_item("tpot_s", times(RequestRecord::tpot_s))?;
        d.set_item("e2e_s", times(RequestRecord::e2e_s))?;
        d.set_item("prompt_len", counts(|x| x.prompt_len))?;
        d.set_item("output_len", counts(|x| x.output_len))?;
        d.set_item("num_migrations", counts(|x| x.num_migrations))?;
        d.set_item("num_preemptions", counts(|x| x.num_preemptions))?;
        d.set_item("num_cached_prompt_tokens", counts(|x| x.num_cached_prompt_tokens))?;
        Ok(d)
    }

    /// The share of all requests meeting a TTFT target of `ttft_base_s +
    /// ttft_per_prompt_token_s * prompt_len` and a TPOT target of `tpot_s`
    /// (`cascadeinfer.goodput.goodput`'s "goodput", computed here without the per-request
    /// lists); NaN for an empty trace.
    fn goodput(&self, ttft_base_s: f64, ttft_per_prompt_token_s: f64, tpot_s: f64) -> f64 {
        self.inner.goodput(ttft_base_s, ttft_per_prompt_token_s, tpot_s)
    }

    /// Landed migrations by reason.
    fn migrations_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.inner.migrations_by_reason.clone()
    }

    /// Migrations reported failed to the policy, by reason (rate-limited ones included).
    fn failed_migrations_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.inner.failed_migrations_by_reason.clone()
    }

    /// The same failures by cause: gone, rate_limited, not_on_source, preempted, no_room,
    /// interrupted, no_room_at_landing (see docs/design/simulator.md).
    fn failed_migrations_by_cause(&self) -> BTreeMap<&'static str, u64> {
        self.inner.failed_migrations_by_cause.clone()
    }

    /// Per stage at every tick: time_s, stage, min_len, max_len, num_instances, num_running,
    /// kv_tokens.
    fn stage_load<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.inner.stage_load;
        let d = PyDict::new(py);
        d.set_item("time_s", s.iter().map(|x| x.time_s).collect::<Vec<f64>>())?;
        d.set_item("stage", s.iter().map(|x| x.stage).collect::<Vec<u32>>())?;
        d.set_item("min_len", s.iter().map(|x| x.min_len).collect::<Vec<u32>>())?;
        d.set_item("max_len", s.iter().map(|x| x.max_len).collect::<Vec<u32>>())?;
        d.set_item("num_instances", s.iter().map(|x| x.num_instances).collect::<Vec<u32>>())?;
        d.set_item("num_running", s.iter().map(|x| x.num_running).collect::<Vec<u32>>())?;
        d.set_item("kv_tokens", s.iter().map(|x| x.kv_tokens).collect::<Vec<u64>>())?;
        Ok(d)
    }

    /// Per instance: instance, num_steps, busy_s, peak_kv_tokens, peak_batch_tokens,
    /// peak_batch_seqs.
    fn instances<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.inner.instances;
        let d = PyDict::new(py);
        d.set_item("instance", s.iter().map(|x| x.instance.0).collect::<Vec<u32>>())?;
        d.set_item("num_steps", s.iter().map(|x| x.num_steps).collect::<Vec<u64>>())?;
        d.set_item("busy_s", s.iter().map(|x| x.busy_s).collect::<Vec<f64>>())?;
        d.set_item("peak_kv_tokens", s.iter().map(|x| x.peak_kv_tokens).collect::<Vec<u64>>())?;
        d.set_item("peak_batch_tokens", s.iter().map(|x| x.peak_batch_tokens).collect::<Vec<u32>>())?;
        d.set_item("peak_batch_seqs", s.iter().map(|x| x.peak_batch_seqs).collect::<Vec<u32>>())?;
        Ok(d)
    }

    #[getter]
    fn policy(&self) -> &str {
        &self.inner.policy
    }
    #[getter]
    fn num_preemptions(&self) -> u64 {
        self.inner.num_preemptions
    }
    #[getter]
    fn num_layout_changes(&self) -> u64 {
        self.inner.num_layout_changes
    }
    #[getter]
    fn num_capacity_moves(&self) -> u64 {
        self.inner.num_capacity_moves
    }
    #[getter]
    fn num_unfinished(&self) -> u64 {
        self.inner.num_unfinished
    }
    #[getter]
    fn total_output_tokens(&self) -> u64 {
        self.inner.total_output_tokens
    }
    #[getter]
    fn makespan_s(&self) -> f64 {
        self.inner.makespan_s
    }

    fn __repr__(&self) -> String {
        let s = &self.inner.summary;
        format!(
            "SimReport(policy={:?}, completed={}, mean_e2e_s={:.4}, migrations={})",
            self.inner.policy, s.completed, s.mean_e2e_s, s.migrations
        )
    }
}

/// One trace request from Python: `(arrival_s, prompt_len, output_len)`, or with its session
/// `(arrival_s, prompt_len, output_len, session, turn, prefix_len)`.
#[derive(FromPyObject)]
pub(crate) enum PyTraceEntry {
    Plain((f64, u32, u32)),
    Turn((f64, u32, u32, u64, u32, u32)),
}

impl From<PyTraceEntry> for TraceRequest {
    fn from(entry: PyTraceEntry) -> Self {
        match entry {
            PyTraceEntry::Plain((arrival_s, prompt_len, output_len)) => {
                TraceRequest::new(arrival_s, prompt_len, output_len)
            }
            PyTraceEntry::Turn((arrival_s, prompt_len, output_len, session, turn, prefix_len)) => TraceRequest {
                session: Some(SessionTurn { session: SessionId(session), turn, prefix_len }),
                ..TraceRequest::new(arrival_s, prompt_len, output_len)
            },
        }
    }
}

/// Simulates `trace` (`(arrival_s, prompt_len, output_len)` each, or
/// `(arrival_s, prompt_len, output_len, session, turn, prefix_len)` for a turn of a session) on engines running `profile`,
/// scheduled by `scheduler`'s policy, which is used as is and left in its final state.
/// `instances` defaults to the policy's; `max_optional_migrations_per_s = math.inf` lifts the
/// rate limit. Releases the GIL while it runs.
#[pyfunction]
#[pyo3(signature = (
    scheduler,
    profile,
    trace,
    instances=None,
    tick_interval_s=0.5,
    max_concurrent_migrations=8,
    max_optional_migrations_per_s=4.0,
))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn simulate(
    py: Python<'_>,
    mut scheduler: PyRefMut<'_, PyScheduler>,
    profile: &PyCostProfile,
    trace: Vec<PyTraceEntry>,
    instances: Option<Vec<u32>>,
    tick_interval_s: f64,
    max_concurrent_migrations: u32,
    max_optional_migrations_per_s: f64,
) -> PyResult<PySimReport> {
    let trace: Vec<TraceRequest> = trace.into_iter().map(TraceRequest::from).collect();
    let is_unlimited = max_optional_migrations_per_s == f64::INFINITY;
    let config = SimConfig {
        tick_interval_s,
        max_concurrent_migrations,
        max_optional_migrations_per_s: (!is_unlimited).then_some(max_optional_migrations_per_s),
    };
    let policy = scheduler.policy_mut();
    let ids: Vec<InstanceId> = match instances {
        Some(v) => v.into_iter().map(InstanceId).collect(),
        None => policy.layout().instances().collect(),
    };
    let p = &profile.inner;
    let report = py.detach(|| run(policy, p, &trace, &ids, &config)).map_err(to_py)?;
    Ok(PySimReport { inner: report })
}

/// `n` requests of a preset arriving at `rate` a second: `"poisson"`, or `"gamma"` with
/// inter-arrival coefficient of variation `cv` (1 is Poisson-like, above 1 bursty). Returns
/// `(arrival_s, prompt_len, output_len)` tuples sorted by arrival, deterministic for `seed`;
/// a multi-turn preset's are `(arrival_s, prompt_len, output_len, session, turn, prefix_len)`,
/// its sessions' starts following the process (`session_arrival_times`).
#[pyfunction]
#[pyo3(signature = (preset, n, rate, arrival="poisson", cv=1.0, seed=0))]
pub(crate) fn generate_trace<'py>(
    py: Python<'py>,
    preset: &str,
    n: usize,
    rate: f64,
    arrival: &str,
    cv: f64,
    seed: u64,
) -> PyResult<Vec<Bound<'py, PyTuple>>> {
    let preset = Preset::from_name(preset).map_err(to_py)?;
    let process = ArrivalProcess::from_name(arrival, cv).map_err(to_py)?;
    let trace = make_trace(preset, n, rate, process, seed).map_err(to_py)?;
    trace.iter().map(|r| trace_tuple(py, r)).collect()
}

fn trace_tuple<'py>(py: Python<'py>, r: &TraceRequest) -> PyResult<Bound<'py, PyTuple>> {
    match r.session {
        None => (r.arrival_s, r.prompt_len, r.output_len).into_pyobject(py),
        Some(s) => (r.arrival_s, r.prompt_len, r.output_len, s.session.0, s.turn, s.prefix_len).into_pyobject(py),
    }
}

/// Arrival times for `sessions` (`(session, turn, prefix_len)` or `None` per request, a
/// session's turns consecutive): sessions start by the process at the rate that makes `rate`
/// requests a second, each later turn `mean_turn_gap_s` (on average) after the one before.
#[pyfunction]
// The default is MEAN_TURN_GAP_S, written out so Python sees it (tests/workloads check it).
#[pyo3(signature = (sessions, rate, arrival="poisson", cv=1.0, seed=0, mean_turn_gap_s=30.0))]
pub(crate) fn session_arrival_times(
    sessions: Vec<Option<(u64, u32, u32)>>,
    rate: f64,
    arrival: &str,
    cv: f64,
    seed: u64,
    mean_turn_gap_s: f64,
) -> PyResult<Vec<f64>> {
    let process = ArrivalProcess::from_name(arrival, cv).map_err(to_py)?;
    let sessions: Vec<Option<SessionTurn>> = sessions
        .into_iter()
        .map(|s| s.map(|(session, turn, prefix_len)| SessionTurn { session: SessionId(session), turn, prefix_len }))
        .collect();
    if !(rate.is_finite() && rate > 0.0) {
        return Err(to_py(crate::error::CoreError::invalid("rate", rate, "must be finite and > 0")));
    }
    make_session_arrival_times(&sessions, rate, process, mean_turn_gap_s, seed).map_err(to_py)
}

/// `n` arrival times at `rate` a second, by the process of `generate_trace`: for the same
/// `seed` they are that trace's arrivals, so lengths drawn outside the core (data-derived
/// workloads) get the arrival process of the presets.
#[pyfunction]
#[pyo3(signature = (n, rate, arrival="poisson", cv=1.0, seed=0))]
pub(crate) fn arrival_times(n: usize, rate: f64, arrival: &str, cv: f64, seed: u64) -> PyResult<Vec<f64>> {
    let process = ArrivalProcess::from_name(arrival, cv).map_err(to_py)?;
    make_arrival_times(process, rate, n, seed).map_err(to_py)
}
