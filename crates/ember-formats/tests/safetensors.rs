//! Safetensors files and Hugging Face checkpoint directories: round trips, files laid out by
//! hand from the format rules, the reference implementation (the `safetensors` crate) as an
//! oracle, every hostile case with its typed error, and checkpoint directory layouts.
//!
//! A counting global allocator records the largest single allocation per thread, so the
//! hostile cases can assert that nothing is allocated beyond a small multiple of the input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ember_formats::safetensors::{IN_MEMORY, MAX_HEADER_SIZE, MAX_SHAPE_DIMS};
use ember_formats::{
    Checkpoint, CheckpointError, SafetensorsError, SafetensorsFile, StDtype, StWriteTensor,
    safetensors_to_bytes, write_safetensors,
};
use proptest::prelude::*;

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only records sizes in a const-initialised
// thread-local (no allocation, no panics).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A fresh, empty directory under the system temp dir (removed by `Drop`).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ember-formats-st-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// File names in the directory, sorted.
    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file laid out by hand from the format rules: 8-byte little-endian header length, the
/// header text as given (no padding added), then the data.
fn hand_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// One header entry.
fn entry(dtype: &str, shape: &[u64], begin: u64, end: u64) -> String {
    let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!(
        r#"{{"dtype":"{dtype}","shape":[{}],"data_offsets":[{begin},{end}]}}"#,
        shape.join(",")
    )
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A few tensors of different dtypes (names deliberately out of order).
fn sample_tensors() -> Vec<StWriteTensor<'static>> {
    let f32s = f32_bytes(&[1.0, -2.0, 3.5, 0.25, 8.0, -0.0]);
    let f16s: Vec<u8> = (0u16..8).flat_map(|x| (0x3c00 + x).to_le_bytes()).collect();
    let bf16s: Vec<u8> = (0u16..4).flat_map(|x| (0x3f80 + x).to_le_bytes()).collect();
    let i64s: Vec<u8> = [-1i64, 1 << 40]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    vec![
        StWriteTensor::new("model.norm.weight", StDtype::F16, vec![8], f16s),
        StWriteTensor::new("lm_head.weight", StDtype::F32, vec![2, 3], f32s),
        StWriteTensor::new("b.bf16", StDtype::BF16, vec![2, 2], bf16s),
        StWriteTensor::new("pos", StDtype::I64, vec![2], i64s),
        StWriteTensor::new("mask", StDtype::Bool, vec![3], vec![1u8, 0, 1]),
        StWriteTensor::new("bytes", StDtype::U8, vec![5], b"hello".to_vec()),
        StWriteTensor::new("scalar", StDtype::F32, vec![], f32_bytes(&[42.0])),
        StWriteTensor::new("empty", StDtype::F32, vec![0, 4], Vec::new()),
        StWriteTensor::new(
            "packed.fp4",
            StDtype::F4,
            vec![2, 3],
            vec![0x21u8, 0x43, 0x65],
        ),
        StWriteTensor::new(
            "ünï \"quoted\"",
            StDtype::I32,
            vec![1],
            7i32.to_le_bytes().to_vec(),
        ),
    ]
}

/// Parse, check the allocation bound (the largest single allocation while parsing is at most
/// a small multiple of the input), and return the error.
fn expect_err(bytes: Vec<u8>) -> SafetensorsError {
    let len = bytes.len();
    LARGEST.with(|l| l.set(0));
    let r = SafetensorsFile::from_bytes(bytes);
    let largest = LARGEST.with(|l| l.get());
    assert!(
        largest <= 16 * len + 4096,
        "allocated {largest} bytes for a {len}-byte input"
    );
    match r {
        Ok(f) => panic!("hostile input accepted: {f:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(IN_MEMORY),
                "error does not name the file: {msg}"
            );
            e
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips and layout

#[test]
fn round_trip_through_a_file() {
    let dir = TempDir::new("roundtrip");
    let path = dir.join("model.safetensors");
    let tensors = sample_tensors();
    let metadata = meta(&[("format", "pt"), ("note", "é \"x\"")]);
    write_safetensors(&path, &tensors, &metadata).unwrap();
    // Only the final file is left (the temporary one was renamed).
    assert_eq!(dir.listing(), ["model.safetensors"]);

    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.path(), Some(path.as_path()));
    assert_eq!(f.metadata(), &metadata);
    assert_eq!(f.tensors().len(), tensors.len());
    for t in &tensors {
        let info = f
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{} lost", t.name));
        assert_eq!(
            (&info.name, info.dtype, &info.shape),
            (&t.name, t.dtype, &t.shape)
        );
        assert_eq!(f.data(info), &t.data[..], "{}", t.name);
        assert_eq!(info.n_bytes, t.data.len());
        assert_eq!(
            info.n_elements(),
            t.shape.iter().product::<usize>(),
            "{}",
            t.name
        );
    }
    assert!(f.tensor("nope").is_none());

    // The same bytes as the in-memory writer, and the same parse.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(safetensors_to_bytes(&tensors, &metadata).unwrap(), bytes);
    let g = SafetensorsFile::from_bytes(bytes).unwrap();
    assert_eq!(g.tensors(), f.tensors());
    assert_eq!(g.path(), None);

    // Zero-copy: the slice points into the file's bytes.
    let info = f.tensor("lm_head.weight").unwrap();
    let whole = f.as_bytes().as_ptr_range();
    assert!(whole.contains(&f.data(info).as_ptr()));
    assert_eq!(f.data(info).as_ptr(), f.as_bytes()[info.offset..].as_ptr());
}

#[test]
fn writer_layout_follows_the_reference_rules() {
    let tensors = sample_tensors();
    let metadata = meta(&[("format", "pt")]);
    let bytes = safetensors_to_bytes(&tensors, &metadata).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header padded to a multiple of 8");
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let json = header.trim_end_matches(' ');
    assert!(n - json.len() < 8, "padding is spaces, fewer than 8");

    // Order: dtype descending in the reference enum order, then name.
    let mut expected: Vec<&StWriteTensor> = tensors.iter().collect();
    expected.sort_by(|a, b| b.dtype.cmp(&a.dtype).then(a.name.cmp(&b.name)));
    let order: Vec<&str> = expected.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        order,
        [
            "pos",
            "empty",
            "lm_head.weight",
            "scalar",
            "ünï \"quoted\"",
            "b.bf16",
            "model.norm.weight",
            "bytes",
            "packed.fp4",
            "mask"
        ]
    );
    let f = SafetensorsFile::from_bytes(bytes.clone()).unwrap();
    // File order is the same (zero-sized "empty" sits where its dtype puts it).
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, order);

    // The exact header text: compact JSON, "__metadata__" first, fields in reference order.
    let mut text = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut off = 0;
    for t in &expected {
        let end = off + t.data.len();
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        text += &format!(
            r#",{}:{{"dtype":"{}","shape":[{}],"data_offsets":[{off},{end}]}}"#,
            serde_json::to_string(&t.name).unwrap(),
            t.dtype.name(),
            shape.join(",")
        );
        off = end;
    }
    text.push('}');
    assert_eq!(json, text);
    // Data packed in that order right after the header.
    let data: Vec<u8> = expected
        .iter()
        .flat_map(|t| t.data.iter().copied())
        .collect();
    assert_eq!(&bytes[8 + n..], &data[..]);
}

