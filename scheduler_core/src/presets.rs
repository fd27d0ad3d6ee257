//! Built-in parametric workloads. Each imitates the published statistics of a public data set;
//! docs/design/workloads.md gives the sources and the shape of every preset.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::rng::Rng;
use crate::session::{SessionId, SessionTurn};
use crate::workload::RequestSample;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Preset {
    /// Chat (ShareGPT / LMSYS-Chat-1M-like): short prompts, medium answers.
    ShortChat,
    /// Mixed chat and long documents up to 128K (LongBench, L-Eval, InfiniteBench-like).
    LongContextMixed,
    /// Multi-turn agent sessions whose context grows every turn (SWE-agent-style traces).
    Agentic,
    /// 80% short chat and 20% long prompts: two clearly separated length modes.
    Bimodal,
    /// Reasoning-model traffic (DeepSeek-R1 in production, ServeGen): prompts of a few hundred
    /// tokens, bimodal outputs of hundreds to thousands of tokens, up to 32K.
    Reasoning,
    /// Chat (Azure's conversation trace), reasoning and long documents (Mooncake's
    /// conversation trace) in one fleet: 60% / 25% / 15% of the requests.
    ProductionMix,
}

pub const PRESET_NAMES: [&str; 6] =
    ["short-chat", "long-context-mixed", "agentic", "bimodal", "reasoning", "production-mix"];

fn clamp_len(x: f64, lo: u32, hi: u32) -> u32 {
    (x.round() as i64).clamp(i64::from(lo), i64::from(hi)) as u32
}

impl Preset {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "short-chat" => Ok(Preset::ShortChat),
            "long-context-mixed" => Ok(Preset::LongContextMixed),
            "agentic" => Ok(Preset::Agentic),
            "bimodal" => Ok(Preset::Bimodal),
            "reasoning" => Ok(Preset::Reasoning),
            "production-mix" => Ok(Preset::ProductionMix),
            _ => {
                Err(CoreError::invalid("workload", name, format!("unknown preset; known: {}", PRESET_NAMES.join(", "))))
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::ShortChat => "short-chat",
            Preset::LongContextMixed => "long-context-mixed",
            Preset::Agentic => "agentic",
            Preset::Bimodal => "bimodal",
            Preset::Reasoning => "reasoning",
            Preset::ProductionMix => "production-mix",
        }
    }

    /// Longest context (prompt + output) the preset produces; the grid's `max_len`.
    pub fn max_len(self) -> u32 {
        match self {
            Preset::ShortChat => 8192,
            Preset::Reasoning => 65_536,
            _ => 131_072,
        }
    }

    /// Whether the preset's requests are turns of sessions ([`Preset::sample_turns`]).
    pub fn is_multi_turn(self) -> bool {
        self == Preset::Agentic
    }

    /// `n` requests, deterministic for `seed`. Every sample has `prompt + output <= max_len()`.
    pub fn sample(self, n: usize, seed: u64) -> Vec<RequestSample> {
        self.draw(n, seed).0
    }

    /// `sample`, with each request's session where the preset has sessions (`None` elsewhere);
    /// a session's turns are consecutive and in order.
    pub fn sample_turns(self, n: usize, seed: u64) -> (Vec<RequestSample>, Vec<Option<SessionTurn>>) {
        let (out, mut sessions) = self.draw(n, seed);
        if sessions.is_empty() {
            sessions = vec![None; out.len()];
        }
        (out, sessions)
    }

    /// The samples, and their sessions for a multi-turn preset (empty for the others).
    fn draw(self, n: usize, seed: u64) -> (Vec<RequestSample>, Vec<Option<SessionTurn>>) {
        let mut rng = Rng::new(seed);
        let max_len = self.max_len();
        let mut out = Vec::with_capacity(n);
        let mut sessions = Vec::new();
        let mut num_sessions = 0;
        while out.len() < n {
            match self {
                Preset::ShortChat => out.push(chat(&mut rng)),
                Preset::LongContextMixed => out.push(long_context(&mut rng)),
                Preset::Bimodal => out.push(bimodal(&mut rng)),
                Preset::Reasoning => out.push(reasoning(&mut rng)),
                Preset::ProductionMix => out.push(production_mix(&mut rng)),
                Preset::Agentic => {
                    let (first, session) = (out.len(), SessionId(num_sessions));
                    agent_session(&mut rng, max_len, n - out.len(), &mut out);
                    num_sessions += 1;
                    sessions.extend(
                        (first..out.len())
                            .map(|i| Some(SessionTurn { session, turn: (i - first) as u32, prefix_len: 0 })),
                    );
                }
            }
        }
        for r in &mut out {
            r.prompt_len = r.prompt_len.min(max_len - 1);
            r.output_len = r.output_len.min(max_len - r.prompt_len).max(1);
        }
        // A later turn shares the previous turn's prompt and output (clamped, as they are).
        for i in 1..sessions.len() {
            if let (Some(prev), Some(cur)) = (sessions[i - 1], &mut sessions[i]) {
                if prev.session == cur.session {
                    let context = out[i - 1].prompt_len + out[i - 1].output_len;
                    cur.prefix_len = context.min(out[i].prompt_len - 1);
                }
            }
        }
        (out, sessions)
    }
}

