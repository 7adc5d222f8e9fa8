//! Rotary position tables: plain RoPE or DeepSeek's YaRN, following the original
//! `modeling_deepseek.py` (inverse frequencies blended by a linear ramp, cos/sin scaled by
//! `mscale / mscale_all_dim`). Angles are computed in f64 on the host per token position.
//! The tables are the same whichever pairs of dimensions an architecture rotates
//! ([`super::config::RopeStyle`]; the attention applies them).

use super::config::{yarn_mscale, Config};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    /// Multiplier of both cos and sin (YaRN's `mscale / mscale_all_dim`, else 1).
    magnitude: f64,
}

impl Rope {
    pub fn new(cfg: &Config) -> Self {
        let d = cfg.rope_dims().0;
        let base = cfg.rope_theta;
        let exps: Vec<f64> = (0..d / 2).map(|i| (2 * i) as f64 / d as f64).collect();
        match &cfg.rope_scaling {
            None => Rope {
                inv_freq: exps.iter().map(|e| 1.0 / base.powf(*e)).collect(),
                magnitude: 1.0,
            },
            Some(y) => {
                let f = y.factor;
                let omax = y.original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    (d as f64 * (omax / (rotations * 2.0 * std::f64::consts::PI)).ln())
                        / (2.0 * base.ln())
                };
                let low = correction_dim(y.beta_fast).floor().max(0.0);
                let mut high = correction_dim(y.beta_slow).ceil().min((d - 1) as f64);
                if low == high {
                    high += 0.001;
                }
                let inv_freq = exps
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let extra = 1.0 / base.powf(*e);
                        let inter = 1.0 / (f * base.powf(*e));
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        inter * (1.0 - keep) + extra * keep
                    })
                    .collect();
                Rope {
                    inv_freq,
                    magnitude: yarn_mscale(f, y.mscale) / yarn_mscale(f, y.mscale_all_dim),
                }
            }
        }
    }

    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// Appends the `[d/2]` cos and sin rows of each position to `cos` and `sin`.
    pub fn tables_into(&self, positions: &[usize], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.reserve(positions.len() * self.inv_freq.len());
        sin.reserve(positions.len() * self.inv_freq.len());
        for &p in positions {
            for f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push((a.cos() * self.magnitude) as f32);
                sin.push((a.sin() * self.magnitude) as f32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_inv_freq_matches_reference_fixture() {
        // The fixture records transformers' inv_freq for the published Lite yarn scaling.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lite-yarn");
        let cfg = Config::from_dir(std::path::Path::new(dir)).unwrap();
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{dir}/reference.json")).unwrap(),
        )
        .unwrap();
        let want: Vec<f64> = reference["compute"]["rope_inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let rope = Rope::new(&cfg);
        assert_eq!(rope.inv_freq().len(), want.len());
        for (a, b) in rope.inv_freq().iter().zip(&want) {
            assert!(((a - b) / b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!((rope.magnitude - 1.0).abs() < 1e-12);
    }

    #[test]
    fn plain_rope_hand_case() {
        let mut cfg = Config::from_dir(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/lite"
        )))
        .unwrap();
        if let crate::model::config::AttentionConfig::Mla(m) = &mut cfg.attention {
            m.qk_rope_head_dim = 4;
        }
        cfg.rope_theta = 100.0;
        let rope = Rope::new(&cfg);
        // inv_freq = [1, 100^-0.5] = [1, 0.1]
        let (mut c, mut s) = (vec![], vec![]);
        rope.tables_into(&[0, 2], &mut c, &mut s);
        let want_c = [1.0, 1.0, 2f64.cos(), 0.2f64.cos()];
        let want_s = [0.0, 0.0, 2f64.sin(), 0.2f64.sin()];
        for i in 0..4 {
            assert!((c[i] as f64 - want_c[i]).abs() < 1e-7);
            assert!((s[i] as f64 - want_s[i]).abs() < 1e-7);
        }
    }
}
