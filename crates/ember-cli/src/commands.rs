//! Subcommands. Flags and `--json` shapes here are contracts other tools rely on: extend them,
//! never rename.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use ember_runtime::chat::ChatMessage;
use ember_runtime::eval;
use ember_runtime::generate::PartialOutput;
use ember_runtime::loaded::{LoadOptions, LoadedModel};
use ember_runtime::sampling::SamplingParams;
use ember_runtime::spec::{Proposer, SpecConfig};
use ember_server::ServerConfig;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "ember",
    version,
    about = "Local LLM inference: GGUF models on CPU through burn"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Whether the command only writes to the terminal or a pipe (everything but `serve`,
    /// whose sockets must see a closed peer as an error, not a signal).
    pub fn is_filter(&self) -> bool {
        !matches!(self.command, Command::Serve(_))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Print the token ids of a text (BOS as the model says, special tokens parsed).
    Tokenize(TokenizeArgs),
    /// Raw logits after every position of a prompt, teacher-forced.
    Logits(LogitsArgs),
    /// Perplexity of a text file, computed as llama-perplexity does.
    Perplexity(PerplexityArgs),
    /// Interactive chat with the model's chat template.
    Chat(ChatArgs),
    /// Show a GGUF file's metadata and tensors.
    Inspect(InspectArgs),
    /// Fetch a model by name into the local cache.
    Pull(PullArgs),
    /// List the models the manifest knows and whether they are cached.
    List,
    /// Prompt-processing and generation speed, llama-bench style.
    Bench(BenchArgs),
    /// Serve the model over HTTP: OpenAI- and Ollama-compatible APIs, continuous batching.
    Serve(ServeArgs),
    /// Train a smaller student of a teacher model (fewer layers) to match its output
    /// distribution, and write it as GGUF (e.g. a draft model for --spec draft).
    #[cfg(feature = "distill")]
    Distill(Box<crate::distill::DistillArgs>),
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt tokens processed in one batch (the pp test); 0 skips it.
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens generated one at a time (the tg test); 0 skips it.
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Tokens already in the cache when each test starts (llama-bench's -d): a fresh cache is
    /// filled to this depth before every run, untimed, so pp and tg measure attention over a
    /// long context.
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    n_depth: usize,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Timed repetitions per test (after one warm-up run).
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    reps: usize,
    /// Print a JSON list with llama-bench's field names instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Address to bind (loopback by default: nothing outside this machine can connect).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind; 0 picks a free one (the address is printed once bound).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests decoded together (continuous batching); more wait in a queue.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Context size per request in tokens (default: the model's trained length, capped so
    /// that --parallel contexts fit in --kv-budget-mib). A longer prompt gets a 400.
    #[arg(short = 'c', long, value_parser = at_least_one, allow_negative_numbers = true)]
    ctx_size: Option<usize>,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long)]
    api_key: Option<String>,
    /// The name the model is served under (default: its manifest name or file stem).
    #[arg(long)]
    alias: Option<String>,
    /// Tokens per forward pass (decode tokens plus prompt chunks).
    #[arg(short = 'b', long, default_value_t = 512)]
    batch_size: usize,
    /// Requests that may wait for a slot; beyond that the server answers 503 (default: 64 per
    /// parallel slot).
    #[arg(long)]
    max_queue: Option<usize>,
    /// Largest request body accepted, in MiB (larger ones get 413).
    #[arg(long, default_value_t = 8.0)]
    body_limit_mib: f64,
    /// Host names served besides loopback names and IP addresses (comma-separated or
    /// repeated; `.example.com` for a domain and its subdomains, `*` for any). Requests for
    /// other names get 403: a web page cannot reach the server through DNS rebinding.
    #[arg(long, value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Web origins allowed to call the server from a browser, with CORS headers
    /// (comma-separated or repeated, e.g. `https://app.example`; `*` for any). By default no
    /// CORS headers are sent and requests from other sites' pages get 403.
    #[arg(long, value_delimiter = ',')]
    cors_origin: Vec<String>,
    /// Seconds a client has to send a request's headers; also how long an idle kept-alive
    /// connection stays open.
    #[arg(long, default_value_t = 10.0, value_parser = serve_timeout_secs)]
    header_timeout: f64,
    /// Seconds a client has to send a request's body (408 after that), and the longest a
    /// response waits for the client to read it (the connection is closed after that).
    #[arg(long, default_value_t = 30.0, value_parser = serve_timeout_secs)]
    body_timeout: f64,
    /// Open connections at most; more get a JSON 503 and are closed.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    #[command(flatten)]
    kv: KvArgs,
    #[command(flatten)]
    spec: SpecArgs,
}

