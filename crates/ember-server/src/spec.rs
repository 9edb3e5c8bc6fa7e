//! Speculative decoding as the APIs see it: the `ember` extension field that overrides the
//! server's speculation for one request, and the counts reported back (OpenAI `usage`,
//! llama-server `timings`, Ollama's final object).
//!
//! ```json
//! {"ember": {"spec": "lookup", "draft_max": 8, "draft_min": 1}}
//! ```
//!
//! Every key is optional; absent ones keep the server's settings (`ember serve --spec ...`).

use ember_runtime::spec::{MAX_DRAFT, Proposer, SpecError, SpecOverride, SpecStats};
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// The request field; also the `param` of every error about it.
pub const PARAM: &str = "ember";

/// The keys `ember` may hold.
const KEYS: &str = "spec, draft_max, draft_min";

/// Reads the `ember` object: `None` or `null` is the server's default. Unknown keys, wrong
/// types, an unknown proposer and counts outside 1 to [`MAX_DRAFT`] are 400s naming the key.
/// Whether the server runs the proposer asked for is the engine's check at submit
/// ([`submit_error`]).
pub fn parse(v: Option<&Value>) -> Result<SpecOverride, ApiError> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(SpecOverride::default()),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(bad(format!(
                "ember must be an object such as {{\"spec\": \"lookup\"}}, not {}",
                kind_of(other)
            )));
        }
    };
    let mut out = SpecOverride::default();
    for (key, value) in obj {
        match key.as_str() {
            "spec" => out.proposer = proposer(value)?,
            "draft_max" => out.draft_max = count("draft_max", value)?,
            "draft_min" => out.draft_min = count("draft_min", value)?,
            other => {
                return Err(bad(format!(
                    "unknown field `ember.{other}`: ember takes {KEYS}"
                )));
            }
        }
    }
    if let (Some(min), Some(max)) = (out.draft_min, out.draft_max)
        && min > max
    {
        return Err(bad(format!(
            "ember.draft_min ({min}) must not be more than ember.draft_max ({max})"
        )));
    }
    Ok(out)
}

fn proposer(v: &Value) -> Result<Option<Proposer>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => s
            .parse::<Proposer>()
            .map(Some)
            .map_err(|e| bad(format!("ember.spec: {e}"))),
        other => Err(bad(format!(
            "ember.spec must be a string ({}), not {}",
            Proposer::NAMES.join(", "),
            kind_of(other)
        ))),
    }
}

fn count(key: &str, v: &Value) -> Result<Option<usize>, ApiError> {
    let n = match v {
        Value::Null => return Ok(None),
        Value::Number(n) => n.as_u64(),
        other => {
            return Err(bad(format!(
                "ember.{key} must be an integer from 1 to {MAX_DRAFT}, not {}",
                kind_of(other)
            )));
        }
    };
    match n.and_then(|n| usize::try_from(n).ok()) {
        Some(n) if (1..=MAX_DRAFT).contains(&n) => Ok(Some(n)),
        _ => Err(bad(format!(
            "ember.{key} must be an integer from 1 to {MAX_DRAFT}, not {v}"
        ))),
    }
}

/// A JSON value's type in words, for messages (the value itself may be huge).
fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn bad(message: String) -> ApiError {
    ApiError::bad_param(PARAM, message)
}

/// The engine's refusal of a request's override (a proposer this server does not run, or
/// draft lengths that do not fit its settings): a 400 worded for the `ember` field.
pub fn submit_error(e: &SpecError) -> ApiError {
    let message = match e {
        SpecError::DraftMax(n) => {
            format!("ember.draft_max must be an integer from 1 to {MAX_DRAFT}, not {n}")
        }
        SpecError::DraftMin { min, max } => format!(
            "ember.draft_min must be from 1 to the draft length ({max}), not {min}: lower \
             ember.draft_min or raise ember.draft_max"
        ),
        SpecError::UnknownProposer(_) | SpecError::Unavailable(_) | SpecError::NoDraftModel => {
            format!("ember.spec: {e}")
        }
        other => format!("ember: {other}"),
    };
    bad(message)
}

/// OpenAI's `usage`; with `completion_tokens_details` (its predicted-outputs counts) when
/// the request speculated: proposed tokens the model accepted and those it rejected.
pub fn usage_json(prompt_n: usize, completion_n: usize, spec: Option<&SpecStats>) -> Value {
    let mut v = json!({
        "prompt_tokens": prompt_n,
        "completion_tokens": completion_n,
        "total_tokens": prompt_n + completion_n,
    });
    if let (Some(s), Some(o)) = (spec, v.as_object_mut()) {
        o.insert(
            "completion_tokens_details".into(),
            json!({
                "accepted_prediction_tokens": s.accepted,
                "rejected_prediction_tokens": s.drafted.saturating_sub(s.accepted),
            }),
        );
    }
    v
}

