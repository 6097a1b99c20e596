//! The requests a connection is waiting on: a sans-IO table keyed by request
//! id, with a deadline per request. The client's connection task drives it
//! (replies in, expiry on the clock); the tests drive it in simulated time.

use std::collections::HashMap;
use std::time::Instant;

/// Outstanding requests on one connection. `W` is whatever wakes the caller
/// (a oneshot sender in the client).
#[derive(Debug)]
pub struct Pending<W> {
    waiting: HashMap<String, (Instant, W)>,
    closed: bool,
}

impl<W> Default for Pending<W> {
    fn default() -> Self {
        Pending {
            waiting: HashMap::new(),
            closed: false,
        }
    }
}

impl<W> Pending<W> {
    /// Registers a request that must be answered by `deadline`; refused (the
    /// waiter handed back) once the connection has closed.
    pub fn insert(&mut self, rid: String, deadline: Instant, waiter: W) -> Result<(), W> {
        if self.closed {
            return Err(waiter);
        }
        self.waiting.insert(rid, (deadline, waiter));
        Ok(())
    }

    /// The waiter of the request this reply answers; `None` for an unknown,
    /// expired or already answered id (Grenache clients ignore those).
    pub fn complete(&mut self, rid: &str) -> Option<W> {
        self.waiting.remove(rid).map(|(_, w)| w)
    }

    /// The earliest deadline, for the driver's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiting.values().map(|(d, _)| *d).min()
    }

    /// Removes and returns every request whose deadline has passed at `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<W> {
        let due: Vec<String> = self
            .waiting
            .iter()
            .filter(|(_, (d, _))| *d <= now)
            .map(|(rid, _)| rid.clone())
            .collect();
        due.iter()
            .filter_map(|rid| self.waiting.remove(rid))
            .map(|(_, w)| w)
            .collect()
    }

    /// The connection is gone: every waiter, to be failed.
    pub fn close(&mut self) -> Vec<W> {
        self.closed = true;
        self.waiting.drain().map(|(_, (_, w))| w).collect()
    }

    /// Requests still waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn replies_match_their_requests_in_any_order() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        for i in 0..3 {
            p.insert(format!("r{i}"), t0 + secs(10), i).unwrap();
        }
        assert_eq!(p.complete("r2"), Some(2));
        assert_eq!(p.complete("r0"), Some(0));
        assert_eq!(p.complete("r0"), None, "a second reply is ignored");
        assert_eq!(p.complete("nope"), None);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn requests_expire_at_their_own_deadlines() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        p.insert("slow".into(), t0 + secs(3), "slow").unwrap();
        p.insert("fast".into(), t0 + secs(1), "fast").unwrap();
        p.insert("mid".into(), t0 + secs(2), "mid").unwrap();
        assert_eq!(p.next_deadline(), Some(t0 + secs(1)));
        assert!(p.expire(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(p.expire(t0 + secs(1)), vec!["fast"]);
        // "mid" is answered in time; a late reply for "fast" finds nothing.
        assert_eq!(p.complete("mid"), Some("mid"));
        assert_eq!(p.complete("fast"), None);
        assert_eq!(p.next_deadline(), Some(t0 + secs(3)));
        assert_eq!(p.expire(t0 + secs(60)), vec!["slow"]);
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn closing_fails_everything_and_refuses_newcomers() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        p.insert("a".into(), t0, 1).unwrap();
        p.insert("b".into(), t0, 2).unwrap();
        let mut failed = p.close();
        failed.sort();
        assert_eq!(failed, vec![1, 2]);
        assert_eq!(p.insert("c".into(), t0, 3), Err(3));
        assert!(p.is_closed() && p.is_empty());
    }
}
