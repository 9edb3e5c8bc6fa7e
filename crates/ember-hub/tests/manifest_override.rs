//! `EMBER_MANIFEST` replaces the embedded manifest. Its own test binary: the active
//! manifest is read once per process, and the env var must be set before that.

use ember_hub::{HubError, pull, resolve, try_manifest};

#[test]
fn ember_manifest_overrides_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manifest.json");
    let json = serde_json::json!({
        "version": 1,
        "models": [{
            "name": "override-only",
            "file": "o.gguf",
            "sha256": "ab".repeat(32),
            "size": 1,
            "parts": [{"requirement": "ember-override==1.0", "path": "o/o.gguf"}]
        }]
    });
    std::fs::write(&path, json.to_string()).unwrap();
    // SAFETY: the only test in this binary, so no other thread reads the environment.
    unsafe {
        std::env::set_var("EMBER_MANIFEST", &path);
        std::env::set_var("EMBER_OFFLINE", "1");
        std::env::set_var("EMBER_MODELS", dir.path().join("cache"));
    }
    assert_eq!(try_manifest().unwrap().names(), ["override-only"]);
    // Names from the embedded manifest are gone...
    let err = resolve("smollm2").unwrap_err();
    assert!(matches!(err, HubError::UnknownModel { .. }), "{err}");
    // ...and the override's model resolves (offline, so it stops at the cache check).
    let err = pull("override-only", Default::default()).unwrap_err();
    assert!(matches!(err, HubError::Offline { .. }), "{err}");
}
