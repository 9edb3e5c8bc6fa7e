//! glibc's allocator, set for inference.
//!
//! A forward pass allocates its activations afresh: each matmul's output of a prompt batch is
//! megabytes (512 rows of SmolLM2's 1536 features: 3 MiB). By default glibc serves such a
//! request with its own `mmap` (or returns the top of its heap to the system once more than
//! 128 KiB is free there), so every pass faulted its buffers in again, page by page: on
//! SmolLM2's 512-token prompt about a tenth of the time went to the kernel's page faults and
//! page clearing (`perf`). With the thresholds below, freed buffers stay in the heaps and the
//! next pass reuses them, as llama.cpp reuses its compute buffer (docs/performance.md:
//! SmolLM2 pp512 +14-18%). The thresholds are set once the model is loaded, after handing
//! back what the load freed: set before it, the load's temporary structures (the tokenizer's
//! build, in threads of their own) stayed in the heaps and raised Gemma 3's peak by 34 MB.
//!
//! A `GLIBC_TUNABLES` naming `glibc.malloc`, or glibc's older `MALLOC_MMAP_THRESHOLD_` /
//! `MALLOC_TRIM_THRESHOLD_`, keeps the user's settings instead.

/// Requests up to this size come from the heaps, and this much free memory may stay at the
/// top of a heap: as large as a prompt batch's buffers of a 1-8B model (the 1B's fused gate
/// and up projections for 512 tokens: 32 MiB; with 32 MiB its prompts ran 9% slower than
/// with 64). glibc before 2.35 refuses an mmap threshold above 32 MiB (`HEAP_MAX_SIZE / 2`),
/// so that is the fallback.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const THRESHOLDS: [libc::c_int; 2] = [64 << 20, 32 << 20];

/// Returns the heaps' free memory to the system, then sets the thresholds: call once a model
/// is loaded.
pub fn tune_for_inference() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` only releases free memory; it may be called at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        let user_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc"))
            || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
            || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some();
        if !user_set {
            // SAFETY: `mallopt` only changes the allocator's parameters, under the allocator's
            // own lock; a value it does not accept is refused (returns 0) and changes nothing.
            let set = |param, value| unsafe { libc::mallopt(param, value) } == 1;
            // Fixing the trim threshold also ends glibc's adaptive thresholds: only do it
            // together with an accepted mmap threshold, so refusals leave glibc as it was.
            if let Some(&t) = THRESHOLDS.iter().find(|&&t| set(libc::M_MMAP_THRESHOLD, t)) {
                set(libc::M_TRIM_THRESHOLD, t);
            }
        }
    }
}
