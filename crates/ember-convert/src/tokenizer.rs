//! Tokenizer conversion: GGUF `tokenizer.ggml.*` <-> `tokenizer.json` + `tokenizer_config.json`
//! (byte-level BPE, and SentencePiece-style vocabularies as Gemma's: a BPE with byte fallback
//! plus a `tokenizer.model` carrying the exact scores and token types).

use std::collections::HashMap;

use ember_formats::{GgufFile, GgufWriter, MetaArray, MetaValue};
use ember_text::tokenizer::{GgufTokenizer, pre_names_for_regexes, pre_tokenizer_regexes};
use serde_json::{Value, json};

use crate::ConvertError;

/// llama.cpp token types (`llama_token_type`).
const TT_NORMAL: i32 = 1;
const TT_UNKNOWN: i32 = 2;
const TT_CONTROL: i32 = 3;
const TT_USER_DEFINED: i32 = 4;
const TT_UNUSED: i32 = 5;
const TT_BYTE: i32 = 6;

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
    /// tokenizer.model (a SentencePiece `ModelProto`), for SentencePiece-style vocabularies.
    pub tokenizer_model: Option<Vec<u8>>,
}

/// The GGUF -> tokenizer_config.json flags.
const ADD_FLAGS: &[(&str, &str)] = &[
    ("tokenizer.ggml.add_bos_token", "add_bos_token"),
    ("tokenizer.ggml.add_sep_token", "add_sep_token"),
    ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ("tokenizer.ggml.add_space_prefix", "add_prefix_space"),
];

/// Builds tokenizer.json and tokenizer_config.json from a GGUF's byte-level BPE vocabulary, or
/// (when `spm` is allowed) its SentencePiece-style one, which also gets a tokenizer.model.
pub(crate) fn export(
    gguf: &GgufFile,
    max_len: Option<u64>,
    spm: bool,
) -> Result<HfTokenizerFiles, ConvertError> {
    let model = gguf.get_str("tokenizer.ggml.model").unwrap_or("");
    let is_spm = match model {
        "gpt2" => false,
        "llama" if spm => true,
        _ => return Err(ConvertError::UnsupportedTokenizerModel(model.to_string())),
    };
    let tok = GgufTokenizer::from_gguf(gguf)?;
    // ember-text's HF form of the vocabulary (built for this call for SentencePiece
    // vocabularies, whose own encoding does not use it): BPE(vocab, merges), `Split(regex,
    // Isolated)` per llama.cpp regex then `ByteLevel(use_regex = false)`, a ByteLevel decoder,
    // and added tokens (CONTROL: special, USER_DEFINED: not special). For SentencePiece
    // vocabularies: BPE(vocab, merges derived from the scores, byte_fallback), normalizer
    // `[Prepend("▁")], Replace(" ", "▁")` and the matching decoder.
    let mut tokenizer_json = tok
        .inner()?
        .to_string(true)
        .map_err(|e| ConvertError::BadTokenizerJson(e.to_string()))?;
    let mut tokenizer_model = None;
    if is_spm {
        if tok.add_bos()
            && let Some(bos) = tok.bos_id()
        {
            tokenizer_json = with_bos_post_processor(&tokenizer_json, &tok, bos)?;
        }
        tokenizer_model = Some(spm_model_proto(gguf)?);
    }

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
    for (gkey, hkey) in ADD_FLAGS {
        if let Some(b) = gguf.get_bool(gkey) {
            cfg.insert(hkey.to_string(), Value::Bool(b));
        }
    }
    if let Some(t) = gguf.get_str("tokenizer.chat_template") {
        cfg.insert("chat_template".into(), Value::String(t.to_string()));
    }
    if is_spm {
        cfg.insert("added_tokens_decoder".into(), added_tokens_decoder(gguf)?);
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
        tokenizer_model,
    })
}

