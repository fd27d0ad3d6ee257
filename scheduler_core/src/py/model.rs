//! Wrappers for the cost profile, the bucket grid, workloads and the partitioner.

use pyo3::prelude::*;

use super::to_py;
use crate::cost::{builtin_profile, BatchShape, CostProfile, BUILTIN_PROFILES};
use crate::grid::BucketGrid;
use crate::partition::{
    partition as solve, partition_by_stage_count as solve_each, PartitionOptions, StagePlan, StageSpec,
};
use crate::presets::{Preset, PRESET_NAMES};
use crate::workload::{RequestSample, WorkloadSummary};

#[pyclass(name = "CostProfile", module = "cascadeinfer._core", frozen)]
#[derive(Clone)]
pub(crate) struct PyCostProfile {
    pub(crate) inner: CostProfile,
}

#[pymethods]
impl PyCostProfile {
    /// Parses and validates a JSON profile.
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        Ok(PyCostProfile { inner: CostProfile::from_json(text).map_err(to_py)? })
    }

    /// One of the profiles shipped with the package.
    #[staticmethod]
    fn builtin(name: &str) -> PyResult<Self> {
        let text = builtin_profile(name).ok_or_else(|| {
            to_py(crate::CoreError::invalid(
                "profile",
                name,
                format!("unknown; built-in: {}", BUILTIN_PROFILES.join(", ")),
            ))
        })?;
        Self::from_json(text)
    }

    #[staticmethod]
    fn builtin_names() -> Vec<&'static str> {
        BUILTIN_PROFILES.to_vec()
    }

    fn to_json(&self) -> String {
        self.inner.to_json()
    }

    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }

    #[getter]
    fn max_model_len(&self) -> u32 {
        self.inner.max_model_len
    }

    #[getter]
    fn kv_capacity_tokens(&self) -> u64 {
        self.inner.kv_capacity_tokens
    }

    /// Predicted seconds of one engine step over the described batch.
    #[pyo3(signature = (num_decode, sum_context, max_context, prefill_tokens=0, prefill_pairs=0))]
    fn step_time(
        &self,
        num_decode: u32,
        sum_context: u64,
        max_context: u32,
        prefill_tokens: u32,
        prefill_pairs: u64,
    ) -> f64 {
        self.inner.step_time(&BatchShape { num_decode, sum_context, max_context, prefill_tokens, prefill_pairs })
    }

    fn __repr__(&self) -> String {
        format!("CostProfile(name={:?})", self.inner.name)
    }
}

#[pyclass(name = "BucketGrid", module = "cascadeinfer._core", frozen)]
#[derive(Clone)]
pub(crate) struct PyBucketGrid {
    pub(crate) inner: BucketGrid,
}

#[pymethods]
impl PyBucketGrid {
    #[new]
    fn new(edges: Vec<u32>) -> PyResult<Self> {
        Ok(PyBucketGrid { inner: BucketGrid::new(edges).map_err(to_py)? })
    }

    /// `num_buckets` buckets growing geometrically from `first_width` tokens to `max_len`.
    #[staticmethod]
    #[pyo3(signature = (max_len, num_buckets, first_width=16))]
    fn geometric(max_len: u32, num_buckets: usize, first_width: u32) -> PyResult<Self> {
        Ok(PyBucketGrid { inner: BucketGrid::geometric(max_len, num_buckets, first_width).map_err(to_py)? })
    }

    #[getter]
    fn edges(&self) -> Vec<u32> {
        self.inner.edges().to_vec()
    }

    #[getter]
    fn num_buckets(&self) -> usize {
        self.inner.num_buckets()
    }

    #[getter]
    fn max_len(&self) -> u32 {
        self.inner.max_len()
    }

    fn bucket_of(&self, length: u32) -> PyResult<usize> {
        self.inner.bucket_of(length).map_err(to_py)
    }
}

#[pyclass(name = "Workload", module = "cascadeinfer._core", frozen)]
pub(crate) struct PyWorkload {
    pub(crate) inner: WorkloadSummary,
}

#[pymethods]
impl PyWorkload {
    /// Summarizes requests (parallel lists) arriving at `arrival_rate` requests per second.
    #[staticmethod]
    fn from_samples(
        grid: &PyBucketGrid,
        prompt_lens: Vec<u32>,
        output_lens: Vec<u32>,
        arrival_rate: f64,
    ) -> PyResult<Self> {
        if prompt_lens.len() != output_lens.len() {
            return Err(to_py(crate::CoreError::invalid(
                "output_lens",
                output_lens.len(),
                format!("must have as many entries as prompt_lens ({})", prompt_lens.len()),
            )));
        }
        let samples: Vec<RequestSample> = prompt_lens
            .into_iter()
            .zip(output_lens)
            .map(|(prompt_len, output_len)| RequestSample { prompt_len, output_len })
            .collect();
        Ok(PyWorkload { inner: WorkloadSummary::from_samples(&grid.inner, &samples, arrival_rate).map_err(to_py)? })
    }

    /// Seconds of engine work per second this traffic needs under `profile`.
    fn work_per_second(&self, profile: &PyCostProfile) -> f64 {
        self.inner.work_per_second(&profile.inner)
    }

