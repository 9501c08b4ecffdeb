//! Hand-off to waiters: releases publish on a per-key channel, and waiting
//! acquires retry as soon as one arrives instead of sleeping out their retry
//! delay. One subscription connection per instance, shared by every wait of a
//! locker; a background task per instance demultiplexes messages to the waits
//! by key. Subscriptions are best effort: when they fail, waits fall back to
//! their timed retries.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tracing::debug;

use crate::instance::{PubSubSource, Resolver};
use crate::standing::member::Member;

/// Prefix of the channel a release of a key publishes on; the key (with the
/// locker's prefix) follows.
pub const RELEASE_CHANNEL_PREFIX: &str = "quorumlock:released:";

/// How long a key stays subscribed after its last wait ended: keys contended
/// again soon skip a SUBSCRIBE round trip and its re-check.
const LINGER: Duration = Duration::from_secs(5);
/// How often lingering subscriptions are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Bounds opening a subscription connection and each (un)subscribe.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pauses between reconnection attempts, doubling up to the second.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A locker that released a key lets others' woken waiters try first for this
/// long before its own next attempt on the key: without it the releaser,
/// already running, would win most hand-offs back (barging).
pub(crate) const COURTESY: Duration = Duration::from_millis(2);
/// The channel a release of `redis_key` publishes on.
pub(crate) fn channel(redis_key: &str) -> Arc<str> {
    format!("{RELEASE_CHANNEL_PREFIX}{redis_key}").into()
}

/// The locker's side of the hand-off; dropping it (with the locker) ends the
/// background tasks.
pub(crate) struct Handoff {
    hub: Arc<Hub>,
}

struct Hub {
    channels: Mutex<HashMap<Arc<str>, Entry>>,
    /// Keys this locker released, and when: for the courtesy pause.
    released: Mutex<HashMap<Arc<str>, Instant>>,
    /// Ticks whenever the set of channels changes, or on shutdown.
    changed: watch::Sender<()>,
    closed: AtomicBool,
}

struct Entry {
    /// Waits watching the key now.
    refs: usize,
    /// When the last wait ended (while `refs` is 0).
    idle_since: Instant,
    /// Bumped by every new release message and by a subscription that just
    /// became active (a release just before it would have been missed).
    wakes: watch::Sender<u64>,
    /// The last message, to count a release heard on several instances once.
    last_message: Option<Arc<str>>,
    /// Instances on which the subscription is active.
    active: usize,
}

impl Handoff {
    /// Starts one background task per instance that can deliver messages.
    pub(crate) fn start(members: &[Member]) -> Self {
        let hub = Arc::new(Hub {
            channels: Mutex::new(HashMap::new()),
            released: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(()),
            closed: AtomicBool::new(false),
        });
        for member in members {
            let Some(source) = member.instance.pubsub() else {
                continue;
            };
            let hub = Arc::clone(&hub);
            let changed = hub.changed.subscribe();
            let address = Arc::clone(&member.address);
            match source {
                PubSubSource::Redis(client) => {
                    let client = *client;
                    let resolve: Resolver = Arc::new(move || {
                        let client = client.clone();
                        Box::pin(async move { Ok(client) })
                    });
                    tokio::spawn(listen_redis(hub, resolve, changed, address));
                }
                PubSubSource::Resolved(resolve) => {
                    tokio::spawn(listen_redis(hub, resolve, changed, address));
                }
                PubSubSource::InProcess(sender) => {
                    // Subscribed from here on: no message can be missed.
                    let published = sender.subscribe();
                    tokio::spawn(listen_memory(hub, published, changed));
                }
            }
        }
        Self { hub }
    }

    /// The wake-up generation of `redis_key` now, if it is watched: pass it to
    /// [`watch`](Self::watch) to catch a release that comes in between.
    pub(crate) fn peek(&self, redis_key: &str) -> Option<u64> {
        let channels = self.hub.channels();
        channels
            .get(&*channel(redis_key))
            .map(|entry| *entry.wakes.borrow())
    }

    /// Starts watching `redis_key` for releases. `seen` is the generation from
    /// [`peek`](Self::peek) before the attempt that failed: a release since then
    /// wakes the watch at once.
    pub(crate) fn watch(&self, redis_key: &str, seen: Option<u64>) -> Watch {
        let channel = channel(redis_key);
        let mut channels = self.hub.channels();
        let created = !channels.contains_key(&channel);
        let entry = channels
            .entry(Arc::clone(&channel))
            .or_insert_with(|| Entry {
                refs: 0,
                idle_since: Instant::now(),
                wakes: watch::Sender::new(0),
                last_message: None,
                active: 0,
            });
        entry.refs += 1;
        let mut wakes = entry.wakes.subscribe();
        if seen.is_some_and(|seen| seen != *wakes.borrow()) {
            wakes.mark_changed();
        }
        drop(channels);
        if created {
            self.hub.changed.send_replace(());
        }
        Watch {
            hub: Arc::clone(&self.hub),
            channel,
            wakes,
        }
    }

    /// Notes that this locker released `redis_key` now.
    pub(crate) fn released(&self, redis_key: &Arc<str>) {
        let mut released = self
            .hub
            .released
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        released.retain(|_, at| now.duration_since(*at) < COURTESY);
        released.insert(Arc::clone(redis_key), now);
    }

    /// Until when this locker should hold back from `redis_key`, having just
    /// released it while others watch it.
    pub(crate) fn courtesy_until(&self, redis_key: &str) -> Option<Instant> {
        let released = self
            .hub
            .released
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let until = *released.get(redis_key)? + COURTESY;
        (until > Instant::now()).then_some(until)
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        self.hub.closed.store(true, Ordering::Release);
        self.hub.changed.send_replace(());
    }
}