/// tokenizer_config.json's `added_tokens_decoder` for the CONTROL, UNKNOWN and USER_DEFINED
/// tokens (`special` for the first two), the list llama.cpp's converter reads token types
/// from on top of tokenizer.model.
fn added_tokens_decoder(gguf: &GgufFile) -> Result<Value, ConvertError> {
    let texts = gguf
        .get_array("tokenizer.ggml.tokens")
        .and_then(MetaArray::as_strings)
        .ok_or_else(|| ConvertError::MissingKey("tokenizer.ggml.tokens".into()))?;
    let types: Vec<i32> = match gguf.get_array("tokenizer.ggml.token_type") {
        Some(MetaArray::I32(t)) => t.to_vec(),
        _ => return Err(ConvertError::MissingKey("tokenizer.ggml.token_type".into())),
    };
    let mut out = serde_json::Map::new();
    for (id, (text, &ty)) in texts.iter().zip(&types).enumerate() {
        if matches!(ty, TT_CONTROL | TT_UNKNOWN | TT_USER_DEFINED) {
            out.insert(
                id.to_string(),
                json!({
                    "content": text,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": ty != TT_USER_DEFINED,
                }),
            );
        }
    }
    Ok(Value::Object(out))
}

/// tokenizer.json with a `TemplateProcessing` post-processor that prepends BOS (as Gemma's
/// own tokenizer.json), so `encode(text, add_special_tokens = true)` adds it like llama.cpp.
fn with_bos_post_processor(
    json: &str,
    tok: &GgufTokenizer,
    bos: u32,
) -> Result<String, ConvertError> {
    let bad = |e: serde_json::Error| ConvertError::BadTokenizerJson(e.to_string());
    let text = tok
        .token_str(bos)
        .ok_or_else(|| ConvertError::UnsupportedMetadata {
            key: "tokenizer.ggml.bos_token_id".into(),
            reason: format!("id {bos} is outside the vocabulary"),
        })?;
    let mut v: Value = serde_json::from_str(json).map_err(bad)?;
    let special = |type_id: u32| json!({"SpecialToken": {"id": text, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    v["post_processor"] = json!({
        "type": "TemplateProcessing",
        "single": [special(0), seq("A", 0)],
        "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
        "special_tokens": {text: {"id": text, "ids": [bos], "tokens": [text]}},
    });
    serde_json::to_string_pretty(&v).map_err(bad)
}

// SentencePiece `ModelProto` (sentencepiece_model.proto), the fields written and read here.
const PB_VARINT: u8 = 0;
const PB_FIXED64: u8 = 1;
const PB_LEN: u8 = 2;
const PB_FIXED32: u8 = 5;

fn pb_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn pb_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    pb_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn pb_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    pb_key(out, field, PB_LEN);
    pb_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// An int32/enum/bool field (negative values sign-extended to 64 bits, as protobuf does).
fn pb_int(out: &mut Vec<u8>, field: u32, v: i64) {
    pb_key(out, field, PB_VARINT);
    pb_varint(out, v as u64);
}

/// tokenizer.model for a SentencePiece-style GGUF vocabulary: every piece with its score and
/// type (UNKNOWN for the unknown token, which SentencePiece requires; the GGUF type otherwise),
/// a BPE trainer spec with byte fallback and the special ids, and an identity normalizer that
/// escapes spaces (`add_dummy_prefix` from `tokenizer.ggml.add_space_prefix`).
fn spm_model_proto(gguf: &GgufFile) -> Result<Vec<u8>, ConvertError> {
    let texts = gguf
        .get_array("tokenizer.ggml.tokens")
        .and_then(MetaArray::as_strings)
        .ok_or_else(|| ConvertError::MissingKey("tokenizer.ggml.tokens".into()))?;
    let scores = match gguf.get_array("tokenizer.ggml.scores") {
        Some(MetaArray::F32(s)) => s.to_vec(),
        _ => return Err(ConvertError::MissingKey("tokenizer.ggml.scores".into())),
    };
    let types: Vec<i32> = match gguf.get_array("tokenizer.ggml.token_type") {
        Some(MetaArray::I32(t)) => t.to_vec(),
        _ => return Err(ConvertError::MissingKey("tokenizer.ggml.token_type".into())),
    };
    if scores.len() < texts.len() || types.len() < texts.len() {
        return Err(ConvertError::UnsupportedMetadata {
            key: "tokenizer.ggml.scores".into(),
            reason: "fewer scores or token types than tokens".into(),
        });
    }
    let id = |k: &str| gguf.get(k).and_then(MetaValue::as_u32);
    let unk = id("tokenizer.ggml.unknown_token_id");
    let mut out = Vec::with_capacity(texts.len() * 16);
    let mut piece = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        piece.clear();
        pb_bytes(&mut piece, 1, text.as_bytes());
        pb_key(&mut piece, 2, PB_FIXED32);
        piece.extend_from_slice(&scores[i].to_le_bytes());
        let ty = if unk == Some(i as u32) {
            TT_UNKNOWN
        } else {
            types[i]
        };
        pb_int(&mut piece, 3, i64::from(ty));
        pb_bytes(&mut out, 1, &piece);
    }
    let opt_id = |k: &str| id(k).map_or(-1, i64::from);
    let mut trainer = Vec::new();
    pb_int(&mut trainer, 3, 2); // model_type: BPE
    pb_int(&mut trainer, 4, texts.len() as i64); // vocab_size
    pb_int(&mut trainer, 35, 1); // byte_fallback
    pb_int(&mut trainer, 40, opt_id("tokenizer.ggml.unknown_token_id"));
    pb_int(&mut trainer, 41, opt_id("tokenizer.ggml.bos_token_id"));
    pb_int(&mut trainer, 42, opt_id("tokenizer.ggml.eos_token_id"));
    pb_int(&mut trainer, 43, opt_id("tokenizer.ggml.padding_token_id"));
    // SentencePiece resolves its special ids through these names.
    for (field, key) in [
        (45, "tokenizer.ggml.unknown_token_id"),
        (46, "tokenizer.ggml.bos_token_id"),
        (47, "tokenizer.ggml.eos_token_id"),
        (48, "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(text) = id(key).and_then(|i| texts.get(i as usize)) {
            pb_bytes(&mut trainer, field, text.as_bytes());
        }
    }
    pb_bytes(&mut out, 2, &trainer);
    let mut norm = Vec::new();
    pb_bytes(&mut norm, 1, b"identity");
    let prefix = gguf
        .get_bool("tokenizer.ggml.add_space_prefix")
        .unwrap_or(true);
    pb_int(&mut norm, 3, i64::from(prefix)); // add_dummy_prefix
    pb_int(&mut norm, 4, 0); // remove_extra_whitespaces
    pb_int(&mut norm, 5, 1); // escape_whitespaces
    pb_bytes(&mut out, 3, &norm);
    Ok(out)
}

/// A SentencePiece piece: text, score, type.
type SpmPiece = (String, f32, i32);

/// The pieces of a tokenizer.model (`ModelProto.pieces`); other fields are skipped.
fn read_spm_model(bytes: &[u8]) -> Result<Vec<SpmPiece>, ConvertError> {
    let bad = |m: &str| ConvertError::BadTokenizerJson(format!("tokenizer.model: {m}"));
    fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*pos)?;
            *pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    /// (field, wire type, varint value or payload range).
    type Field = (u64, u8, u64, std::ops::Range<usize>);
    fn fields(b: &[u8]) -> Option<Vec<Field>> {
        let mut pos = 0;
        let mut out = Vec::new();
        while pos < b.len() {
            let key = varint(b, &mut pos)?;
            let (field, wire) = (key >> 3, (key & 7) as u8);
            match wire {
                PB_VARINT => {
                    let v = varint(b, &mut pos)?;
                    out.push((field, wire, v, pos..pos));
                }
                PB_FIXED64 | PB_FIXED32 => {
                    let n = if wire == PB_FIXED64 { 8 } else { 4 };
                    let end = pos.checked_add(n).filter(|&e| e <= b.len())?;
                    out.push((field, wire, 0, pos..end));
                    pos = end;
                }
                PB_LEN => {
                    let n = usize::try_from(varint(b, &mut pos)?).ok()?;
                    let end = pos.checked_add(n).filter(|&e| e <= b.len())?;
                    out.push((field, wire, 0, pos..end));
                    pos = end;
                }
                _ => return None,
            }
        }
        Some(out)
    }
    let mut pieces = Vec::new();
    for (field, wire, _, r) in fields(bytes).ok_or_else(|| bad("not a protobuf message"))? {
        if field != 1 || wire != PB_LEN {
            continue;
        }
        let p = &bytes[r];
        let (mut text, mut score, mut ty) = (None, 0f32, TT_NORMAL);
        for (f, w, v, r) in fields(p).ok_or_else(|| bad("a malformed piece"))? {
            match (f, w) {
                (1, PB_LEN) => {
                    text = Some(
                        String::from_utf8(p[r].to_vec())
                            .map_err(|_| bad("a piece that is not UTF-8"))?,
                    );
                }
                (2, PB_FIXED32) => {
                    let b: [u8; 4] = p[r].try_into().map_err(|_| bad("a bad score"))?;
                    score = f32::from_le_bytes(b);
                }
                (3, PB_VARINT) => ty = v as i32,
                _ => {}
            }
        }
        pieces.push((text.ok_or_else(|| bad("a piece without text"))?, score, ty));
    }
    if pieces.is_empty() {
        return Err(bad("no pieces"));
    }
    Ok(pieces)
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
    /// tokenizer.model (SentencePiece), if the checkpoint has one.
    pub spm_model: Option<&'a [u8]>,
}

/// Whether a tokenizer.json is the HF form of a SentencePiece BPE (transformers'
/// `LlamaConverter`/`GemmaConverter`): a BPE with byte fallback and no byte-level
/// pre-tokenizer.
fn is_spm_json(tj: &Value) -> bool {
    let model = &tj["model"];
    model["type"] == "BPE"
        && model["byte_fallback"] == true
        && !tj["pre_tokenizer"].to_string().contains("ByteLevel")
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
    if is_spm_json(&tj) {
        return import_spm(w, src, &tj);
    }
    let pre = recover_pre(
        tj.get("pre_tokenizer").unwrap_or(&Value::Null),
        src.pre_hint,
    )?;
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let Ids {
        by_id,
        added,
        vocab_size,
    } = ids(vocab, &tj, src.model_config)?;
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
    let merges: Vec<String> = merge_pairs(model)?
        .into_iter()
        .map(|(a, b)| format!("{a} {b}"))
        .collect();

    w.add("tokenizer.ggml.model", "gpt2");
    w.add("tokenizer.ggml.pre", pre);
    w.add_string_array("tokenizer.ggml.tokens", &tokens);
    w.add_array("tokenizer.ggml.token_type", MetaArray::I32(types));
    w.add_string_array("tokenizer.ggml.merges", &merges);
    write_special_keys(w, src, &tokens, vocab_size, None);
    Ok(())
}

/// The token ids of a tokenizer.json: text and added-or-not by id, the added tokens'
/// `special` flags, and the vocabulary size (config.json's, at least the ids present).
struct Ids {
    by_id: HashMap<u32, (String, bool)>,
    added: HashMap<u32, bool>,
    vocab_size: u64,
}

fn ids(
    vocab: &serde_json::Map<String, Value>,
    tj: &Value,
    model_config: &Value,
) -> Result<Ids, ConvertError> {
    let bad = |m: String| ConvertError::BadTokenizerJson(m);
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
    // Ids may leave holes (padded with placeholders), but not so many that the vocabulary is
    // sized by one large id rather than by the tokens the file holds.
    if n_tok > (by_id.len() as u64).saturating_add(1 << 20) {
        return Err(bad(format!(
            "token id {} leaves more than 2^20 ids without a token ({} tokens)",
            n_tok - 1,
            by_id.len()
        )));
    }
    let vocab_size = model_config
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
    Ok(Ids {
        by_id,
        added,
        vocab_size,
    })
}

/// The BPE merges of a tokenizer.json model, as pairs ("a b" strings or `[a, b]` arrays).
fn merge_pairs(model: &Value) -> Result<Vec<(String, String)>, ConvertError> {
    let bad = |m: &str| ConvertError::BadTokenizerJson(m.to_string());
    match model.get("merges").and_then(Value::as_array) {
        None => Ok(Vec::new()),
        Some(ms) => ms
            .iter()
            .map(|m| match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad("a merge string without a space")),
                Value::Array(pair) if pair.len() == 2 => match (pair[0].as_str(), pair[1].as_str())
                {
                    (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                    _ => Err(bad("a merge pair that is not two strings")),
                },
                _ => Err(bad("a merge that is neither a string nor a pair")),
            })
            .collect(),
    }
}

