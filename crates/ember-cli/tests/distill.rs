//! `ember distill` as a user runs it, on a tiny random llama teacher (2 layers, written in
//! code): a run exports a student Ember loads and reports on it; a run cut by `--stop-at` or
//! by Ctrl-C and resumed writes the same file, byte for byte, as an unbroken one; bad input
//! exits 1 with a clear message and leaves no output file.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ember_models::testing::ScratchDir;
use ember_models::testing::tiny::{TinyArch, TinyDtype, gguf};

fn scratch(name: &str) -> ScratchDir {
    ScratchDir::new(env!("CARGO_TARGET_TMPDIR"), &format!("cli-distill-{name}"))
}

fn tiny(dir: &Path, arch: TinyArch) -> PathBuf {
    let path = dir.join(format!("tiny-{arch:?}.gguf"));
    std::fs::write(&path, gguf(arch, TinyDtype::F32).expect("tiny model")).expect("write");
    path
}

fn text(dir: &Path) -> PathBuf {
    let para = "The river runs past the old mill, and the children watch the water turn the \
                wheel. In the evening the miller shuts the gate, the wheel stops, and the \
                town is quiet until the morning bell. ";
    let path = dir.join("text.txt");
    std::fs::write(&path, para.repeat(12)).expect("write text");
    path
}

fn ember(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ember")
}

fn args(teacher: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "distill",
        "-m",
        "",
        "-o",
        "",
        "--layers",
        "1",
        "--data",
        "",
        "--seq-len",
        "32",
        "--top-k",
        "16",
        "--steps",
        "12",
        "--batch",
        "2",
        "--save-every",
        "4",
        "--type",
        "f32",
        "--holdout",
        "0.1",
        "--lr",
        "1e-3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a[2] = teacher.display().to_string();
    a[4] = out.display().to_string();
    a[8] = data.display().to_string();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Steps of the run the test interrupts with Ctrl-C.
#[cfg(unix)]
const INTERRUPTED_STEPS: &str = "400";

/// Replaces the value of `flag` in an argument list (the parser refuses a flag given twice).
#[cfg(unix)]
fn set(args: &mut [String], flag: &str, value: &str) {
    let i = args.iter().position(|s| s == flag).expect("flag present");
    args[i + 1] = value.to_string();
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "ember distill failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn partial(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

fn csv_steps(out: &Path) -> Vec<usize> {
    let mut p = out.as_os_str().to_owned();
    p.push(".train.csv");
    std::fs::read_to_string(PathBuf::from(p))
        .expect("loss csv")
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .next()
                .and_then(|s| s.parse().ok())
                .expect("step")
        })
        .collect()
}

#[test]
fn runs_export_report_and_resume_bit_for_bit() {
    let dir = scratch("run");
    let teacher = tiny(&dir, TinyArch::Mistral);
    let data = text(&dir);

    // One unbroken run, with the report.
    let a = dir.join("a.gguf");
    let out = ember(&args(&teacher, &data, &a, &["--report"]));
    ok(&out);
    assert!(a.exists() && !partial(&a).exists());
    assert_eq!(csv_steps(&a), (1..=12).collect::<Vec<_>>());
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("a.gguf.report.json")).expect("report file"),
    )
    .expect("report JSON");
    assert_eq!(report["teacher"]["layers"], 2);
    assert_eq!(report["student"]["layers"], 1);
    assert_eq!(report["training"]["steps"], 12);
    assert_eq!(report["draft"]["same_tokens"], true, "{report}");
    assert!(
        report["draft"]["agreement"]
            .as_f64()
            .is_some_and(|a| (0.0..=1.0).contains(&a))
    );
    assert!(
        report["student"]["perplexity"]
            .as_f64()
            .is_some_and(f64::is_finite)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("student") && stdout.contains("agrees with"),
        "{stdout}"
    );
    // Ember runs the student.
    ok(&ember(&[
        "generate".into(),
        "-m".into(),
        a.display().to_string(),
        "-p".into(),
        "the river".into(),
        "-n".into(),
        "4".into(),
    ]));

    // Cut at step 5 (exit 0, no output yet), then resumed: the same bytes. The teacher's
    // cache is reused (it was made the same way).
    let b = dir.join("b.gguf");
    let cache_path = dir.join("a.gguf.topk").display().to_string();
    let cache = vec!["--cache", cache_path.as_str()];
    let mut first = cache.clone();
    first.extend(["--stop-at", "5"]);
    let out = ember(&args(&teacher, &data, &b, &first));
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("reused"));
    assert!(!b.exists() && !partial(&b).exists());
    let ckpt = dir.join("b.gguf.ckpt");
    assert_eq!(
        std::fs::read_to_string(ckpt.join("step")).expect("step"),
        "5"
    );
    // A --stop-at the checkpoint has already passed is refused.
    let ckpt_s = format!("{}/", ckpt.display()); // a trailing slash, as shells complete it
    let mut early = cache.clone();
    early.extend(["--resume", &ckpt_s, "--stop-at", "3"]);
    let out = ember(&args(&teacher, &data, &b, &early));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--stop-at 3 is not after"));
    let mut resume = cache.clone();
    resume.extend(["--resume", &ckpt_s]);
    ok(&ember(&args(&teacher, &data, &b, &resume)));
    assert!(std::fs::read(&b).expect("b") == std::fs::read(&a).expect("a"));
    assert_eq!(csv_steps(&b), (1..=12).collect::<Vec<_>>());

    // A resume with other settings names what differs.
    let mut other = resume.clone();
    other.extend(["--seed", "7"]);
    let c = dir.join("c.gguf");
    let out = ember(&args(&teacher, &data, &c, &other));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another configuration") && err.contains("seed"),
        "{err}"
    );
    assert!(!c.exists() && !partial(&c).exists());

    // Ctrl-C: a checkpoint, exit 130, no output file; resumed, the unbroken run's bytes.
    // The signal arrives some steps after the first line (a few on a loaded machine): this
    // run is long enough that it always lands mid-training, and its unbroken twin is the
    // reference.
    #[cfg(unix)]
    {
        let long = |out: &Path, extra: &[&str]| {
            let mut a = args(&teacher, &data, out, extra);
            set(&mut a, "--steps", INTERRUPTED_STEPS);
            set(&mut a, "--save-every", "100000");
            a
        };
        let e = dir.join("e.gguf");
        ok(&ember(&long(&e, &cache)));
        let d = dir.join("d.gguf");
        let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(long(&d, &cache))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        // The handler is installed before this line.
        let first = lines.next().expect("a line").expect("text");
        assert!(first.starts_with("distilling"), "{first}");
        let killed = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(130), "{rest:?}");
        assert!(rest.iter().any(|l| l.contains("--resume")), "{rest:?}");
        assert!(!d.exists() && !partial(&d).exists());
        let ckpt = dir.join("d.gguf.ckpt");
        let step: usize = std::fs::read_to_string(ckpt.join("step"))
            .expect("step")
            .parse()
            .expect("a step number");
        let steps: usize = INTERRUPTED_STEPS.parse().expect("steps");
        assert!((1..steps).contains(&step), "checkpoint at step {step}");
        let mut resume = cache.clone();
        let ckpt_s = ckpt.display().to_string();
        resume.extend(["--resume", &ckpt_s]);
        ok(&ember(&long(&d, &resume)));
        assert!(std::fs::read(&d).expect("d") == std::fs::read(&e).expect("e"));
    }
}

