//! The documented per-request limits (README, server section) and their checks: header
//! sizes, per-request lists, and the ranges of sampling values.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use ember_runtime::sampling::SamplingParams;

use crate::error::ApiError;

/// Headers per request, and their total bytes; past them a JSON 431.
pub const MAX_HEADERS: usize = 100;
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// hyper's own parser limits, above ours so that ours answer first with a JSON body; past
/// these hyper answers a bodiless 431 and closes the connection.
pub const HYPER_MAX_HEADERS: usize = 256;
pub const HYPER_MAX_HEAD_BYTES: usize = 256 * 1024;

/// Stop strings per request and bytes per stop string. They are matched on the engine's
/// thread after every token, so their total is what one request can cost every other.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 1024;
/// Chat messages per request (each goes through the template).
pub const MAX_MESSAGES: usize = 4096;

/// JSON 431 for too many or too large headers, before any handler runs.
pub async fn check_headers(req: Request, next: Next) -> Response {
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        let err = ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            format!(
                "the request has {} headers of {bytes} bytes; the limits are {MAX_HEADERS} \
                 headers and {MAX_HEADER_BYTES} bytes",
                headers.len()
            ),
        )
        .code("headers_too_large");
        return err.for_path(req.uri().path());
    }
    next.run(req).await
}

/// Checks `stop` against [`MAX_STOP_STRINGS`] and [`MAX_STOP_BYTES`].
pub fn check_stop(stop: &[String]) -> Result<(), ApiError> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::bad_param(
            "stop",
            format!(
                "stop has {} strings; at most {MAX_STOP_STRINGS} are accepted",
                stop.len()
            ),
        ));
    }
    if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_param(
            "stop",
            format!(
                "a stop string is {} bytes; at most {MAX_STOP_BYTES} are accepted",
                s.len()
            ),
        ));
    }
    Ok(())
}

/// OpenAI's documented ranges (temperature 0-2, top_p 0-1, penalties -2-2) and llama.cpp's
/// for its extras (min_p 0-1, repeat_penalty > 0, repeat_last_n >= -1). Every value must be
/// finite. `names` gives each field's name in the request (Ollama nests them in `options`).
pub fn check_sampling(p: &SamplingParams, names: &SamplingNames) -> Result<(), ApiError> {
    let range = |name: &'static str, v: f32, lo: f32, hi: f32| {
        if v.is_finite() && (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(ApiError::bad_param(
                name,
                format!("{name} is {v}; it must be from {lo} to {hi}"),
            ))
        }
    };
    range(names.temperature, p.temperature, 0.0, 2.0)?;
    range(names.top_p, p.top_p, 0.0, 1.0)?;
    range(names.min_p, p.min_p, 0.0, 1.0)?;
    range(names.presence_penalty, p.presence_penalty, -2.0, 2.0)?;
    range(names.frequency_penalty, p.frequency_penalty, -2.0, 2.0)?;
    if !(p.repeat_penalty.is_finite() && p.repeat_penalty > 0.0 && p.repeat_penalty <= 100.0) {
        return Err(ApiError::bad_param(
            names.repeat_penalty,
            format!(
                "{} is {}; it must be more than 0 and at most 100 (1 turns it off)",
                names.repeat_penalty, p.repeat_penalty
            ),
        ));
    }
    if p.repeat_last_n < -1 {
        return Err(ApiError::bad_param(
            names.repeat_last_n,
            format!(
                "{} is {}; it must be -1 (the whole context), 0 (off) or more",
                names.repeat_last_n, p.repeat_last_n
            ),
        ));
    }
    Ok(())
}

/// `top_k`: 0 or less turns it off (llama.cpp); anything else is a count.
pub fn top_k(name: &'static str, k: Option<i64>, default: usize) -> Result<usize, ApiError> {
    match k {
        None => Ok(default),
        Some(k) if k <= 0 => Ok(0),
        Some(k) => usize::try_from(k)
            .map_err(|_| ApiError::bad_param(name, format!("{name} is {k}; it is too large"))),
    }
}

/// The request's names for the sampling fields.
pub struct SamplingNames {
    pub temperature: &'static str,
    pub top_p: &'static str,
    pub min_p: &'static str,
    pub presence_penalty: &'static str,
    pub frequency_penalty: &'static str,
    pub repeat_penalty: &'static str,
    pub repeat_last_n: &'static str,
}

pub const OPENAI_NAMES: SamplingNames = SamplingNames {
    temperature: "temperature",
    top_p: "top_p",
    min_p: "min_p",
    presence_penalty: "presence_penalty",
    frequency_penalty: "frequency_penalty",
    repeat_penalty: "repeat_penalty",
    repeat_last_n: "repeat_last_n",
};

pub const OLLAMA_NAMES: SamplingNames = SamplingNames {
    temperature: "options.temperature",
    top_p: "options.top_p",
    min_p: "options.min_p",
    presence_penalty: "options.presence_penalty",
    frequency_penalty: "options.frequency_penalty",
    repeat_penalty: "options.repeat_penalty",
    repeat_last_n: "options.repeat_last_n",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_ranges() {
        let ok = SamplingParams::default();
        assert!(check_sampling(&ok, &OPENAI_NAMES).is_ok());
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..ok.clone()
            },
            SamplingParams {
                temperature: f32::INFINITY,
                ..ok.clone()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..ok.clone()
            },
            SamplingParams {
                temperature: 2.5,
                ..ok.clone()
            },
            SamplingParams {
                top_p: 2.0,
                ..ok.clone()
            },
            SamplingParams {
                min_p: 2.0,
                ..ok.clone()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..ok.clone()
            },
            SamplingParams {
                presence_penalty: 3.0,
                ..ok.clone()
            },
            SamplingParams {
                frequency_penalty: -3.0,
                ..ok.clone()
            },
            SamplingParams {
                repeat_last_n: -2,
                ..ok.clone()
            },
        ];
        for p in bad {
            assert!(check_sampling(&p, &OPENAI_NAMES).is_err(), "{p:?}");
        }
        let edges = SamplingParams {
            temperature: 2.0,
            top_p: 0.0,
            min_p: 1.0,
            presence_penalty: -2.0,
            repeat_last_n: -1,
            ..ok.clone()
        };
        assert!(check_sampling(&edges, &OPENAI_NAMES).is_ok());
    }

    #[test]
    fn stop_limits() {
        assert!(check_stop(&vec!["x".to_string(); MAX_STOP_STRINGS]).is_ok());
        assert!(check_stop(&vec!["x".to_string(); MAX_STOP_STRINGS + 1]).is_err());
        assert!(check_stop(&["y".repeat(MAX_STOP_BYTES + 1)]).is_err());
    }
}
