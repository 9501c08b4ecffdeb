//! Bytes travelling one way, held until their release time, and the rule that
//! no chunk overtakes an earlier one: apart from the sockets, so that the rule
//! is tested alone.

use std::collections::VecDeque;

use tokio::time::Instant;

/// Bytes travelling one way, held until their release time.
pub(super) struct Pipe {
    pub(super) queue: VecDeque<Chunk>,
    pub(super) held: usize,
    /// Release time of the last chunk queued: later chunks never go before it.
    last_release: Option<Instant>,
    /// The sender closed its side; passed on once the queue is delivered.
    pub(super) eof: bool,
    /// The EOF was passed on.
    pub(super) shut: bool,
}

pub(super) struct Chunk {
    data: Vec<u8>,
    sent: usize,
    release: Instant,
}

impl Pipe {
    pub(super) fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            held: 0,
            last_release: None,
            eof: false,
            shut: false,
        }
    }

    pub(super) fn push(&mut self, data: Vec<u8>, release: Instant) {
        let release = self.last_release.map_or(release, |last| last.max(release));
        self.last_release = Some(release);
        self.held += data.len();
        self.queue.push_back(Chunk {
            data,
            sent: 0,
            release,
        });
    }

    /// The undelivered bytes of the first chunk, if it is due.
    pub(super) fn due(&self, now: Instant) -> Option<&[u8]> {
        self.queue
            .front()
            .filter(|chunk| chunk.release <= now)
            .map(|chunk| &chunk.data[chunk.sent..])
    }

    pub(super) fn next_release(&self) -> Option<Instant> {
        self.queue.front().map(|chunk| chunk.release)
    }

    pub(super) fn advance(&mut self, n: usize) {
        self.held -= n;
        if let Some(chunk) = self.queue.front_mut() {
            chunk.sent += n;
            if chunk.sent == chunk.data.len() {
                self.queue.pop_front();
            }
        }
    }

    /// Drops everything held; whether there was anything.
    pub(super) fn discard(&mut self) -> bool {
        let had = !self.queue.is_empty();
        self.queue.clear();
        self.held = 0;
        had
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn chunks_never_overtake() {
        let mut pipe = Pipe::new();
        let start = Instant::now();
        pipe.push(b"slow".to_vec(), start + Duration::from_millis(50));
        pipe.push(b"fast".to_vec(), start + Duration::from_millis(1));
        assert_eq!(pipe.due(start + Duration::from_millis(10)), None);
        let later = start + Duration::from_millis(50);
        assert_eq!(pipe.due(later), Some(&b"slow"[..]));
        pipe.advance(2);
        assert_eq!(pipe.due(later), Some(&b"ow"[..]));
        pipe.advance(2);
        assert_eq!(pipe.due(later), Some(&b"fast"[..]));
        assert_eq!(pipe.held, 4);
        assert!(pipe.discard());
        assert_eq!((pipe.held, pipe.due(later)), (0, None));
    }
}
