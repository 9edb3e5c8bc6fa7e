//! Qwen 2 / 2.5 (`qwen2`): the llama block with biases on the Q, K and V projections and NEOX
//! RoPE; the output head is tied to the embedding unless the file has `output.weight`.
//! Follows llama.cpp's `qwen2` graph (`src/models/qwen2.cpp`).

use burn::tensor::Tensor;

use crate::layers::{Decoder, DecoderSpec, LayerRope};
use crate::model::{Architecture, Pass};
use crate::{ModelConfig, ModelError, Weights};

/// Qwen 2 / 2.5 (`qwen2`): the llama block with biases on the Q, K and V projections and NEOX
/// RoPE.
pub struct Qwen2(Decoder);

impl Qwen2 {
    /// Loads every block's weights (`blk.N.*`), checking each tensor's shape against `config`.
    pub fn load(w: &Weights<'_>, config: &ModelConfig) -> Result<Self, ModelError> {
        // llama.cpp loads and adds an `output.bias`; our shared head has none.
        if w.has("output.bias") {
            return Err(ModelError::Unsupported("qwen2 output.bias".into()));
        }
        let spec = DecoderSpec::plain(config);
        // llama.cpp's qwen2 has no sliding window (it never reads `sliding_window`).
        let layer = LayerRope::uniform(config);
        Ok(Self(Decoder::load(w, config, spec, layer)?))
    }
}

impl Architecture for Qwen2 {
    fn layer_windows(&self) -> Vec<Option<usize>> {
        self.0.layer_windows()
    }

    fn blocks(&self, x: Tensor<2>, pass: &mut Pass<'_>) -> Result<Tensor<2>, ModelError> {
        self.0.forward(x, pass)
    }
}