#[test]
fn empty_metadata_and_no_tensors() {
    let bytes = safetensors_to_bytes(&[], &BTreeMap::new()).unwrap();
    assert_eq!(&bytes[..8], &24u64.to_le_bytes());
    assert_eq!(&bytes[8..], b"{\"__metadata__\":{}}     ");
    let f = SafetensorsFile::from_bytes(bytes).unwrap();
    assert!(f.tensors().is_empty() && f.metadata().is_empty());
    assert_eq!(f.data_offset(), 32);
}

#[test]
fn hand_laid_files_per_the_spec() {
    // The reference crate's own doc example: no metadata, no padding, one I32 tensor.
    let bytes = b"<\x00\x00\x00\x00\x00\x00\x00{\"test\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    let f = SafetensorsFile::from_bytes(bytes.to_vec()).unwrap();
    let t = f.tensor("test").unwrap();
    assert_eq!(
        (t.dtype, t.shape.as_slice(), t.offset),
        (StDtype::I32, &[2, 2][..], 68)
    );
    assert!(f.metadata().is_empty());
    assert_eq!(f.header_len(), 60);

    // Pretty-printed header, keys in any order, unknown fields ignored, escaped names, padding
    // spaces, metadata last, tensors listed out of offset order: as other writers may do.
    let header = format!(
        "{{\n  \"b\\u00e9\": {},\n  \"a\": {{\"shape\": [2], \"data_offsets\": [0, 8], \"dtype\": \"F32\", \"extra\": [1, {{}}]}},\n  \"__metadata__\": {{\"format\": \"pt\"}}\n}}      ",
        entry("BF16", &[3], 8, 14)
    );
    let mut data = f32_bytes(&[1.0, 2.0]);
    data.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
    let f = SafetensorsFile::from_bytes(hand_file(&header, &data)).unwrap();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "bé"], "sorted by offset");
    assert_eq!(f.data(f.tensor("a").unwrap()), &data[..8]);
    assert_eq!(f.data(f.tensor("bé").unwrap()), &data[8..]);
    assert_eq!(f.metadata(), &meta(&[("format", "pt")]));

    // `"__metadata__": null` is no metadata (the reference reads an Option).
    let header = format!(r#"{{"__metadata__":null,"x":{}}}"#, entry("U8", &[1], 0, 1));
    let f = SafetensorsFile::from_bytes(hand_file(&header, &[9])).unwrap();
    assert!(f.metadata().is_empty());

    // Zero-sized tensors anywhere on the tiling, and every dtype width.
    let header = format!(
        r#"{{"z0":{},"a":{},"z1":{},"b":{},"z2":{},"f4":{},"f6":{}}}"#,
        entry("F64", &[0], 0, 0),
        entry("C64", &[1], 0, 8),
        entry("U16", &[3, 0], 8, 8),
        entry("F8_E4M3", &[2], 8, 10),
        entry("F4", &[0], 10, 10),
        entry("F4", &[2, 3], 10, 13),
        entry("F6_E2M3", &[4], 13, 16),
    );
    let f = SafetensorsFile::from_bytes(hand_file(&header, &[0; 16])).unwrap();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["z0", "a", "z1", "b", "z2", "f4", "f6"]);
    assert_eq!(f.tensor("f6").unwrap().n_bytes, 3);
}

#[test]
fn dtype_table() {
    for d in StDtype::ALL {
        assert_eq!(StDtype::parse(d.name()), Some(d));
        assert_eq!(d.to_string(), d.name());
    }
    assert_eq!(StDtype::parse("f16"), None);
    assert_eq!(StDtype::parse("F8_E4M3FN"), None);
    assert_eq!(StDtype::F16.size_bits(), 16);
    assert_eq!(StDtype::F4.bytes_for(3), None);
    assert_eq!(StDtype::F4.bytes_for(4), Some(2));
    assert_eq!(StDtype::F6E3M2.bytes_for(4), Some(3));
    assert_eq!(StDtype::U64.bytes_for(usize::MAX), None);
    let mut sorted = StDtype::ALL;
    sorted.sort();
    assert_eq!(sorted, StDtype::ALL);
}

// ---------------------------------------------------------------------------------------------
// The reference implementation as an oracle

fn reference_dtype(d: StDtype) -> safetensors::Dtype {
    serde_json::from_value(serde_json::Value::from(d.name())).unwrap()
}

