//! Arrival processes and request traces for the cluster simulator.
//!
//! Inter-arrival gaps are Poisson (exponential gaps) or Gamma with a chosen coefficient of
//! variation (CV): CV = 1 is statistically Poisson, CV > 1 is bursty (gaps cluster), CV < 1 is
//! smoother than Poisson. The mean gap is always `1 / rate`. Lengths come from a [`Preset`].

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::presets::Preset;
use crate::rng::Rng;
use crate::session::{session_arrival_times, SessionTurn, MEAN_TURN_GAP_S};

/// How arrival times are spread.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ArrivalProcess {
    Poisson,
    /// Gamma-distributed gaps; `cv` is their coefficient of variation (std / mean).
    Gamma {
        cv: f64,
    },
}

impl ArrivalProcess {
    /// `"poisson"` (where `cv` must be 1) or `"gamma"` with coefficient of variation `cv`.
    pub fn from_name(name: &str, cv: f64) -> Result<Self> {
        let process = match name {
            "poisson" if cv == 1.0 => ArrivalProcess::Poisson,
            "poisson" => return Err(CoreError::invalid("cv", cv, "only the gamma process takes a cv")),
            "gamma" => ArrivalProcess::Gamma { cv },
            _ => return Err(CoreError::invalid("arrival", name, "known: poisson, gamma")),
        };
        process.validate()?;
        Ok(process)
    }

    pub fn validate(&self) -> Result<()> {
        if let ArrivalProcess::Gamma { cv } = *self {
            if !(cv.is_finite() && cv > 0.0) {
                return Err(CoreError::invalid("cv", cv, "must be finite and > 0"));
            }
        }
        Ok(())
    }

    /// One inter-arrival gap, seconds, for `rate` arrivals per second.
    pub fn gap(&self, rng: &mut Rng, rate: f64) -> f64 {
        match *self {
            ArrivalProcess::Poisson => rng.exponential(1.0 / rate),
            ArrivalProcess::Gamma { cv } => {
                // shape k = 1/cv^2 gives std/mean = cv; scale 1/(rate k) keeps the mean at 1/rate.
                let shape = 1.0 / (cv * cv);
                rng.gamma(shape, 1.0 / (rate * shape))
            }
        }
    }
}

/// One request of a trace.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Seconds from the start of the trace.
    pub arrival_s: f64,
    pub prompt_len: u32,
    pub output_len: u32,
    /// The request's session and turn, when the trace has sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionTurn>,
}

impl TraceRequest {
    /// A request outside any session.
    pub fn new(arrival_s: f64, prompt_len: u32, output_len: u32) -> Self {
        TraceRequest { arrival_s, prompt_len, output_len, session: None }
    }
}

/// `n` arrival times (the first one gap after 0) at `rate` per second, deterministic for `seed`.
pub fn arrival_times(process: ArrivalProcess, rate: f64, n: usize, seed: u64) -> Result<Vec<f64>> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(CoreError::invalid("rate", rate, "must be finite and > 0"));
    }
    process.validate()?;
    // A stream apart from the preset's, which is seeded with `seed` itself.
    let mut rng = Rng::new(seed ^ 0xA076_1D64_78BD_642F);
    let mut t = 0.0;
    Ok((0..n)
        .map(|_| {
            t += process.gap(&mut rng, rate);
            t
        })
        .collect())
}

