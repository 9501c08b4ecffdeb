//! Sends one operation to every instance at once and collects the replies until
//! the caller's decision is made, the per-instance deadline passes, or every
//! instance has answered. Replies still in flight stay available, never dropped
//! unseen, so they can be finished in the background.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Shared as SharedFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use crate::error::{InstanceVote, Vote};
use crate::instance::{BoxFuture, Reply};
use crate::metrics;
use crate::quorum::{self, Decision};
use crate::shared::Shared;
use crate::standing::member::Member;
use crate::standing::state::{Admission, InFlight, InstanceState};

/// One instance's reply, tagged with the instance's index.
pub(crate) struct Tagged {
    pub(crate) index: usize,
    reply: BoxFuture<Reply>,
    /// Told of a failed connection, wherever the reply ends up being read (in
    /// the attempt, or finished in the background): the server behind it may have
    /// restarted, and must not vote until a probe has seen which server it is.
    state: Arc<InstanceState>,
    /// Counts the request against the instance's backlog until the reply is in.
    in_flight: Option<InFlight>,
}

impl Future for Tagged {
    type Output = (usize, Reply);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let reply = std::task::ready!(self.reply.as_mut().poll(cx));
        if let Err(err) = &reply {
            self.state.failed(err);
        }
        self.in_flight = None;
        Poll::Ready((self.index, reply))
    }
}

/// A reply still in flight after the decision of a won attempt, shared between
/// the task that finishes it and the release that must follow it.
pub(crate) struct Straggler {
    pub(crate) index: usize,
    pub(crate) reply: SharedFuture<Tagged>,
}

/// Counts of the replies so far.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tally {
    /// Instances that did what was asked.
    pub(crate) granted: usize,
    /// Instances that did not: refused, failed, timed out, or were not asked
    /// (not admitted).
    pub(crate) denied: usize,
    /// Of `denied`, those that answered with an error, did not answer, or were
    /// not admitted.
    pub(crate) unreachable: usize,
}

impl Tally {
    pub(crate) fn answered(&self) -> usize {
        self.granted + self.denied
    }
}

/// The instances an operation was sent to, by index (every index from 64 on
/// counts as asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Asked(u64);

impl Asked {
    pub(crate) const ALL: Self = Self(u64::MAX);

    pub(crate) fn contains(self, index: usize) -> bool {
        index >= 64 || self.0 & (1 << index) != 0
    }

    fn insert(&mut self, index: usize) {
        if index < 64 {
            self.0 |= 1 << index;
        }
    }
}

/// An operation in flight on every instance.
pub(crate) struct Fanout {
    shared: Arc<Shared>,
    pending: FuturesUnordered<Tagged>,
    votes: Vec<Option<Vote>>,
    /// What each instance that did it counted, where any counted more than 1
    /// (a fenced grant's counter); empty otherwise, so that the usual fan-out
    /// allocates nothing for it.
    counts: Vec<u64>,
    tally: Tally,
    asked: Asked,
    /// When the requests left: each reply's latency is counted from here. Only
    /// with metrics: a clock read per fan-out is not free on the hot path.
    #[cfg(feature = "metrics")]
    started: Instant,
}

