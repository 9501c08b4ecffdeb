//! What a held lock's handle, its watchdog, its status views and the
//! operations on it share: the key, the token, and the validity, which extends
//! move forward and a loss ends.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Error;
use crate::fanout::Asked;
use crate::lease::Lease;
use crate::shared::LockKey;
use crate::value::LockValue;

/// The state of one held lock.
pub(crate) struct Held {
    pub(crate) key: LockKey,
    pub(crate) token: Arc<str>,
    /// What the key holds in Redis: token, nonce and metadata (see `value`).
    pub(crate) value: Arc<str>,
    pub(crate) acquired_at: Instant,
    /// The instances the winning attempt asked: only they can hold the key.
    pub(crate) asked: Asked,
    /// Held across an extend round: one lock's extends run one at a time, so
    /// each instance applies them in the order they were sent, and the last
    /// one to finish is the last one each instance applied.
    pub(crate) extending: tokio::sync::Mutex<()>,
    validity: watch::Sender<Validity>,
    /// Why the lock was lost, when a failed extend is the reason.
    loss: Mutex<Option<Error>>,
    /// The fencing token of a fenced lock, set once when it is handed out.
    fencing_token: OnceLock<u64>,
}

/// The part of a lock's state that changes.
#[derive(Debug, Clone, Copy)]
struct Validity {
    /// The lease last set on the instances.
    lease: Lease,
    valid_until: Instant,
    /// The latest moment any TTL sent for this lock (an extend's included, even
    /// one dropped or failed) runs out, counted from when it left.
    sent_until: Instant,
    /// Set by a failed extend or a release; sticky.
    lost: bool,
    /// The watchdog's last extend was inconclusive (instances slow or out of
    /// reach): validity is left, but it may not be renewed. Cleared by a
    /// successful extend.
    at_risk: bool,
}

impl Held {
    pub(crate) fn new(
        key: LockKey,
        token: Arc<str>,
        value: Arc<str>,
        lease: Lease,
        acquired_at: Instant,
        valid_until: Instant,
        asked: Asked,
    ) -> Self {
        Self {
            key,
            token,
            value,
            acquired_at,
            asked,
            extending: tokio::sync::Mutex::new(()),
            validity: watch::Sender::new(Validity {
                lease,
                valid_until,
                sent_until: acquired_at + lease.ttl(),
                lost: false,
                at_risk: false,
            }),
            loss: Mutex::new(None),
            fencing_token: OnceLock::new(),
        }
    }

    pub(crate) fn set_fencing_token(&self, token: u64) {
        let _ = self.fencing_token.set(token);
    }

    pub(crate) fn fencing_token(&self) -> Option<u64> {
        self.fencing_token.get().copied()
    }

    pub(crate) fn metadata(&self) -> Option<&str> {
        LockValue::parse(&self.value).and_then(|value| value.metadata)
    }

    /// The lease last set on the instances.
    pub(crate) fn lease(&self) -> Lease {
        self.validity.borrow().lease
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.lease().ttl()
    }

    pub(crate) fn valid_until(&self) -> Instant {
        self.validity.borrow().valid_until
    }

    /// When the keys expire by their TTL at the latest, counted from when the
    /// request left (the server applied it a little later): an extend that was
    /// dropped or failed may still have set its TTL on some instances.
    pub(crate) fn expires_at(&self) -> Instant {
        self.validity.borrow().sent_until
    }

    /// Notes an extend to `lease` about to leave at `start`.
    pub(crate) fn sending(&self, start: Instant, lease: Lease) {
        self.validity.send_if_modified(|validity| {
            validity.sent_until = validity.sent_until.max(start + lease.ttl());
            false
        });
    }

    pub(crate) fn remaining(&self) -> Duration {
        let validity = self.validity.borrow();
        if validity.lost {
            Duration::ZERO
        } else {
            validity
                .valid_until
                .saturating_duration_since(Instant::now())
        }
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.remaining().is_zero()
    }

    /// Ends the validity at `until` if it would end later: an extend to a
    /// shorter TTL, about to be sent, may land on some instances and not be
    /// heard of (its future dropped), and they then drop the key sooner.
    pub(crate) fn cap(&self, until: Instant) {
        self.validity.send_if_modified(|validity| {
            if validity.valid_until <= until {
                return false;
            }
            validity.valid_until = until;
            true
        });
    }

    /// Records a successful extend, valid until `valid_until`.
    pub(crate) fn renew(&self, lease: Lease, valid_until: Instant) {
        self.validity.send_if_modified(|validity| {
            // A lost lock stays lost: someone may have been told so and acted on it.
            if validity.lost {
                return false;
            }
            *validity = Validity {
                lease,
                valid_until,
                sent_until: validity.sent_until,
                lost: false,
                at_risk: false,
            };
            true
        });
    }

    /// Marks the lock at risk: an extend could not be confirmed, though
    /// validity is left (see `LockStatus::at_risk`).
    pub(crate) fn warn_at_risk(&self) {
        self.validity.send_if_modified(|validity| {
            let changed = !validity.lost && !validity.at_risk;
            validity.at_risk |= !validity.lost;
            changed
        });
    }

    /// Whether the lock is at risk and not yet lost.
    pub(crate) fn is_at_risk(&self) -> bool {
        let validity = self.validity.borrow();
        validity.at_risk && !validity.lost
    }

    /// Resolves once the lock is at risk, or lost (whichever comes first).
    pub(crate) async fn endangered(&self) {
        self.until(|validity| validity.lost || validity.at_risk)
            .await;
    }

    /// Marks the lock lost, keeping the first reason given.
    pub(crate) fn lose(&self, reason: Option<Error>) {
        if let Some(reason) = reason {
            let mut loss = self.loss.lock().unwrap_or_else(PoisonError::into_inner);
            if loss.is_none() && !self.validity.borrow().lost {
                *loss = Some(reason);
            }
        }
        self.validity.send_if_modified(|validity| {
            if std::mem::replace(&mut validity.lost, true) {
                return false;
            }
            // A lost lock promises no more time.
            validity.valid_until = validity.valid_until.min(Instant::now());
            true
        });
    }

    /// Why the lock was lost, if a failed extend said so; taken once.
    pub(crate) fn take_loss(&self) -> Option<Error> {
        self.loss
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Resolves once the validity has run out or the lock was marked lost.
    pub(crate) async fn lost(&self) {
        self.until(|validity| validity.lost).await;
    }

    /// Resolves once `done` holds of the validity, or it has run out.
    async fn until(&self, done: impl Fn(&Validity) -> bool) {
        let mut validity = self.validity.subscribe();
        loop {
            let now = *validity.borrow_and_update();
            if done(&now) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(now.valid_until) => {
                    // An extend may have landed at the same instant.
                    if self.valid_until() <= Instant::now() {
                        return;
                    }
                }
                changed = validity.changed() => {
                    // The sender lives in `self`: this cannot fail while we run.
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
