//! Fuzz request parsing and validation of the OpenAI routes: any body must give a parsed,
//! validated request or an `ApiError` that is a 4xx with a message, never a panic; and the
//! `Host` parser must never panic and only return clean lower-case names.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ctx = 1 + (data.first().copied().unwrap_or(0) as usize) * 37;
    if let Err(e) = ember_server::fuzzing::validate_openai_request(data, ctx) {
        assert!(e.status.is_client_error(), "{}: {}", e.status, e.message);
        assert!(!e.message.is_empty());
    }
    if let Ok(s) = std::str::from_utf8(data)
        && let Some(name) = ember_server::fuzzing::host_name(s)
    {
        assert!(!name.is_empty());
        assert_eq!(name, name.to_ascii_lowercase());
    }
});