/// The special ids, `add_*` flags and chat template, from tokenizer_config.json (and
/// config.json's `*_token_id`). `spm` always writes `tokenizer.ggml.add_space_prefix`.
fn write_special_keys(
    w: &mut GgufWriter,
    src: &TokenizerSource<'_>,
    tokens: &[String],
    vocab_size: u64,
    spm: Option<bool>,
) {
    let text_to_id: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
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
    let model_type = src.model_config.get("model_type").and_then(Value::as_str);
    for (gkey, hkey) in ADD_FLAGS {
        let flag = tcfg.get(*hkey).and_then(Value::as_bool);
        let flag = match (*hkey, spm, model_type) {
            // llama.cpp's Phi-3 converter writes no add_space_prefix (the loader's default is
            // true for SentencePiece vocabularies): write it only where that default is wrong.
            ("add_prefix_space", Some(prepend), Some("phi3")) => (!prepend).then_some(false),
            ("add_prefix_space", Some(prepend), _) => flag.or(Some(prepend)),
            // For byte-level BPE only LlamaModel.set_vocab copies tokenizer_config's flag.
            ("add_prefix_space", None, t) if !matches!(t, Some("llama" | "mistral")) => None,
            _ => flag,
        };
        if let Some(b) = flag {
            w.add(*gkey, MetaValue::Bool(b));
        }
    }
    if let Some(t) = tcfg.get("chat_template").and_then(Value::as_str) {
        w.add("tokenizer.chat_template", t);
    }
}