/// A timeout in seconds: positive, finite, at most a day.
fn serve_timeout_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if v.is_finite() && v > 0.0 && v <= 86_400.0 {
        Ok(v)
    } else {
        Err(format!(
            "{s} seconds: a timeout must be more than 0 and at most 86400"
        ))
    }
}

#[derive(Args)]
struct ModelArg {
    /// A GGUF path, a Hugging Face checkpoint directory (safetensors; F32/F16/BF16, AWQ, GPTQ,
    /// EXL2 or compressed-tensors), or a model name from the manifest (pulled on first use).
    #[arg(
        short = 'm',
        long = "model",
        default_value = "smollm2-135m-instruct-q4_1"
    )]
    model: String,
    /// For a quantized checkpoint directory: dequantize its layers to F16 at load instead of
    /// running the packed AWQ/GPTQ/EXL2 kernels.
    #[arg(long)]
    dequantize: bool,
    /// Keep every weight a zero-copy view of the mapped file instead of repacking Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K matrices for this CPU's kernels at load (AVX-512
    /// VNNI). Same results; repacked decode is faster, loading slower.
    #[arg(long)]
    no_repack: bool,
    /// Where the model runs: cpu, or with a GPU build (`--features wgpu`) wgpu (the best
    /// adapter: Vulkan, Metal or DX12), vulkan or metal; cuda with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With a GPU --device: run only the last N blocks there, with the output head, and the
    /// others on the CPU (llama.cpp's -ngl). Default: every block on the GPU.
    #[arg(long, value_name = "N")]
    gpu_layers: Option<usize>,
    /// With a GPU --device: the memory it has for the model, in MiB. A model whose GPU part
    /// (weights, working memory, attention at the context size) needs more is refused before
    /// loading, naming the sizes and the --gpu-layers that fits. Default: the memory the device
    /// states (CUDA, Metal; Vulkan with --features vulkan), else not checked.
    #[arg(long, value_name = "MiB", value_parser = positive_mib, allow_negative_numbers = true)]
    gpu_memory_mib: Option<f64>,
}

impl ModelArg {
    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            dequantize: self.dequantize,
            no_repack: self.no_repack,
            gpu_layers: self.gpu_layers,
            gpu_memory: self.gpu_memory_bytes(),
            max_context: None,
            kv_budget: None,
        }
    }

    fn gpu_memory_bytes(&self) -> Option<u64> {
        // `positive_mib` checked it is finite and more than 0; the cast saturates.
        self.gpu_memory_mib
            .map(|mib| (mib * (1u64 << 20) as f64) as u64)
    }
}

#[derive(Args)]
struct PromptArgs {
    /// Prompt text.
    #[arg(short = 'p', long = "prompt", conflicts_with = "stdin")]
    prompt: Option<String>,
    /// Read the prompt from standard input.
    #[arg(long)]
    stdin: bool,
}

impl PromptArgs {
    fn text(&self) -> Result<String> {
        match (&self.prompt, self.stdin) {
            (Some(p), _) => Ok(p.clone()),
            (None, true) => {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the prompt from stdin")?;
                Ok(s)
            }
            (None, false) => bail!("give a prompt with -p TEXT or --stdin"),
        }
    }
}

/// Speculative decoding: a cheap proposer guesses the next tokens, the model checks them all in
/// one pass. Greedy output is token for token the output without it; sampling keeps the
/// model's distribution.
#[derive(Args, Clone)]
struct SpecArgs {
    /// Who proposes: none, lookup (n-grams of the prompt and output), draft (a smaller model
    /// with the same vocabulary, --draft-model) or self (the model's own first --spec-layers).
    #[arg(long = "spec", value_parser = proposer, default_value = "none")]
    spec: Proposer,
    /// The draft model for --spec draft: a GGUF path or a manifest name (implies --spec draft).
    #[arg(long)]
    draft_model: Option<String>,
    /// Most tokens proposed per step (1 to 64); fewer while proposals keep failing.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    draft_max: i64,
    /// Fewest proposed tokens worth checking (1 to --draft-max): shorter proposals are dropped.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    draft_min: i64,
    /// Longest n-gram prompt lookup matches (1 to 64; shorter ones are tried down to 1).
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    spec_ngram: i64,
    /// Layers --spec self runs (1 to the model's layers - 1; default half of them).
    #[arg(long, allow_negative_numbers = true)]
    spec_layers: Option<i64>,
}

