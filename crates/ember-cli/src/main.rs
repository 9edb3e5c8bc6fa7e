//! `ember`: the command line. Thin: every command parses its flags, calls the library crates and
//! prints. Errors print one clear message and exit with code 1.

mod commands;
#[cfg(feature = "distill")]
mod distill;
mod inspect;
mod memory;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    if cli.is_filter() {
        die_quietly_on_closed_pipe();
    }
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", message(&err));
            ExitCode::from(1)
        }
    }
}

/// `ember inspect m.gguf | head`: when the reader goes away, end as Unix filters do (killed by
/// SIGPIPE) instead of panicking in `println!`, which Rust's runtime makes of the ignored
/// signal's EPIPE.
fn die_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called at the top of `main` before any thread exists; `SIG_DFL` is a valid
    // disposition for SIGPIPE and no Rust state depends on the previous one.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text the message
/// already shows (many error types print their source inside their own message).
fn message(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner detail")]
    struct Inner;

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let err = anyhow::Error::new(Outer(Inner)).context("loading m.gguf");
        assert_eq!(super::message(&err), "loading m.gguf: outer: inner detail");
        let plain = anyhow::anyhow!("a").context("b");
        assert_eq!(super::message(&plain), "b: a");
    }
}
