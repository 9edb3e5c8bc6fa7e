//! Pre-tokenizer profiles for byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`).
//!
//! Both tables are copied from llama.cpp's `src/llama-vocab.cpp` (vendored in
//! llama-cpp-python 0.3.36): `llama_vocab::impl::load` maps the `tokenizer.ggml.pre` string to
//! a `LLAMA_VOCAB_PRE_TYPE_*` (plus a few per-type flags), and `llm_tokenizer_bpe`'s constructor
//! lists the `regex_exprs` for each type. The regexes are applied in order, each one splitting
//! every piece produced by the previous one, matches and the text between them both kept
//! (HF `Split` with `Isolated` behaviour). The strings below are the C++ literals unescaped
//! verbatim (a literal CR/LF in the C++ source is written `\r`/`\n` here, which the regex engine
//! reads identically).

use super::TokenizerError;

/// A resolved pre-tokenizer profile.
#[derive(Clone, Debug)]
pub(crate) struct PreProfile {
    /// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*` name (without the prefix).
    pub kind: &'static str,
    pub regexes: &'static [&'static str],
    /// llama.cpp `clean_spaces` (BPE default true).
    pub clean_spaces: bool,
    /// llama.cpp `ignore_merges`: a pre-token that is itself in the vocab is emitted whole.
    pub ignore_merges: bool,
    /// llama.cpp sets `add_bos = true` for these types before reading `add_bos_token`.
    pub add_bos: bool,
    /// llama.cpp resets the default BOS id to "none" for these types (chatglm/glm4).
    pub no_default_bos: bool,
}

// The GPT-2 regex. llama.cpp runs it through a hand-written matcher
// (`unicode_regex_split_custom_gpt2`) that also handles the trailing `\s+` the literal lacks;
// with HF `Split(Isolated)` an unmatched run of whitespace becomes its own piece, which is the
// same split.
const GPT2: &str = r##"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"##;
const LLAMA3: &str = r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const QWEN2: &str = r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const QWEN35: &str = r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const PORO: &str = r##" ?[^(\s|.,!?…。，、।۔،)]+"##;
const TEKKEN: &str = r##"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const GPT4O: &str = r##"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"##;
const BAILINGMOE: &str = r##"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"##;
const SEED_CODER: &str = r##"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"##;

