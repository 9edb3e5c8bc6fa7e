//! `cargo xtask tiny-models [--out DIR] [--build DIR] [--fixtures DIR] [-t THREADS]`: writes
//! the tiny random GGUF of every architecture in `ember_models::testing::tiny` (f32 and f16
//! weights) to `--out` (default `target/tiny-models`), runs llama.cpp on each through
//! `tiny-logits` (`tiny_logits.cpp` here, compiled against llama.cpp's static libraries in
//! `--build`, default the build `build-llamacpp.sh` makes; `--build .../build-noamx` works
//! too), and writes its teacher-forced logits as fixtures to `tests/fixtures/tiny/`, which
//! `crates/ember-models/tests/tiny_archs.rs` compares ours with.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use ember_models::testing::tiny;
use serde_json::Value;

use crate::{llama_bin, root};

const TINY_LOGITS_CPP: &str = include_str!("tiny_logits.cpp");

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the tiny GGUFs and the compiled `tiny-logits` go (relative to the workspace root).
    #[arg(long, default_value = "target/tiny-models")]
    pub out: PathBuf,
    /// llama.cpp's CMake build directory (default: the one `build-llamacpp.sh` makes).
    #[arg(long)]
    pub build: Option<PathBuf>,
    /// Where the fixture JSON files go (relative to the workspace root).
    #[arg(long, default_value = "tests/fixtures/tiny")]
    pub fixtures: PathBuf,
    /// Threads for llama.cpp.
    #[arg(short, long, default_value_t = 2)]
    pub threads: usize,
}

