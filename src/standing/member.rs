//! A member of the quorum: an instance in the locker's order, the name it is
//! shown by, and its standing.

use std::sync::Arc;

use super::state::InstanceState;
use crate::instance::Instance;

/// An instance in the locker's order, with the name it is shown by and what the
/// locker knows about it.
pub(crate) struct Member {
    pub(crate) index: usize,
    pub(crate) address: Arc<str>,
    pub(crate) instance: Box<dyn Instance>,
    pub(crate) state: Arc<InstanceState>,
}
