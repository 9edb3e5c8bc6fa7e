//! Writer -> reader round trips, versions, alignment and API behaviour.

mod common;

use common::{Raw, sample_bytes, sample_writer, touch_everything};
use ember_formats::{
    GgmlType, GgufError, GgufFile, GgufWriteError, GgufWriter, MetaArray, MetaType, MetaValue,
};

#[test]
fn round_trip_all_metadata_types() {
    let w = sample_writer();
    let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.architecture(), Some("llama"));

    // Keys come back in insertion order.
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys[0], "general.architecture");
    assert_eq!(keys[1], "t.u8");
    assert_eq!(*keys.last().unwrap(), "a.nested");

    assert_eq!(f.get("t.u8"), Some(&MetaValue::U8(200)));
    assert_eq!(f.get("t.i8"), Some(&MetaValue::I8(-100)));
    assert_eq!(f.get("t.u16"), Some(&MetaValue::U16(60000)));
    assert_eq!(f.get("t.i16"), Some(&MetaValue::I16(-30000)));
    assert_eq!(f.get("t.u32"), Some(&MetaValue::U32(4_000_000_000)));
    assert_eq!(f.get("t.i32"), Some(&MetaValue::I32(-2_000_000_000)));
    assert_eq!(f.get("t.f32"), Some(&MetaValue::F32(1.5)));
    assert_eq!(f.get("t.bool"), Some(&MetaValue::Bool(true)));
    assert_eq!(f.get_str("t.string"), Some("héllo wörld"));
    assert_eq!(f.get_str("t.empty_string"), Some(""));
    assert_eq!(f.get("t.u64"), Some(&MetaValue::U64(u64::MAX)));
    assert_eq!(f.get("t.i64"), Some(&MetaValue::I64(i64::MIN)));
    assert_eq!(f.get("t.f64"), Some(&MetaValue::F64(-2.25)));

    assert_eq!(f.get_array("a.u8"), Some(&MetaArray::U8(vec![1, 2, 255])));
    assert_eq!(f.get_array("a.i8"), Some(&MetaArray::I8(vec![-1, 0, 127])));
    assert_eq!(f.get_array("a.u16"), Some(&MetaArray::U16(vec![1, 65535])));
    assert_eq!(f.get_array("a.i16"), Some(&MetaArray::I16(vec![-32768, 5])));
    assert_eq!(f.get_array("a.u32"), Some(&MetaArray::U32(vec![7, 8, 9])));
    assert_eq!(f.get_array("a.i32"), Some(&MetaArray::I32(vec![-7, 8, -9])));
    assert_eq!(
        f.get_array("a.f32"),
        Some(&MetaArray::F32(vec![0.5, -1.0, f32::INFINITY]))
    );
    assert_eq!(
        f.get_array("a.bool"),
        Some(&MetaArray::Bool(vec![true, false, true]))
    );
    assert_eq!(
        f.get_string_array("a.string"),
        Some(vec!["a", "", "ünïcode", "<|im_start|>"])
    );
    assert_eq!(
        f.get_array("a.u64"),
        Some(&MetaArray::U64(vec![u64::MAX, 0]))
    );
    assert_eq!(
        f.get_array("a.i64"),
        Some(&MetaArray::I64(vec![i64::MIN, i64::MAX]))
    );
    assert_eq!(
        f.get_array("a.f64"),
        Some(&MetaArray::F64(vec![1e300, -0.0]))
    );
    assert_eq!(f.get_array("a.empty"), Some(&MetaArray::U32(vec![])));
    let nested = f.get_array("a.nested").unwrap();
    assert_eq!(nested.element_type(), MetaType::Array);
    assert_eq!(nested.len(), 4);
    let MetaArray::Array(inner) = nested else {
        panic!("not nested")
    };
    assert_eq!(inner[0], MetaArray::U32(vec![1, 2]));
    assert_eq!(inner[1].as_strings().unwrap().to_vec(), vec!["x", "yz"]);
    assert_eq!(inner[2], MetaArray::Array(vec![MetaArray::F32(vec![3.0])]));
    assert_eq!(inner[3], MetaArray::Array(vec![]));

    // Every value equals what was written.
    let written = w.to_bytes().unwrap();
    let again = GgufFile::from_bytes(written).unwrap();
    assert_eq!(again.metadata(), f.metadata());
}

