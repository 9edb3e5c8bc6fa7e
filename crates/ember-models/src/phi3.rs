//! Phi-3 (`phi3`): the llama block with a fused QKV projection (`attn_qkv`: Q rows, then K,
//! then V) and a fused gate-and-up projection (`ffn_up`: gate rows first, as `ggml_swiglu`
//! activates the first half; separate `attn_q/k/v` and `ffn_gate`/`ffn_up` are taken too, as a
//! checkpoint directory supplies them), NEOX RoPE over `rope.dimension_count` dims of each head, and Q
//! scaled before attention. Follows llama.cpp's `phi3` graph (`src/models/phi3.cpp`): it
//! disables Phi's sliding window (`phi3.attention.sliding_window` is read and dropped, see
//! llama.cpp PR 13676), and so do we.

use burn::tensor::Tensor;

use crate::layers::{Decoder, DecoderSpec, LayerRope, QueryScale};
use crate::model::{Architecture, Pass};
use crate::{ModelConfig, ModelError, Weights};

/// Phi-3 (`phi3`): the llama block with a fused QKV projection, a fused gate-and-up
/// projection, and NEOX RoPE over `rope.dimension_count` dims of each head; Phi's sliding
/// window is disabled, as llama.cpp does.
pub struct Phi3(Decoder);

impl Phi3 {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        // LongRoPE (Phi-3 128k, Phi-3.5): per-dimension frequency factors and an attention
        // factor, which our rope kernel does not take yet.
        for t in ["rope_factors_long.weight", "rope_factors_short.weight"] {
            if w.has(t) {
                return Err(ModelError::Unsupported(format!("phi3 LongRoPE ({t})")));
            }
        }
        let spec = DecoderSpec {
            fused_gate_up: true,
            // llama.cpp scales Q itself and attends with a scale of 1.
            query_scale: QueryScale::OnQuery(1.0 / (config.head_dim as f32).sqrt()),
            ..DecoderSpec::plain(config)
        };
        // llama.cpp: "Phi SWA is currently disabled"; every layer attends to all positions.
        let layer = LayerRope::uniform(config);
        Ok(Self(Decoder::load(w, config, spec, layer)?))
    }
}

impl Architecture for Phi3 {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        self.0.layer_windows()
    }

    fn blocks(&self, x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError> {
        self.0.forward(x, pass)
    }
}