fn chat(rng: &mut Rng) -> RequestSample {
    RequestSample {
        prompt_len: clamp_len(rng.lognormal(100.0, 1.0), 4, 4096),
        output_len: clamp_len(rng.lognormal(220.0, 0.9), 1, 2048),
    }
}

fn long_context(rng: &mut Rng) -> RequestSample {
    let u = rng.uniform();
    let prompt = if u < 0.6 {
        rng.lognormal(100.0, 1.0)
    } else if u < 0.9 {
        rng.lognormal(6000.0, 0.8)
    } else {
        // Log-uniform between 32K and 120K.
        (32_768f64.ln() + rng.uniform() * (120_000f64 / 32_768f64).ln()).exp()
    };
    RequestSample {
        prompt_len: clamp_len(prompt, 4, 126_000),
        output_len: clamp_len(rng.lognormal(200.0, 0.8), 1, 4096),
    }
}

fn bimodal(rng: &mut Rng) -> RequestSample {
    if rng.uniform() < 0.8 {
        RequestSample {
            prompt_len: clamp_len(rng.lognormal(256.0, 0.6), 4, 4096),
            output_len: clamp_len(rng.lognormal(256.0, 0.6), 1, 2048),
        }
    } else {
        RequestSample {
            prompt_len: clamp_len(rng.lognormal(16_384.0, 0.5), 2048, 100_000),
            output_len: clamp_len(rng.lognormal(512.0, 0.6), 1, 4096),
        }
    }
}

/// A reasoning model's request: a log-normal prompt and an output from a two-component
/// log-normal mixture, fitted to ServeGen's DeepSeek-R1 length distributions (short answers
/// around 600 tokens, long chains of thought around 2,300).
fn reasoning(rng: &mut Rng) -> RequestSample {
    let prompt = clamp_len(rng.lognormal(210.0, 1.9), 4, 32_768);
    let output = if rng.uniform() < 0.73 { rng.lognormal(610.0, 0.7) } else { rng.lognormal(2270.0, 0.95) };
    RequestSample { prompt_len: prompt, output_len: clamp_len(output, 16, 32_768) }
}

/// Chat as in Azure's 2023 conversation trace, reasoning as above, and long documents as in
/// Mooncake's conversation trace (Kimi).
fn production_mix(rng: &mut Rng) -> RequestSample {
    let u = rng.uniform();
    if u < 0.60 {
        RequestSample {
            prompt_len: clamp_len(rng.lognormal(1020.0, 0.6), 4, 8192),
            output_len: clamp_len(rng.lognormal(129.0, 0.8), 1, 2048),
        }
    } else if u < 0.85 {
        reasoning(rng)
    } else {
        RequestSample {
            prompt_len: clamp_len(rng.lognormal(6900.0, 1.05), 512, 126_000),
            output_len: clamp_len(rng.lognormal(340.0, 0.5), 1, 2048),
        }
    }
}