#[test]
fn typed_getters_convert_widths() {
    let f = GgufFile::from_bytes(sample_bytes()).unwrap();
    assert_eq!(f.get_u32("t.u8"), Some(200));
    assert_eq!(f.get_u64("t.u16"), Some(60000));
    assert_eq!(f.get_u32("t.u32"), Some(4_000_000_000));
    assert_eq!(f.get_u32("t.i8"), None, "negative does not fit u32");
    assert_eq!(f.get_u32("t.u64"), None, "u64::MAX does not fit u32");
    assert_eq!(f.get_u64("t.u64"), Some(u64::MAX));
    assert_eq!(f.get_i32("t.i16"), Some(-30000));
    assert_eq!(f.get_i64("t.i64"), Some(i64::MIN));
    assert_eq!(f.get_u32("t.string"), None);
    assert_eq!(f.get_f32("t.f32"), Some(1.5));
    assert_eq!(f.get_f32("t.f64"), Some(-2.25));
    assert_eq!(f.get_f32("t.u32"), None);
    assert_eq!(f.get_bool("t.bool"), Some(true));
    assert_eq!(f.get_bool("t.u8"), None);
    assert_eq!(f.get_str("missing"), None);
    assert_eq!(f.get_i32_array("a.u8"), Some(vec![1, 2, 255]));
    assert_eq!(f.get_i32_array("a.i16"), Some(vec![-32768, 5]));
    assert_eq!(f.get_i32_array("a.u64"), None, "u64::MAX does not fit i32");
    assert_eq!(f.get_i32_array("a.f32"), None);
    assert_eq!(f.get_u32_array("a.u32"), Some(vec![7, 8, 9]));
    assert_eq!(f.get_f32_array("a.f64"), Some(vec![1e300f64 as f32, -0.0]));
    assert_eq!(f.get_f32_array("a.i32"), Some(vec![-7.0, 8.0, -9.0]));
    assert_eq!(f.get_string_array("a.u32"), None);
    assert_eq!(f.get_string_array("t.string"), None);
}

#[test]
fn round_trip_tensors() {
    let f = GgufFile::from_bytes(sample_bytes()).unwrap();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "tok_embd.weight",
            "blk.0.attn_q.weight",
            "scalar",
            "empty",
            "odd.i8"
        ]
    );
    let t = f.tensor("tok_embd.weight").unwrap();
    assert_eq!(t.dims, vec![4, 3]);
    assert_eq!(t.ggml_type, GgmlType::F32);
    assert_eq!(t.n_elements(), 12);
    assert_eq!(t.n_rows(), 3);
    assert_eq!(t.n_bytes, 48);
    let vals: Vec<f32> = f
        .tensor_data(t)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals, (0..12).map(|i| i as f32).collect::<Vec<_>>());

    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        (q.ggml_type, q.n_elements(), q.n_bytes),
        (GgmlType::Q4_1, 128, 80)
    );
    assert_eq!(
        f.tensor_data(q),
        (0..80u32).map(|i| i as u8).collect::<Vec<_>>()
    );

    let s = f.tensor("scalar").unwrap();
    assert_eq!((s.dims.len(), s.n_elements(), s.n_bytes), (0, 1, 2));
    assert_eq!(f.tensor_data(s), [0x00, 0x3c]);
    let e = f.tensor("empty").unwrap();
    assert_eq!((e.n_elements(), e.n_bytes, e.n_rows()), (0, 0, 0));
    assert!(f.tensor_data(e).is_empty());
    assert_eq!(f.tensor_data(f.tensor("odd.i8").unwrap()), [1, 2, 3]);

    for t in f.tensors() {
        assert_eq!(t.offset % f.alignment(), 0, "{} misaligned", t.name);
        assert_eq!((f.data_offset() + t.offset) % f.alignment(), 0);
    }
    assert!(f.tensor("nope").is_none());
    assert_eq!(f.bytes().len() as u64 % f.alignment(), 0);
    touch_everything(&f);
}

#[test]
fn shared_views_outlive_the_file() {
    let f = GgufFile::from_bytes(sample_bytes()).unwrap();
    let t = f.tensor("odd.i8").unwrap().clone();
    let view = f.shared_tensor_data(&t);
    let whole = f.shared_bytes();
    let range = f.tensor_range(&t).unwrap();
    drop(f);
    assert_eq!(&*view, &[1, 2, 3]);
    assert_eq!(&whole[range], &[1, 2, 3]);
}

#[test]
fn foreign_tensor_info_gives_empty_slice() {
    let f = GgufFile::from_bytes(sample_bytes()).unwrap();
    let mut t = f.tensor("odd.i8").unwrap().clone();
    t.offset = u64::MAX - 1;
    assert!(f.tensor_data(&t).is_empty());
    assert!(f.tensor_range(&t).is_none());
    assert!(f.shared_tensor_data(&t).is_empty());
}

