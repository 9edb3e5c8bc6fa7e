//! Fuzz chat-template rendering: a template taken from a model file is hostile input. Any
//! template source with any messages must render or fail with an error within the render
//! limits (no panic, hang or runaway allocation), and when content is located its spans must
//! point at message content.
//!
//! Input: template source, then messages separated by U+0001; a message's first character
//! picks its role.
#![no_main]

use ember_text::chat::{BuiltinTemplate, ChatMessage, ChatTemplate, RenderLimits, detect_builtin};
use libfuzzer_sys::fuzz_target;

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{1}');
    let src = parts.next().unwrap_or("");
    let messages: Vec<ChatMessage> = parts
        .take(16)
        .map(|p| {
            let mut chars = p.chars();
            let role = chars.next().map_or(0, |c| c as usize) % ROLES.len();
            ChatMessage::new(ROLES[role], chars.as_str())
        })
        .collect();
    // Tight limits keep each run fast; they are the same code paths as the defaults.
    let limits = RenderLimits {
        fuel: 50_000,
        recursion_limit: 100,
        max_output_bytes: 1 << 20,
        max_filter_size: 10_000,
    };
    if let Ok(t) = ChatTemplate::with_limits(src, "<s>", "</s>", limits) {
        exercise(&t, &messages);
    }
    if let Some(b) = detect_builtin(src) {
        exercise(&ChatTemplate::from_builtin(b), &messages);
    }
    let b = BuiltinTemplate::ALL[data.len() % BuiltinTemplate::ALL.len()];
    exercise(&ChatTemplate::from_builtin(b), &messages);
});

fn exercise(t: &ChatTemplate, messages: &[ChatMessage]) {
    for add_gen in [false, true] {
        let Ok(plain) = t.render(messages, add_gen) else {
            continue;
        };
        let Ok(r) = t.render_with_spans(messages, add_gen, false) else {
            // Limits are per render: the placeholder render may run out where the real one
            // did not. Anything else must not fail once the real render worked.
            continue;
        };
        assert_eq!(r.text, plain, "render_with_spans changed the text");
        if let Some(spans) = &r.content_spans {
            let mut last = 0;
            for s in spans {
                assert!(s.start < s.end && s.start >= last && s.end <= r.text.len());
                let piece = r.text.get(s.clone()).expect("span not on char boundaries");
                assert!(
                    messages.iter().any(|m| m.content.contains(piece)),
                    "span {piece:?} is not message content"
                );
                last = s.end;
            }
        }
        let _ = t.render_for_tokenizer(messages, add_gen, true);
    }
}
