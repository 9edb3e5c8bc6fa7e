//! A generation that fails midway keeps what it produced: one `Err` item,
//! `Error::Interrupted`, whose partial output is the text already streamed. A forward pass
//! is made to panic with the runtime's fail point (its own test binary: fail points are
//! process-wide).

use ember::{Error, GenerateParams, Model};

#[test]
fn a_failure_midway_keeps_the_streamed_text() {
    let model = Model::builder("smollm2-135m-instruct-q4_1")
        .ctx_size(256)
        .load()
        .unwrap();
    let params = GenerateParams::greedy().max_tokens(32);
    // The prompt pass and 5 decode passes run, the next one panics.
    fail::cfg("engine::forward", "6*off->1*panic(injected fault)").unwrap();
    let mut stream = model.generate("Once upon a time", &params).unwrap();
    let mut streamed = String::new();
    let mut failure = None;
    for piece in stream.by_ref() {
        match piece {
            Ok(p) => streamed.push_str(&p),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    fail::remove("engine::forward");
    let e = failure.expect("the injected fault ends the stream with an error");
    let Error::Interrupted { partial, .. } = &e else {
        panic!("{e}");
    };
    assert!(!partial.tokens.is_empty() && partial.tokens.len() < 32);
    assert!(
        partial.text.starts_with(&streamed),
        "{:?} {streamed:?}",
        partial.text
    );
    assert!(stream.next().is_none(), "nothing after the error");
    // `finish` reports the same failure with the same partial output.
    let again = stream.finish().expect_err("still an error");
    assert_eq!(again.partial().map(|p| &p.tokens), Some(&partial.tokens));
    // The model is fine afterwards.
    let ok = model
        .generate("Once upon a time", &params)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(ok.tokens.len(), 32);
}
