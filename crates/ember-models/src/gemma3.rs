//! Gemma 3 (`gemma3`): GQA attention with RMS-normed Q and K (QK-norm), NEOX RoPE with a
//! different base on sliding-window layers, norms after attention and after the feed-forward
//! as well as before, a GELU-gated feed-forward, embeddings scaled by `sqrt(n_embd)`, and
//! sliding-window layers (window `gemma3.attention.sliding_window`) interleaved with global
//! ones: with the default pattern of 6, layer `i` is global iff `i % 6 == 5`. Follows
//! llama.cpp's `gemma3` graph (norm weights in GGUF already include Gemma's `+1`).

use burn::tensor::Tensor;

use crate::layers::{Decoder, DecoderSpec, Gate, LayerRope, QueryScale};
use crate::model::{Architecture, Pass};
use crate::{ModelConfig, ModelError, Weights};

/// Gemma 3 (`gemma3`): RMS-normed Q and K (QK-norm), NEOX RoPE with its own base on
/// sliding-window layers, norms after attention and feed-forward as well as before, a
/// GELU-gated feed-forward, embeddings scaled by `sqrt(n_embd)`, and window layers interleaved
/// with global ones ([`SlidingWindow`](crate::SlidingWindow)).
pub struct Gemma3 {
    decoder: Decoder,
    n_embd: usize,
}

impl Gemma3 {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        let c = config;
        // llama.cpp soft-caps the logits when the file asks (no Gemma 3 release does); our
        // shared head does not.
        let softcap = "gemma3.final_logit_softcapping";
        if let Some(cap) = w.file().get_f32(softcap)
            && cap != 0.0
        {
            return Err(ModelError::Unsupported(format!(
                "final logit soft-capping {cap} ({softcap})"
            )));
        }
        // gemma_pytorch: the 27B model scales by the query_pre_attn_scalar n_embd / n_head.
        let attn_scale = if c.n_layer == 62 {
            1.0 / ((c.n_embd / c.n_head) as f32).sqrt()
        } else {
            1.0 / (c.head_dim as f32).sqrt()
        };
        let spec = DecoderSpec {
            qk_norm: true,
            post_norms: true,
            gate: Gate::Gelu,
            // Q is multiplied by the scale before attention, which then uses 1, as llama.cpp.
            query_scale: QueryScale::OnQuery(attn_scale),
            ..DecoderSpec::plain(config)
        };
        // Read and checked with the rest of the metadata (`ModelConfig::from_gguf`).
        let layer = |i: usize| {
            // llama.cpp's `set_swa_pattern(n_pattern)`: a pattern of 0 makes every layer SWA.
            let swa = c
                .sliding_window
                .filter(|s| s.pattern == 0 || i % s.pattern < s.pattern - 1);
            match swa {
                // llama.cpp scales only the global layers (`rope_freq_scale_train_swa` is 1).
                Some(s) => LayerRope {
                    window: Some(s.window),
                    base: s.rope_base,
                    freq_scale: 1.0,
                },
                None => LayerRope {
                    window: None,
                    base: c.rope_base,
                    freq_scale: c.rope_freq_scale,
                },
            }
        };
        Ok(Self {
            decoder: Decoder::load(w, config, spec, layer)?,
            n_embd: c.n_embd,
        })
    }
}

impl Architecture for Gemma3 {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        self.decoder.layer_windows()
    }

    fn embedding_scale(&self) -> Option<f32> {
        Some((self.n_embd as f32).sqrt())
    }

    fn blocks(&self, x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError> {
        self.decoder.forward(x, pass)
    }
}