#[test]
fn custom_alignment_is_honoured() {
    for align in [1u32, 8, 64, 4096] {
        let mut w = sample_writer();
        w.set_alignment(align);
        let bytes = w.to_bytes().unwrap();
        let f = GgufFile::from_bytes(bytes).unwrap();
        assert_eq!(f.alignment(), align as u64);
        assert_eq!(f.get_u32("general.alignment"), Some(align));
        assert_eq!(f.data_offset() % align as u64, 0);
        for t in f.tensors() {
            assert_eq!(t.offset % align as u64, 0);
        }
        assert_eq!(
            f.tensor_data(f.tensor("odd.i8").unwrap()),
            [1, 2, 3],
            "alignment {align}"
        );
    }
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new();
    w.add_tensor("a", &[2], GgmlType::F32, vec![0; 8]).unwrap();
    assert!(matches!(
        w.add_tensor("a", &[2], GgmlType::F32, vec![0; 8]),
        Err(GgufWriteError::DuplicateTensor(_))
    ));
    assert!(matches!(
        w.add_tensor("b", &[2], GgmlType::F32, vec![0; 7]),
        Err(GgufWriteError::SizeMismatch {
            expected: 8,
            got: 7,
            ..
        })
    ));
    assert!(matches!(
        w.add_tensor("c", &[16], GgmlType::Q4_0, vec![0; 9]),
        Err(GgufWriteError::BadDims { .. })
    ));
    assert!(matches!(
        w.add_tensor("d", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]),
        Err(GgufWriteError::TooManyDims { .. })
    ));
    assert!(matches!(
        w.add_tensor("e", &[u64::MAX, 2], GgmlType::F32, vec![]),
        Err(GgufWriteError::BadDims { .. })
    ));
    let mut bad = w.clone();
    bad.set_alignment(48);
    assert!(matches!(
        bad.to_bytes(),
        Err(GgufWriteError::BadAlignment(_))
    ));
    let mut bad = w.clone();
    bad.add("general.alignment", "32");
    assert!(matches!(
        bad.to_bytes(),
        Err(GgufWriteError::BadAlignment(_))
    ));
    let mut bad = w.clone();
    bad.set_version(1);
    assert!(matches!(
        bad.to_bytes(),
        Err(GgufWriteError::UnsupportedVersion(1))
    ));
}

#[test]
fn writer_replaces_existing_keys_in_place() {
    let mut w = GgufWriter::new();
    w.add("a", 1u32).add("b", 2u32).add("a", "x");
    let f = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    assert_eq!(f.metadata().len(), 2);
    assert_eq!(f.metadata()[0].0, "a");
    assert_eq!(f.get_str("a"), Some("x"));
}

#[test]
fn empty_file_without_tensors_or_metadata() {
    let bytes = GgufWriter::new().to_bytes().unwrap();
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert!(f.metadata().is_empty() && f.tensors().is_empty());
    assert_eq!(f.architecture(), None);
    // A minimal file without trailing padding is fine too.
    let f = GgufFile::from_bytes(Raw::header(3, 0, 0).bytes()).unwrap();
    assert_eq!(f.data_offset(), 32);
}

#[test]
fn v2_files_are_read_like_v3() {
    let mut w = sample_writer();
    w.set_version(2);
    let v2 = w.to_bytes().unwrap();
    let v3 = sample_bytes();
    assert_eq!(&v2[4..8], &2u32.to_le_bytes());
    assert_eq!(
        v2[8..],
        v3[8..],
        "v2 and v3 encodings differ only in the version"
    );
    let f2 = GgufFile::from_bytes(v2).unwrap();
    let f3 = GgufFile::from_bytes(v3).unwrap();
    assert_eq!(f2.version(), 2);
    assert_eq!(f2.metadata(), f3.metadata());
    assert_eq!(f2.tensors(), f3.tensors());
}

#[test]
fn v1_and_future_versions_rejected_clearly() {
    let mut b = sample_bytes();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    let e = GgufFile::from_bytes(b.clone()).unwrap_err();
    assert!(matches!(
        e,
        GgufError::UnsupportedVersion { version: 1, .. }
    ));
    assert!(e.to_string().contains("v1"), "{e}");

    b[4..8].copy_from_slice(&4u32.to_le_bytes());
    let e = GgufFile::from_bytes(b.clone()).unwrap_err();
    assert!(matches!(
        e,
        GgufError::UnsupportedVersion { version: 4, .. }
    ));

    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    let e = GgufFile::from_bytes(b).unwrap_err();
    assert!(matches!(e, GgufError::BigEndian { version: 3, .. }), "{e}");
}

#[test]
fn open_from_disk_and_write_file() {
    let dir = std::env::temp_dir().join(format!("ember-formats-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    sample_writer().write_file(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.bytes(), sample_bytes().as_slice());
    assert_eq!(f.tensor_data(f.tensor("odd.i8").unwrap()), [1, 2, 3]);
    touch_everything(&f);

    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(GgufError::BadMagic { .. })
    ));
    let missing = dir.join("missing.gguf");
    let e = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }));
    assert!(e.to_string().contains("missing.gguf"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_name_the_field() {
    // A truncated string array element names the key.
    let mut r = Raw::header(3, 0, 1);
    r.str("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(3)
        .str("a")
        .str("b")
        .u64(100);
    let e = GgufFile::from_bytes(r.bytes()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, GgufError::Truncated { .. }), "{msg}");
    assert!(msg.contains("tokenizer.ggml.tokens"), "{msg}");
    assert!(msg.contains("element #2"), "{msg}");
}