    #[getter]
    fn grid(&self) -> PyBucketGrid {
        PyBucketGrid { inner: self.inner.grid.clone() }
    }
    #[getter]
    fn arrival_rate(&self) -> f64 {
        self.inner.arrival_rate
    }
    #[getter]
    fn mean_prompt_len(&self) -> f64 {
        self.inner.mean_prompt_len
    }
    #[getter]
    fn mean_output_len(&self) -> f64 {
        self.inner.mean_output_len
    }
    #[getter]
    fn decode_tokens(&self) -> Vec<f64> {
        self.inner.decode_tokens.clone()
    }
    #[getter]
    fn arrivals(&self) -> Vec<f64> {
        self.inner.arrivals.clone()
    }
    #[getter]
    fn crossings(&self) -> Vec<f64> {
        self.inner.crossings.clone()
    }
}

#[pyclass(name = "PlannedStage", module = "cascadeinfer._core", frozen, get_all)]
#[derive(Clone)]
pub(crate) struct PyPlannedStage {
    min_len: u32,
    max_len: u32,
    num_instances: u32,
    tpot_s: f64,
    utilization: f64,
    queue_wait_s: f64,
    running_per_instance: f64,
    decode_tokens_per_s: f64,
    entering_per_s: f64,
}

impl From<&StageSpec> for PyPlannedStage {
    fn from(s: &StageSpec) -> Self {
        let p = &s.prediction;
        PyPlannedStage {
            min_len: s.min_len,
            max_len: s.max_len,
            num_instances: s.num_instances,
            tpot_s: p.tpot_s,
            utilization: p.utilization,
            queue_wait_s: p.queue_wait_s,
            running_per_instance: p.running_per_instance,
            decode_tokens_per_s: p.decode_tokens_per_s,
            entering_per_s: p.entering_per_s,
        }
    }
}

#[pyclass(name = "StagePlan", module = "cascadeinfer._core", frozen)]
pub(crate) struct PyStagePlan {
    pub(crate) inner: StagePlan,
}

#[pymethods]
impl PyStagePlan {
    #[getter]
    fn stages(&self) -> Vec<PyPlannedStage> {
        self.inner.stages.iter().map(PyPlannedStage::from).collect()
    }

    /// Predicted mean end-to-end latency, seconds.
    #[getter]
    fn objective_s(&self) -> f64 {
        self.inner.objective_s
    }

    fn to_json(&self) -> String {
        serde_json::to_string(&self.inner).expect("plan serializes")
    }
}

/// The stage plan with the least predicted mean latency (releases the GIL while solving).
#[pyfunction]
#[pyo3(signature = (workload, profile, num_instances, max_stages=None))]
pub(crate) fn partition(
    py: Python<'_>,
    workload: &PyWorkload,
    profile: &PyCostProfile,
    num_instances: u32,
    max_stages: Option<u32>,
) -> PyResult<PyStagePlan> {
    let options = PartitionOptions { num_instances, max_stages };
    let (w, p) = (&workload.inner, &profile.inner);
    let plan = py.detach(|| solve(w, p, &options)).map_err(to_py)?;
    Ok(PyStagePlan { inner: plan })
}

/// The one-stage plan on all instances (never infeasible; see `partition::single_stage`).
#[pyfunction]
pub(crate) fn single_stage_plan(
    workload: &PyWorkload,
    profile: &PyCostProfile,
    num_instances: u32,
) -> PyResult<PyStagePlan> {
    let plan = crate::partition::single_stage(&workload.inner, &profile.inner, num_instances).map_err(to_py)?;
    Ok(PyStagePlan { inner: plan })
}

/// `plan`'s stage ranges on `sizes` instances each (see `partition::resized`).
#[pyfunction]
pub(crate) fn resized_plan(
    workload: &PyWorkload,
    profile: &PyCostProfile,
    plan: &PyStagePlan,
    sizes: Vec<u32>,
) -> PyResult<PyStagePlan> {
    let plan = crate::partition::resized(&workload.inner, &profile.inner, &plan.inner, &sizes).map_err(to_py)?;
    Ok(PyStagePlan { inner: plan })
}

/// For every `k` in `1..=max_stages`, what `partition(..., k)` returns (`None` where infeasible),
/// from one solve (releases the GIL while solving).
#[pyfunction]
pub(crate) fn partition_by_stage_count(
    py: Python<'_>,
    workload: &PyWorkload,
    profile: &PyCostProfile,
    num_instances: u32,
    max_stages: u32,
) -> PyResult<Vec<Option<PyStagePlan>>> {
    let (w, p) = (&workload.inner, &profile.inner);
    let plans = py.detach(|| solve_each(w, p, num_instances, max_stages)).map_err(to_py)?;
    Ok(plans.into_iter().map(|plan| plan.map(|inner| PyStagePlan { inner })).collect())
}

#[pyfunction]
pub(crate) fn preset_names() -> Vec<&'static str> {
    PRESET_NAMES.to_vec()
}

#[pyfunction]
pub(crate) fn preset_max_len(name: &str) -> PyResult<u32> {
    Ok(Preset::from_name(name).map_err(to_py)?.max_len())
}

/// `n` (prompt_len, output_len) pairs of a preset as two lists, deterministic for `seed`.
#[pyfunction]
pub(crate) fn sample_preset(name: &str, n: usize, seed: u64) -> PyResult<(Vec<u32>, Vec<u32>)> {
    let samples = Preset::from_name(name).map_err(to_py)?.sample(n, seed);
    Ok(samples.iter().map(|s| (s.prompt_len, s.output_len)).unzip())
}