/// One agent session: a task prompt, then turns whose prompt is the whole history so far
/// (previous prompt + model output + tool output). Pushes at most `budget` requests.
fn agent_session(rng: &mut Rng, max_len: u32, budget: usize, out: &mut Vec<RequestSample>) {
    let turns = rng.range_u32(4, 20) as usize;
    let mut context = clamp_len(rng.lognormal(3000.0, 0.5), 256, 16_384);
    for _ in 0..turns.min(budget) {
        let output = clamp_len(rng.lognormal(300.0, 0.7), 1, 4096);
        if context + output >= max_len {
            break;
        }
        out.push(RequestSample { prompt_len: context, output_len: output });
        let tool_output = clamp_len(rng.lognormal(1500.0, 1.0), 16, 32_768);
        context = context.saturating_add(output).saturating_add(tool_output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_deterministic_and_in_range() {
        for name in PRESET_NAMES {
            let p = Preset::from_name(name).unwrap();
            let a = p.sample(5000, 3);
            assert_eq!(a, p.sample(5000, 3));
            assert_eq!(a.len(), 5000);
            assert!(a
                .iter()
                .all(|r| r.prompt_len >= 1 && r.output_len >= 1 && r.prompt_len + r.output_len <= p.max_len()));
        }
    }

    #[test]
    fn shapes_match_their_documentation() {
        let mean = |v: &[RequestSample], f: fn(&RequestSample) -> u32| {
            v.iter().map(|r| f64::from(f(r))).sum::<f64>() / v.len() as f64
        };
        let chat = Preset::ShortChat.sample(20_000, 1);
        let mp = mean(&chat, |r| r.prompt_len);
        let mo = mean(&chat, |r| r.output_len);
        assert!((130.0..200.0).contains(&mp), "chat prompt mean {mp}");
        assert!((280.0..380.0).contains(&mo), "chat output mean {mo}");
        let long = Preset::LongContextMixed.sample(20_000, 1);
        let frac_long = long.iter().filter(|r| r.prompt_len >= 32_768).count() as f64 / long.len() as f64;
        assert!((0.08..0.12).contains(&frac_long), "{frac_long}");
        let agent = Preset::Agentic.sample(20_000, 1);
        assert!(mean(&agent, |r| r.prompt_len) > 8000.0);
    }

    /// The value at quantile `q` (nearest rank) of one length over `v`.
    fn quantile(v: &[RequestSample], f: fn(&RequestSample) -> u32, q: f64) -> u32 {
        let mut x: Vec<u32> = v.iter().map(f).collect();
        x.sort_unstable();
        x[((q * x.len() as f64).ceil() as usize).clamp(1, x.len()) - 1]
    }

    fn share(v: &[RequestSample], pred: fn(&RequestSample) -> bool) -> f64 {
        v.iter().filter(|r| pred(r)).count() as f64 / v.len() as f64
    }

    #[test]
    fn reasoning_matches_the_deepseek_r1_statistics_it_imitates() {
        // ServeGen's DeepSeek-R1 lengths: prompt median 208; output median 792, mean 1,527,
        // p99 12,607, at most 32,768 (docs/design/workloads.md).
        let r = Preset::Reasoning.sample(20_000, 1);
        let prompt_median = quantile(&r, |r| r.prompt_len, 0.5);
        assert!((180..250).contains(&prompt_median), "prompt median {prompt_median}");
        let output_median = quantile(&r, |r| r.output_len, 0.5);
        assert!((700..880).contains(&output_median), "output median {output_median}");
        let output_mean = r.iter().map(|r| f64::from(r.output_len)).sum::<f64>() / r.len() as f64;
        assert!((1350.0..1750.0).contains(&output_mean), "output mean {output_mean}");
        let output_p99 = quantile(&r, |r| r.output_len, 0.99);
        assert!((10_000..16_000).contains(&output_p99), "output p99 {output_p99}");
        assert!(r.iter().all(|r| r.output_len <= 32_768 && r.prompt_len <= 32_768));
    }

    #[test]
    fn production_mix_holds_its_three_classes_in_the_documented_shares() {
        let m = Preset::ProductionMix.sample(20_000, 1);
        // Long documents (15%, 43% of them past 8K) and a reasoning prompt tail: ~7.2%.
        let long_prompts = share(&m, |r| r.prompt_len >= 8192);
        assert!((0.06..0.085).contains(&long_prompts), "prompts >= 8K: {long_prompts}");
        // Reasoning (25%, 39% of them past 1,000 output tokens) and a little of the rest: ~10%.
        let long_outputs = share(&m, |r| r.output_len >= 1000);
        assert!((0.085..0.125).contains(&long_outputs), "outputs >= 1,000: {long_outputs}");
        // Chat is most of the requests: the median prompt is near its median, 1,020.
        let prompt_median = quantile(&m, |r| r.prompt_len, 0.5);
        assert!((850..1150).contains(&prompt_median), "prompt median {prompt_median}");
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = Preset::from_name("nope").unwrap_err().to_string();
        assert!(err.contains("short-chat"), "{err}");
    }
}
