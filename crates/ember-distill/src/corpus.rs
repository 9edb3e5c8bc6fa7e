//! Where training text comes from: text files tokenized with the teacher's tokenizer, and the
//! teacher's own generations; and which of the teacher's layers a student keeps.

use std::path::Path;

use ember_runtime::chat::{ChatMessage, ChatTemplate};
use ember_runtime::generate::{GenerateRequest, generate};
use ember_runtime::loaded::LoadedModel;
use ember_runtime::sampling::SamplingParams;
use ember_runtime::spec::SpecConfig;

use crate::DistillError;

/// `n` of a teacher's `total` layers, spread evenly with the first and the last included
/// (one layer: the first). `n` must be at least 1 and below `total`: a student as deep as
/// its teacher is no student.
pub fn spread_layers(total: usize, n: usize) -> Result<Vec<usize>, DistillError> {
    if n == 0 || n >= total {
        return Err(DistillError::Layers(format!(
            "a student of {n} layers: it must have at least 1 and fewer than the teacher's {total}"
        )));
    }
    if n == 1 {
        return Ok(vec![0]);
    }
    // Layer i sits at i * (total - 1) / (n - 1), rounded to the nearest.
    Ok((0..n)
        .map(|i| (2 * i * (total - 1) + (n - 1)) / (2 * (n - 1)))
        .collect())
}

/// Checks a chosen layer list against the teacher's `total`: not empty, each layer present,
/// in increasing order without repeats, fewer than `total`.
pub fn check_layers(keep: &[usize], total: usize) -> Result<(), DistillError> {
    if keep.is_empty() || keep.len() >= total {
        return Err(DistillError::Layers(format!(
            "a student of {} layers: it must have at least 1 and fewer than the teacher's {total}",
            keep.len()
        )));
    }
    if let Some(&bad) = keep.iter().find(|&&l| l >= total) {
        return Err(DistillError::Layers(format!(
            "layer {bad} is not among the teacher's {total} (0 to {})",
            total - 1
        )));
    }
    if keep.windows(2).any(|w| w[1] <= w[0]) {
        return Err(DistillError::Layers(format!(
            "{keep:?}: list the layers in increasing order, each once"
        )));
    }
    Ok(())
}

/// Prompts for `--self-generate` when none are given: varied instructions of the kind a chat
/// model is asked, so the teacher's answers cover prose, lists, code and reasoning.
pub const BUILTIN_PROMPTS: &[&str] = &[
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of the seasons on Earth?",
    "Give me five tips for learning a new language.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarize the plot of Romeo and Juliet in a paragraph.",
    "How does a bicycle stay upright when it moves?",
    "Describe the water cycle to a ten-year-old.",
    "What is the difference between a virus and a bacterium?",
    "Write an email asking a colleague to review a report by Friday.",
    "List the planets of the solar system with one fact about each.",
    "Explain what a binary search is and when to use it.",
    "Write a haiku about autumn rain.",
    "Why do we have leap years?",
    "Give a recipe for a simple tomato soup.",
    "What should I pack for a three-day hiking trip?",
    "Explain compound interest with an example.",
    "Write a SQL query that finds the ten customers with the most orders.",
    "What are the benefits of regular exercise?",
    "Describe how a bill becomes a law in a parliamentary system.",
    "Write a limerick about a cat who loves coffee.",
    "How do vaccines train the immune system?",
    "Explain the difference between weather and climate.",
    "Write a JavaScript function that debounces another function.",
    "What makes a good presentation? Give practical advice.",
    "Describe the life cycle of a star.",
    "How can I improve my sleep?",
    "Explain recursion using a real-world analogy.",
    "Write a product description for a reusable water bottle.",
    "What was the Industrial Revolution and why did it matter?",
    "Compare electric cars and petrol cars.",
    "Write a Rust function that reverses the words in a sentence.",
    "How do noise-cancelling headphones work?",
    "Give me a weekly plan for learning to cook.",
    "Explain photosynthesis step by step.",
    "Write a dialogue between a customer and a bookshop owner.",
    "What is machine learning, in simple terms?",
    "How does the internet route a message from one computer to another?",
    "Suggest names for a bakery and explain each one.",
    "What are some good habits for writing clean code?",
];

/// Prompts the report measures the student as a draft on: none of them is among
/// [`BUILTIN_PROMPTS`], so a student trained on the teacher's answers to those is measured on
/// requests it has not seen.
pub const EVAL_PROMPTS: &[&str] = &[
    "Explain how a hash table handles collisions.",
    "Write a short poem about the sea at night.",
    "What are the pros and cons of working from home?",
    "Describe how to change a flat tyre on a car.",
    "Write a C function that counts the set bits in an integer.",
    "Why is the sky blue?",
    "Plan a one-day visit to a museum with children.",
    "Summarize the causes of the First World War.",
];

