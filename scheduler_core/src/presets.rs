//! Built-in parametric workloads. Each imitates the published statistics of a public data set;
//! docs/design/workloads.md gives the sources and the shape of every preset.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::rng::Rng;
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
}

pub const PRESET_NAMES: [&str; 4] = ["short-chat", "long-context-mixed", "agentic", "bimodal"];

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
        }
    }

    /// Longest context (prompt + output) the preset produces; the grid's `max_len`.
    pub fn max_len(self) -> u32 {
        match self {
            Preset::ShortChat => 8192,
            _ => 131_072,
        }
    }

    /// `n` requests, deterministic for `seed`. Every sample has `prompt + output <= max_len()`.
    pub fn sample(self, n: usize, seed: u64) -> Vec<RequestSample> {
        let mut rng = Rng::new(seed);
        let max_len = self.max_len();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self {
                Preset::ShortChat => out.push(chat(&mut rng)),
                Preset::LongContextMixed => out.push(long_context(&mut rng)),
                Preset::Bimodal => out.push(bimodal(&mut rng)),
                Preset::Agentic => agent_session(&mut rng, max_len, n - out.len(), &mut out),
            }
        }
        for r in &mut out {
            r.prompt_len = r.prompt_len.min(max_len - 1);
            r.output_len = r.output_len.min(max_len - r.prompt_len).max(1);
        }
        out
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

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = Preset::from_name("nope").unwrap_err().to_string();
        assert!(err.contains("short-chat"), "{err}");
    }
}
