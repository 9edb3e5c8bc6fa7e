//! Qwen 3 (`qwen3`): the llama block with an RMS norm over every Q and K head before RoPE
//! (QK-norm, as Gemma 3), NEOX RoPE, and a head size (`attention.key_length`) independent of
//! `n_embd / n_head`. Follows llama.cpp's `qwen3` graph (`src/models/qwen3.cpp`), including
//! its optional Q/K/V biases and fused `attn_qkv`.

use burn::tensor::Tensor;

use crate::layers::{Decoder, DecoderSpec, LayerRope};
use crate::model::{Architecture, Pass};
use crate::{ModelConfig, ModelError, Weights};

/// Qwen 3 (`qwen3`): the llama block with an RMS norm over every Q and K head before RoPE
/// (QK-norm), NEOX RoPE, and a head size (`attention.key_length`) independent of
/// `n_embd / n_head`.
pub struct Qwen3(Decoder);

impl Qwen3 {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        let spec = DecoderSpec {
            qk_norm: true,
            ..DecoderSpec::plain(config)
        };
        let layer = LayerRope::uniform(config);
        Ok(Self(Decoder::load(w, config, spec, layer)?))
    }
}

impl Architecture for Qwen3 {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        self.0.layer_windows()
    }

    fn blocks(&self, x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError> {
        self.0.forward(x, pass)
    }
}
