//! Python bindings (`cascadeinfer._core`): type conversion and thin wrappers only. Core errors
//! become Python exceptions in one place, `errors.rs`.

mod config;
mod errors;
mod model;
mod scheduler;
mod sim;

use pyo3::prelude::*;

pub(crate) use errors::to_py;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::PyCostProfile>()?;
    m.add_class::<model::PyBucketGrid>()?;
    m.add_class::<model::PyWorkload>()?;
    m.add_class::<model::PyPlannedStage>()?;
    m.add_class::<model::PyStagePlan>()?;
    errors::register(m)?;
    m.add("MigrationReason", scheduler::migration_reason_type(m.py())?)?;
    m.add_class::<scheduler::PyMigration>()?;
    m.add_class::<scheduler::PyScheduler>()?;
    m.add_class::<sim::PySimReport>()?;
    m.add_function(wrap_pyfunction!(model::partition, m)?)?;
    m.add_function(wrap_pyfunction!(model::single_stage_plan, m)?)?;
    m.add_function(wrap_pyfunction!(model::partition_by_stage_count, m)?)?;
    m.add_function(wrap_pyfunction!(model::resized_plan, m)?)?;
    m.add_function(wrap_pyfunction!(model::preset_names, m)?)?;
    m.add_function(wrap_pyfunction!(model::preset_max_len, m)?)?;
    m.add_function(wrap_pyfunction!(model::sample_preset, m)?)?;
    m.add_function(wrap_pyfunction!(sim::simulate, m)?)?;
    m.add_function(wrap_pyfunction!(sim::generate_trace, m)?)?;
    m.add_function(wrap_pyfunction!(sim::arrival_times, m)?)?;
    m.add_function(wrap_pyfunction!(sim::session_arrival_times, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
