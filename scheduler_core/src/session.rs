//! Multi-turn sessions: which conversation a request belongs to, and how much of its prompt it
//! shares with the previous turn (the part a prefix cache can serve).
//!
//! Each turn of a chat or an agent session sends the whole conversation so far plus a new
//! message, so turn `k + 1`'s prompt starts with turn `k`'s prompt and output. Engines with
//! prefix caching (vLLM's automatic prefix caching) keep that KV after turn `k` ends; a turn
//! that lands on the instance holding it prefills only its new tokens.

use serde::{Deserialize, Serialize};

use crate::arrivals::{arrival_times, ArrivalProcess};
use crate::error::{CoreError, Result};
use crate::rng::Rng;

/// A conversation's key: dense in traces, a hash of the client's session key in the live
/// scheduler.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(pub u64);

impl SessionId {
    /// The id of a client's session key (64-bit FNV-1a of its bytes): the same key gives the
    /// same id in every process and version, so a restarted scheduler keeps its sessions'
    /// affinity once it has seen them again.
    pub fn from_key(key: &str) -> Self {
        let hash =
            key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        SessionId(hash)
    }
}

/// A request's place in its session.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTurn {
    pub session: SessionId,
    /// 0 for the first turn.
    pub turn: u32,
    /// Leading prompt tokens identical to the previous turn's prompt and output (0 on the
    /// first turn). The live scheduler, which cannot see tokens, passes the prompt length: the
    /// prompt of a chat turn extends its conversation.
    pub prefix_len: u32,
}

/// Mean seconds between the arrivals of a session's consecutive turns in generated traces:
/// the previous answer's generation (a few hundred tokens at tens of ms each) plus the time
/// the user or the agent's tool takes before the next message.
pub const MEAN_TURN_GAP_S: f64 = 30.0;

/// Arrival times for requests grouped in sessions, in the order given: sessions start
/// following `process` at `rate * num_sessions / n` a second (so the steady-state request
/// rate is `rate`), and each later turn comes a gap after the one before, uniform in
/// `[0.5, 1.5) * mean_turn_gap_s`. The trace is open-loop, as every other trace: a turn comes
/// at its time whether the previous one has finished or not. A request without a session is
/// a session of its own. Deterministic for `seed`.
pub fn session_arrival_times(
    sessions: &[Option<SessionTurn>],
    rate: f64,
    process: ArrivalProcess,
    mean_turn_gap_s: f64,
    seed: u64,
) -> Result<Vec<f64>> {
    if !(mean_turn_gap_s.is_finite() && mean_turn_gap_s >= 0.0) {
        return Err(CoreError::invalid("mean_turn_gap_s", mean_turn_gap_s, "must be finite and >= 0"));
    }
    // A request starts a new session unless it continues the previous request's session.
    let starts: Vec<bool> = sessions
        .iter()
        .enumerate()
        .map(|(i, s)| match (i.checked_sub(1).and_then(|j| sessions[j]), s) {
            (Some(prev), Some(cur)) => prev.session != cur.session,
            _ => true,
        })
        .collect();
    let num_sessions = starts.iter().filter(|&&s| s).count();
    if num_sessions == 0 {
        return Ok(Vec::new());
    }
    let session_rate = rate * num_sessions as f64 / sessions.len() as f64;
    let session_starts = arrival_times(process, session_rate, num_sessions, seed)?;
    // A stream apart from the lengths' and the session starts'.
    let mut rng = Rng::new(seed ^ 0x5E55_1011_7A11_7ED5);
    let mut next_start = session_starts.into_iter();
    let mut t = 0.0;
    Ok(starts
        .iter()
        .map(|&is_start| {
            t = if is_start { next_start.next().unwrap_or(t) } else { t + mean_turn_gap_s * (0.5 + rng.uniform()) };
            t
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(session: u64, turn: u32) -> Option<SessionTurn> {
        Some(SessionTurn { session: SessionId(session), turn, prefix_len: 0 })
    }

    #[test]
    fn a_session_key_hashes_to_a_fixed_id() {
        assert_eq!(SessionId::from_key(""), SessionId(0xcbf2_9ce4_8422_2325));
        assert_eq!(SessionId::from_key("a"), SessionId(0xaf63_dc4c_8601_ec8c));
        assert_ne!(SessionId::from_key("conv-1"), SessionId::from_key("conv-2"));
    }

    #[test]
    fn turns_follow_their_session_start_by_the_gaps() {
        let sessions = vec![turn(0, 0), turn(0, 1), turn(0, 2), None, turn(1, 0), turn(1, 1)];
        let t = session_arrival_times(&sessions, 6.0, ArrivalProcess::Poisson, 10.0, 7).unwrap();
        assert_eq!(t.len(), 6);
        for (a, b) in [(0, 1), (1, 2), (4, 5)] {
            let gap = t[b] - t[a];
            assert!((5.0..15.0).contains(&gap), "turn gap {gap}");
        }
        // Session starts (0, 3, 4) follow the arrival process, in order.
        assert!(t[0] > 0.0 && t[0] <= t[3] && t[3] <= t[4]);
        assert_eq!(t, session_arrival_times(&sessions, 6.0, ArrivalProcess::Poisson, 10.0, 7).unwrap());
    }

    #[test]
    fn the_steady_request_rate_is_the_rate_asked_for() {
        // 2,000 sessions of 5 turns at 10 requests/s: 2 sessions/s, so the last session
        // starts near 1,000 s, and 10,000 requests arrive in about that span plus one session.
        let sessions: Vec<_> = (0..10_000).map(|i| turn(i / 5, (i % 5) as u32)).collect();
        let t = session_arrival_times(&sessions, 10.0, ArrivalProcess::Poisson, 2.0, 1).unwrap();
        let last_start = t[9995];
        assert!((900.0..1100.0).contains(&last_start), "{last_start}");
        assert!(session_arrival_times(&sessions, 10.0, ArrivalProcess::Poisson, f64::NAN, 1).is_err());
    }
}