fn proposer(s: &str) -> Result<Proposer, String> {
    s.parse()
        .map_err(|e: ember_runtime::spec::SpecError| e.to_string())
}

impl SpecArgs {
    /// The settings as flags give them; the facade checks them against the model and opens
    /// the draft model.
    fn config(&self) -> Result<SpecConfig> {
        // Negative values would wrap: refuse them with the same message as 0.
        let count = |v: i64| usize::try_from(v).unwrap_or(0);
        let mut proposer = self.spec;
        if self.draft_model.is_some() {
            if !matches!(proposer, Proposer::None | Proposer::Draft) {
                bail!("--draft-model is for --spec draft, not --spec {proposer}");
            }
            proposer = Proposer::Draft;
        }
        Ok(SpecConfig {
            proposer,
            draft_max: count(self.draft_max),
            draft_min: count(self.draft_min),
            ngram_max: count(self.spec_ngram),
            layers: self.spec_layers.map(|n| usize::try_from(n).unwrap_or(0)),
        })
    }
}

#[derive(Args, Clone)]
struct KvArgs {
    /// KV cache type for K and V: f16 (llama.cpp's default), f32 or q8_0.
    #[arg(long = "kv-type", alias = "cache-type", default_value = "f16")]
    kv_type: ember_kernels::KvDtype,
    /// Tokens per KV cache block (1 to 4096).
    #[arg(long, default_value_t = 32, value_parser = block_size, allow_negative_numbers = true)]
    kv_block_size: usize,
    /// Memory the KV cache may take, in MiB (more than 0); the default context is the model's
    /// trained length capped by this.
    #[arg(long, default_value_t = 1024.0, value_parser = positive_mib, allow_negative_numbers = true)]
    kv_budget_mib: f64,
}

/// Loads a model through the facade (`ember::Model`, the API library users have) with the KV,
/// context and speculation flags; the facade's typed errors are told in the flags' names.
fn load_model(
    model: &ModelArg,
    kv: &KvArgs,
    ctx_size: Option<usize>,
    spec: &SpecArgs,
) -> Result<ember::Model> {
    let mut builder = ember::Model::builder(&model.model)
        .device(ember_models::device_by_name(&model.device)?)
        .dequantize(model.dequantize)
        .no_repack(model.no_repack)
        .kv_type(kv.kv_type)
        .kv_block_size(kv.kv_block_size)
        .kv_budget_mib(kv.kv_budget_mib)
        .spec(spec.config()?);
    if let Some(n) = ctx_size {
        builder = builder.ctx_size(n);
    }
    if let Some(n) = model.gpu_layers {
        builder = builder.gpu_layers(n);
    }
    if let Some(bytes) = model.gpu_memory_bytes() {
        builder = builder.gpu_memory_bytes(bytes);
    }
    if let Some(draft) = &spec.draft_model {
        builder = builder.draft_model(draft);
    }
    let model = builder.load().map_err(|e| flag_error(e, "--ctx-size"))?;
    crate::memory::tune_for_inference();
    Ok(model)
}

/// The facade's KV errors in the command line's terms (`ctx_flag`: the flag that set the
/// context); other errors as they are.
fn flag_error(e: ember::Error, ctx_flag: &str) -> anyhow::Error {
    match e {
        ember::Error::ContextOverBudget {
            ctx_size,
            per_token_bytes,
            kv_type,
            budget_mib,
        } => anyhow::anyhow!(
            "{ctx_flag} {ctx_size} needs {:.1} MiB of KV cache ({per_token_bytes} bytes per token as {kv_type}), more than --kv-budget-mib {budget_mib}",
            ctx_size as f64 * per_token_bytes as f64 / 1048576.0,
        ),
        ember::Error::KvBudgetTooSmall {
            budget_mib,
            per_token_bytes,
            kv_type,
        } => anyhow::anyhow!(
            "--kv-budget-mib {budget_mib} holds no token: one token's KV cache takes {per_token_bytes} bytes as {kv_type}; raise it"
        ),
        ember::Error::Draft { name, error } => match *error {
            e @ ember::Error::Vocab(_) => {
                anyhow::Error::new(e).context(format!("--draft-model {name}"))
            }
            e => anyhow::Error::new(e).context(format!("opening the draft model {name}")),
        },
        e => e.into(),
    }
}

// Value parsers: a value out of range is a usage error (exit 2, as clap's own) saying what is
// allowed, before any model is loaded.

fn finite_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|_| "not a number".to_string())?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err("must be a finite number".into())
    }
}

