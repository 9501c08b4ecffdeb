//! The instance monitor: its handle, kept in the shared state, and the probe
//! task that keeps every instance's standing current.

pub(crate) mod handle;
pub(crate) mod probe;
