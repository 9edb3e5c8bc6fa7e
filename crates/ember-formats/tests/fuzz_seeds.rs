//! Regenerates the fuzz seed inputs (`fuzz/seeds/gguf_reader/seed_*.bin`; not `.gguf`, which
//! the repository's .gitignore excludes):
//! `cargo test --release -p ember-formats --test fuzz_seeds -- --ignored`

mod common;

use ember_formats::{GgmlType, GgufWriter};

#[test]
#[ignore = "writes files into fuzz/seeds; run explicitly to regenerate them"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/gguf_reader");
    std::fs::create_dir_all(&dir).unwrap();
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![("seed_sample_v3.bin", common::sample_bytes())];
    let mut v2 = common::sample_writer();
    v2.set_version(2).set_alignment(8);
    seeds.push(("seed_sample_v2_align8.bin", v2.to_bytes().unwrap()));
    seeds.push(("seed_empty.bin", GgufWriter::new().to_bytes().unwrap()));
    let mut tiny = GgufWriter::new();
    tiny.add("general.architecture", "llama")
        .add_string_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
        .add_array("tokenizer.ggml.scores", vec![0f32, -1.0, -2.0]);
    tiny.add_tensor("w", &[32, 1], GgmlType::Q8_0, vec![1u8; 34])
        .unwrap();
    seeds.push(("seed_tiny.bin", tiny.to_bytes().unwrap()));
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn seeds_parse() {
    // The seed builders themselves stay valid.
    let f = ember_formats::GgufFile::from_bytes(common::sample_bytes()).unwrap();
    assert_eq!(f.tensors().len(), 5);
}
