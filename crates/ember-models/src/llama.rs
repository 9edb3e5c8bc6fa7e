//! The llama architecture (SmolLM2, Llama 2/3, Mistral-style): pre-norm blocks of GQA attention
//! with RoPE and a SwiGLU feed-forward, RMSNorm, optionally tied embeddings. Follows llama.cpp's
//! `llama` graph (`src/models/llama.cpp`), with its optional biases and fused `attn_qkv`.

use burn::tensor::Tensor;

use crate::layers::{Decoder, DecoderSpec, LayerRope};
use crate::model::{Architecture, Pass};
use crate::{ModelConfig, ModelError, Weights};

/// The `llama` architecture (SmolLM2, Llama 2/3, Mistral-style): pre-norm blocks of GQA
/// attention with RoPE ([`RopeMode::Normal`](crate::RopeMode::Normal)) and a SwiGLU
/// feed-forward, RMS norms. [`load`](crate::load) picks it for `general.architecture = llama`.
pub struct Llama(Decoder);

impl Llama {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        let spec = DecoderSpec {
            projection_biases: true,
            rope_factors: true,
            ..DecoderSpec::plain(config)
        };
        // llama.cpp ignores `sliding_window` for this architecture; so do we, to agree with it.
        let layer = LayerRope::uniform(config);
        Ok(Self(Decoder::load(w, config, spec, layer)?))
    }
}

impl Architecture for Llama {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        self.0.layer_windows()
    }

    fn blocks(&self, x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError> {
        self.0.forward(x, pass)
    }
}
