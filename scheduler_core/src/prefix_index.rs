//! Where each session's KV is probably cached, as the router knows it from its own decisions
//! (SGLang's gateway keeps such an approximate tree per worker of what it routed there,
//! rather than asking the engines): a session's request leaves its context on the instance it
//! ran on, and a migration leaves a copy on its source. Each instance's record is capped at its
//! KV capacity, least recently used sessions forgotten first, as the engine would evict them.

use std::collections::{BTreeMap, HashMap};

use crate::ids::{InstanceId, RequestId};
use crate::session::SessionId;

/// One instance's record of one session.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    pub instance: InstanceId,
    pub tokens: u32,
    stamp: u64,
}

#[derive(Clone, Debug, Default)]
struct InstanceRecord {
    tokens: u64,
    /// Sessions by the stamp of their last use, oldest first.
    lru: BTreeMap<u64, SessionId>,
}

#[derive(Clone, Debug, Default)]
pub struct PrefixIndex {
    capacity_tokens: u64,
    sessions: HashMap<SessionId, Vec<Holding>>,
    instances: Vec<InstanceRecord>,
    /// Requests of sessions placed and not yet finished.
    requests: HashMap<RequestId, SessionId>,
    next_stamp: u64,
}

impl PrefixIndex {
    /// An index remembering at most `capacity_tokens` per instance.
    pub fn new(capacity_tokens: u64) -> Self {
        PrefixIndex { capacity_tokens, ..PrefixIndex::default() }
    }

    /// The instances holding part of `session`'s context, and how much.
    pub fn holdings(&self, session: SessionId) -> &[Holding] {
        self.sessions.get(&session).map_or(&[], Vec::as_slice)
    }

    /// Tokens of `session` cached on `instance` by this record.
    pub fn cached_tokens(&self, session: SessionId, instance: InstanceId) -> u32 {
        self.holdings(session).iter().find(|h| h.instance == instance).map_or(0, |h| h.tokens)
    }

    /// `request` of `session` was placed on `instance` with `tokens` of context: the instance
    /// will hold that much of the session.
    pub fn placed(&mut self, request: RequestId, session: SessionId, instance: InstanceId, tokens: u32) {
        self.requests.insert(request, session);
        self.hold(session, instance, tokens);
    }

    /// `request` moved to `to` with `tokens` of context (its source keeps its copy).
    pub fn moved(&mut self, request: RequestId, to: InstanceId, tokens: u32) {
        if let Some(&session) = self.requests.get(&request) {
            self.hold(session, to, tokens);
        }
    }

    /// `request` ended on `instance` with `tokens` of context, if known.
    pub fn finished(&mut self, request: RequestId, instance: InstanceId, tokens: Option<u32>) {
        if let Some(session) = self.requests.remove(&request) {
            if let Some(tokens) = tokens {
                self.hold(session, instance, tokens);
            }
        }
    }

    /// Whether `request` belongs to a session this index follows.
    pub fn follows(&self, request: RequestId) -> bool {
        !self.requests.is_empty() && self.requests.contains_key(&request)
    }

    fn hold(&mut self, session: SessionId, instance: InstanceId, tokens: u32) {
        if self.instances.len() <= instance.index() {
            self.instances.resize_with(instance.index() + 1, InstanceRecord::default);
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let holdings = self.sessions.entry(session).or_default();
        let record = &mut self.instances[instance.index()];
        if let Some(h) = holdings.iter_mut().find(|h| h.instance == instance) {
            record.lru.remove(&h.stamp);
            record.tokens -= u64::from(h.tokens);
            h.tokens = h.tokens.max(tokens);
            h.stamp = stamp;
            record.tokens += u64::from(h.tokens);
        } else {
            holdings.push(Holding { instance, tokens, stamp });
            record.tokens += u64::from(tokens);
        }
        record.lru.insert(stamp, session);
        self.evict(instance);
    }

    fn evict(&mut self, instance: InstanceId) {
        let record = &mut self.instances[instance.index()];
        while record.tokens > self.capacity_tokens {
            let Some((_, session)) = record.lru.pop_first() else { break };
            let Some(holdings) = self.sessions.get_mut(&session) else { continue };
            if let Some(pos) = holdings.iter().position(|h| h.instance == instance) {
                record.tokens -= u64::from(holdings.swap_remove(pos).tokens);
            }
            if holdings.is_empty() {
                self.sessions.remove(&session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_where_it_ran_moved_and_ended() {
        let mut index = PrefixIndex::new(10_000);
        let (s, a, b) = (SessionId(1), InstanceId(0), InstanceId(3));
        index.placed(RequestId(7), s, a, 1000);
        assert_eq!(index.cached_tokens(s, a), 1000);
        index.moved(RequestId(7), b, 1500);
        index.finished(RequestId(7), b, Some(1800));
        assert_eq!((index.cached_tokens(s, a), index.cached_tokens(s, b)), (1000, 1800));
        assert!(!index.follows(RequestId(7)));
        index.moved(RequestId(8), a, 5); // not a session's request: nothing changes
        assert_eq!(index.holdings(s).len(), 2);
    }

    #[test]
    fn an_instance_forgets_its_least_recently_used_sessions_past_its_capacity() {
        let mut index = PrefixIndex::new(2500);
        let a = InstanceId(0);
        for k in 0..3 {
            index.placed(RequestId(k), SessionId(k), a, 1000);
        }
        assert_eq!(index.cached_tokens(SessionId(0), a), 0, "the oldest went");
        assert_eq!(index.cached_tokens(SessionId(2), a), 1000);
        index.placed(RequestId(9), SessionId(1), a, 1200); // session 1 used again
        index.placed(RequestId(10), SessionId(3), a, 100);
        assert_eq!((index.cached_tokens(SessionId(1), a), index.cached_tokens(SessionId(2), a)), (1200, 1000));
        index.placed(RequestId(11), SessionId(4), a, 300);
        assert_eq!(index.cached_tokens(SessionId(2), a), 0);
        assert!(index.holdings(SessionId(0)).is_empty());
    }
}
