//! Tokenizer conversion: GGUF `tokenizer.ggml.*` <-> `tokenizer.json` + `tokenizer_config.json`
//! (byte-level BPE only).

use std::collections::HashMap;

use ember_formats::{GgufFile, GgufWriter, MetaArray, MetaValue};
use ember_text::tokenizer::{GgufTokenizer, pre_names_for_regexes, pre_tokenizer_regexes};
use serde_json::{Value, json};

use crate::ConvertError;

/// llama.cpp token types (`llama_token_type`).
const TT_NORMAL: i32 = 1;
const TT_CONTROL: i32 = 3;
const TT_USER_DEFINED: i32 = 4;
const TT_UNUSED: i32 = 5;

/// The special-token kinds carried by name in tokenizer_config.json and by id in GGUF.
const SPECIAL_KINDS: &[(&str, &str)] = &[
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("cls", "tokenizer.ggml.cls_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
];

/// What the HF side of a tokenizer consists of.
pub(crate) struct HfTokenizerFiles {
    /// tokenizer.json.
    pub tokenizer_json: String,
    /// tokenizer_config.json.
    pub tokenizer_config: Value,
    /// The special ids by kind (`bos`, `eos`, ...), for config.json and generation_config.json.
    pub special_ids: Vec<(&'static str, u32)>,
}

/// Builds tokenizer.json and tokenizer_config.json from a GGUF's byte-level BPE vocabulary.
pub(crate) fn export(
    gguf: &GgufFile,
    max_len: Option<u64>,
) -> Result<HfTokenizerFiles, ConvertError> {
    let model = gguf.get_str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(ConvertError::UnsupportedTokenizerModel(model.to_string()));
    }
    let tok = GgufTokenizer::from_gguf(gguf)?;
    // The tokenizer ember-text builds is the HF form of the vocabulary: BPE(vocab, merges),
    // `Split(regex, Isolated)` per llama.cpp regex then `ByteLevel(use_regex = false)`, a
    // ByteLevel decoder, and added tokens (CONTROL: special, USER_DEFINED: not special).
    let tokenizer_json = tok
        .inner()
        .to_string(true)
        .map_err(|e| ConvertError::BadTokenizerJson(e.to_string()))?;

    let texts = gguf
        .get_array("tokenizer.ggml.tokens")
        .and_then(MetaArray::as_strings)
        .ok_or_else(|| ConvertError::MissingKey("tokenizer.ggml.tokens".into()))?;
    let mut cfg = serde_json::Map::new();
    let mut special_ids = Vec::new();
    for (kind, key) in SPECIAL_KINDS {
        if let Some(id) = gguf.get(key).and_then(MetaValue::as_u32) {
            let text = texts
                .get(id as usize)
                .ok_or_else(|| ConvertError::UnsupportedMetadata {
                    key: (*key).to_string(),
                    reason: format!("id {id} is outside the vocabulary"),
                })?;
            cfg.insert(format!("{kind}_token"), Value::String(text.to_string()));
            special_ids.push((*kind, id));
        }
    }
    for (gkey, hkey) in [
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
        ("tokenizer.ggml.add_space_prefix", "add_prefix_space"),
    ] {
        if let Some(b) = gguf.get_bool(gkey) {
            cfg.insert(hkey.to_string(), Value::Bool(b));
        }
    }
    if let Some(t) = gguf.get_str("tokenizer.chat_template") {
        cfg.insert("chat_template".into(), Value::String(t.to_string()));
    }
    cfg.insert("clean_up_tokenization_spaces".into(), Value::Bool(false));
    if let Some(n) = max_len {
        cfg.insert("model_max_length".into(), json!(n));
    }
    cfg.insert(
        "tokenizer_class".into(),
        Value::String("PreTrainedTokenizerFast".into()),
    );
    Ok(HfTokenizerFiles {
        tokenizer_json,
        tokenizer_config: Value::Object(cfg),
        special_ids,
    })
}

/// The split regexes a tokenizer.json pre-tokenizer applies, in order, or `None` when it is not
/// byte-level.
fn split_regexes(pre: &Value) -> Result<Vec<String>, ConvertError> {
    let bad = |m: &str| ConvertError::BadTokenizerJson(m.to_string());
    let gpt2 = pre_tokenizer_regexes(Some("gpt-2"))?[0];
    let mut out = Vec::new();
    let mut byte_level = false;
    let items: Vec<&Value> = match pre.get("type").and_then(Value::as_str) {
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("Sequence pre-tokenizer without 'pretokenizers'"))?
            .iter()
            .collect(),
        Some(_) => vec![pre],
        None => {
            return Err(bad(
                "no byte-level pre_tokenizer (a SentencePiece tokenizer?)",
            ));
        }
    };
    for p in items {
        match p.get("type").and_then(Value::as_str) {
            Some("Split") => {
                let re = p
                    .get("pattern")
                    .and_then(|x| x.get("Regex"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a Split pre-tokenizer without a Regex pattern"))?;
                if p.get("invert").and_then(Value::as_bool) == Some(true)
                    || p.get("behavior").and_then(Value::as_str) != Some("Isolated")
                {
                    return Err(bad(
                        "a Split pre-tokenizer that is not Isolated/non-inverted",
                    ));
                }
                out.push(re.to_string());
            }
            Some("Digits") => {
                let individual = p
                    .get("individual_digits")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                out.push(if individual { r"\p{N}" } else { r"\p{N}+" }.to_string());
            }
            Some("ByteLevel") => {
                if p.get("use_regex").and_then(Value::as_bool).unwrap_or(true) {
                    out.push(gpt2.to_string());
                }
                byte_level = true;
            }
            Some(other) => {
                return Err(bad(&format!(
                    "pre-tokenizer type '{other}' is not converted"
                )));
            }
            None => return Err(bad("a pre-tokenizer without 'type'")),
        }
    }
    if !byte_level {
        return Err(bad(
            "the pre-tokenizer is not byte-level (no ByteLevel step)",
        ));
    }
    Ok(out)
}

/// The GGUF `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer: among the names whose
/// regex list matches, `hint` if it is one of them, else the one llama.cpp usually writes.
fn recover_pre(pre: &Value, hint: Option<&str>) -> Result<String, ConvertError> {
    let regexes = split_regexes(pre)?;
    let names = pre_names_for_regexes(&regexes);
    if let Some(h) = hint.filter(|h| names.contains(h)) {
        return Ok(h.to_string());
    }
    names
        .first()
        .map(|n| (*n).to_string())
        .ok_or(ConvertError::UnknownPreTokenizer { regexes })
}

/// The content of a tokenizer_config.json special-token entry (a string or an AddedToken
/// object).
fn token_content(v: &Value) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(Value::as_str))
}

