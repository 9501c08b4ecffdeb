//! The operations on a lock, each one fan-out to the instances decided at a
//! quorum: acquire (one attempt, and the loop of attempts), extend, release,
//! the fencing counter; and the held lock's state they share.

pub(crate) mod acquire;
pub(crate) mod attempts;
pub(crate) mod extend;
pub(crate) mod fencing;
pub(crate) mod held;
pub(crate) mod lifetime;
pub(crate) mod pacing;
pub(crate) mod release;
