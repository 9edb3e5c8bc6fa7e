//! Shared helpers: a sample file with every metadata type, and a raw byte builder for
//! hand-crafting (possibly invalid) GGUF headers.
#![allow(dead_code)]

use ember_formats::{GgmlType, GgufWriter, MetaArray, MetaValue, StringArray};

/// Every scalar metadata type, every array element type, nested arrays, and tensors of a few
/// types (including a quantized one and a zero-dim scalar).
pub fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "llama")
        .add("t.u8", 200u8)
        .add("t.i8", -100i8)
        .add("t.u16", 60000u16)
        .add("t.i16", -30000i16)
        .add("t.u32", 4_000_000_000u32)
        .add("t.i32", -2_000_000_000i32)
        .add("t.f32", 1.5f32)
        .add("t.bool", true)
        .add("t.string", "héllo wörld")
        .add("t.empty_string", "")
        .add("t.u64", u64::MAX)
        .add("t.i64", i64::MIN)
        .add("t.f64", -2.25f64)
        .add_array("a.u8", vec![1u8, 2, 255])
        .add_array("a.i8", vec![-1i8, 0, 127])
        .add_array("a.u16", vec![1u16, 65535])
        .add_array("a.i16", vec![-32768i16, 5])
        .add_array("a.u32", vec![7u32, 8, 9])
        .add_array("a.i32", vec![-7i32, 8, -9])
        .add_array("a.f32", vec![0.5f32, -1.0, f32::INFINITY])
        .add_array("a.bool", vec![true, false, true])
        .add_string_array("a.string", ["a", "", "ünïcode", "<|im_start|>"])
        .add_array("a.u64", vec![u64::MAX, 0])
        .add_array("a.i64", vec![i64::MIN, i64::MAX])
        .add_array("a.f64", vec![1e300f64, -0.0])
        .add_array("a.empty", Vec::<u32>::new())
        .add_array(
            "a.nested",
            vec![
                MetaArray::U32(vec![1, 2]),
                MetaArray::String(["x", "yz"].into_iter().collect::<StringArray>()),
                MetaArray::Array(vec![MetaArray::F32(vec![3.0])]),
                MetaArray::Array(vec![]),
            ],
        );
    let f32_data: Vec<u8> = (0..12u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    w.add_tensor("tok_embd.weight", &[4, 3], GgmlType::F32, f32_data)
        .unwrap();
    // Q4_1 needs whole blocks of 32 per row: 2 rows of 64 = 4 blocks of 20 bytes.
    let q: Vec<u8> = (0..80u32).map(|i| i as u8).collect();
    w.add_tensor("blk.0.attn_q.weight", &[64, 2], GgmlType::Q4_1, q)
        .unwrap();
    w.add_tensor("scalar", &[], GgmlType::F16, vec![0x00, 0x3c])
        .unwrap();
    w.add_tensor("empty", &[0, 5], GgmlType::F32, Vec::new())
        .unwrap();
    w.add_tensor("odd.i8", &[3], GgmlType::I8, vec![1, 2, 3])
        .unwrap();
    w
}

pub fn sample_bytes() -> Vec<u8> {
    sample_writer().to_bytes().unwrap()
}

/// Builds raw GGUF bytes field by field, with no validation.
#[derive(Default)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    /// Magic, version, tensor count, kv count.
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    /// A u32 metadata entry.
    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    /// A tensor info.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Zero-pad to a multiple of `a`.
    pub fn pad(&mut self, a: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(a) {
            self.0.push(0);
        }
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

/// Read every piece of a parsed file (all metadata, all tensor bytes) so lazy bugs surface.
pub fn touch_everything(f: &ember_formats::GgufFile) -> u64 {
    let mut acc = 0u64;
    for (k, v) in f.metadata() {
        acc = acc.wrapping_add(k.len() as u64);
        acc = acc.wrapping_add(touch_value(v));
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
    }
    for t in f.tensors() {
        let d = f.tensor_data(t);
        assert_eq!(d.len() as u64, t.n_bytes);
        acc = acc.wrapping_add(d.iter().map(|&b| b as u64).sum::<u64>());
        acc = acc.wrapping_add(t.n_elements());
        assert_eq!(f.tensor(&t.name), Some(t));
    }
    acc
}

fn touch_value(v: &MetaValue) -> u64 {
    match v {
        MetaValue::Array(a) => touch_array(a),
        MetaValue::String(s) => s.len() as u64,
        v => v.as_integer().map(|x| x as u64).unwrap_or(1),
    }
}

fn touch_array(a: &MetaArray) -> u64 {
    let mut acc = a.len() as u64;
    match a {
        MetaArray::Array(v) => {
            for x in v {
                acc = acc.wrapping_add(touch_array(x));
            }
        }
        MetaArray::String(s) => {
            for x in s.iter() {
                acc = acc.wrapping_add(x.len() as u64);
            }
        }
        _ => {
            for i in 0..a.len() {
                acc = acc.wrapping_add(a.get(i).map(|v| touch_value(&v)).unwrap_or(0));
            }
        }
    }
    acc
}