const RE_DEFAULT: &[&str] = &[
    r##"[\p{P}\$\+<=>\^~\|]+"##,
    GPT2,
    r##"\p{N}+"##,
    r##"[0-9][0-9][0-9]"##,
];
const RE_LLAMA3: &[&str] = &[LLAMA3];
const RE_DEEPSEEK3: &[&str] = &[
    r##"\p{N}{1,3}"##,
    r##"[一-龥぀-ゟ゠-ヿ]+"##,
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
];
const RE_FALCON: &[&str] = &[r##"[\p{P}\$\+<=>\^~\|`]+"##, GPT2, r##"[0-9][0-9][0-9]"##];
const RE_STARCODER: &[&str] = &[r##"\p{N}"##, GPT2];
const RE_GPT2: &[&str] = &[GPT2];
const RE_QWEN2: &[&str] = &[QWEN2];
const RE_QWEN35: &[&str] = &[QWEN35];
const RE_PORO: &[&str] = &[PORO];
const RE_VIKING: &[&str] = &[PORO, r##"\p{N}"##];
const RE_TEKKEN: &[&str] = &[TEKKEN];
const RE_GPT4O: &[&str] = &[GPT4O];
const RE_BAILINGMOE: &[&str] = &[BAILINGMOE];
const RE_SEED_CODER: &[&str] = &[SEED_CODER];

/// `tokenizer.ggml.pre` values llama.cpp knows but Ember does not implement (their regexes rely
/// on llama.cpp-specific custom matchers or a non-byte-level encoding).
const KNOWN_UNSUPPORTED: &[&str] = &[
    "deepseek-llm",
    "deepseek-coder",
    "spark2_5",
    "youtu",
    "jais-2",
    "gemma4",
    "granite-embed-multi-311m",
    "granite-embed-multi-97m",
    "sarvam-moe",
    "whitespace",
    "minicpm5",
    "chameleon",
    "exaone-moe",
    "tiny_aya",
    "cohere2moe",
    "superbpe",
    "kimi-k2",
    "ufakzeka",
    "afmoe",
    "laguna",
];

/// Resolves `tokenizer.ggml.pre` the way llama.cpp's loader does. `None` (key absent or empty)
/// is llama.cpp's "missing pre-tokenizer type, using: 'default'" path.
pub(crate) fn resolve(pre: Option<&str>) -> Result<PreProfile, TokenizerError> {
    let p = |kind, regexes| PreProfile {
        kind,
        regexes,
        clean_spaces: true,
        ignore_merges: false,
        add_bos: false,
        no_default_bos: false,
    };
    let name = match pre {
        None | Some("") => return Ok(p("DEFAULT", RE_DEFAULT)),
        Some(n) => n,
    };
    let prof = match name {
        "default" => p("DEFAULT", RE_DEFAULT),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PreProfile {
            ignore_merges: true,
            add_bos: true,
            ..p("LLAMA3", RE_LLAMA3)
        },
        "deepseek-v3" => PreProfile {
            clean_spaces: false,
            ..p("DEEPSEEK3_LLM", RE_DEEPSEEK3)
        },
        "hunyuan-dense" | "hy_v4" | "joyai-llm" => PreProfile {
            clean_spaces: false,
            ..p("DEEPSEEK3_LLM", RE_DEEPSEEK3)
        },
        "falcon" => p("FALCON", RE_FALCON),
        "mpt" => p("MPT", RE_GPT2),
        "starcoder" => p("STARCODER", RE_STARCODER),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "exaone4" | "jina-v1-en" | "jina-v2-code"
        | "roberta-bpe" => p("GPT2", RE_GPT2),
        "refact" => p("REFACT", RE_STARCODER),
        "command-r" => PreProfile {
            clean_spaces: false,
            ..p("COMMAND_R", RE_STARCODER)
        },
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" => PreProfile {
            clean_spaces: false,
            ..p("QWEN2", RE_QWEN2)
        },
        "megrez" => p("QWEN2", RE_QWEN2),
        "qwen35" => PreProfile {
            clean_spaces: false,
            ..p("QWEN35", RE_QWEN35)
        },
        "stablelm2" => p("STABLELM2", RE_QWEN2),
        "hunyuan" => PreProfile {
            clean_spaces: false,
            ..p("HUNYUAN", RE_QWEN2)
        },
        "solar-open" => PreProfile {
            clean_spaces: false,
            ..p("SOLAR_OPEN", RE_QWEN2)
        },
        "olmo" => p("OLMO", RE_GPT2),
        "dbrx" => p("DBRX", RE_LLAMA3),
        "smaug-bpe" => p("SMAUG", RE_LLAMA3),
        "poro-chat" => PreProfile {
            clean_spaces: false,
            ..p("PORO", RE_PORO)
        },
        "bloom" => p("BLOOM", RE_PORO),
        "gpt3-finnish" => p("GPT3_FINNISH", RE_PORO),
        "chatglm-bpe" => PreProfile {
            no_default_bos: true,
            ..p("CHATGLM4", RE_LLAMA3)
        },
        "glm4" | "glm5" => PreProfile {
            no_default_bos: true,
            ignore_merges: true,
            ..p("CHATGLM4", RE_LLAMA3)
        },
        "viking" => PreProfile {
            clean_spaces: false,
            ..p("VIKING", RE_VIKING)
        },
        "jais" => p("JAIS", RE_GPT2),
        "tekken" => PreProfile {
            clean_spaces: false,
            ignore_merges: true,
            add_bos: true,
            ..p("TEKKEN", RE_TEKKEN)
        },
        "smollm" => PreProfile {
            clean_spaces: false,
            ..p("SMOLLM", RE_STARCODER)
        },
        "codeshell" => p("CODESHELL", RE_STARCODER),
        "exaone" => p("EXAONE", RE_STARCODER),
        "minerva-7b" => p("MINERVA", RE_STARCODER),
        "mellum2" => p("MELLUM2", RE_STARCODER),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" => PreProfile {
            clean_spaces: false,
            ..p("GPT4O", RE_GPT4O)
        },
        "minimax-m2" => PreProfile {
            clean_spaces: false,
            ..p("MINIMAX_M2", RE_GPT4O)
        },
        "trillion" => PreProfile {
            clean_spaces: false,
            ..p("TRILLION", RE_GPT2)
        },
        "granite-docling" => PreProfile {
            clean_spaces: false,
            ..p("GRANITE_DOCLING", RE_GPT2)
        },
        "bailingmoe" | "bailingmoe2" | "llada-moe" => PreProfile {
            clean_spaces: false,
            ..p("BAILINGMOE", RE_BAILINGMOE)
        },
        "seed-coder" => PreProfile {
            clean_spaces: false,
            ..p("SEED_CODER", RE_SEED_CODER)
        },
        "grok-2" => PreProfile {
            clean_spaces: false,
            ..p("GROK_2", RE_QWEN2)
        },
        other if KNOWN_UNSUPPORTED.contains(&other) => {
            return Err(TokenizerError::UnsupportedPre(other.to_string()));
        }
        other => return Err(TokenizerError::UnknownPre(other.to_string())),
    };
    Ok(prof)
}
