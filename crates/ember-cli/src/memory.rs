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
//! A `GLIBC_TUNABLES` naming `glibc.malloc` keeps the user's settings instead.

/// Requests up to this size come from the heaps, and this much free memory may stay at the
/// top of a heap: larger than a prompt batch's buffers of a 1-8B model.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const THRESHOLD: libc::c_int = 64 << 20;

/// Returns the heaps' free memory to the system, then sets the thresholds: call once a model
/// is loaded.
pub fn tune_for_inference() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` only releases free memory; it may be called at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        let user_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc"));
        if !user_set {
            // SAFETY: `mallopt` only changes the allocator's parameters (the values are in
            // their documented ranges), under the allocator's own lock.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
                libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
            }
        }
    }
}
