//! What the locker knows about each instance between operations, and whether
//! it may vote: below the shared state, which holds one per member.

pub(crate) mod identities;
pub(crate) mod member;
pub(crate) mod policy;
pub(crate) mod state;
