//! `Scheduler`: one policy object (cascade or a baseline) behind the common interface.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use super::config::{PyCascadeConfig, PyLlumnixConfig};
use super::model::{PyBucketGrid, PyCostProfile, PyStagePlan, PyWorkload};
use super::to_py;
use crate::baselines::{Baseline, BaselineKind, LlumnixConfig};
use crate::cascade::CascadePolicy;
use crate::error::CoreError;
use crate::ids::{InstanceId, RequestId};
use crate::layout::{StageLayout, StageRange};
use crate::policy::{Migration, MigrationReason, NewRequest, Policy, StepEntry};
use crate::session::{SessionId, SessionTurn};

static MIGRATION_REASON: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `cascadeinfer._core.MigrationReason`: an `enum.StrEnum` built from the core's own reasons, so
/// its values are the wire strings (metric labels, logs, the simulator report's keys) and cannot
/// drift from them. Members are the names upper-cased: `MigrationReason.STAGE_BOUND == "stage_bound"`.
pub(crate) fn migration_reason_type(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    let cls = MIGRATION_REASON.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
        let members: Vec<(String, &str)> =
            MigrationReason::ALL.iter().map(|r| (r.as_str().to_uppercase(), r.as_str())).collect();
        let kwargs = PyDict::new(py);
        kwargs.set_item("module", "cascadeinfer._core")?;
        kwargs.set_item("qualname", "MigrationReason")?;
        let cls = py.import("enum")?.getattr("StrEnum")?.call(("MigrationReason", members), Some(&kwargs))?;
        cls.setattr("__doc__", "Why the core moves a running request; each value is its name on the wire.")?;
        Ok(cls.unbind())
    })?;
    Ok(cls.bind(py))
}

#[pyclass(name = "Migration", module = "cascadeinfer._core", frozen, eq)]
#[derive(Clone, PartialEq)]
pub(crate) struct PyMigration {
    #[pyo3(get)]
    request_id: u64,
    #[pyo3(get)]
    from_instance: u32,
    #[pyo3(get)]
    to_instance: u32,
    #[pyo3(get)]
    context_len: u32,
    reason: MigrationReason,
}

#[pymethods]
impl PyMigration {
    /// A `MigrationReason` member.
    #[getter]
    fn reason<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        migration_reason_type(py)?.call1((self.reason.as_str(),))
    }

    fn __repr__(&self) -> String {
        format!(
            "Migration(request_id={}, from_instance={}, to_instance={}, context_len={}, reason={:?})",
            self.request_id,
            self.from_instance,
            self.to_instance,
            self.context_len,
            self.reason.as_str()
        )
    }
}

impl From<&Migration> for PyMigration {
    fn from(m: &Migration) -> Self {
        PyMigration {
            request_id: m.request.0,
            from_instance: m.from.0,
            to_instance: m.to.0,
            context_len: m.context_len,
            reason: m.reason,
        }
    }
}

impl PyMigration {
    fn to_core(&self) -> Migration {
        Migration {
            request: RequestId(self.request_id),
            from: InstanceId(self.from_instance),
            to: InstanceId(self.to_instance),
            context_len: self.context_len,
            reason: self.reason,
        }
    }
}

fn ids(instances: &[u32]) -> Vec<InstanceId> {
    instances.iter().map(|&i| InstanceId(i)).collect()
}

#[pyclass(name = "Scheduler", module = "cascadeinfer._core")]
pub(crate) struct PyScheduler {
    policy: Box<dyn Policy>,
}

impl PyScheduler {
    /// The policy itself, for the simulator to drive.
    pub(crate) fn policy_mut(&mut self) -> &mut dyn Policy {
        self.policy.as_mut()
    }
}

#[pymethods]
impl PyScheduler {
    /// The cascade policy over `plan`'s stages, with `instances` assigned to them in order.
    #[staticmethod]
    #[pyo3(signature = (profile, plan, instances, grid, config, planned_for=None))]
    fn cascade(
        profile: &PyCostProfile,
        plan: &PyStagePlan,
        instances: Vec<u32>,
        grid: &PyBucketGrid,
        config: PyCascadeConfig,
        planned_for: Option<PyRef<'_, PyWorkload>>,
    ) -> PyResult<Self> {
        let layout = StageLayout::from_plan(&plan.inner, &ids(&instances)).map_err(to_py)?;
        let w = planned_for.as_ref().map(|w| &w.inner);
        let config = config.try_into().map_err(to_py)?;
        let policy = CascadePolicy::new(profile.inner.clone(), layout, grid.inner.clone(), config, w).map_err(to_py)?;
        Ok(PyScheduler { policy: Box::new(policy) })
    }

