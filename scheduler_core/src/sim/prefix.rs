//! One instance's prefix cache, as vLLM's automatic prefix caching keeps it: the KV blocks a
//! session's request held when it ended (finished, or migrated away) stay in the free pool
//! with their contents, and a later turn of that session admitted there reuses its leading
//! blocks instead of prefilling them. Cached blocks are free blocks: an allocation takes the
//! least recently used ones first, so they never crowd out running requests.
//!
//! Kept per session rather than per hashed block: a turn's prompt extends its session's
//! previous turn (`SessionTurn::prefix_len`), so the longest cached prefix of a turn is the
//! session's last cached context on that instance. Eviction takes a session's last blocks
//! first (vLLM frees a request's blocks tail first), so a partly evicted entry still serves
//! its leading part.

use std::collections::{BTreeMap, HashMap};

use crate::session::SessionId;

#[derive(Copy, Clone, Debug)]
struct Entry {
    num_blocks: u32,
    /// When it was last cached: the key of its place in the LRU order.
    stamp: u64,
}

#[derive(Debug)]
pub(super) struct PrefixCache {
    /// The instance's KV blocks: cached blocks plus blocks in use never exceed them.
    total_blocks: u64,
    entries: HashMap<SessionId, Entry>,
    /// Entries by the stamp of their last use, oldest first.
    lru: BTreeMap<u64, SessionId>,
    pub num_blocks: u64,
    next_stamp: u64,
}

impl PrefixCache {
    pub fn new(total_blocks: u64) -> Self {
        PrefixCache { total_blocks, entries: HashMap::new(), lru: BTreeMap::new(), num_blocks: 0, next_stamp: 0 }
    }

    /// Caches `num_blocks` full blocks of `session`'s context, replacing what the session had
    /// here (the new context extends it), as the most recently used; then evicts down to the
    /// blocks not in use (`used_blocks` are).
    pub fn insert(&mut self, session: SessionId, num_blocks: u32, used_blocks: u64) {
        self.take(session);
        if num_blocks == 0 {
            return;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.entries.insert(session, Entry { num_blocks, stamp });
        self.lru.insert(stamp, session);
        self.num_blocks += u64::from(num_blocks);
        self.fit(used_blocks);
    }

    /// Removes `session`'s entry and returns its blocks (0 when nothing is cached): a turn
    /// that reuses them holds them as its own from now on.
    pub fn take(&mut self, session: SessionId) -> u32 {
        let Some(entry) = self.entries.remove(&session) else { return 0 };
        self.lru.remove(&entry.stamp);
        self.num_blocks -= u64::from(entry.num_blocks);
        entry.num_blocks
    }

    /// Evicts the least recently used blocks until the cache fits beside `used_blocks`.
    pub fn fit(&mut self, used_blocks: u64) {
        self.evict_to(self.total_blocks.saturating_sub(used_blocks));
    }

    fn evict_to(&mut self, max_blocks: u64) {
        while self.num_blocks > max_blocks {
            let Some((&stamp, &session)) = self.lru.iter().next() else { return };
            let entry = self.entries.get_mut(&session).expect("every LRU key has its entry");
            let excess = self.num_blocks - max_blocks;
            if u64::from(entry.num_blocks) > excess {
                entry.num_blocks -= excess as u32;
                self.num_blocks = max_blocks;
                return;
            }
            self.num_blocks -= u64::from(entry.num_blocks);
            self.entries.remove(&session);
            self.lru.remove(&stamp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_cached_goes_first_and_its_leading_blocks_last() {
        let mut c = PrefixCache::new(100);
        c.insert(SessionId(1), 10, 0);
        c.insert(SessionId(2), 10, 0);
        c.insert(SessionId(1), 12, 0); // session 1 again: replaced, now the newest
        assert_eq!(c.num_blocks, 22);
        c.fit(85); // 15 blocks free
        assert_eq!(c.take(SessionId(2)), 3, "session 2 was the oldest: cut to its first 3 blocks");
        assert_eq!(c.take(SessionId(2)), 0, "taken");
        c.insert(SessionId(3), 50, 80);
        assert_eq!((c.num_blocks, c.take(SessionId(1)), c.take(SessionId(3))), (20, 0, 20));
        assert_eq!(c.num_blocks, 0);
    }
}