fn temperature(s: &str) -> Result<f32, String> {
    match finite_f32(s)? {
        v if v < 0.0 => Err("must be 0 (greedy) or more".into()),
        v => Ok(v),
    }
}

fn probability(s: &str) -> Result<f32, String> {
    match finite_f32(s)? {
        v if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("must be between 0 and 1".into()),
    }
}

fn repeat_penalty(s: &str) -> Result<f32, String> {
    match finite_f32(s)? {
        v if v > 0.0 => Ok(v),
        _ => Err("must be more than 0 (1 disables it)".into()),
    }
}

fn repeat_last_n(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(v) if v >= -1 => Ok(v),
        _ => Err("must be -1 (all), 0 (off) or a number of tokens".into()),
    }
}

fn count(s: &str, what: &str) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .map_err(|_| format!("must be {what}"))
}

fn top_k(s: &str) -> Result<usize, String> {
    count(s, "0 (off) or a number of tokens")
}

fn n_predict(s: &str) -> Result<usize, String> {
    count(
        s,
        "a number of tokens, 0 or more (0 generates nothing; -1, \"until the context is full\", is not supported)",
    )
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match count(s, "a whole number, at least 1")? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

fn block_size(s: &str) -> Result<usize, String> {
    let max = ember_kv::MAX_BLOCK_SIZE;
    let what = format!("between 1 and {max} tokens");
    match count(s, &what)? {
        n if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("must be {what}")),
    }
}

fn positive_mib(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err("must be a number of MiB greater than 0".into()),
    }
}

/// Perplexity scores positions `ctx/2 .. ctx-1` of each chunk: fewer than 3 scores none.
fn perplexity_ctx(s: &str) -> Result<usize, String> {
    match count(s, "a number of tokens, at least 3")? {
        n if n >= 3 => Ok(n),
        _ => Err("must be at least 3 (each chunk scores its positions ctx/2 to ctx-2)".into()),
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Temperature, 0 or more; 0 is greedy.
    #[arg(long, default_value_t = 0.8, value_parser = temperature, allow_negative_numbers = true)]
    temperature: f32,
    /// Top-k (0 disables).
    #[arg(long, default_value_t = 40, value_parser = top_k, allow_negative_numbers = true)]
    top_k: usize,
    /// Top-p, 0 to 1 (1.0 disables).
    #[arg(long, default_value_t = 0.95, value_parser = probability, allow_negative_numbers = true)]
    top_p: f32,
    /// Min-p, 0 to 1 (0.0 disables).
    #[arg(long, default_value_t = 0.05, value_parser = probability, allow_negative_numbers = true)]
    min_p: f32,
    /// Repetition penalty, more than 0 (1.0 disables).
    #[arg(long, default_value_t = 1.0, value_parser = repeat_penalty, allow_negative_numbers = true)]
    repeat_penalty: f32,
    /// Tokens of history the penalties look at (-1 = all).
    #[arg(long, default_value_t = 64, value_parser = repeat_last_n, allow_negative_numbers = true)]
    repeat_last_n: i32,
    #[arg(long, default_value_t = 0.0, value_parser = finite_f32, allow_negative_numbers = true)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, value_parser = finite_f32, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// RNG seed: the same seed gives the same output.
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Tokens to generate at most; 0 generates nothing (as llama.cpp's -n 0).
    #[arg(short = 'n', long = "n-predict", default_value_t = 128, value_parser = n_predict, allow_negative_numbers = true)]
    n: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Context size in tokens (default: the model's trained length, capped by --kv-budget-mib).
    /// It must hold the prompt and one generated token: a longer prompt is refused, never
    /// truncated.
    #[arg(short = 'c', long, value_parser = at_least_one, allow_negative_numbers = true)]
    ctx_size: Option<usize>,
    #[command(flatten)]
    kv: KvArgs,
    /// When the context fills while generating, drop the oldest half of the tokens (after
    /// --keep) and go on, as llama.cpp's context shift; reported on stderr and in --json.
    #[arg(long)]
    context_shift: bool,
    /// Tokens at the start that a context shift keeps (the BOS is always kept).
    #[arg(long, default_value_t = 0)]
    keep: usize,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text. If generation fails midway the object
    /// is still printed, with what was generated, `"stop_reason": "error"` and an `error`
    /// field, and the exit code is 1.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    spec: SpecArgs,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    prompt: PromptArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt text (tokenized like `ember tokenize`).
    #[arg(long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// How many of the highest logits to print per position.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Text file to score.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Chunk size in tokens.
    #[arg(long = "ctx", alias = "ctx-size", short = 'c', default_value_t = 512, value_parser = perplexity_ctx, allow_negative_numbers = true)]
    ctx: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512, value_parser = at_least_one, allow_negative_numbers = true)]
    n: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(short = 'c', long, value_parser = at_least_one, allow_negative_numbers = true)]
    ctx_size: Option<usize>,
    #[command(flatten)]
    kv: KvArgs,
    /// Drop the oldest half of the conversation when the context fills, instead of stopping.
    #[arg(long)]
    context_shift: bool,
    #[command(flatten)]
    spec: SpecArgs,
}