    /// The cascade policy over explicit stages: `(min_len, max_len, [instance ids])` each.
    #[staticmethod]
    fn cascade_with_stages(
        profile: &PyCostProfile,
        stages: Vec<(u32, u32, Vec<u32>)>,
        grid: &PyBucketGrid,
        config: PyCascadeConfig,
    ) -> PyResult<Self> {
        let ranges = stages
            .into_iter()
            .map(|(min_len, max_len, instances)| StageRange { min_len, max_len, instances: ids(&instances) })
            .collect();
        let layout = StageLayout::new(ranges).map_err(to_py)?;
        let config = config.try_into().map_err(to_py)?;
        let policy =
            CascadePolicy::new(profile.inner.clone(), layout, grid.inner.clone(), config, None).map_err(to_py)?;
        Ok(PyScheduler { policy: Box::new(policy) })
    }

    /// A baseline: "round-robin", "least-load", "power-of-two" or "llumnix".
    #[staticmethod]
    #[pyo3(signature = (name, profile, instances, max_len, seed=0, llumnix=None))]
    fn baseline(
        name: &str,
        profile: &PyCostProfile,
        instances: Vec<u32>,
        max_len: u32,
        seed: u64,
        llumnix: Option<PyLlumnixConfig>,
    ) -> PyResult<Self> {
        let kind = BaselineKind::from_name(name).map_err(to_py)?;
        let llumnix = llumnix.map(LlumnixConfig::from).unwrap_or_default();
        let policy =
            Baseline::new(kind, profile.inner.clone(), &ids(&instances), max_len, seed, llumnix).map_err(to_py)?;
        Ok(PyScheduler { policy: Box::new(policy) })
    }

    #[getter]
    fn name(&self) -> &'static str {
        self.policy.name()
    }

    /// `(instance, stage)` for a new request, or `None` when no eligible instance has room.
    /// `session` is the client's key of the conversation the request continues, if any: its
    /// prompt is taken to extend what the session left cached (the scheduler sees no tokens of
    /// earlier turns), so a policy that follows sessions' KV may place it where that is.
    #[pyo3(signature = (request_id, prompt_len, now, session=None))]
    fn admit(
        &mut self,
        request_id: u64,
        prompt_len: u32,
        now: f64,
        session: Option<&str>,
    ) -> PyResult<Option<(u32, usize)>> {
        let session =
            session.map(|key| SessionTurn { session: SessionId::from_key(key), turn: 0, prefix_len: prompt_len });
        let request = NewRequest { session, ..NewRequest::new(RequestId(request_id), prompt_len) };
        let admission = self.policy.admit(&request, now).map_err(to_py)?;
        Ok(admission.map(|a| (a.instance.0, a.stage)))
    }

    /// One engine step's running requests as three parallel lists; returns migrations to start.
    fn on_step(
        &mut self,
        request_ids: Vec<u64>,
        instances: Vec<u32>,
        context_lens: Vec<u32>,
        now: f64,
    ) -> PyResult<Vec<PyMigration>> {
        if request_ids.len() != instances.len() || request_ids.len() != context_lens.len() {
            return Err(to_py(CoreError::invalid(
                "on_step",
                format!("{}/{}/{}", request_ids.len(), instances.len(), context_lens.len()),
                "request_ids, instances and context_lens must have equal lengths",
            )));
        }
        let entries: Vec<StepEntry> = request_ids
            .iter()
            .zip(&instances)
            .zip(&context_lens)
            .map(|((&r, &i), &l)| StepEntry { request: RequestId(r), instance: InstanceId(i), context_len: l })
            .collect();
        let migrations = self.policy.on_step(&entries, now).map_err(to_py)?;
        Ok(migrations.iter().map(PyMigration::from).collect())
    }

    /// Periodic work; returns the migrations to start and, when the stage layout changed, why
    /// ("refinement" or "capacity").
    fn tick(&mut self, now: f64) -> (Vec<PyMigration>, Option<&'static str>) {
        let outcome = self.policy.tick(now);
        let change = outcome.new_layout.map(|(_, why)| why.as_str());
        (outcome.migrations.iter().map(PyMigration::from).collect(), change)
    }

    fn migration_done(&mut self, migration: &PyMigration, succeeded: bool) {
        self.policy.migration_done(&migration.to_core(), succeeded);
    }

    fn request_finished(&mut self, request_id: u64, instance: u32) {
        self.policy.request_finished(RequestId(request_id), InstanceId(instance));
    }

    /// A request `admit` refused leaves the queue unadmitted (cancelled, or turned away).
    fn request_withdrawn(&mut self, request_id: u64) {
        self.policy.request_withdrawn(RequestId(request_id));
    }

    /// Current stages as `(min_len, max_len, [instance ids])`.
    fn stages(&self) -> Vec<(u32, u32, Vec<u32>)> {
        self.policy
            .layout()
            .stages()
            .iter()
            .map(|s| (s.min_len, s.max_len, s.instances.iter().map(|i| i.0).collect()))
            .collect()
    }

    fn add_instance(&mut self, instance: u32) -> PyResult<()> {
        self.policy.add_instance(InstanceId(instance)).map_err(to_py)
    }

    fn remove_instance(&mut self, instance: u32) -> PyResult<()> {
        self.policy.remove_instance(InstanceId(instance)).map_err(to_py)
    }
}
