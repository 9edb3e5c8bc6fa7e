//! Regenerates the fuzz seed inputs (`fuzz/seeds/gguf_reader/seed_*.bin`, not `.gguf`, which
//! the repository's .gitignore excludes; `fuzz/seeds/safetensors_reader/seed_*.bin`):
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

/// Small valid safetensors files: written by `write_safetensors`'s layout (several dtypes,
/// metadata, a zero-sized tensor), laid out by hand as other writers do (no metadata, no
/// padding, pretty JSON), and one without tensors.
fn safetensors_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use ember_formats::{StDtype, StWriteTensor, safetensors_to_bytes};
    let f32s: Vec<u8> = [1.0f32, -2.0, 0.5, 3.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let tensors = [
        StWriteTensor::new(
            "model.norm.weight",
            StDtype::F32,
            vec![2, 2],
            f32s.as_slice(),
        ),
        StWriteTensor::new(
            "embed",
            StDtype::BF16,
            vec![3],
            vec![0x80u8, 0x3f, 0, 0x40, 0, 0],
        ),
        StWriteTensor::new("ids", StDtype::I64, vec![1], 7i64.to_le_bytes().to_vec()),
        StWriteTensor::new("empty", StDtype::U8, vec![0, 3], Vec::new()),
        StWriteTensor::new("fp4", StDtype::F4, vec![4], vec![0x21u8, 0x43]),
    ];
    let metadata = std::collections::BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let sample = safetensors_to_bytes(&tensors, &metadata).unwrap();
    let header = "{\n  \"b\": {\"dtype\": \"F16\", \"shape\": [2], \"data_offsets\": [4, 8]},\n  \"a\": {\"dtype\": \"U8\", \"shape\": [2, 2], \"data_offsets\": [0, 4]}\n}";
    let mut hand = (header.len() as u64).to_le_bytes().to_vec();
    hand.extend_from_slice(header.as_bytes());
    hand.extend_from_slice(&[1, 2, 3, 4, 0, 0x3c, 0, 0xbc]);
    let empty = safetensors_to_bytes(&[], &Default::default()).unwrap();
    vec![
        ("seed_sample.bin", sample),
        ("seed_hand.bin", hand),
        ("seed_empty.bin", empty),
    ]
}

#[test]
#[ignore = "writes files into fuzz/seeds; run explicitly to regenerate them"]
fn write_safetensors_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds/safetensors_reader");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in safetensors_seeds() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn safetensors_seeds_parse_and_match_the_committed_files() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds/safetensors_reader");
    for (name, bytes) in safetensors_seeds() {
        let f = ember_formats::SafetensorsFile::from_bytes(bytes.clone()).unwrap();
        assert_eq!(f.tensors().is_empty(), name == "seed_empty.bin");
        // The committed seeds are what the builders produce (regenerate them if this fails).
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), bytes, "{name}");
    }
}