/// llama.cpp's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Everything hf_to_gguf needs to write the tokenizer keys.
pub(crate) struct TokenizerSource<'a> {
    /// tokenizer.json text.
    pub json: &'a str,
    /// tokenizer_config.json.
    pub config: Option<&'a Value>,
    /// config.json.
    pub model_config: &'a Value,
    /// `tokenizer.ggml.pre` recorded by [`crate::gguf_to_hf`], if any.
    pub pre_hint: Option<&'a str>,
}

/// Writes the `tokenizer.ggml.*` keys (and `tokenizer.chat_template`) the way llama.cpp's
/// converter does for a byte-level BPE (`_set_vocab_gpt2` and `SpecialVocab`).
pub(crate) fn import(w: &mut GgufWriter, src: &TokenizerSource<'_>) -> Result<(), ConvertError> {
    let bad = |m: String| ConvertError::BadTokenizerJson(m);
    let tj: Value =
        serde_json::from_str(src.json).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let model = tj.get("model").ok_or_else(|| bad("no 'model'".into()))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(bad("model type is not BPE".into()));
    }
    let pre = recover_pre(
        tj.get("pre_tokenizer").unwrap_or(&Value::Null),
        src.pre_hint,
    )?;
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let mut by_id: HashMap<u32, (String, bool)> = HashMap::with_capacity(vocab.len());
    let mut max_id: Option<u32> = None;
    let id_of = |v: &Value, what: &str| -> Result<u32, ConvertError> {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| bad(format!("{what}: id is not a u32")))
    };
    for (text, id) in vocab {
        let id = id_of(id, text)?;
        by_id.insert(id, (text.clone(), false));
        max_id = max_id.max(Some(id));
    }
    let mut added: HashMap<u32, bool> = HashMap::new();
    for at in tj
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let content = at
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("an added token without content".into()))?;
        let id = id_of(at.get("id").unwrap_or(&Value::Null), content)?;
        let special = at.get("special").and_then(Value::as_bool).unwrap_or(false);
        by_id.insert(id, (content.to_string(), true));
        added.insert(id, special);
        max_id = max_id.max(Some(id));
    }
    let n_tok = max_id.map_or(0, |m| m as u64 + 1);
    let vocab_size = src
        .model_config
        .get("vocab_size")
        .and_then(Value::as_u64)
        .unwrap_or(n_tok);
    if vocab_size < n_tok {
        return Err(bad(format!(
            "token id {} is outside config.json vocab_size {vocab_size}",
            n_tok - 1
        )));
    }
    // The vocabulary size is bounded by the ids present, which are bounded by the file.
    if vocab_size > n_tok.saturating_add(1 << 20) {
        return Err(ConvertError::UnsupportedConfig {
            key: "vocab_size".into(),
            reason: format!("{vocab_size} is far beyond the tokenizer's {n_tok} tokens"),
        });
    }
    let mut tokens: Vec<String> = Vec::with_capacity(vocab_size as usize);
    let mut types: Vec<i32> = Vec::with_capacity(vocab_size as usize);
    for id in 0..vocab_size as u32 {
        match by_id.get(&id) {
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(TT_UNUSED);
            }
            Some((text, _)) => {
                let ty = match added.get(&id) {
                    Some(&special) if special || looks_special(text) => TT_CONTROL,
                    Some(_) => TT_USER_DEFINED,
                    None => TT_NORMAL,
                };
                tokens.push(text.clone());
                types.push(ty);
            }
        }
    }
    let merges: Vec<String> = match model.get("merges").and_then(Value::as_array) {
        None => Vec::new(),
        Some(ms) => ms
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str())
                {
                    (Some(a), Some(b)) => Ok(format!("{a} {b}")),
                    _ => Err(bad("a merge pair that is not two strings".into())),
                },
                _ => Err(bad("a merge that is neither a string nor a pair".into())),
            })
            .collect::<Result<_, _>>()?,
    };
    let text_to_id: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();

    w.add("tokenizer.ggml.model", "gpt2");
    w.add("tokenizer.ggml.pre", pre);
    w.add_string_array("tokenizer.ggml.tokens", &tokens);
    w.add_array("tokenizer.ggml.token_type", MetaArray::I32(types));
    w.add_string_array("tokenizer.ggml.merges", &merges);
    let empty = serde_json::Map::new();
    let tcfg = src.config.and_then(Value::as_object).unwrap_or(&empty);
    for (kind, key) in SPECIAL_KINDS {
        let from_cfg = tcfg
            .get(&format!("{kind}_token"))
            .and_then(token_content)
            .and_then(|t| text_to_id.get(t).copied());
        let from_model = src
            .model_config
            .get(format!("{kind}_token_id"))
            .and_then(Value::as_u64)
            .and_then(|x| u32::try_from(x).ok())
            .filter(|&x| (x as u64) < vocab_size);
        if let Some(id) = from_cfg.or(from_model) {
            w.add(*key, MetaValue::U32(id));
        }
    }
    for (hkey, gkey) in [
        ("add_bos_token", "tokenizer.ggml.add_bos_token"),
        ("add_eos_token", "tokenizer.ggml.add_eos_token"),
        ("add_prefix_space", "tokenizer.ggml.add_space_prefix"),
    ] {
        if let Some(b) = tcfg.get(hkey).and_then(Value::as_bool) {
            w.add(gkey, MetaValue::Bool(b));
        }
    }
    if let Some(t) = tcfg.get("chat_template").and_then(Value::as_str) {
        w.add("tokenizer.chat_template", t);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_recovery() {
        let seq = |items: Vec<Value>| json!({"type": "Sequence", "pretokenizers": items});
        let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
        let bl = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let re = pre_tokenizer_regexes(Some("smollm")).unwrap();
        let p = seq(re.iter().map(|r| split(r)).chain([bl.clone()]).collect());
        assert_eq!(recover_pre(&p, Some("smollm")).unwrap(), "smollm");
        assert_eq!(recover_pre(&p, None).unwrap(), "starcoder");
        assert_eq!(recover_pre(&p, Some("qwen2")).unwrap(), "starcoder");
        // The original SmolLM2 tokenizer.json form: Digits + ByteLevel(use_regex).
        let hf = seq(vec![
            json!({"type": "Digits", "individual_digits": true}),
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
        ]);
        assert_eq!(recover_pre(&hf, Some("smollm")).unwrap(), "smollm");
        let q = seq(vec![
            split(pre_tokenizer_regexes(Some("qwen2")).unwrap()[0]),
            bl.clone(),
        ]);
        assert_eq!(recover_pre(&q, None).unwrap(), "qwen2");
        let unknown = seq(vec![split("x+"), bl]);
        match recover_pre(&unknown, None) {
            Err(ConvertError::UnknownPreTokenizer { regexes }) => assert_eq!(regexes, ["x+"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            recover_pre(&json!({"type": "Metaspace"}), None),
            Err(ConvertError::BadTokenizerJson(_))
        ));
    }
}