/// One wait's interest in a key's releases; ends with the wait.
pub(crate) struct Watch {
    hub: Arc<Hub>,
    channel: Arc<str>,
    wakes: watch::Receiver<u64>,
}

impl Watch {
    /// Marks every wake-up so far as seen: call before each attempt.
    pub(crate) fn mark(&mut self) {
        self.wakes.borrow_and_update();
    }

    /// Resolves at the next wake-up not yet seen (at once if one came since
    /// [`mark`](Self::mark)). Never resolves if the hub is gone.
    pub(crate) async fn woken(&mut self) {
        if self.wakes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut channels = self.hub.channels();
        if let Some(entry) = channels.get_mut(&self.channel) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                entry.idle_since = Instant::now();
            }
        }
    }
}

impl Hub {
    fn channels(&self) -> MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Drops channels idle past [`LINGER`]; returns the channels to subscribe.
    fn sweep(&self) -> HashSet<Arc<str>> {
        let mut channels = self.channels();
        let now = Instant::now();
        channels.retain(|_, entry| entry.refs > 0 || now.duration_since(entry.idle_since) < LINGER);
        channels.keys().cloned().collect()
    }

    /// A release message arrived on `channel`.
    fn deliver(&self, channel: &str, message: Arc<str>) {
        let mut channels = self.channels();
        let Some(entry) = channels.get_mut(channel) else {
            return;
        };
        if entry.last_message.as_ref() == Some(&message) {
            return; // the same release, heard on another instance
        }
        entry.last_message = Some(message);
        entry.wakes.send_modify(|generation| *generation += 1);
    }

    /// Messages may have been lost: wake every watch.
    fn wake_all(&self) {
        for entry in self.channels().values_mut() {
            entry.wakes.send_modify(|generation| *generation += 1);
        }
    }

    /// The subscription to `channel` is active on one more instance; the first
    /// wakes the watches, which re-check what they may have missed.
    fn activated(&self, channel: &str) {
        if let Some(entry) = self.channels().get_mut(channel) {
            entry.active += 1;
            if entry.active == 1 {
                entry.wakes.send_modify(|generation| *generation += 1);
            }
        }
    }

    /// An instance's subscription connection was lost.
    fn deactivated(&self, subscribed: &HashSet<Arc<str>>) {
        let mut channels = self.channels();
        for channel in subscribed {
            if let Some(entry) = channels.get_mut(channel) {
                entry.active = entry.active.saturating_sub(1);
            }
        }
    }
}

/// Waits for a change in the channels, the sweep period, or shutdown; false on
/// shutdown.
async fn pause(hub: &Hub, changed: &mut watch::Receiver<()>, period: Duration) -> bool {
    tokio::select! {
        result = changed.changed() => result.is_ok() && !hub.is_closed(),
        () = tokio::time::sleep(period) => !hub.is_closed(),
    }
}

/// Keeps a subscription connection to one server, subscribed to every watched
/// channel, and delivers its messages.
async fn listen_redis(
    hub: Arc<Hub>,
    resolve: Resolver,
    mut changed: watch::Receiver<()>,
    address: Arc<str>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        if hub.is_closed() {
            return;
        }
        // No connection while nothing is watched.
        if hub.sweep().is_empty() {
            if !pause(&hub, &mut changed, SWEEP_EVERY).await {
                return;
            }
            continue;
        }
        // Found anew for each connection: a Sentinel member's primary moves.
        let connect = async { resolve().await?.get_async_pubsub().await };
        let pubsub = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, connect).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(err)) => {
                debug!(%address, %err, "subscription connection failed; waits fall back to timed retries");
                if !pause(&hub, &mut changed, backoff).await && hub.is_closed() {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(_) => {
                debug!(%address, "subscription connection timed out");
                if !pause(&hub, &mut changed, backoff).await && hub.is_closed() {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = FIRST_BACKOFF;
        let (mut sink, mut stream) = pubsub.split();
        let mut subscribed: HashSet<Arc<str>> = HashSet::new();
        'connection: loop {
            let wanted = hub.sweep();
            for channel in wanted.difference(&subscribed).cloned().collect::<Vec<_>>() {
                match tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(&*channel)).await {
                    Ok(Ok(())) => {
                        hub.activated(&channel);
                        subscribed.insert(channel);
                    }
                    _ => break 'connection,
                }
            }
            for channel in subscribed.difference(&wanted).cloned().collect::<Vec<_>>() {
                subscribed.remove(&channel);
                match tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.unsubscribe(&*channel)).await {
                    Ok(Ok(())) => {}
                    _ => break 'connection,
                }
            }
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => {
                        let payload: Arc<str> = String::from_utf8_lossy(message.get_payload_bytes()).into();
                        hub.deliver(message.get_channel_name(), payload);
                    }
                    None => break 'connection,
                },
                result = changed.changed() => {
                    if result.is_err() || hub.is_closed() {
                        return;
                    }
                }
                () = tokio::time::sleep(SWEEP_EVERY) => {}
            }
        }
        debug!(%address, "subscription connection lost; reconnecting");
        hub.deactivated(&subscribed);
    }
}

/// Delivers a memory instance's release messages.
async fn listen_memory(
    hub: Arc<Hub>,
    mut published: broadcast::Receiver<(Arc<str>, Arc<str>)>,
    mut changed: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            message = published.recv() => match message {
                Ok((channel, message)) => hub.deliver(&channel, message),
                Err(broadcast::error::RecvError::Lagged(_)) => hub.wake_all(),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            result = changed.changed() => {
                if result.is_err() || hub.is_closed() {
                    return;
                }
                hub.sweep();
            }
        }
    }
}