impl Fanout {
    /// Starts `operation` on the members in `among`; the others are counted as
    /// refusals without being asked (the key cannot be ours there: the acquire
    /// did not ask them). The futures are created here, and the commands leave
    /// on the first poll: all of them within one poll of `collect`.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        among: Asked,
        operation: impl Fn(&Member) -> BoxFuture<Reply>,
    ) -> Self {
        let mut fanout = Self::new(shared);
        for member in &shared.members {
            if among.contains(member.index) {
                fanout.send(member, operation(member));
            } else {
                fanout.votes[member.index] = Some(Vote::Refused);
                fanout.tally.denied += 1;
            }
        }
        fanout
    }

    /// Starts a grant on every member its standing admits now (see
    /// `InstanceState::admit`; the quarantine after a loss is read across the
    /// members, in `Shared::after_loss`), with what it is admitted with;
    /// members not trusted (restarted, unverified,
    /// unmeasured, drifting, a second name, stalled) are not asked, and count
    /// as failed votes.
    pub(crate) fn start_gated(
        shared: &Arc<Shared>,
        operation: impl Fn(&Member, &Admission) -> BoxFuture<Reply>,
    ) -> Self {
        let mut fanout = Self::new(shared);
        let admissions: Vec<Result<Admission, Vote>> = shared
            .members
            .iter()
            .map(|member| {
                member.state.admit(&shared.settings.policy, |lost_at| {
                    shared.after_loss(member.index, lost_at)
                })
            })
            .collect();
        let refused = admissions
            .iter()
            .filter(|admission| admission.is_err())
            .count();
        metrics::quarantined(
            admissions
                .iter()
                .filter(|admission| matches!(admission, Err(Vote::Quarantined(_))))
                .count(),
        );
        // Too few left to make a quorum: asking them would only set keys to roll
        // back.
        let hopeless = refused > shared.members.len().saturating_sub(shared.quorum);
        for (member, admission) in shared.members.iter().zip(admissions) {
            match admission {
                Err(refusal) => {
                    debug!(instance = member.index, address = %member.address, vote = %refusal, "instance not asked");
                    fanout.tally.denied += 1;
                    fanout.tally.unreachable += 1;
                    fanout.votes[member.index] = Some(refusal);
                }
                Ok(_) if hopeless => {}
                Ok(admission) => fanout.send(member, operation(member, &admission)),
            }
        }
        fanout
    }

    fn new(shared: &Arc<Shared>) -> Self {
        Self {
            shared: Arc::clone(shared),
            pending: FuturesUnordered::new(),
            votes: vec![None; shared.members.len()],
            counts: Vec::new(),
            tally: Tally::default(),
            asked: Asked(0),
            #[cfg(feature = "metrics")]
            started: Instant::now(),
        }
    }

    fn send(&mut self, member: &Member, reply: BoxFuture<Reply>) {
        self.asked.insert(member.index);
        self.pending.push(Tagged {
            index: member.index,
            reply,
            state: Arc::clone(&member.state),
            in_flight: Some(member.state.in_flight()),
        });
    }

    /// The members the operation was sent to.
    pub(crate) fn asked(&self) -> Asked {
        self.asked
    }

    /// Whether `index` was asked and has not answered yet.
    pub(crate) fn is_pending(&self, index: usize) -> bool {
        self.asked.contains(index) && self.vote(index).is_none()
    }

    pub(crate) fn tally(&self) -> Tally {
        self.tally
    }

    /// The vote of each instance so far; `None` while it has not answered.
    pub(crate) fn vote(&self, index: usize) -> Option<&Vote> {
        self.votes.get(index).and_then(Option::as_ref)
    }

    /// Collects replies until the quorum is decided (won, or out of reach),
    /// every instance has answered, or `deadline` passes; see
    /// [`collect`](Self::collect).
    pub(crate) async fn collect_until_decided(&mut self, deadline: Instant, timeout: Duration) {
        let (n, quorum) = (self.shared.members.len(), self.shared.quorum);
        self.collect(deadline, timeout, |tally| {
            quorum::decide(n, quorum, tally.granted, tally.denied) != Decision::Open
        })
        .await;
    }

    /// The quorum's decision on the replies so far.
    pub(crate) fn decision(&self) -> Decision {
        let (n, quorum) = (self.shared.members.len(), self.shared.quorum);
        quorum::decide(n, quorum, self.tally.granted, self.tally.denied)
    }

    /// Collects replies until `done(tally)` holds, every instance has answered, or
    /// `deadline` passes; at the deadline, instances that have not answered are
    /// counted as failed (timed out) but their replies stay in flight.
    pub(crate) async fn collect(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        done: impl FnMut(Tally) -> bool,
    ) {
        self.collect_until(deadline, Some(timeout), done).await;
    }

    /// As [`collect`](Self::collect), but the instances still out at `until`
    /// stay unanswered rather than timed out: for a short extra wait after the
    /// decision, which says nothing about how slow they are.
    pub(crate) async fn wait_a_little(&mut self, until: Instant, done: impl FnMut(Tally) -> bool) {
        self.collect_until(until, None, done).await;
    }

    async fn collect_until(
        &mut self,
        deadline: Instant,
        timeout: Option<Duration>,
        mut done: impl FnMut(Tally) -> bool,
    ) {
        while !done(self.tally) && !self.pending.is_empty() {
            match tokio::time::timeout_at(deadline, self.pending.next()).await {
                Ok(Some((index, reply))) => self.record(index, reply),
                Ok(None) => break,
                Err(_elapsed) => {
                    let Some(timeout) = timeout else {
                        return;
                    };
                    for tagged in self.pending.iter() {
                        if let Some(vote @ None) = self.votes.get_mut(tagged.index) {
                            *vote = Some(Vote::TimedOut(timeout));
                            self.tally.denied += 1;
                            self.tally.unreachable += 1;
                            let address = self.shared.members.get(tagged.index);
                            debug!(
                                instance = tagged.index,
                                address = address.map(|member| &*member.address),
                                ?timeout,
                                "instance timed out"
                            );
                        }
                    }
                    return;
                }
            }
        }
        // Replies that are already here cost nothing to count, and make reports
        // (how many released, which instances may hold a rolled-back token) exact.
        while let Some(Some((index, reply))) = self.pending.next().now_or_never() {
            self.record(index, reply);
        }
    }

    fn record(&mut self, index: usize, reply: Reply) {
        let n = self.votes.len();
        let Some(slot) = self.votes.get_mut(index) else {
            return;
        };
        // A reply after the deadline replaces nothing: the vote was already counted.
        if slot.is_some() {
            return;
        }
        let vote = match reply {
            Ok(0) => Vote::Refused,
            Ok(count) => {
                if count != 1 {
                    if self.counts.is_empty() {
                        self.counts = vec![1; n];
                    }
                    self.counts[index] = count;
                }
                Vote::Granted
            }
            Err(err) => Vote::Failed(err),
        };
        let member = self.shared.members.get(index);
        let address = member.map(|member| &*member.address);
        match &vote {
            Vote::Granted => {
                self.tally.granted += 1;
                trace!(instance = index, address, "instance granted");
            }
            Vote::Failed(err) => {
                self.tally.denied += 1;
                self.tally.unreachable += 1;
                debug!(instance = index, address, %err, "instance failed");
            }
            _ => {
                self.tally.denied += 1;
                trace!(instance = index, address, "instance refused");
            }
        }
        #[cfg(feature = "metrics")]
        if let Some(address) = address {
            metrics::replied(address, &vote, self.started.elapsed());
        }
        *slot = Some(vote);
    }

    /// What instance `index` counted where it did what was asked (1, or a
    /// fenced grant's counter); 0 where it did not, or has not answered.
    pub(crate) fn count(&self, index: usize) -> u64 {
        match self.vote(index) {
            Some(Vote::Granted) => self.counts.get(index).copied().unwrap_or(1),
            _ => 0,
        }
    }

    /// Every instance's vote, in order; instances not yet heard from are
    /// `Unanswered`.
    pub(crate) fn votes(&self) -> Vec<InstanceVote> {
        self.shared
            .members
            .iter()
            .map(|member| InstanceVote {
                index: member.index,
                address: Arc::clone(&member.address),
                vote: self.vote(member.index).cloned().unwrap_or(Vote::Unanswered),
            })
            .collect()
    }

    /// Lets the replies still in flight land in the background, each bounded by
    /// `bound`, logging those that fail: a connection still opening would
    /// otherwise never send them, and a failure still tells the monitor.
    pub(crate) fn finish_in_background(
        &mut self,
        key: &Arc<str>,
        bound: Duration,
        what: &'static str,
    ) {
        let pending = self.take_pending();
        if pending.is_empty() {
            return;
        }
        let key = Arc::clone(key);
        self.shared.background.spawn(async move {
            let finish = pending.into_iter().map(|tagged| {
                let key = Arc::clone(&key);
                async move {
                    let index = tagged.index;
                    match tokio::time::timeout(bound, tagged).await {
                        Ok((_, Ok(_))) => {}
                        Ok((_, Err(err))) => warn!(%key, instance = index, %err, "{what} failed"),
                        Err(_) => warn!(%key, instance = index, "{what} timed out"),
                    }
                }
            });
            futures_util::future::join_all(finish).await;
        });
    }

    /// The replies still in flight, to be finished elsewhere.
    pub(crate) fn take_pending(&mut self) -> FuturesUnordered<Tagged> {
        std::mem::take(&mut self.pending)
    }
}
