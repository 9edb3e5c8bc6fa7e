//! Fuzz the tokenizer built from GGUF metadata: hostile vocabularies, merges, token types and
//! special ids must build or fail with an error (never panic), and a built tokenizer must
//! encode and decode any text; the bounded and span-aware encoders must agree with `encode`.
//!
//! Input, split at NUL bytes: header (model, pre-tokenizer, flags), tokens (separated by
//! 0x01), merges (separated by 0x01), token types (one byte each), special ids (5 bytes each:
//! key, u32 LE), text to encode.
#![no_main]

use ember_formats::{GgufFile, GgufWriter};
use ember_text::tokenizer::{GgufTokenizer, TokenizerError};
use libfuzzer_sys::fuzz_target;

const PRES: [&str; 8] = [
    "smollm",
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "default",
    "tekken",
    "deepseek-v3",
    "nope",
];
const ID_KEYS: [&str; 8] = [
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.fim_pre_token_id",
    "tokenizer.ggml.mask_token_id",
];

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let header = parts.next().unwrap_or(&[]);
    let tokens = parts.next().unwrap_or(&[]);
    let merges = parts.next().unwrap_or(&[]);
    let types = parts.next().unwrap_or(&[]);
    let ids = parts.next().unwrap_or(&[]);
    let text_bytes = parts.next().unwrap_or(&[]);
    let h = |i: usize| header.get(i).copied().unwrap_or(0);

    let mut w = GgufWriter::new();
    let spm = h(0) & 1 == 1;
    w.add("tokenizer.ggml.model", if spm { "llama" } else { "gpt2" });
    w.add("tokenizer.ggml.pre", PRES[h(1) as usize % PRES.len()]);
    w.add("general.name", if h(2) & 1 == 1 { "phi-3" } else { "fuzz" });
    let flags = h(3);
    if flags & 1 != 0 {
        w.add("tokenizer.ggml.add_bos_token", flags & 2 != 0);
    }
    if flags & 4 != 0 {
        w.add("tokenizer.ggml.add_eos_token", flags & 8 != 0);
    }
    if flags & 16 != 0 {
        w.add("tokenizer.ggml.add_space_prefix", flags & 32 != 0);
    }
    let tokens: Vec<String> = tokens
        .split(|&b| b == 1)
        .take(2048)
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect();
    w.add_string_array("tokenizer.ggml.tokens", tokens.iter());
    if flags & 64 != 0 {
        let scores: Vec<f32> = (0..tokens.len())
            .map(|i| -(types.get(i).copied().unwrap_or(0) as f32) - i as f32 * 0.5)
            .collect();
        w.add_array("tokenizer.ggml.scores", scores);
    }
    if flags & 128 != 0 {
        let t: Vec<i32> = types.iter().map(|&b| i32::from(b % 8)).collect();
        w.add_array("tokenizer.ggml.token_type", t);
    }
    let merges: Vec<String> = merges
        .split(|&b| b == 1)
        .take(4096)
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    if !spm || h(4) & 1 == 1 {
        w.add_string_array("tokenizer.ggml.merges", merges.iter());
    }
    for chunk in ids.chunks_exact(5) {
        let key = ID_KEYS[chunk[0] as usize % ID_KEYS.len()];
        let v = u32::from_le_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]);
        // Small values mostly, so that both valid and invalid ids are reached.
        let v = if chunk[0] & 0x80 != 0 { v } else { v % 512 };
        w.add(key, v);
    }
    let Ok(bytes) = w.to_bytes() else {
        return;
    };
    let Ok(file) = GgufFile::from_bytes(bytes) else {
        return;
    };
    let Ok(tok) = GgufTokenizer::from_gguf(&file) else {
        return;
    };

    let text = String::from_utf8_lossy(text_bytes);
    let n = tok.vocab_size() as u32;
    for add in [false, true] {
        for parse in [false, true] {
            let Ok(all) = tok.encode(&text, add, parse) else {
                continue;
            };
            assert!(all.iter().all(|&id| id < n), "id out of vocabulary");
            let _ = tok.decode(&all, add);
            let _ = tok.decode_bytes(&all, !add);
            for max in [0, all.len().saturating_sub(1), all.len(), all.len() + 3] {
                match tok.encode_bounded(&text, add, parse, max) {
                    Ok(ids) => assert!(ids == all && all.len() <= max, "bounded differs"),
                    Err(TokenizerError::TooLong { at_least, .. }) => assert!(
                        all.len() > max && at_least > max && at_least <= all.len(),
                        "TooLong at_least {at_least} for max {max}, but encode gives {} ids",
                        all.len()
                    ),
                    Err(e) => panic!("bounded failed where encode worked: {e}"),
                }
            }
        }
    }
    // Spans from the header; with none, span-aware encoding is plain encoding.
    let len = text.len();
    let spans = [h(5) as usize % (len + 1)..h(6) as usize % (len + 1)];
    if let Ok(plain) = tok.encode(&text, true, true) {
        let none = tok
            .encode_with_text_spans(&text, true, &[])
            .expect("spans encode");
        assert_eq!(none, plain);
    }
    if let Ok(ids) = tok.encode_with_text_spans(&text, false, &spans) {
        assert!(ids.iter().all(|&id| id < n));
    }
    let _ = tok.find_control_text(&text);
    let mut dec = tok.stream_decoder(h(7) & 1 == 1);
    for id in (0..n.min(300)).chain([n, u32::MAX]) {
        let _ = tok.token_to_piece(id);
        let _ = dec.push(&tok, id);
        let _ = tok.is_eog(id);
    }
    let _ = dec.finish();
});