/// llama.cpp's `_set_vocab_sentencepiece` for a SentencePiece BPE tokenizer.json: tokens,
/// scores and types from tokenizer.model when there is one (exact), with the added tokens
/// made CONTROL (special) or USER_DEFINED and scored -1000 as llama.cpp does for
/// `added_tokens_decoder`; without tokenizer.model, the scores are derived from the merge
/// ranks (the first merge making a token ranks it: encoding is the same, the values are not
/// the original ones) and `<0xXX>` tokens are BYTE.
fn import_spm(
    w: &mut GgufWriter,
    src: &TokenizerSource<'_>,
    tj: &Value,
) -> Result<(), ConvertError> {
    let bad = |m: String| ConvertError::BadTokenizerJson(m);
    let model = &tj["model"];
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let Ids {
        by_id,
        added,
        vocab_size,
    } = ids(vocab, tj, src.model_config)?;
    let n = vocab_size as usize;
    let mut tokens: Vec<String> = Vec::with_capacity(n);
    let mut scores: Vec<f32> = Vec::with_capacity(n);
    let mut types: Vec<i32> = Vec::with_capacity(n);
    if let Some(bytes) = src.spm_model {
        let pieces = read_spm_model(bytes)?;
        if pieces.len() > n {
            return Err(bad(format!(
                "tokenizer.model has {} pieces, more than vocab_size {n}",
                pieces.len()
            )));
        }
        for (id, (text, score, ty)) in pieces.into_iter().enumerate() {
            if let Some((t, _)) = by_id.get(&(id as u32))
                && *t != text
            {
                return Err(bad(format!(
                    "token {id} is {t:?} in tokenizer.json but {text:?} in tokenizer.model"
                )));
            }
            tokens.push(text);
            scores.push(score);
            types.push(ty);
        }
    } else {
        let mut first_merge: HashMap<String, usize> = HashMap::new();
        for (rank, (a, b)) in merge_pairs(model)?.into_iter().enumerate() {
            first_merge.entry(a + &b).or_insert(rank);
        }
        let unmerged = -(first_merge.len() as f32) - 1.0;
        for id in 0..n as u32 {
            let Some((text, _)) = by_id.get(&id) else {
                // A hole in the ids: an unused placeholder, as llama.cpp pads, and go on.
                tokens.push(format!("[PAD{id}]"));
                scores.push(-1000.0);
                types.push(TT_UNUSED);
                continue;
            };
            let is_byte = text.len() == 6
                && text.starts_with("<0x")
                && text.ends_with('>')
                && u8::from_str_radix(&text[3..5], 16).is_ok();
            let (score, ty) = if is_byte {
                (0.0, TT_BYTE)
            } else {
                let score = first_merge
                    .get(text)
                    .map_or(unmerged, |&r| -(r as f32) - 1.0);
                (score, TT_NORMAL)
            };
            tokens.push(text.clone());
            scores.push(score);
            types.push(ty);
        }
    }
    // Ids past the pieces: llama.cpp pads with `[PAD{id}]` UNUSED tokens.
    for id in tokens.len()..n {
        match by_id.get(&(id as u32)) {
            Some((text, _)) => tokens.push(text.clone()),
            None => tokens.push(format!("[PAD{id}]")),
        }
        scores.push(-1000.0);
        types.push(TT_UNUSED);
    }
    // llama.cpp overlays tokenizer_config.json's `added_tokens_decoder`; without one, the
    // tokenizer.json added tokens (the same list in transformers' files).
    let decoder = src
        .config
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(Value::as_object);
    let overlay: Vec<(u32, String, bool)> = match decoder {
        Some(d) => d
            .iter()
            .map(|(id, at)| {
                let id: u32 = id
                    .parse()
                    .map_err(|_| bad(format!("added_tokens_decoder key {id:?} is not an id")))?;
                let content = at
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("added_tokens_decoder {id} has no content")))?;
                let special = at.get("special").and_then(Value::as_bool).unwrap_or(false);
                Ok((id, content.to_string(), special))
            })
            .collect::<Result<_, ConvertError>>()?,
        None => added
            .iter()
            .filter_map(|(&id, &special)| by_id.get(&id).map(|(t, _)| (id, t.clone(), special)))
            .collect(),
    };
    for (id, text, special) in overlay {
        let i = id as usize;
        if i >= n {
            return Err(bad(format!(
                "added token {id} is outside vocab_size {vocab_size}"
            )));
        }
        tokens[i] = text;
        scores[i] = -1000.0;
        types[i] = if special { TT_CONTROL } else { TT_USER_DEFINED };
    }
    let prepend = tj["normalizer"].to_string().contains("\"Prepend\"");
    w.add("tokenizer.ggml.model", "llama");
    w.add("tokenizer.ggml.pre", "default");
    w.add_string_array("tokenizer.ggml.tokens", &tokens);
    w.add_array("tokenizer.ggml.scores", MetaArray::F32(scores));
    w.add_array("tokenizer.ggml.token_type", MetaArray::I32(types));
    write_special_keys(w, src, &tokens, vocab_size, Some(prepend));
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

    #[test]
    fn spm_model_proto_round_trips() {
        let mut w = GgufWriter::new();
        let tokens = [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<0x41>",
            "\u{2581}a",
            "é b",
        ];
        w.add_string_array("tokenizer.ggml.tokens", tokens);
        let scores = vec![
            -1000.0,
            -1000.0,
            -1000.0,
            -1000.0,
            0.0,
            -1.5,
            f32::MIN_POSITIVE,
        ];
        w.add_array("tokenizer.ggml.scores", MetaArray::F32(scores.clone()));
        let types = vec![3, 3, 3, 3, 6, 1, 4];
        w.add_array("tokenizer.ggml.token_type", MetaArray::I32(types.clone()));
        w.add("tokenizer.ggml.unknown_token_id", MetaValue::U32(3));
        w.add("tokenizer.ggml.bos_token_id", MetaValue::U32(2));
        let gguf = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
        let proto = spm_model_proto(&gguf).unwrap();
        let pieces = read_spm_model(&proto).unwrap();
        assert_eq!(pieces.len(), tokens.len());
        for (i, (text, score, ty)) in pieces.iter().enumerate() {
            assert_eq!(text, tokens[i]);
            assert_eq!(score.to_bits(), scores[i].to_bits());
            // SentencePiece needs its unknown piece typed UNKNOWN.
            assert_eq!(*ty, if i == 3 { TT_UNKNOWN } else { types[i] });
        }
        assert!(read_spm_model(&[0x0a, 0x05, 0x0a]).is_err());
        assert!(read_spm_model(&[]).is_err());
    }
}
