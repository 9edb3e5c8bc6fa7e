//! Fuzz the GGUF reader: parsing any bytes must return a value or a typed error, never panic,
//! and a parsed file must be fully readable. Parsed files are re-written with `GgufWriter`;
//! the rewrite must parse and re-writing it again must be byte-identical.
#![no_main]

use ember_formats::{GgufFile, GgufWriter, MetaArray, MetaValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    touch(&f);
    let Some(w1) = rewrite(&f) else {
        return;
    };
    let g = match GgufFile::from_bytes(w1.clone()) {
        Ok(g) => g,
        Err(e) => panic!("rewritten file does not parse: {e}"),
    };
    touch(&g);
    assert_eq!(g.tensors().len(), f.tensors().len());
    assert_eq!(g.metadata().len(), f.metadata().len());
    for t in f.tensors() {
        let u = g.tensor(&t.name).expect("tensor lost in rewrite");
        assert_eq!(
            (&u.dims, u.ggml_type, u.n_bytes),
            (&t.dims, t.ggml_type, t.n_bytes)
        );
        assert_eq!(g.tensor_data(u), f.tensor_data(t));
    }
    let w2 = rewrite(&g).expect("rewrite of a rewrite failed");
    assert!(w1 == w2, "rewrite is not idempotent");
});

/// Write a parsed file back out; `None` when the writer refuses it (a `general.alignment` that
/// is valid but not u32-typed).
fn rewrite(f: &GgufFile) -> Option<Vec<u8>> {
    let mut w = GgufWriter::new();
    w.set_version(f.version());
    for (k, v) in f.metadata() {
        w.add(k.as_str(), v.clone());
    }
    for t in f.tensors() {
        if let Err(e) = w.add_tensor(t.name.as_str(), &t.dims, t.ggml_type, f.tensor_data(t)) {
            panic!("writer rejects a tensor the reader accepted: {e}");
        }
    }
    w.to_bytes().ok()
}

fn touch(f: &GgufFile) {
    let mut acc = 0u64;
    for (k, v) in f.metadata() {
        assert!(f.get(k).is_some());
        let _ = (
            f.get_str(k),
            f.get_u32(k),
            f.get_u64(k),
            f.get_f32(k),
            f.get_bool(k),
        );
        let _ = (
            f.get_string_array(k),
            f.get_i32_array(k),
            f.get_f32_array(k),
        );
        acc = acc.wrapping_add(value(v));
    }
    let _ = (
        f.architecture(),
        f.alignment(),
        f.data_offset(),
        f.version(),
    );
    for t in f.tensors() {
        let d = f.tensor_data(t);
        assert_eq!(d.len() as u64, t.n_bytes);
        assert_eq!(f.tensor(&t.name), Some(t));
        acc = acc.wrapping_add(t.n_elements());
        acc = acc.wrapping_add(d.iter().map(|&b| u64::from(b)).sum::<u64>());
    }
    std::hint::black_box(acc);
}

fn value(v: &MetaValue) -> u64 {
    match v {
        MetaValue::Array(a) => array(a),
        MetaValue::String(s) => s.len() as u64,
        v => v.as_integer().map(|x| x as u64).unwrap_or(1),
    }
}

fn array(a: &MetaArray) -> u64 {
    match a {
        MetaArray::Array(v) => v.iter().map(array).fold(0, u64::wrapping_add),
        MetaArray::String(s) => s.iter().map(|x| x.len() as u64).fold(0, u64::wrapping_add),
        _ => (0..a.len())
            .filter_map(|i| a.get(i))
            .map(|v| value(&v))
            .fold(0, u64::wrapping_add),
    }
}