/// The prompts in a file, one per non-empty line.
pub fn read_prompts(path: &Path) -> Result<Vec<String>, DistillError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DistillError::Data(format!("{}: {e}", path.display())))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        return Err(DistillError::Data(format!(
            "{}: no prompts (one per line)",
            path.display()
        )));
    }
    Ok(prompts)
}

/// Each file's text tokenized by the teacher (as a prompt is: BOS first where the model
/// wants one), one document per file. An empty or unreadable file is an error.
pub fn text_documents(
    teacher: &LoadedModel,
    paths: &[impl AsRef<Path>],
) -> Result<Vec<Vec<u32>>, DistillError> {
    paths
        .iter()
        .map(|p| {
            let p = p.as_ref();
            let bad = |why: String| DistillError::Data(format!("{}: {why}", p.display()));
            let text = std::fs::read_to_string(p).map_err(|e| bad(e.to_string()))?;
            if text.trim().is_empty() {
                return Err(bad("the file is empty".into()));
            }
            teacher
                .tokenize_prompt(&text)
                .map_err(|e| bad(e.to_string()))
        })
        .collect()
}

/// `prompt` as a user turn in `model`'s chat `template` when it has one, else as plain text,
/// tokenized as a prompt.
pub(crate) fn chat_prompt(
    model: &LoadedModel,
    template: Option<&ChatTemplate>,
    prompt: &str,
) -> Result<Vec<u32>, String> {
    match template {
        Some(t) => t
            .render_tokens(
                &model.tokenizer,
                &[ChatMessage::user(prompt)],
                true,
                true,
                None,
            )
            .map_err(|e| e.to_string()),
        None => model.tokenize_prompt(prompt).map_err(|e| e.to_string()),
    }
}

/// A plain generation request: no stop strings, stopping at end-of-generation, the default KV
/// cache, no speculation.
pub(crate) fn request(
    prompt_tokens: Vec<u32>,
    max_tokens: usize,
    ctx_size: usize,
    sampling: SamplingParams,
) -> GenerateRequest {
    GenerateRequest {
        prompt_tokens,
        max_tokens,
        sampling,
        stop: Vec::new(),
        ctx_size,
        stop_at_eog: true,
        context_shift: None,
        kv: Default::default(),
        spec: SpecConfig::default(),
    }
}

/// The teacher's own answers: `n` generations of at most `max_tokens` tokens each, from
/// `prompts` in turn (wrapped in the teacher's chat template where it has one), sampled at
/// temperature 0.8 with seeds `seed, seed + 1, ...` (so the same settings give the same
/// data). Each document is the prompt's tokens followed by the answer's. `progress(done, n)`
/// is called after each; returning `false` stops early with what was made.
pub fn self_generate(
    teacher: &LoadedModel,
    prompts: &[String],
    n: usize,
    max_tokens: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize) -> bool,
) -> Result<Vec<Vec<u32>>, DistillError> {
    if prompts.is_empty() {
        return Err(DistillError::Data("no prompts to generate from".into()));
    }
    let template = teacher.chat_template().ok();
    let ctx = teacher.model.config().context_length;
    let mut docs = Vec::with_capacity(n);
    for i in 0..n {
        let prompt = &prompts[i % prompts.len()];
        let gen_err =
            |why: String| DistillError::Data(format!("generating from {prompt:?}: {why}"));
        let prompt_tokens = chat_prompt(teacher, template.as_ref(), prompt).map_err(gen_err)?;
        let ctx_size = (prompt_tokens.len() + max_tokens).min(ctx);
        let sampling = SamplingParams {
            seed: Some(seed.wrapping_add(i as u64)),
            ..SamplingParams::default()
        };
        let req = request(prompt_tokens, max_tokens, ctx_size, sampling);
        let out = generate(&teacher.model, &teacher.tokenizer, &req, |_| {})
            .map_err(|e| gen_err(e.to_string()))?;
        let mut doc = req.prompt_tokens;
        doc.extend_from_slice(&out.tokens);
        docs.push(doc);
        if !progress(i + 1, n) {
            break;
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_spread_with_both_ends() {
        assert_eq!(
            spread_layers(30, 10).unwrap(),
            [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
        );
        assert_eq!(spread_layers(30, 2).unwrap(), [0, 29]);
        assert_eq!(spread_layers(4, 3).unwrap(), [0, 2, 3]);
        assert_eq!(spread_layers(30, 1).unwrap(), [0]);
        for (total, n) in [(30, 0), (30, 30), (30, 31), (1, 1)] {
            assert!(spread_layers(total, n).is_err(), "{total} {n}");
        }
        for n in 1..30 {
            let l = spread_layers(30, n).unwrap();
            assert!(check_layers(&l, 30).is_ok(), "{n}: {l:?}");
        }
    }

    #[test]
    fn chosen_layers_are_checked() {
        assert!(check_layers(&[0, 5, 9], 10).is_ok());
        for bad in [
            &[][..],
            &[0, 10],
            &[3, 1],
            &[2, 2],
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        ] {
            assert!(check_layers(bad, 10).is_err(), "{bad:?}");
        }
    }
}