pub fn run(a: Args) -> Result<()> {
    // `join` keeps an absolute argument as it is.
    let root = root().canonicalize().context("workspace root")?;
    let out = root.join(&a.out);
    let fixtures = root.join(&a.fixtures);
    let threads = a.threads.to_string();
    let build = match a.build {
        Some(dir) => dir,
        None => llama_bin()?
            .parent()
            .context("llama.cpp bin directory has no parent")?
            .to_path_buf(),
    };
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(&fixtures)?;

    let version = llama_version(&build)?;
    let exe = compile_tiny_logits(&build, &out)?;
    eprintln!("llama.cpp: {version}");

    for (arch, dtype) in tiny::ALL {
        let name = tiny::name(arch, dtype);
        let bytes = tiny::gguf(arch, dtype)?;
        let path = out.join(format!("{name}.gguf"));
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        let tokens = tiny::tokens(arch);
        let list = tokens
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let output = Command::new(&exe)
            .arg("-m")
            .arg(&path)
            .args(["--tokens", &list, "-t", &threads])
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !output.status.success() {
            bail!(
                "tiny-logits failed on {name}:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let got: Value = serde_json::from_slice(&output.stdout).context("parsing tiny-logits")?;
        let command = format!(
            "tiny-logits -m {name}.gguf --tokens {list} -t {threads}  # cargo xtask tiny-models"
        );
        let fixture = render_fixture(
            &name,
            arch.gguf_name(),
            dtype.name(),
            &bytes,
            &got,
            &command,
            &version,
        )?;
        let dest = fixtures.join(format!("{name}.json"));
        std::fs::write(&dest, fixture).with_context(|| format!("writing {}", dest.display()))?;
        eprintln!("{name}: {} -> {}", path.display(), dest.display());
    }
    Ok(())
}

/// `version: ... (commit ...)` as `llama-cli --version` prints it, read from the build's
/// generated `common/build-info.cpp` (present in every build, with or without llama-cli).
fn llama_version(build: &Path) -> Result<String> {
    let info = build.join("common/build-info.cpp");
    let text =
        std::fs::read_to_string(&info).with_context(|| format!("reading {}", info.display()))?;
    let value = |key: &str| {
        text.lines()
            .find(|l| l.contains(key))
            .and_then(|l| l.split('=').nth(1))
            .map(|v| v.trim().trim_end_matches(';').trim_matches('"').to_string())
    };
    let commit = value("LLAMA_COMMIT").context("no LLAMA_COMMIT in build-info.cpp")?;
    let number = value("LLAMA_BUILD_NUMBER").unwrap_or_default();
    // The build script vendors llama.cpp from a llama-cpp-python sdist: name it too.
    let sdist = source_dir(build)?
        .ancestors()
        .filter_map(|p| p.file_name()?.to_str())
        .find(|n| n.starts_with("llama_cpp_python-"))
        .map(|n| format!(" as vendored in {}", n.replace('_', "-")))
        .unwrap_or_default();
    Ok(format!(
        "llama.cpp build {number}, commit {commit}{sdist}, CPU"
    ))
}

/// llama.cpp's source tree, as recorded in the build's CMake cache.
fn source_dir(build: &Path) -> Result<PathBuf> {
    let cache = build.join("CMakeCache.txt");
    let text =
        std::fs::read_to_string(&cache).with_context(|| format!("reading {}", cache.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("CMAKE_HOME_DIRECTORY:INTERNAL="))
        .map(PathBuf::from)
        .context("no CMAKE_HOME_DIRECTORY in CMakeCache.txt")
}

/// Compiles `tiny_logits.cpp` against the build's static libraries (as `build-llamacpp.sh`
/// builds refgen), into `out`.
fn compile_tiny_logits(build: &Path, out: &Path) -> Result<PathBuf> {
    let src = source_dir(build)?;
    let cpp = out.join("tiny_logits.cpp");
    std::fs::write(&cpp, TINY_LOGITS_CPP)?;
    let exe = out.join("tiny-logits");
    let status = Command::new("g++")
        .args(["-O2", "-std=c++17"])
        .arg(&cpp)
        .arg("-I")
        .arg(src.join("include"))
        .arg("-I")
        .arg(src.join("ggml/include"))
        .arg(build.join("src/libllama.a"))
        .arg(build.join("ggml/src/libggml.a"))
        .arg(build.join("ggml/src/libggml-cpu.a"))
        .arg(build.join("ggml/src/libggml-base.a"))
        .args(["-fopenmp", "-lpthread", "-o"])
        .arg(&exe)
        .status()
        .context("running g++")?;
    if !status.success() {
        bail!("compiling tiny_logits.cpp failed");
    }
    Ok(exe)
}

/// The fixture JSON: metadata first, then one line per position's logits row.
fn render_fixture(
    name: &str,
    arch: &str,
    dtype: &str,
    gguf: &[u8],
    got: &Value,
    command: &str,
    version: &str,
) -> Result<String> {
    let rows = got["logits"].as_array().context("no logits")?;
    let q = |s: &str| Value::from(s).to_string();
    let mut o = String::new();
    writeln!(o, "{{")?;
    writeln!(o, "  \"name\": {},", q(name))?;
    writeln!(o, "  \"architecture\": {},", q(arch))?;
    writeln!(o, "  \"weights\": {},", q(dtype))?;
    writeln!(
        o,
        "  \"generator\": \"ember_models::testing::tiny::gguf (regenerated by the test)\","
    )?;
    writeln!(o, "  \"gguf_bytes\": {},", gguf.len())?;
    writeln!(
        o,
        "  \"gguf_fnv1a64\": \"{:016x}\",",
        tiny::fingerprint(gguf)
    )?;
    writeln!(o, "  \"llama_cpp\": {},", q(version))?;
    writeln!(o, "  \"command\": {},", q(command))?;
    writeln!(o, "  \"context\": {},", got["ctx"])?;
    writeln!(o, "  \"n_vocab\": {},", got["n_vocab"])?;
    writeln!(o, "  \"tokens\": {},", got["tokens"])?;
    writeln!(o, "  \"logits\": [")?;
    for (i, row) in rows.iter().enumerate() {
        let sep = if i + 1 < rows.len() { "," } else { "" };
        writeln!(o, "    {row}{sep}")?;
    }
    writeln!(o, "  ]")?;
    writeln!(o, "}}")?;
    Ok(o)
}
