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

/// Every `tokenizer.ggml.pre` name [`resolve`] accepts, grouped so that for each regex list the
/// name llama.cpp's converter usually writes comes first ([`pre_names_for_regexes`] returns
/// them in this order).
const SUPPORTED_PRE_NAMES: &[&str] = &[
    "default",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
    "chatglm-bpe",
    "glm4",
    "glm5",
    "deepseek-v3",
    "hunyuan-dense",
    "hy_v4",
    "joyai-llm",
    "falcon",
    "gpt-2",
    "mpt",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "exaone4",
    "jina-v1-en",
    "jina-v2-code",
    "roberta-bpe",
    "olmo",
    "jais",
    "trillion",
    "granite-docling",
    "starcoder",
    "smollm",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
    "mellum2",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "stablelm2",
    "hunyuan",
    "solar-open",
    "grok-2",
    "qwen35",
    "poro-chat",
    "bloom",
    "gpt3-finnish",
    "viking",
    "tekken",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "minimax-m2",
    "bailingmoe",
    "bailingmoe2",
    "llada-moe",
    "seed-coder",
];

/// The pre-tokenizer split regexes llama.cpp applies for a `tokenizer.ggml.pre` value (`None`
/// or `""`: llama.cpp's default list), in order: each regex splits every piece the previous one
/// produced, keeping matches and the text between them (HF `Split` with `Isolated`), before the
/// byte-level mapping. Errors as [`super::GgufTokenizer::from_gguf`] does for an unknown or
/// unported name.
///
/// ```
/// let re = ember_text::tokenizer::pre_tokenizer_regexes(Some("smollm")).unwrap();
/// assert_eq!(re.len(), 2);
/// assert_eq!(re[0], r"\p{N}");
/// ```
pub fn pre_tokenizer_regexes(pre: Option<&str>) -> Result<&'static [&'static str], TokenizerError> {
    resolve(pre).map(|p| p.regexes)
}

/// The inverse of [`pre_tokenizer_regexes`]: every supported `tokenizer.ggml.pre` name whose
/// regex list is exactly `regexes`, the name llama.cpp's converter usually writes for that list
/// first. Several names share a list (they differ only in llama.cpp flags such as
/// `clean_spaces`), so the answer may be ambiguous; empty when no name matches.
///
/// ```
/// use ember_text::tokenizer::{pre_names_for_regexes, pre_tokenizer_regexes};
/// let re = pre_tokenizer_regexes(Some("qwen2")).unwrap();
/// assert_eq!(pre_names_for_regexes(re)[0], "qwen2");
/// ```
pub fn pre_names_for_regexes<S: AsRef<str>>(regexes: &[S]) -> Vec<&'static str> {
    SUPPORTED_PRE_NAMES
        .iter()
        .copied()
        .filter(|name| {
            resolve(Some(name)).is_ok_and(|p| {
                p.regexes.len() == regexes.len()
                    && p.regexes.iter().zip(regexes).all(|(a, b)| *a == b.as_ref())
            })
        })
        .collect()
}

#[cfg(test)]
mod supported_names_tests {
    use super::*;

    #[test]
    fn every_listed_name_resolves_and_inverts() {
        for name in SUPPORTED_PRE_NAMES {
            let re = pre_tokenizer_regexes(Some(name)).unwrap();
            assert!(pre_names_for_regexes(re).contains(name), "{name}");
        }
        assert_eq!(
            pre_names_for_regexes(pre_tokenizer_regexes(Some("smollm")).unwrap())[0],
            "starcoder"
        );
        assert!(pre_names_for_regexes(&["x"]).is_empty());
    }
}