#[test]
fn bad_input_exits_1_clearly_and_leaves_no_output() {
    let dir = scratch("bad");
    let teacher = tiny(&dir, TinyArch::Mistral);
    let qwen = tiny(&dir, TinyArch::Qwen2);
    let data = text(&dir);
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").expect("write");
    let out = dir.join("s.gguf");
    let missing_dir = dir.join("no-such-dir").join("s.gguf");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            args(&qwen, &data, &out, &[]),
            "qwen2 teacher has no student",
        ),
        (
            args(&teacher, &data, &out, &["--layers", "0"]),
            "at least 1 and fewer than the teacher's 2",
        ),
        (
            args(&teacher, &data, &out, &["--layers", "2"]),
            "at least 1 and fewer than the teacher's 2",
        ),
        (
            args(&teacher, &data, &out, &["--keep-layers", "5"]),
            "layer 5 is not among",
        ),
        (args(&teacher, &empty, &out, &[]), "empty"),
        (
            args(&teacher, &data, &out, &["--seq-len", "65"]),
            "context (64)",
        ),
        (args(&teacher, &data, &missing_dir, &[]), "no-such-dir"),
        (
            args(&teacher, &data, &out, &["--ffn", "100000"]),
            "feed-forward width of 100000",
        ),
    ];
    // A directory of other files as --checkpoint-dir, or another file as --cache, would be
    // replaced: refused, and left as they are.
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).expect("dir");
    std::fs::write(foreign.join("notes.txt"), "keep me").expect("write");
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "keep me too").expect("write");
    let foreign_s = foreign.display().to_string();
    let notes_s = notes.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = cases
        .into_iter()
        .chain([
            (
                args(&teacher, &data, &out, &["--checkpoint-dir", &foreign_s]),
                "holds other files",
            ),
            (
                args(&teacher, &data, &out, &["--cache", &notes_s]),
                "is not a teacher cache",
            ),
        ])
        .collect();
    for (mut a, want) in cases {
        // A flag given twice is refused by the parser: the case's own value replaces the
        // default one (the last occurrence is the case's).
        for flag in ["--layers", "--seq-len"] {
            if a.iter().filter(|s| *s == flag).count() == 2 {
                let i = a.iter().position(|s| s == flag).expect("flag");
                a.drain(i..i + 2);
            }
        }
        if a.iter().any(|s| s == "--keep-layers") {
            let i = a.iter().position(|s| s == "--layers").expect("--layers");
            a.drain(i..i + 2);
        }
        let o = ember(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{a:?}: {err}");
        assert!(err.contains(want), "{a:?}: expected {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists() && !partial(&out).exists(), "{a:?}");
        assert!(!missing_dir.exists());
    }
    assert_eq!(
        std::fs::read_to_string(foreign.join("notes.txt")).expect("kept"),
        "keep me"
    );
    assert_eq!(
        std::fs::read_to_string(&notes).expect("kept"),
        "keep me too"
    );
}