#[derive(Args)]
struct InspectArgs {
    /// A GGUF path, a Hugging Face checkpoint directory, or a model name.
    model: String,
    /// Print every metadata array in full instead of its first items.
    #[arg(long)]
    full: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PullArgs {
    /// Model name from the manifest (`ember list` shows them).
    name: String,
    /// Fetch again even if a verified copy is cached.
    #[arg(long)]
    force: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Tokenize(a) => cmd_tokenize(a),
        Command::Logits(a) => cmd_logits(a),
        Command::Perplexity(a) => cmd_perplexity(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Inspect(a) => crate::inspect::run(&a.model, a.full, a.json),
        Command::Pull(a) => {
            let opts = ember_hub::PullOptions {
                force: a.force,
                ..Default::default()
            };
            let path = ember_hub::pull(&a.name, opts)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Bench(a) => cmd_bench(a),
        Command::Serve(a) => cmd_serve(a),
        #[cfg(feature = "distill")]
        Command::Distill(a) => crate::distill::run(*a),
        Command::List => {
            for m in ember_hub::list_models() {
                let state = if m.present { "cached" } else { "not pulled" };
                println!(
                    "{:<32} {:>7.1} MiB  {:<10}  {}",
                    m.entry.name,
                    m.entry.size as f64 / (1024.0 * 1024.0),
                    state,
                    m.entry.description
                );
            }
            Ok(())
        }
    }
}

fn open(model: &ModelArg) -> Result<LoadedModel> {
    // The device first: an unknown name or a build without it fails before any download.
    let device = ember_models::device_by_name(&model.device)?;
    let path = ember_hub::resolve(&model.model)?;
    let loaded = LoadedModel::open_with(&path, &device, &model.load_options())?;
    crate::memory::tune_for_inference();
    Ok(loaded)
}

impl GenerateArgs {
    fn params(&self) -> ember::GenerateParams {
        ember::GenerateParams {
            max_tokens: self.n,
            sampling: self.sampling.params(),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            context_shift: self.context_shift.then_some(self.keep),
        }
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let text = a.prompt.text()?;
    let model = load_model(&a.model, &a.kv, a.ctx_size, &a.spec)?;
    let prompt_tokens = model.tokenize(&text)?;
    check_room(
        prompt_tokens.len(),
        model.ctx_size(),
        a.n,
        a.ctx_size.is_some(),
    )?;
    let stdout = std::io::stdout();
    let mut shown = false;
    // The engine's scheduler (the one `ember serve` runs), one sequence, on this thread,
    // pulled a piece at a time through the facade's stream.
    // A generation that cannot start is reported like one that fails midway (with --json,
    // the object is still printed).
    let result = model
        .generate_tokens(prompt_tokens.clone(), &a.params())
        .and_then(|mut stream| {
            for piece in stream.by_ref() {
                let piece = piece?;
                if !a.json {
                    shown |= !piece.is_empty();
                    let mut lock = stdout.lock();
                    let _ = lock.write_all(piece.as_bytes());
                    let _ = lock.flush();
                }
            }
            stream.finish()
        });
    let (out, stop_reason, error) = match result {
        Ok(done) => {
            let reason = json!(done.stop_reason);
            let partial = PartialOutput {
                tokens: done.tokens,
                text: done.text,
                timings: done.timings,
                context_shifts: done.context_shifts,
                spec: done.spec,
            };
            (partial, reason, None)
        }
        // What was generated before a failure is printed too, then the error (exit 1).
        Err(e) => (
            e.partial().cloned().unwrap_or_default(),
            json!("error"),
            Some(e),
        ),
    };
    for dropped in &out.context_shifts {
        eprintln!(
            "context shift: the context of {} tokens filled; dropped the {dropped} oldest tokens and went on",
            model.ctx_size()
        );
    }
    if a.json {
        let error = error.as_ref().map(|e| e.to_string());
        let obj = generate_json(&prompt_tokens, &out, stop_reason, error.as_deref());
        // Not `println!`: a closed stdout is an error to report, not a panic.
        writeln!(stdout.lock(), "{obj}").context("writing the JSON result to stdout")?;
    } else if error.is_none() || shown {
        println!();
    }
    if let Some(e) = error {
        return Err(e.into());
    }
    if !a.json {
        let t = &out.timings;
        eprintln!(
            "prompt: {} tokens in {:.0} ms ({:.1} t/s); generated {} tokens in {:.0} ms ({:.1} t/s)",
            t.prompt_n,
            t.prompt_ms,
            t.prompt_n as f64 * 1e3 / t.prompt_ms.max(1e-9),
            t.predicted_n,
            t.predicted_ms,
            t.predicted_n as f64 * 1e3 / t.predicted_ms.max(1e-9)
        );
        if let Some(s) = &out.spec {
            eprintln!("{}", spec_summary(s));
        }
    }
    Ok(())
}

/// One line on what speculation did.
fn spec_summary(s: &ember_runtime::spec::SpecStats) -> String {
    let rate = if s.drafted > 0 {
        100.0 * s.accepted as f64 / s.drafted as f64
    } else {
        0.0
    };
    format!(
        "speculation ({}): {} proposed, {} accepted ({rate:.0}%), {} verification passes",
        s.proposer, s.drafted, s.accepted, s.steps
    )
}

/// `ember generate --json`'s object. The fields are a contract (extend, never rename); on a
/// failure `stop_reason` is `"error"` and `error` says what went wrong.
fn generate_json(
    prompt_tokens: &[u32],
    out: &PartialOutput,
    stop_reason: serde_json::Value,
    error: Option<&str>,
) -> serde_json::Value {
    let mut obj = json!({
        "prompt_tokens": prompt_tokens,
        "tokens": out.tokens,
        "text": out.text,
        "stop_reason": stop_reason,
        "timings": out.timings,
        "context_shifts": out.context_shifts,
        // `null` without speculation.
        "spec": out.spec.as_ref().map(|s| json!({
            "proposer": s.proposer,
            "drafted": s.drafted,
            "accepted": s.accepted,
        })),
    });
    if let (Some(e), Some(o)) = (error, obj.as_object_mut()) {
        o.insert("error".into(), json!(e));
    }
    obj
}

/// The context must hold the prompt and, to generate anything, one more token (llama.cpp
/// refuses a prompt that leaves no room as well): otherwise a clear error, never a silent
/// one-token run.
fn check_room(prompt: usize, ctx: usize, max_tokens: usize, explicit: bool) -> Result<()> {
    if prompt < ctx || (max_tokens == 0 && prompt == ctx) {
        return Ok(());
    }
    let origin = if explicit {
        "--ctx-size".to_string()
    } else {
        "the model's trained length capped by --kv-budget-mib".to_string()
    };
    bail!(
        "the prompt is {prompt} tokens but the context size is {ctx} ({origin}), which must hold \
         the prompt and at least one generated token: use a shorter prompt or a context of at \
         least {} tokens (nothing was truncated)",
        prompt + 1
    )
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let text = a.prompt.text()?;
    let path = ember_hub::resolve(&a.model.model)?;
    let tok = if path.is_dir() {
        // A checkpoint's tokenizer comes with its metadata image; its weights stay mapped.
        open(&a.model)?.tokenizer
    } else {
        // Tokenizing needs no weights: open the file and build only the tokenizer.
        let file = ember_formats::GgufFile::open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        ember_runtime::tokenizer::GgufTokenizer::from_gguf(&file)?
    };
    let ids = tok.encode(&text, true, true)?;
    if a.json {
        println!("{}", json!({ "tokens": ids }));
    } else {
        for id in ids {
            let piece = String::from_utf8_lossy(&tok.token_to_piece(id)).into_owned();
            println!("{id:6} -> {piece:?}");
        }
    }
    Ok(())
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let loaded = open(&a.model)?;
    let tokens = match (&a.prompt, &a.tokens) {
        (Some(p), _) => loaded.tokenize_prompt(p)?,
        (None, Some(t)) => t.clone(),
        (None, None) => bail!("give --prompt TEXT or --tokens 1,2,3"),
    };
    if tokens.is_empty() {
        bail!("no tokens to score");
    }
    let rows = eval::teacher_forced_logits(&loaded.model, &tokens, 512)?;
    let positions: Vec<_> = rows
        .iter()
        .enumerate()
        .map(|(pos, row)| json!({ "pos": pos, "top": eval::top_k(row, a.top_k) }))
        .collect();
    if a.json {
        println!("{}", json!({ "tokens": tokens, "positions": positions }));
    } else {
        for (pos, row) in rows.iter().enumerate() {
            let top: Vec<String> = eval::top_k(row, a.top_k)
                .into_iter()
                .map(|(id, l)| {
                    let piece =
                        String::from_utf8_lossy(&loaded.tokenizer.token_to_piece(id)).into_owned();
                    format!("{id} {piece:?} {l:.4}")
                })
                .collect();
            println!("pos {pos} (token {}): {}", tokens[pos], top.join(" | "));
        }
    }
    Ok(())
}

fn cmd_perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let loaded = open(&a.model)?;
    let tokens = loaded.tokenize_prompt(&text)?;
    let bos = if loaded.tokenizer.add_bos() {
        loaded.tokenizer.bos_id()
    } else {
        None
    };
    let json_out = a.json;
    let result = eval::perplexity(&loaded.model, &tokens, a.ctx, bos, |done, total, ppl| {
        if !json_out {
            eprintln!("[{done}/{total}] {ppl:.4}");
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!(
            "Final estimate: PPL = {:.4} ({} tokens scored in {} chunks of {})",
            result.ppl, result.tokens, result.chunks, a.ctx
        );
    }
    Ok(())
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let model = load_model(&a.model, &a.kv, a.ctx_size, &a.spec)?;
    // Fail before the first prompt if the template cannot be built.
    model.chat_template()?;
    let params = ember::GenerateParams {
        max_tokens: a.n,
        sampling: a.sampling.params(),
        stop: Vec::new(),
        ignore_eos: false,
        context_shift: a.context_shift.then_some(0),
    };
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(ChatMessage::system(s.clone()));
    }
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    eprintln!(
        "Chatting with {} (ctx {}). Type /exit to quit, /reset to start over.",
        a.model.model,
        model.ctx_size()
    );
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m: &ChatMessage| m.role == "system");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::user(line));
        // What the user types is text: special tokens come only from the template.
        let reply = model.chat(&messages, &params).and_then(|mut stream| {
            for piece in stream.by_ref() {
                let piece = piece?;
                let mut lock = stdout.lock();
                let _ = lock.write_all(piece.as_bytes());
                let _ = lock.flush();
            }
            stream.finish()
        });
        println!();
        match reply {
            Ok(done) => messages.push(ChatMessage::assistant(done.text)),
            Err(e) => {
                eprintln!("error: {e}");
                messages.pop();
            }
        }
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // burn-flex and our kernels both run on rayon's global pool: size it before any work.
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("setting the thread count")?;
    let path = ember_hub::resolve(&a.model.model)?;
    let loaded = open(&a.model)?;
    let cfg = loaded.model.config();
    let summary = loaded.weight_summary();
    let (size, params, file_type) = (summary.bytes, summary.params, summary.type_name);
    let mut tests = Vec::new();
    if a.n_prompt > 0 {
        tests.push((a.n_prompt, 0));
    }
    if a.n_gen > 0 {
        tests.push((0, a.n_gen));
    }
    let mut results = Vec::new();
    for (p, n) in tests {
        let r =
            ember_runtime::bench::bench_at_depth(&loaded.model, p, n, a.n_depth, a.reps, threads)?;
        results.push(r);
    }
    let model_type = format!("{} {}", cfg.architecture, file_type);
    if a.json {
        let out: Vec<_> = results
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("model_filename".into(), json!(path.display().to_string()));
                    o.insert("model_type".into(), json!(model_type));
                    o.insert("model_size".into(), json!(size));
                    o.insert("model_n_params".into(), json!(params));
                    o.insert("backend".into(), json!("flex"));
                    o.insert("build_commit".into(), json!(env!("CARGO_PKG_VERSION")));
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("| model | size | params | backend | threads | test | t/s |");
        println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
        for r in &results {
            let mut test = if r.n_prompt > 0 {
                format!("pp{}", r.n_prompt)
            } else {
                format!("tg{}", r.n_gen)
            };
            if r.n_depth > 0 {
                // llama-bench's label for a test at depth.
                test.push_str(&format!(" @ d{}", r.n_depth));
            }
            println!(
                "| {model_type} | {:.2} MiB | {:.2} M | flex | {threads} | {test} | {:.2} ± {:.2} |",
                size as f64 / (1024.0 * 1024.0),
                params as f64 / 1e6,
                r.avg_ts,
                r.stddev_ts
            );
        }
    }
    Ok(())
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    // An infinite or huge value would turn the limit off.
    if !(a.body_limit_mib.is_finite() && a.body_limit_mib > 0.0 && a.body_limit_mib <= 4096.0) {
        bail!(
            "--body-limit-mib is {}; it must be more than 0 and at most 4096",
            a.body_limit_mib
        );
    }
    if a.max_queue == Some(0) {
        // Every request waits until the scheduler's next step admits it: 0 would refuse all.
        bail!("--max-queue must be at least 1");
    }
    let model = load_model(&a.model, &a.kv, None, &a.spec)?;
    let path = model.path().to_path_buf();
    // The pool holds parallel x ctx when the budget allows. A smaller budget that still holds
    // one whole context is allowed, as vLLM allows it: requests share prompt prefixes, and when
    // the pool fills the newest sequence is preempted and recomputed later (same output).
    let options = ember::EngineOptions {
        parallel: a.parallel,
        ctx_size: a.ctx_size,
        max_batch_tokens: a.batch_size,
        max_queue: a.max_queue,
    };
    let engine = model
        .engine(&options)
        .map_err(|e| flag_error(e, "--ctx-size"))?
        .into_runtime();
    let (ctx, pool) = (engine.ctx_size(), engine.config().kv_budget_tokens);
    let total = ctx.saturating_mul(a.parallel);
    if total > pool {
        eprintln!(
            "note: --parallel {} x --ctx-size {ctx} = {total} tokens, the KV budget holds {pool}: \
             when it fills, the newest request is preempted and recomputed later (same output)",
            a.parallel
        );
    }

    // Served under the manifest name (its aliases and the file stem also accepted), or the
    // file stem for a path; --alias renames it and keeps the others as aliases.
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| a.model.model.clone());
    let entry = ember_hub::try_manifest()
        .ok()
        .and_then(|m| m.find(&a.model.model));
    let mut names: Vec<String> = match entry {
        Some(e) => std::iter::once(e.name.clone())
            .chain(e.aliases.iter().cloned())
            .chain(std::iter::once(stem))
            .collect(),
        None => vec![stem],
    };
    if let Some(alias) = &a.alias {
        names.insert(0, alias.clone());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    let mut config = ServerConfig::new(names.remove(0));
    config.aliases = names;
    config.host = a.host;
    config.port = a.port;
    config.api_key = a.api_key.filter(|k| !k.is_empty());
    config.model_digest = entry.map(|e| e.sha256.clone());
    config.model_path = Some(path);
    config.body_limit_bytes = (a.body_limit_mib * 1024.0 * 1024.0) as usize;
    config.allowed_hosts = a.allowed_hosts;
    config.cors_origins = a.cors_origin;
    config.header_timeout = std::time::Duration::from_secs_f64(a.header_timeout);
    config.body_timeout = std::time::Duration::from_secs_f64(a.body_timeout);
    config.max_connections = a.max_connections as usize;
    eprintln!(
        "serving {} with {} parallel requests of up to {ctx} tokens",
        config.model_name, a.parallel
    );
    Ok(ember_server::serve_blocking(engine, config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generation that fails midway still reports what it generated, in the usual fields.
    #[test]
    fn failed_generation_json_keeps_the_contract_fields_and_adds_the_error() {
        let partial = PartialOutput {
            tokens: vec![28, 253],
            text: ", a".into(),
            timings: Default::default(),
            context_shifts: vec![32],
            spec: None,
        };
        let v = generate_json(&[1, 2], &partial, json!("error"), Some("boom"));
        assert_eq!(v["prompt_tokens"], json!([1, 2]));
        assert_eq!(v["tokens"], json!([28, 253]));
        assert_eq!(v["text"], ", a");
        assert_eq!(v["stop_reason"], "error");
        assert_eq!(v["context_shifts"], json!([32]));
        assert_eq!(v["error"], "boom");
        for k in ["prompt_n", "prompt_ms", "predicted_n", "predicted_ms"] {
            assert!(v["timings"][k].is_number(), "timings.{k}");
        }
        let ok = generate_json(&[1], &partial, json!("length"), None);
        assert!(ok.get("error").is_none(), "no error field on success");
    }

    #[test]
    fn a_context_must_hold_the_prompt_and_one_token() {
        assert!(check_room(4, 5, 3, true).is_ok());
        assert!(check_room(4, 4, 0, true).is_ok(), "-n 0 needs no room");
        let msg = check_room(4, 4, 1, true).unwrap_err().to_string();
        assert!(msg.contains("at least 5 tokens"), "{msg}");
        let msg = check_room(4, 1, 1, false).unwrap_err().to_string();
        assert!(msg.contains("--kv-budget-mib"), "{msg}");
    }
}