#[test]
fn dtypes_match_the_reference() {
    for d in StDtype::ALL {
        let r = reference_dtype(d);
        assert_eq!(r.bitsize(), d.size_bits(), "{d}");
    }
    // Same order (the writer's sort key).
    for a in StDtype::ALL {
        for b in StDtype::ALL {
            assert_eq!(
                a.cmp(&b),
                reference_dtype(a).cmp(&reference_dtype(b)),
                "{a} {b}"
            );
        }
    }
}

#[test]
fn writer_is_byte_identical_to_the_reference() {
    let tensors = sample_tensors();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|t| {
            let v = safetensors::tensor::TensorView::new(
                reference_dtype(t.dtype),
                t.shape.clone(),
                &t.data,
            )
            .unwrap();
            (t.name.clone(), v)
        })
        .collect();
    // One metadata key: the reference keeps metadata in a HashMap (random order).
    let reference = safetensors::serialize(
        views,
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )
    .unwrap();
    let ours = safetensors_to_bytes(&tensors, &meta(&[("format", "pt")])).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ours[..200.min(ours.len())]),
        String::from_utf8_lossy(&reference[..200.min(reference.len())])
    );
    assert_eq!(ours, reference);
}

#[test]
fn each_reader_accepts_what_the_other_writes() {
    let tensors = sample_tensors();
    // Reference writer without metadata -> our reader.
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|t| {
            let dtype = reference_dtype(t.dtype);
            let v = safetensors::tensor::TensorView::new(dtype, t.shape.clone(), &t.data);
            (t.name.as_str(), v.unwrap())
        })
        .collect();
    let reference = safetensors::serialize(views, None).unwrap();
    let f = SafetensorsFile::from_bytes(reference).unwrap();
    assert!(f.metadata().is_empty());
    for t in &tensors {
        let info = f.tensor(&t.name).unwrap();
        assert_eq!((info.dtype, &info.shape), (t.dtype, &t.shape));
        assert_eq!(f.data(info), &t.data[..]);
    }

    // Our writer with several metadata keys -> the reference reader.
    let metadata = meta(&[("format", "pt"), ("a", "1"), ("z", "")]);
    let ours = safetensors_to_bytes(&tensors, &metadata).unwrap();
    let st = safetensors::SafeTensors::deserialize(&ours).unwrap();
    assert_eq!(st.len(), tensors.len());
    for t in &tensors {
        let v = st.tensor(&t.name).unwrap();
        assert_eq!(v.dtype(), reference_dtype(t.dtype));
        assert_eq!(v.shape(), &t.shape[..]);
        assert_eq!(v.data(), &t.data[..]);
    }
    let (_, m) = safetensors::SafeTensors::read_metadata(&ours).unwrap();
    let m: BTreeMap<String, String> = m.metadata().clone().unwrap().into_iter().collect();
    assert_eq!(m, metadata);
}

// ---------------------------------------------------------------------------------------------
// Writing: the temporary file and writer errors

#[test]
fn write_replaces_atomically_and_cleans_up_on_failure() {
    let dir = TempDir::new("atomic");
    let path = dir.join("w.safetensors");
    let v1 = [StWriteTensor::new(
        "a",
        StDtype::U8,
        vec![3],
        b"one".as_slice(),
    )];
    write_safetensors(&path, &v1, &BTreeMap::new()).unwrap();
    let old = SafetensorsFile::open(&path).unwrap();

    // Rewriting a mapped file: the mapping keeps the old contents, a fresh open sees the new.
    let v2 = [StWriteTensor::new(
        "a",
        StDtype::U8,
        vec![5],
        b"three".as_slice(),
    )];
    write_safetensors(&path, &v2, &BTreeMap::new()).unwrap();
    assert_eq!(old.data(old.tensor("a").unwrap()), b"one");
    let new = SafetensorsFile::open(&path).unwrap();
    assert_eq!(new.data(new.tensor("a").unwrap()), b"three");
    assert_eq!(dir.listing(), ["w.safetensors"]);

    // The rename fails (a non-empty directory holds the final name): an error naming the
    // path, and no temporary file left behind.
    let blocked = dir.join("blocked.safetensors");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    let e = write_safetensors(&blocked, &v1, &BTreeMap::new()).unwrap_err();
    assert!(
        matches!(e, SafetensorsError::Io { ref file, .. } if file.contains("blocked")),
        "{e}"
    );
    assert_eq!(dir.listing(), ["blocked.safetensors", "w.safetensors"]);

    // The directory does not exist: nothing is created.
    let e = write_safetensors(&dir.join("no/such/dir.safetensors"), &v1, &BTreeMap::new());
    assert!(matches!(e, Err(SafetensorsError::Io { .. })));
    assert_eq!(dir.listing(), ["blocked.safetensors", "w.safetensors"]);

    // A relative path in the current directory has a parent of "": handled.
    assert!(write_safetensors(Path::new(""), &v1, &BTreeMap::new()).is_err());
}

