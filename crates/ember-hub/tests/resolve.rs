//! Name/path resolution through the public API, against the embedded manifest.

use ember_hub::{HubError, list_models, manifest, resolve};

#[test]
fn manifest_names_are_unique_and_complete() {
    let m = manifest();
    let mut names: Vec<String> = m
        .models
        .iter()
        .flat_map(|e| std::iter::once(&e.name).chain(&e.aliases))
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let total = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), total, "duplicate names or aliases");
    for e in &m.models {
        let parts: u64 = e.parts.iter().map(|p| p.size.unwrap_or(0)).sum();
        assert_eq!(parts, e.size, "{}", e.name);
        assert!(e.file.ends_with(".gguf"), "{}", e.name);
        for p in &e.parts {
            assert!(p.requirement.contains("=="), "unpinned: {}", p.requirement);
        }
    }
    assert_eq!(list_models().len(), m.models.len());
}

#[test]
fn existing_path_passes_through() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my model.gguf");
    std::fs::write(&file, b"GGUF").unwrap();
    let s = file.to_str().unwrap();
    assert_eq!(resolve(s).unwrap(), file);
}

#[test]
fn missing_path_is_path_not_found() {
    let err = resolve("./definitely/not/here.gguf").unwrap_err();
    assert!(matches!(err, HubError::PathNotFound(_)), "{err}");
}

#[test]
fn unknown_name_lists_known_names() {
    let err = resolve("no-such-model").unwrap_err();
    assert!(matches!(err, HubError::UnknownModel { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("no-such-model"), "{msg}");
    for name in manifest().names() {
        assert!(msg.contains(name), "{msg} should list {name}");
    }
}
