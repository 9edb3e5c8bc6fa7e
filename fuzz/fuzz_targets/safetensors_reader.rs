//! Fuzz the safetensors reader: parsing any bytes must return a value or a typed error, never
//! panic, and a parsed file must be fully readable. Parsed files are re-written with
//! `safetensors_to_bytes`; the rewrite must parse to the same tensors and metadata, and
//! re-writing it again must be byte-identical.
#![no_main]

use ember_formats::{SafetensorsError, SafetensorsFile, StWriteTensor, safetensors_to_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafetensorsFile::from_bytes(data.to_vec()) else {
        return;
    };
    touch(&f);
    let Some(w1) = rewrite(&f) else {
        return;
    };
    let g = match SafetensorsFile::from_bytes(w1.clone()) {
        Ok(g) => g,
        Err(e) => panic!("rewritten file does not parse: {e}"),
    };
    touch(&g);
    assert_eq!(g.tensors().len(), f.tensors().len());
    assert_eq!(g.metadata(), f.metadata());
    for t in f.tensors() {
        let u = g.tensor(&t.name).expect("tensor lost in rewrite");
        assert_eq!(
            (u.dtype, &u.shape, u.n_bytes),
            (t.dtype, &t.shape, t.n_bytes)
        );
        assert_eq!(g.data(u), f.data(t));
    }
    let w2 = rewrite(&g).expect("rewrite of a rewrite failed");
    assert!(w1 == w2, "rewrite is not idempotent");
});

/// Write a parsed file back out; `None` only when the rewritten header would pass the size
/// limit (it always adds `"__metadata__"` and padding).
fn rewrite(f: &SafetensorsFile) -> Option<Vec<u8>> {
    let tensors: Vec<StWriteTensor> = f
        .tensors()
        .iter()
        .map(|t| StWriteTensor::new(t.name.clone(), t.dtype, t.shape.clone(), f.data(t)))
        .collect();
    match safetensors_to_bytes(&tensors, f.metadata()) {
        Ok(b) => Some(b),
        Err(SafetensorsError::HeaderTooLarge { .. }) => None,
        Err(e) => panic!("writer rejects tensors the reader accepted: {e}"),
    }
}

fn touch(f: &SafetensorsFile) {
    let mut acc = 0usize;
    let mut previous_end = f.data_offset();
    for t in f.tensors() {
        let d = f.data(t);
        assert_eq!(d.len(), t.n_bytes);
        assert_eq!(t.dtype.bytes_for(t.n_elements()), Some(t.n_bytes));
        assert_eq!(f.tensor(&t.name), Some(t));
        // The tensors tile the data section in file order.
        assert_eq!(t.offset, previous_end);
        previous_end = t.offset + t.n_bytes;
        acc = acc.wrapping_add(t.n_elements());
        acc = acc.wrapping_add(d.iter().map(|&b| usize::from(b)).sum::<usize>());
    }
    assert_eq!(previous_end, f.as_bytes().len());
    for (k, v) in f.metadata() {
        acc = acc.wrapping_add(k.len() + v.len());
    }
    std::hint::black_box((acc, f.header_len(), f.path(), format!("{f:?}")));
}