/// A trace of `n` requests whose lengths follow `preset` and whose arrivals follow `process` at
/// `rate` requests per second; deterministic for `seed`. A multi-turn preset's requests carry
/// their sessions, the process times the sessions' starts and turns follow
/// ([`session_arrival_times`]); the trace is sorted by arrival.
pub fn generate_trace(
    preset: Preset,
    n: usize,
    rate: f64,
    process: ArrivalProcess,
    seed: u64,
) -> Result<Vec<TraceRequest>> {
    if !preset.is_multi_turn() {
        let times = arrival_times(process, rate, n, seed)?;
        return Ok(preset
            .sample(n, seed)
            .into_iter()
            .zip(times)
            .map(|(s, arrival_s)| TraceRequest::new(arrival_s, s.prompt_len, s.output_len))
            .collect());
    }
    let (samples, sessions) = preset.sample_turns(n, seed);
    let times = session_arrival_times(&sessions, rate, process, MEAN_TURN_GAP_S, seed)?;
    let mut trace: Vec<TraceRequest> = samples
        .into_iter()
        .zip(sessions)
        .zip(times)
        .map(|((s, session), arrival_s)| TraceRequest {
            session,
            ..TraceRequest::new(arrival_s, s.prompt_len, s.output_len)
        })
        .collect();
    trace.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean and coefficient of variation of the gaps between consecutive times.
    fn gap_stats(times: &[f64]) -> (f64, f64) {
        let gaps: Vec<f64> = std::iter::once(times[0]).chain(times.windows(2).map(|w| w[1] - w[0])).collect();
        let n = gaps.len() as f64;
        let mean = gaps.iter().sum::<f64>() / n;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt() / mean)
    }

    #[test]
    fn gamma_with_cv_one_is_poisson_like_and_cv_three_is_bursty() {
        let rate = 40.0;
        let n = 200_000;
        let (mean, cv) = gap_stats(&arrival_times(ArrivalProcess::Gamma { cv: 1.0 }, rate, n, 11).unwrap());
        assert!((mean * rate - 1.0).abs() < 0.01, "mean gap {mean}, expected {}", 1.0 / rate);
        assert!((cv - 1.0).abs() < 0.02, "cv {cv}");
        let (mean, cv) = gap_stats(&arrival_times(ArrivalProcess::Gamma { cv: 3.0 }, rate, n, 11).unwrap());
        assert!((mean * rate - 1.0).abs() < 0.03, "mean gap {mean}");
        assert!((cv - 3.0).abs() < 0.15, "cv {cv}");
        let (mean, cv) = gap_stats(&arrival_times(ArrivalProcess::Poisson, rate, n, 11).unwrap());
        assert!((mean * rate - 1.0).abs() < 0.01 && (cv - 1.0).abs() < 0.02, "poisson {mean} {cv}");
    }

    #[test]
    fn traces_are_deterministic_sorted_and_follow_the_preset() {
        let a = generate_trace(Preset::Bimodal, 1000, 5.0, ArrivalProcess::Gamma { cv: 2.0 }, 3).unwrap();
        assert_eq!(a, generate_trace(Preset::Bimodal, 1000, 5.0, ArrivalProcess::Gamma { cv: 2.0 }, 3).unwrap());
        assert_ne!(a, generate_trace(Preset::Bimodal, 1000, 5.0, ArrivalProcess::Gamma { cv: 2.0 }, 4).unwrap());
        assert!(a.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s) && a[0].arrival_s > 0.0);
        let lens = Preset::Bimodal.sample(1000, 3);
        assert!(a.iter().zip(&lens).all(|(r, s)| (r.prompt_len, r.output_len) == (s.prompt_len, s.output_len)));
        assert!(a.iter().all(|r| r.session.is_none()));
    }

    #[test]
    fn a_multi_turn_trace_keeps_each_sessions_turns_in_order() {
        let t = generate_trace(Preset::Agentic, 2000, 4.0, ArrivalProcess::Poisson, 5).unwrap();
        assert!(t.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
        assert!(t.iter().all(|r| r.session.is_some_and(|s| s.prefix_len < r.prompt_len)));
        let mut last: std::collections::HashMap<u64, (u32, u32)> = std::collections::HashMap::new();
        for r in &t {
            let s = r.session.unwrap();
            if let Some(&(turn, context)) = last.get(&s.session.0) {
                assert_eq!(s.turn, turn + 1, "turns arrive in order");
                assert_eq!(s.prefix_len, context, "the prefix is the previous prompt and output");
            } else {
                assert_eq!((s.turn, s.prefix_len), (0, 0));
            }
            last.insert(s.session.0, (s.turn, r.prompt_len + r.output_len));
        }
        // The lengths are the preset's, only their order changed.
        let mut a: Vec<(u32, u32)> = t.iter().map(|r| (r.prompt_len, r.output_len)).collect();
        let mut b: Vec<(u32, u32)> =
            Preset::Agentic.sample(2000, 5).iter().map(|r| (r.prompt_len, r.output_len)).collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_parameters_name_the_field() {
        assert!(arrival_times(ArrivalProcess::Poisson, 0.0, 10, 1).unwrap_err().to_string().contains("rate"));
        assert!(ArrivalProcess::from_name("gamma", -1.0).unwrap_err().to_string().contains("cv"));
        assert!(ArrivalProcess::from_name("poisson", 2.0).unwrap_err().to_string().contains("cv"));
        assert!(ArrivalProcess::from_name("uniform", 1.0).unwrap_err().to_string().contains("poisson"));
        assert_eq!(ArrivalProcess::from_name("poisson", 1.0).unwrap(), ArrivalProcess::Poisson);
    }
}