#[test]
fn writer_rejects_bad_tensors_before_creating_anything() {
    let dir = TempDir::new("writer-errors");
    let path = dir.join("bad.safetensors");
    let none = BTreeMap::new();
    let ok = StWriteTensor::new("ok", StDtype::F32, vec![1], vec![0u8; 4]);

    type Check = fn(&SafetensorsError) -> bool;
    let cases: Vec<(Vec<StWriteTensor>, Check)> = vec![
        (
            vec![StWriteTensor::new("a", StDtype::F32, vec![2], vec![0u8; 7])],
            |e| matches!(e, SafetensorsError::WriteSizeMismatch { tensor, expected: 8, found: 7, .. } if tensor == "a"),
        ),
        (
            vec![ok.clone(), ok.clone()],
            |e| matches!(e, SafetensorsError::DuplicateTensor { tensor, .. } if tensor == "ok"),
        ),
        (
            vec![StWriteTensor::new(
                "__metadata__",
                StDtype::U8,
                vec![0],
                Vec::new(),
            )],
            |e| matches!(e, SafetensorsError::ReservedName { .. }),
        ),
        (
            vec![StWriteTensor::new("h", StDtype::F4, vec![3], vec![0u8; 2])],
            |e| matches!(e, SafetensorsError::NotByteSized { bits: 12, .. }),
        ),
        (
            vec![StWriteTensor::new(
                "o",
                StDtype::F64,
                vec![usize::MAX, 2],
                Vec::new(),
            )],
            |e| matches!(e, SafetensorsError::ShapeOverflow { .. }),
        ),
    ];
    for (tensors, check) in cases {
        let e = write_safetensors(&path, &tensors, &none).unwrap_err();
        assert!(check(&e), "{e}");
        assert!(e.to_string().contains("bad.safetensors"), "{e}");
        let e = safetensors_to_bytes(&tensors, &none).unwrap_err();
        assert!(check(&e), "{e}");
        assert!(dir.listing().is_empty());
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile input

#[test]
fn too_small() {
    for len in 0..8 {
        let e = expect_err(vec![0; len]);
        assert!(
            matches!(e, SafetensorsError::TooSmall { len: l, .. } if l == len),
            "{e}"
        );
    }
}

#[test]
fn header_length_too_large_or_beyond_the_file() {
    for n in [MAX_HEADER_SIZE + 1, 1 << 40, u64::MAX] {
        let mut b = n.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let e = expect_err(b);
        assert!(
            matches!(e, SafetensorsError::HeaderTooLarge { header_len, .. } if header_len == n),
            "{e}"
        );
    }
    for n in [3u64, 1000, MAX_HEADER_SIZE] {
        let mut b = n.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let e = expect_err(b);
        assert!(
            matches!(e, SafetensorsError::HeaderBeyondFile { header_len, available: 2, file_len: 10, .. } if header_len == n),
            "{e}"
        );
    }
}

#[test]
fn header_not_utf8_or_not_json() {
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    let e = expect_err(b);
    assert!(matches!(e, SafetensorsError::HeaderNotUtf8 { .. }), "{e}");

    for text in [
        "",
        "{",
        "{\"a\":",
        "{} x",
        "{}\0\0\0\0",
        "{\"a\":{\"dtype\":\"F32\",}}",
        "{'a':1}",
        "{\"a\":{\"dtype\":\"U8\"",
    ] {
        let e = expect_err(hand_file(text, &[]));
        assert!(
            matches!(e, SafetensorsError::InvalidJson { .. }),
            "{text:?}: {e}"
        );
    }
    for text in ["[]", "\"x\"", "null", "12", "true", &"[".repeat(1000)] {
        let e = expect_err(hand_file(text, &[]));
        assert!(
            matches!(e, SafetensorsError::HeaderNotObject { .. }),
            "{text:?}: {e}"
        );
    }
}

#[test]
fn entry_not_an_object() {
    for (value, kind) in [
        ("5", "a number"),
        ("\"F32\"", "a string"),
        ("[1,2]", "an array"),
        ("null", "null"),
        ("false", "a boolean"),
    ] {
        let e = expect_err(hand_file(&format!(r#"{{"w":{value}}}"#), &[]));
        assert!(
            matches!(e, SafetensorsError::EntryNotObject { ref tensor, found, .. } if tensor == "w" && found == kind),
            "{value}: {e}"
        );
    }
}

#[test]
fn malformed_entries() {
    let deep: Vec<u64> = vec![1; MAX_SHAPE_DIMS + 1];
    let cases: Vec<(String, &str)> = vec![
        (
            r#"{"shape":[1],"data_offsets":[0,1]}"#.into(),
            "missing \"dtype\"",
        ),
        (
            r#"{"dtype":"U8","data_offsets":[0,1]}"#.into(),
            "missing \"shape\"",
        ),
        (
            r#"{"dtype":"U8","shape":[1]}"#.into(),
            "missing \"data_offsets\"",
        ),
        (
            r#"{"dtype":8,"shape":[1],"data_offsets":[0,1]}"#.into(),
            "\"dtype\" is a number",
        ),
        (
            r#"{"dtype":"U8","shape":"1","data_offsets":[0,1]}"#.into(),
            "\"shape\" is a string",
        ),
        (
            r#"{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}"#.into(),
            "element 0 is a negative number",
        ),
        (
            r#"{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}"#.into(),
            "element 0 is a fractional",
        ),
        (
            r#"{"dtype":"U8","shape":[1e30],"data_offsets":[0,1]}"#.into(),
            "element 0 is a fractional",
        ),
        (
            r#"{"dtype":"U8","shape":[1,[2]],"data_offsets":[0,1]}"#.into(),
            "element 1 is an array",
        ),
        (
            r#"{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}"#.into(),
            "has 3 elements",
        ),
        (
            r#"{"dtype":"U8","shape":[1],"data_offsets":[1]}"#.into(),
            "has 1 elements",
        ),
        (
            r#"{"dtype":"U8","shape":[1],"data_offsets":{"a":0}}"#.into(),
            "\"data_offsets\" is an object",
        ),
        (
            r#"{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}"#.into(),
            "field \"dtype\" appears twice",
        ),
        (entry("U8", &deep, 0, 1), "more than 64 elements"),
    ];
    for (value, reason) in cases {
        let e = expect_err(hand_file(&format!(r#"{{"w":{value}}}"#), &[0]));
        assert!(
            matches!(e, SafetensorsError::BadEntry { ref tensor, reason: ref r, .. } if tensor == "w" && r.contains(reason)),
            "{value}: {e}"
        );
    }
}

#[test]
fn bad_metadata() {
    for (value, reason) in [
        (r#"{"a":1}"#, "value of \"a\" is a number"),
        (r#"{"a":{"b":"c"}}"#, "value of \"a\" is an object"),
        (r#"{"a":"x","a":"y"}"#, "key \"a\" appears twice"),
        ("[]", "is an array"),
        ("\"pt\"", "is a string"),
    ] {
        let e = expect_err(hand_file(&format!(r#"{{"__metadata__":{value}}}"#), &[]));
        assert!(
            matches!(e, SafetensorsError::BadMetadata { reason: ref r, .. } if r.contains(reason)),
            "{value}: {e}"
        );
    }
    let e = expect_err(hand_file(r#"{"__metadata__":{},"__metadata__":{}}"#, &[]));
    assert!(matches!(e, SafetensorsError::BadMetadata { .. }), "{e}");
}

#[test]
fn unknown_dtype() {
    for d in ["F128", "f32", "", "FLOAT", "F8_E4M3FN"] {
        let e = expect_err(hand_file(
            &format!(r#"{{"w":{}}}"#, entry(d, &[1], 0, 1)),
            &[0],
        ));
        assert!(
            matches!(e, SafetensorsError::UnknownDtype { ref tensor, ref dtype, .. } if tensor == "w" && dtype == d),
            "{d}: {e}"
        );
    }
}

#[test]
fn shape_overflow_and_byte_count_mismatch() {
    let overflowing: [&[u64]; 4] = [
        &[1 << 32, 1 << 32, 2],
        &[u64::MAX, 2],
        &[1 << 62],
        &[0, u64::MAX, u64::MAX],
    ];
    for shape in overflowing {
        let e = expect_err(hand_file(
            &format!(r#"{{"w":{}}}"#, entry("F32", shape, 0, 4)),
            &[0; 4],
        ));
        // A leading zero keeps the running product at 0 (no overflow, as the reference
        // computes it): [0, MAX, MAX] is 0 elements, which disagrees with 4 bytes.
        if shape[0] == 0 {
            assert!(
                matches!(
                    e,
                    SafetensorsError::SizeMismatch {
                        expected: 0,
                        found: 4,
                        ..
                    }
                ),
                "{e}"
            );
        } else {
            assert!(
                matches!(e, SafetensorsError::ShapeOverflow { shape: ref s, .. } if s.as_slice() == shape),
                "{shape:?}: {e}"
            );
        }
    }
    let e = expect_err(hand_file(
        &format!(r#"{{"w":{}}}"#, entry("F4", &[3], 0, 2)),
        &[0; 2],
    ));
    assert!(
        matches!(
            e,
            SafetensorsError::NotByteSized {
                n_elements: 3,
                bits: 12,
                ..
            }
        ),
        "{e}"
    );

    for (dtype, shape, end) in [
        ("F32", &[2u64][..], 4u64),
        ("F32", &[2], 12),
        ("F16", &[3, 3], 16),
        ("BF16", &[], 4),
        ("U8", &[0], 1),
    ] {
        let e = expect_err(hand_file(
            &format!(r#"{{"w":{}}}"#, entry(dtype, shape, 0, end)),
            &vec![0; end as usize],
        ));
        assert!(
            matches!(e, SafetensorsError::SizeMismatch { ref tensor, found, begin: 0, .. } if tensor == "w" && found == end),
            "{dtype} {shape:?}: {e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(dtype) && msg.contains(&format!("span {end}")),
            "{msg}"
        );
    }
}

#[test]
fn offsets_reversed_out_of_range_overlapping_or_not_tiling() {
    let e = expect_err(hand_file(
        &format!(r#"{{"w":{}}}"#, entry("U8", &[0], 8, 0)),
        &[0; 8],
    ));
    assert!(
        matches!(
            e,
            SafetensorsError::OffsetsReversed {
                begin: 8,
                end: 0,
                ..
            }
        ),
        "{e}"
    );

    for (begin, end) in [(0u64, 1u64 << 40), (4, 12), (u64::MAX - 1, u64::MAX)] {
        let h = format!(r#"{{"w":{}}}"#, entry("U8", &[end - begin], begin, end));
        let e = expect_err(hand_file(&h, &[0; 8]));
        assert!(
            matches!(e, SafetensorsError::OffsetOutOfRange { begin: b, end: en, data_len: 8, .. } if b == begin && en == end),
            "{e}"
        );
    }

    let h = format!(
        r#"{{"a":{},"b":{}}}"#,
        entry("U8", &[8], 0, 8),
        entry("U8", &[8], 4, 12)
    );
    let e = expect_err(hand_file(&h, &[0; 12]));
    assert!(
        matches!(e, SafetensorsError::OverlappingTensors { ref tensor, ref other, begin: 4, other_end: 8, .. } if tensor == "b" && other == "a"),
        "{e}"
    );
    // The same tensor range twice under two names.
    let h = format!(
        r#"{{"a":{},"b":{}}}"#,
        entry("U8", &[8], 0, 8),
        entry("U8", &[8], 0, 8)
    );
    let e = expect_err(hand_file(&h, &[0; 8]));
    assert!(
        matches!(e, SafetensorsError::OverlappingTensors { .. }),
        "{e}"
    );
    // A zero-sized tensor inside another one.
    let h = format!(
        r#"{{"a":{},"z":{}}}"#,
        entry("U8", &[8], 0, 8),
        entry("U8", &[0], 3, 3)
    );
    let e = expect_err(hand_file(&h, &[0; 8]));
    assert!(
        matches!(e, SafetensorsError::OverlappingTensors { .. }),
        "{e}"
    );

    let h = format!(
        r#"{{"a":{},"b":{}}}"#,
        entry("U8", &[4], 0, 4),
        entry("U8", &[4], 8, 12)
    );
    let e = expect_err(hand_file(&h, &[0; 12]));
    assert!(
        matches!(e, SafetensorsError::DataGap { ref tensor, begin: 8, previous_end: 4, .. } if tensor == "b"),
        "{e}"
    );
    let h = format!(r#"{{"a":{}}}"#, entry("U8", &[4], 4, 8));
    let e = expect_err(hand_file(&h, &[0; 8]));
    assert!(
        matches!(
            e,
            SafetensorsError::DataGap {
                previous_end: 0,
                ..
            }
        ),
        "{e}"
    );

    let h = format!(r#"{{"a":{}}}"#, entry("U8", &[4], 0, 4));
    let e = expect_err(hand_file(&h, &[0; 8]));
    assert!(
        matches!(
            e,
            SafetensorsError::TrailingData {
                covered: 4,
                data_len: 8,
                ..
            }
        ),
        "{e}"
    );
    let e = expect_err(hand_file("{}", &[0]));
    assert!(
        matches!(
            e,
            SafetensorsError::TrailingData {
                covered: 0,
                data_len: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn duplicate_names() {
    let h = format!(
        r#"{{"a":{},"a":{}}}"#,
        entry("U8", &[4], 0, 4),
        entry("U8", &[4], 4, 8)
    );
    let e = expect_err(hand_file(&h, &[0; 8]));
    assert!(
        matches!(e, SafetensorsError::DuplicateTensor { ref tensor, .. } if tensor == "a"),
        "{e}"
    );
    // Even when the second entry is identical (the reference crate would collapse them).
    let h = format!(r#"{{"a":{0},"a":{0}}}"#, entry("U8", &[0], 0, 0));
    let e = expect_err(hand_file(&h, &[]));
    assert!(matches!(e, SafetensorsError::DuplicateTensor { .. }), "{e}");
}

#[test]
fn large_hostile_headers_cost_a_small_multiple_of_their_size() {
    // Many tiny entries, each refused lazily only at the end (tiling), or a long array.
    let mut h = String::from("{");
    for i in 0..20_000 {
        if i > 0 {
            h.push(',');
        }
        h += &format!(r#""t{i}":{}"#, entry("U8", &[0], 0, 0));
    }
    h.push('}');
    // Valid as it stands (all zero-sized at 0); trailing data makes it hostile.
    let e = expect_err(hand_file(&h, &[0]));
    assert!(matches!(e, SafetensorsError::TrailingData { .. }), "{e}");

    let long = format!(
        r#"{{"w":{{"dtype":"U8","shape":[{}],"data_offsets":[0,1]}}}}"#,
        vec!["1"; 1_000_000].join(",")
    );
    let e = expect_err(hand_file(&long, &[0]));
    assert!(matches!(e, SafetensorsError::BadEntry { .. }), "{e}");

    // Deep nesting: in an unknown field it is skipped without recursion (serde_json ignores
    // values iteratively), in a known one the element is refused at its first level.
    let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
    let nested =
        format!(r#"{{"w":{{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":{open}1{close}}}}}"#);
    let f = SafetensorsFile::from_bytes(hand_file(&nested, &[0])).unwrap();
    assert_eq!(f.tensors().len(), 1);
    let nested = format!(r#"{{"w":{{"dtype":"U8","shape":{open}1{close},"data_offsets":[0,1]}}}}"#);
    let e = expect_err(hand_file(&nested, &[0]));
    assert!(
        matches!(e, SafetensorsError::BadEntry { ref reason, .. } if reason.contains("element 0 is an array")),
        "{e}"
    );
    let nested = format!(r#"{{"__metadata__":{{"k":{open}{close}}},"w":{{}}}}"#);
    let e = expect_err(hand_file(&nested, &[0]));
    assert!(matches!(e, SafetensorsError::BadMetadata { .. }), "{e}");
}

#[test]
fn data_of_a_foreign_info_is_empty() {
    let f = SafetensorsFile::from_bytes(
        safetensors_to_bytes(&sample_tensors(), &BTreeMap::new()).unwrap(),
    )
    .unwrap();
    let mut info = f.tensors()[0].clone();
    info.offset = usize::MAX - 1;
    assert!(f.data(&info).is_empty());
    info.offset = f.as_bytes().len();
    info.n_bytes = 1;
    assert!(f.data(&info).is_empty());
}

#[test]
fn open_errors_name_the_file() {
    let dir = TempDir::new("open");
    let e = SafetensorsFile::open(&dir.join("missing.safetensors")).unwrap_err();
    assert!(
        matches!(e, SafetensorsError::Io { .. }) && e.to_string().contains("missing.safetensors"),
        "{e}"
    );
    let empty = dir.join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    let e = SafetensorsFile::open(&empty).unwrap_err();
    assert!(
        matches!(e, SafetensorsError::TooSmall { len: 0, .. })
            && e.to_string().contains("empty.safetensors"),
        "{e}"
    );
}

/// A valid file with a few tensors and metadata, for mutation.
fn valid_file() -> Vec<u8> {
    let t = vec![
        StWriteTensor::new(
            "a",
            StDtype::F32,
            vec![2, 2],
            f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
        ),
        StWriteTensor::new("b", StDtype::F16, vec![3], vec![1u8, 2, 3, 4, 5, 6]),
        StWriteTensor::new("c", StDtype::U8, vec![0], Vec::new()),
    ];
    safetensors_to_bytes(&t, &meta(&[("format", "pt")])).unwrap()
}

/// Touch everything a parsed file offers.
fn touch(f: &SafetensorsFile) {
    let mut sum = 0usize;
    for t in f.tensors() {
        let d = f.data(t);
        assert_eq!(d.len(), t.n_bytes);
        assert_eq!(t.dtype.bytes_for(t.n_elements()), Some(t.n_bytes));
        assert_eq!(f.tensor(&t.name), Some(t));
        sum += d.iter().map(|&b| b as usize).sum::<usize>();
    }
    std::hint::black_box((sum, f.metadata().len(), format!("{f:?}")));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn truncations_never_panic(cut in 0usize..400) {
        let b = valid_file();
        let cut = cut.min(b.len());
        match SafetensorsFile::from_bytes(b[..cut].to_vec()) {
            Ok(f) => { prop_assert_eq!(cut, b.len()); touch(&f) }
            Err(e) => { prop_assert!(cut < b.len()); prop_assert!(!e.to_string().is_empty()) }
        }
    }

    #[test]
    fn byte_flips_never_panic(flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let mut b = valid_file();
        let len = b.len();
        for (i, x) in flips {
            b[i % len] ^= x;
        }
        // Our verdict agrees with the reference reader's, except where ours is stricter
        // (duplicate names, which the reference collapses).
        let reference_ok = safetensors::SafeTensors::deserialize(&b).is_ok();
        match SafetensorsFile::from_bytes(b.clone()) {
            Ok(f) => { touch(&f); prop_assert!(reference_ok, "we accept what the reference refuses") }
            Err(SafetensorsError::DuplicateTensor { .. }) => {}
            Err(e) => prop_assert!(!reference_ok, "reference accepts what we refuse: {}", e),
        }
    }

    #[test]
    fn random_tensors_round_trip(
        specs in proptest::collection::vec((0usize..StDtype::ALL.len(), proptest::collection::vec(0usize..5, 0..4), "[a-z.]{1,12}"), 0..8),
        kv in proptest::collection::btree_map("[a-z_]{1,8}", ".{0,12}", 0..4),
    ) {
        let mut seen = std::collections::HashSet::new();
        let mut tensors = Vec::new();
        for (d, mut shape, name) in specs {
            if !seen.insert(name.clone()) { continue }
            let dtype = StDtype::ALL[d];
            let n: usize = shape.iter().product();
            if dtype.bytes_for(n).is_none() { shape.push(4) }
            let n: usize = shape.iter().product();
            let bytes = dtype.bytes_for(n).unwrap();
            let data: Vec<u8> = (0..bytes).map(|i| (i * 31 + name.len()) as u8).collect();
            tensors.push(StWriteTensor { name, dtype, shape, data: Cow::Owned(data) });
        }
        let bytes = safetensors_to_bytes(&tensors, &kv).unwrap();
        let f = SafetensorsFile::from_bytes(bytes.clone()).unwrap();
        prop_assert_eq!(f.metadata(), &kv);
        prop_assert_eq!(f.tensors().len(), tensors.len());
        for t in &tensors {
            let info = f.tensor(&t.name).unwrap();
            prop_assert_eq!((info.dtype, &info.shape), (t.dtype, &t.shape));
            prop_assert_eq!(f.data(info), &t.data[..]);
        }
        // The reference reads it too.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        prop_assert_eq!(st.len(), tensors.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint directories

const CONFIG: &str =
    r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":8}"#;

fn shard_a() -> Vec<StWriteTensor<'static>> {
    vec![
        StWriteTensor::new(
            "model.embed_tokens.weight",
            StDtype::F16,
            vec![4, 2],
            vec![1u8; 16],
        ),
        StWriteTensor::new(
            "model.layers.0.mlp.up_proj.weight",
            StDtype::BF16,
            vec![2, 2],
            vec![2u8; 8],
        ),
    ]
}

fn shard_b() -> Vec<StWriteTensor<'static>> {
    vec![
        StWriteTensor::new(
            "model.norm.weight",
            StDtype::F32,
            vec![2],
            f32_bytes(&[1.0, 1.0]),
        ),
        StWriteTensor::new("lm_head.weight", StDtype::F16, vec![4, 2], vec![3u8; 16]),
    ]
}

fn write_index(dir: &TempDir, map: &[(&str, &str)]) {
    let weight_map: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(t, s)| (t.to_string(), serde_json::Value::from(*s)))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 56}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

const S1: &str = "model-00001-of-00002.safetensors";
const S2: &str = "model-00002-of-00002.safetensors";

/// A sharded checkpoint: config, tokenizer files, index and two shards.
fn sharded_dir() -> TempDir {
    let dir = TempDir::new("sharded");
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template":"{{x}}"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"temperature":0.6}"#).unwrap();
    let pt = meta(&[("format", "pt")]);
    write_safetensors(&dir.join(S1), &shard_a(), &pt).unwrap();
    write_safetensors(&dir.join(S2), &shard_b(), &pt).unwrap();
    let mut map = Vec::new();
    for t in shard_a() {
        map.push((t.name, S1));
    }
    for t in shard_b() {
        map.push((t.name, S2));
    }
    let map: Vec<(&str, &str)> = map.iter().map(|(t, s)| (t.as_str(), *s)).collect();
    write_index(&dir, &map);
    dir
}

#[test]
fn sharded_checkpoint() {
    let dir = sharded_dir();
    assert!(Checkpoint::is_checkpoint_dir(dir.path()));
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.dir(), dir.path());
    assert_eq!(ck.config()["model_type"], "llama");
    assert_eq!(ck.tokenizer_json(), Some(dir.join("tokenizer.json")));
    assert_eq!(ck.tokenizer_config().unwrap()["chat_template"], "{{x}}");
    assert_eq!(ck.generation_config().unwrap()["temperature"], 0.6);
    assert_eq!(
        ck.index_path(),
        Some(dir.join("model.safetensors.index.json").as_path())
    );
    assert_eq!(ck.shards().len(), 2);
    assert_eq!(ck.shards()[0].path(), Some(dir.join(S1).as_path()));
    assert_eq!(ck.n_tensors(), 4);

    let names: Vec<&str> = ck.tensor_names().collect();
    assert_eq!(
        names,
        [
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.norm.weight"
        ]
    );
    for (shard, tensors) in [(0, shard_a()), (1, shard_b())] {
        for t in tensors {
            let (info, data) = ck.tensor(&t.name).unwrap();
            assert_eq!((info.dtype, &info.shape), (t.dtype, &t.shape));
            assert_eq!(data, &t.data[..]);
            let (s, _) = ck.tensor_location(&t.name).unwrap();
            assert_eq!(s, shard, "{} in the wrong shard", t.name);
        }
    }
    assert!(ck.tensor("nope").is_none());
}

#[test]
fn single_file_and_glob_fallbacks() {
    // model.safetensors alone (and a stray other file, which is ignored).
    let dir = TempDir::new("single");
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &shard_a(), &BTreeMap::new()).unwrap();
    write_safetensors(&dir.join("other.safetensors"), &shard_a(), &BTreeMap::new()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.shards().len(), 1);
    assert_eq!(ck.n_tensors(), 2);
    assert!(ck.tokenizer_json().is_none() && ck.tokenizer_config().is_none());
    assert!(ck.generation_config().is_none() && ck.index_path().is_none());

    // No index, no model.safetensors: every *.safetensors file (sorted; hidden ones skipped).
    let dir = TempDir::new("glob");
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    write_safetensors(
        &dir.join("output.safetensors"),
        &shard_b(),
        &BTreeMap::new(),
    )
    .unwrap();
    write_safetensors(&dir.join("a.safetensors"), &shard_a(), &BTreeMap::new()).unwrap();
    std::fs::write(dir.join(".hidden.safetensors"), b"junk").unwrap();
    std::fs::write(dir.join("notes.txt"), b"junk").unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.shards().len(), 2);
    assert_eq!(
        ck.shards()[0].path(),
        Some(dir.join("a.safetensors").as_path())
    );
    assert_eq!(ck.n_tensors(), 4);
    assert_eq!(ck.tensor_location("lm_head.weight").unwrap().0, 1);
    assert_eq!(
        ck.tensor("model.norm.weight").unwrap().1,
        &f32_bytes(&[1.0, 1.0])[..]
    );
}

#[test]
fn missing_shard_and_other_index_errors() {
    let dir = sharded_dir();
    std::fs::remove_file(dir.join(S2)).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::MissingShard { ref shard, ref tensor, .. } if shard == S2 && tensor == "lm_head.weight"),
        "{e}"
    );
    assert!(e.to_string().contains(S2), "{e}");

    // The index places a tensor in a shard that lacks it.
    let dir = sharded_dir();
    write_index(&dir, &[("model.norm.weight", S1), ("lm_head.weight", S2)]);
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::TensorNotInShard { ref tensor, ref shard, .. } if tensor == "model.norm.weight" && shard.ends_with(S1)),
        "{e}"
    );

    // A tensor in two shards.
    let dir = sharded_dir();
    let mut both = shard_b();
    both.push(StWriteTensor::new(
        "model.embed_tokens.weight",
        StDtype::U8,
        vec![1],
        vec![0u8],
    ));
    write_safetensors(&dir.join(S2), &both, &BTreeMap::new()).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::DuplicateTensor { ref tensor, ref first, ref second } if tensor == "model.embed_tokens.weight" && first.ends_with(S1) && second.ends_with(S2)),
        "{e}"
    );

    // Malformed indexes.
    for (text, reason) in [
        (r#"{"metadata":{}}"#, "no \"weight_map\""),
        (r#"{"weight_map":[]}"#, "is an array"),
        (r#"{"weight_map":{}}"#, "is empty"),
        (r#"{"weight_map":{"a":1}}"#, "is a number"),
        (
            r#"{"weight_map":{"a":"../model.safetensors"}}"#,
            "not a plain file name",
        ),
        (
            r#"{"weight_map":{"a":"/etc/passwd"}}"#,
            "not a plain file name",
        ),
        (r#"{"weight_map":{"a":".."}}"#, "not a plain file name"),
        (r#"{"weight_map":{"a":""}}"#, "not a plain file name"),
    ] {
        let dir = sharded_dir();
        std::fs::write(dir.join("model.safetensors.index.json"), text).unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert!(
            matches!(e, CheckpointError::BadIndex { reason: ref r, .. } if r.contains(reason)),
            "{text}: {e}"
        );
    }
    let dir = sharded_dir();
    std::fs::write(dir.join("model.safetensors.index.json"), "{").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::BadJson { ref path, .. } if path.ends_with("model.safetensors.index.json")),
        "{e}"
    );
}

#[test]
fn config_and_weights_errors() {
    let dir = sharded_dir();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(!Checkpoint::is_checkpoint_dir(dir.path()));
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, CheckpointError::MissingConfig { .. }), "{e}");

    std::fs::write(dir.join("config.json"), r#"{"a": }"#).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::BadJson { ref path, .. } if path.ends_with("config.json")),
        "{e}"
    );
    assert!(
        e.to_string().contains("config.json") && e.to_string().contains("line 1"),
        "{e}"
    );

    std::fs::write(dir.join("config.json"), "[1]").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            CheckpointError::NotAnObject {
                found: "an array",
                ..
            }
        ),
        "{e}"
    );

    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), "{").unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::BadJson { ref path, .. } if path.ends_with("tokenizer_config.json")),
        "{e}"
    );

    // A corrupted shard: the safetensors error, naming the shard.
    let dir = sharded_dir();
    let mut bytes = std::fs::read(dir.join(S1)).unwrap();
    bytes.truncate(bytes.len() - 1);
    std::fs::write(dir.join(S1), bytes).unwrap();
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Shard(SafetensorsError::TrailingData { ref file, .. } | SafetensorsError::OffsetOutOfRange { ref file, .. }) if file.ends_with(S1)),
        "{e}"
    );

    // No weights at all.
    let dir = TempDir::new("noweights");
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    assert!(!Checkpoint::is_checkpoint_dir(dir.path()));
    let e = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(e, CheckpointError::NoWeights { .. }), "{e}");

    // Not a directory, or missing.
    let e = Checkpoint::open(&dir.join("config.json")).unwrap_err();
    assert!(matches!(e, CheckpointError::NotADirectory { .. }), "{e}");
    assert!(!Checkpoint::is_checkpoint_dir(&dir.join("config.json")));
    let e = Checkpoint::open(&dir.join("missing")).unwrap_err();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
}
