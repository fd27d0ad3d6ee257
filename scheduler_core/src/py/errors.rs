//! Core errors as Python exceptions, in one place: one class per `CoreError` variant, each a
//! `ValueError` (what every core error was before the classes existed) so `except ValueError`
//! still catches them. Callers tell failures apart by class and attributes, never by message.

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyInt, PyString};

use crate::error::CoreError;

create_exception!(
    cascadeinfer._core,
    InvalidArgumentError,
    PyValueError,
    "A configuration or input value is out of its domain: `field` names it, `value` is what was \
     given (as text) and `reason` says what was expected."
);
create_exception!(
    cascadeinfer._core,
    InfeasibleError,
    PyValueError,
    "No stage plan carries the workload on the instances given: too few instances, or a rate \
     past what they can serve."
);
create_exception!(
    cascadeinfer._core,
    UnknownIdError,
    PyValueError,
    "An id the core was never told about: `kind` (\"instance\") and `id` say which."
);

pub(crate) fn to_py(err: CoreError) -> PyErr {
    let message = err.to_string();
    Python::attach(|py| match err {
        CoreError::InvalidInput { field, value, reason } => with_attrs(
            py,
            InvalidArgumentError::new_err(message),
            [
                ("field", PyString::new(py, field).into_any()),
                ("value", PyString::new(py, &value).into_any()),
                ("reason", PyString::new(py, &reason).into_any()),
            ],
        ),
        CoreError::Infeasible(_) => InfeasibleError::new_err(message),
        CoreError::Unknown { kind, id } => with_attrs(
            py,
            UnknownIdError::new_err(message),
            [("kind", PyString::new(py, kind).into_any()), ("id", PyInt::new(py, id).into_any())],
        ),
    })
}

/// `err` with attributes set on its exception object (or the error from setting one, should that
/// ever fail).
fn with_attrs<'py, const N: usize>(py: Python<'py>, err: PyErr, attrs: [(&str, Bound<'py, PyAny>); N]) -> PyErr {
    let value = err.value(py);
    for (name, attr) in attrs {
        if let Err(e) = value.setattr(name, attr) {
            return e;
        }
    }
    err
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("InvalidArgumentError", py.get_type::<InvalidArgumentError>())?;
    m.add("InfeasibleError", py.get_type::<InfeasibleError>())?;
    m.add("UnknownIdError", py.get_type::<UnknownIdError>())?;
    Ok(())
}
