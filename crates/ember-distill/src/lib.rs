//! Distillation: a small, fast student that learns a teacher's output distribution (issue #17).
//!
//! This crate holds the differentiable side of it, written with plain burn ops so that burn's
//! autodiff can train it (Ember's fused inference kernels have no backward pass):
//!
//! - [`Student`]: the llama architecture as a burn [`Module`](burn::module::Module) — token
//!   embedding, RMSNorm, RoPE attention with GQA, SwiGLU feed-forward, tied or separate
//!   head — computing what `ember-models`' inference model computes, in f32.
//! - [`Student::from_teacher`]: a student made of chosen layers of a GGUF teacher (embeddings,
//!   norms, head and those blocks copied, dequantized to f32).
//! - [`kl_topk`]: the loss, KL divergence to the teacher's top-k distribution ([`TopK`], what
//!   is cached so training never runs the teacher) at a temperature.
//! - [`WarmupCosine`] (the learning-rate schedule) and [`save_checkpoint`] /
//!   [`load_checkpoint`] (parameters, AdamW state and step: a resumed run continues bit for
//!   bit).
//! - [`TeacherCache`]: token chunks with the teacher's top-k at every position, computed once
//!   by Ember's inference model and cached on disk; [`train`]: AdamW on burn's autodiff with
//!   the schedule, accumulation, a seeded data order, checkpoints and resume.
//! - [`Job`]: a whole run as `ember distill` does it (text files and the teacher's own
//!   generations from [`corpus`], the cache, the student, training with checkpoints and
//!   resume, the export and the [`report`]).
//! - [`export_gguf`]: the student as a GGUF that Ember and llama.cpp load: the teacher's
//!   metadata (tokenizer, chat template) with the student's layer count, its tensors in the
//!   teacher's names and layout.

mod checkpoint;
pub mod corpus;
mod data;
mod error;
mod export;
mod job;
mod loss;
pub mod report;
mod schedule;
mod student;
mod trainer;

pub use checkpoint::{check_checkpoint_dir, checkpoint_manifest, load_checkpoint, save_checkpoint};
pub use data::{Fnv, TeacherCache, teacher_id};
pub use error::DistillError;
pub use export::{ExportType, export_gguf};
pub use job::{Event, Job, Layers, Outcome, TrainSettings};
pub use loss::{TopK, kl_topk};
pub use schedule::WarmupCosine;
pub use student::{Student, StudentConfig};
pub use trainer::{StepReport, TrainConfig, train};
