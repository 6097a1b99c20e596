//! The requests a connection is waiting on, keyed by request id: a sans-IO
//! table the client's connection tasks drive.

use std::collections::HashMap;

/// Outstanding requests on one connection. `W` is whatever wakes the caller
/// (a oneshot sender in the client).
#[derive(Debug)]
pub struct Pending<W> {
    waiting: HashMap<String, W>,
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
    /// Registers a request; refused (the waiter handed back) once the
    /// connection has closed, so nothing waits on a dead connection.
    pub fn insert(&mut self, rid: String, waiter: W) -> Result<(), W> {
        if self.closed {
            return Err(waiter);
        }
        self.waiting.insert(rid, waiter);
        Ok(())
    }

    /// The waiter of the request this reply answers; `None` for an unknown
    /// or already answered id (Grenache clients ignore those).
    pub fn complete(&mut self, rid: &str) -> Option<W> {
        self.waiting.remove(rid)
    }

    /// The caller gave up (deadline passed): forget the request.
    pub fn abandon(&mut self, rid: &str) {
        self.waiting.remove(rid);
    }

    /// The connection is gone: every waiter, to be failed.
    pub fn close(&mut self) -> Vec<W> {
        self.closed = true;
        self.waiting.drain().map(|(_, w)| w).collect()
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

    #[test]
    fn replies_match_their_requests_in_any_order() {
        let mut p = Pending::default();
        for i in 0..3 {
            p.insert(format!("r{i}"), i).unwrap();
        }
        assert_eq!(p.complete("r2"), Some(2));
        assert_eq!(p.complete("r0"), Some(0));
        assert_eq!(p.complete("r0"), None, "a second reply is ignored");
        assert_eq!(p.complete("nope"), None);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn closing_fails_everything_and_refuses_newcomers() {
        let mut p = Pending::default();
        p.insert("a".into(), 1).unwrap();
        p.insert("b".into(), 2).unwrap();
        let mut failed = p.close();
        failed.sort();
        assert_eq!(failed, vec![1, 2]);
        assert_eq!(p.insert("c".into(), 3), Err(3));
        assert!(p.is_closed() && p.is_empty());
    }

    #[test]
    fn an_abandoned_request_does_not_take_a_late_reply() {
        let mut p = Pending::default();
        p.insert("a".into(), 1).unwrap();
        p.abandon("a");
        assert_eq!(p.complete("a"), None);
    }
}