/// Ollama's final object: `draft_n` and `draft_n_accepted` (llama-server's names) when the
/// request speculated; Ollama's clients ignore fields they do not know.
pub fn ollama_fields(o: &mut Map<String, Value>, spec: Option<&SpecStats>) {
    if let Some(s) = spec {
        o.insert("draft_n".into(), json!(s.drafted));
        o.insert("draft_n_accepted".into(), json!(s.accepted));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(v: Value) -> Result<SpecOverride, ApiError> {
        parse(Some(&v))
    }

    fn message(r: Result<SpecOverride, ApiError>) -> String {
        let e = r.expect_err("should be refused");
        assert_eq!(e.param, Some(PARAM));
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        e.message
    }

    #[test]
    fn absent_and_null_are_the_default() {
        assert_eq!(parse(None).ok(), Some(SpecOverride::default()));
        assert_eq!(parse_json(Value::Null).ok(), Some(SpecOverride::default()));
        assert_eq!(parse_json(json!({})).ok(), Some(SpecOverride::default()));
        assert_eq!(
            parse_json(json!({"spec": null, "draft_max": null})).ok(),
            Some(SpecOverride::default())
        );
    }

    #[test]
    fn every_key_is_read() {
        let o = parse_json(json!({"spec": "lookup", "draft_max": 12, "draft_min": 2}));
        assert_eq!(
            o.ok(),
            Some(SpecOverride {
                proposer: Some(Proposer::Lookup),
                draft_max: Some(12),
                draft_min: Some(2),
            })
        );
        for (name, p) in [
            ("none", Proposer::None),
            ("draft", Proposer::Draft),
            ("self", Proposer::SelfSpec),
        ] {
            let o = parse_json(json!({ "spec": name })).expect("valid");
            assert_eq!(o.proposer, Some(p));
        }
        let o = parse_json(json!({"draft_max": MAX_DRAFT})).expect("valid");
        assert_eq!(o.draft_max, Some(MAX_DRAFT));
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (json!({"nope": 1}), "ember.nope"),
            (json!({"spec": "bogus"}), "bogus"),
            (json!({"spec": 1}), "ember.spec must be a string"),
            (json!({"spec": ["lookup"]}), "ember.spec"),
            (json!({"draft_max": 0}), "ember.draft_max"),
            (json!({"draft_max": MAX_DRAFT + 1}), "ember.draft_max"),
            (json!({"draft_max": -3}), "ember.draft_max"),
            (json!({"draft_max": 2.5}), "ember.draft_max"),
            (json!({"draft_max": "8"}), "ember.draft_max"),
            (json!({"draft_max": 1e300}), "ember.draft_max"),
            (json!({"draft_min": 0}), "ember.draft_min"),
            (json!({"draft_min": true}), "ember.draft_min"),
            (json!({"draft_min": 5, "draft_max": 4}), "ember.draft_min"),
            (json!("lookup"), "must be an object"),
            (json!([1]), "must be an object"),
        ];
        for (v, needle) in cases {
            let msg = message(parse_json(v.clone()));
            assert!(msg.contains(needle), "{v}: {msg:?} lacks {needle:?}");
            assert!(msg.contains("ember"), "{v}: {msg:?}");
        }
        // The proposer's own message, with its choices.
        let msg = message(parse_json(json!({"spec": "bogus"})));
        assert!(msg.contains("none, lookup, draft or self"), "{msg}");
    }

    #[test]
    fn engine_refusals_are_400_about_ember() {
        for e in [
            SpecError::Unavailable(Proposer::SelfSpec),
            SpecError::DraftMax(0),
            SpecError::DraftMin { min: 9, max: 4 },
            SpecError::NoDraftModel,
        ] {
            let err = submit_error(&e);
            assert_eq!(err.status, axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(err.param, Some(PARAM));
            assert!(err.message.starts_with("ember"), "{}", err.message);
        }
        let err = submit_error(&SpecError::Unavailable(Proposer::SelfSpec));
        assert!(err.message.contains("--spec self"), "{}", err.message);
    }

    #[test]
    fn usage_details_only_when_speculating() {
        let plain = usage_json(3, 4, None);
        assert!(plain.get("completion_tokens_details").is_none());
        assert_eq!(plain["total_tokens"], 7);
        let stats = SpecStats {
            proposer: Proposer::Lookup,
            drafted: 10,
            accepted: 7,
            steps: 3,
        };
        let v = usage_json(3, 4, Some(&stats));
        assert_eq!(
            v["completion_tokens_details"],
            json!({"accepted_prediction_tokens": 7, "rejected_prediction_tokens": 3})
        );
        let mut o = Map::new();
        ollama_fields(&mut o, None);
        assert!(o.is_empty());
        ollama_fields(&mut o, Some(&stats));
        assert_eq!(
            Value::Object(o),
            json!({"draft_n": 10, "draft_n_accepted": 7})
        );
    }
}
