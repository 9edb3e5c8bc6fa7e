//! Print a GGUF file's header: `cargo run --release -p ember-formats --example gguf_dump -- FILE`.
//! Metadata values are summarised (arrays show type and length); tensors show dims, type,
//! offset and size.

use ember_formats::{GgufFile, MetaValue};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: gguf_dump FILE.gguf");
        std::process::exit(2);
    };
    let f = match GgufFile::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "version {} alignment {} data_offset {}",
        f.version(),
        f.alignment(),
        f.data_offset()
    );
    for (k, v) in f.metadata() {
        match v {
            MetaValue::Array(a) => println!("kv {k} array<{}>[{}]", a.element_type(), a.len()),
            MetaValue::String(s) => println!("kv {k} string {s:?}"),
            v => println!("kv {k} {} {v:?}", v.meta_type()),
        }
    }
    for t in f.tensors() {
        println!(
            "tensor {} {:?} {} offset {} bytes {}",
            t.name, t.dims, t.ggml_type, t.offset, t.n_bytes
        );
    }
}
