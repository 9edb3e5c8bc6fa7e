//! Hostile and corrupted input: typed errors, never panics, never allocations that a header
//! merely claims.
//!
//! A counting global allocator records the largest single allocation per thread, so tests can
//! assert that parsing an N-byte input never asks for much more than a small multiple of N.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use common::{Raw, sample_bytes, touch_everything};
use ember_formats::{GgufError, GgufFile, MAX_ARRAY_DEPTH};
use proptest::prelude::*;

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; only records sizes in a const-initialised
// thread-local (no allocation, no panics).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Parse `bytes` and return the result with the largest single allocation made while parsing
/// (excluding the input buffer itself, which is allocated before).
fn parse_measured(bytes: Vec<u8>) -> (Result<GgufFile, GgufError>, usize) {
    LARGEST.with(|l| l.set(0));
    let r = GgufFile::from_bytes(bytes);
    (r, LARGEST.with(|l| l.get()))
}

/// Parse, assert the allocation bound and the time bound, and return the error.
fn expect_err(bytes: Vec<u8>) -> GgufError {
    let len = bytes.len();
    let t = Instant::now();
    let (r, largest) = parse_measured(bytes);
    assert!(t.elapsed() < Duration::from_secs(1), "slow rejection");
    assert!(
        largest <= 16 * len + 4096,
        "allocated {largest} bytes for a {len}-byte input"
    );
    match r {
        Ok(_) => panic!("hostile input accepted"),
        Err(e) => {
            // Display works and says something.
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

const HUGE: u64 = 1 << 60;

#[test]
fn huge_metadata_count_rejected() {
    for n in [HUGE, u64::MAX, 1_000_000] {
        let e = expect_err(Raw::header(3, 0, n).bytes());
        assert!(
            matches!(e, GgufError::CountTooLarge { what: "metadata entry", count, offset: 16, .. } if count == n),
            "{e}"
        );
    }
}

#[test]
fn huge_tensor_count_rejected() {
    for n in [HUGE, u64::MAX, 1_000] {
        let e = expect_err(Raw::header(3, n, 0).bytes());
        assert!(
            matches!(
                e,
                GgufError::CountTooLarge {
                    what: "tensor info",
                    offset: 8,
                    ..
                }
            ),
            "{e}"
        );
    }
}

#[test]
fn huge_array_counts_rejected_for_every_element_type() {
    for elem_type in 0u32..=12 {
        for count in [HUGE, u64::MAX, 1 << 33] {
            let mut r = Raw::header(3, 0, 1);
            r.str("a").u32(9).u32(elem_type).u64(count).zeros(64);
            let e = expect_err(r.bytes());
            assert!(
                matches!(
                    e,
                    GgufError::CountTooLarge {
                        what: "array element",
                        ..
                    }
                ),
                "type {elem_type}: {e}"
            );
            assert!(e.to_string().contains("metadata key \"a\""), "{e}");
        }
    }
}

#[test]
fn huge_nested_array_counts_rejected() {
    let mut r = Raw::header(3, 0, 1);
    // array of 2 arrays, the second claiming 2^60 u64s.
    r.str("n").u32(9).u32(9).u64(2);
    r.u32(4).u64(1).u32(7);
    r.u32(10).u64(HUGE).zeros(64);
    let e = expect_err(r.bytes());
    assert!(
        matches!(e, GgufError::CountTooLarge { count: HUGE, .. }),
        "{e}"
    );
}

#[test]
fn huge_string_lengths_rejected() {
    for len in [HUGE, u64::MAX, 100] {
        // As a key.
        let mut r = Raw::header(3, 0, 1);
        r.u64(len).zeros(20);
        let e = expect_err(r.bytes());
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    what: "metadata key",
                    ..
                }
            ),
            "{e}"
        );
        // As a value.
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(8).u64(len).zeros(20);
        let e = expect_err(r.bytes());
        assert!(
            matches!(e, GgufError::Truncated { needed, .. } if needed == len),
            "{e}"
        );
        // As a tensor name.
        let mut r = Raw::header(3, 1, 0);
        r.u64(len).zeros(30);
        let e = expect_err(r.bytes());
        assert!(
            matches!(
                e,
                GgufError::Truncated {
                    what: "tensor name",
                    ..
                }
            ),
            "{e}"
        );
    }
}

#[test]
fn nesting_depth_limited() {
    let nested = |depth: usize| {
        let mut r = Raw::header(3, 0, 1);
        r.str("deep").u32(9);
        for _ in 1..depth {
            r.u32(9).u64(1);
        }
        r.u32(4).u64(1).u32(42);
        r.bytes()
    };
    let ok = GgufFile::from_bytes(nested(MAX_ARRAY_DEPTH)).unwrap();
    assert!(ok.get_array("deep").is_some());
    let e = expect_err(nested(MAX_ARRAY_DEPTH + 1));
    assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");
    // Very deep nesting must not overflow the stack either.
    let e = expect_err(nested(100_000));
    assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e}");
}

#[test]
fn unknown_value_types_rejected() {
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(13).u32(0);
    let e = expect_err(r.bytes());
    assert!(
        matches!(
            e,
            GgufError::UnknownValueType {
                type_id: 13,
                offset: 33,
                ..
            }
        ),
        "{e}"
    );
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(9).u32(0xdead).u64(0);
    let e = expect_err(r.bytes());
    assert!(
        matches!(
            e,
            GgufError::UnknownValueType {
                type_id: 0xdead,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn invalid_utf8_rejected() {
    let mut r = Raw::header(3, 0, 1);
    r.u64(2).u8(0xff).u8(0xfe).u32(4).u32(1);
    let e = expect_err(r.bytes());
    assert!(
        matches!(
            e,
            GgufError::InvalidUtf8 {
                what: "metadata key",
                offset: 32,
                ..
            }
        ),
        "{e}"
    );
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(9).u32(8).u64(1).u64(1).u8(0xc3);
    let e = expect_err(r.bytes());
    assert!(matches!(e, GgufError::InvalidUtf8 { .. }), "{e}");
}

#[test]
fn duplicate_keys_rejected() {
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("k", 1).kv_u32("k", 2);
    let e = expect_err(r.bytes());
    assert!(
        matches!(e, GgufError::DuplicateKey { ref key, .. } if key == "k"),
        "{e}"
    );
}

fn one_tensor(dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", dims, ty, offset).pad(32).zeros(data);
    r.bytes()
}

#[test]
fn tensor_checks() {
    // Valid baseline (and proof that the allocation counter sees the parser's allocations).
    let (f, largest) = parse_measured(one_tensor(&[8], 0, 0, 32));
    assert!(largest > 0, "allocation counter is not counting");
    let f = f.unwrap();
    assert_eq!(f.tensor_data(&f.tensors()[0]).len(), 32);

    let e = expect_err(one_tensor(&[8], 0, 0, 31));
    assert!(
        matches!(
            e,
            GgufError::TensorOutOfBounds {
                start: 64,
                end: 96,
                file_len: 95,
                ..
            }
        ),
        "{e}"
    );
    let e = expect_err(one_tensor(&[8], 0, u64::MAX - 31, 32));
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
    let e = expect_err(one_tensor(&[8], 0, 4, 64));
    assert!(
        matches!(
            e,
            GgufError::MisalignedTensor {
                offset: 4,
                alignment: 32,
                ..
            }
        ),
        "{e}"
    );
    let e = expect_err(one_tensor(&[8], 5, 0, 32));
    assert!(
        matches!(e, GgufError::UnknownTensorType { type_id: 5, .. }),
        "{e}"
    );
    let e = expect_err(one_tensor(&[8], u32::MAX, 0, 32));
    assert!(matches!(e, GgufError::UnknownTensorType { .. }), "{e}");
    let e = expect_err(one_tensor(&[1 << 32, 1 << 32], 0, 0, 32));
    assert!(matches!(e, GgufError::DimsOverflow { .. }), "{e}");
    let e = expect_err(one_tensor(&[1 << 62, 2], 0, 0, 32));
    assert!(
        matches!(e, GgufError::DimsOverflow { .. }),
        "i64 overflow: {e}"
    );
    // Fits i64 elements but not in bytes.
    let e = expect_err(one_tensor(&[1 << 62], 0, 0, 32));
    assert!(
        matches!(e, GgufError::DimsOverflow { .. }),
        "byte overflow: {e}"
    );
    // Big but representable: out of bounds, not overflow.
    let e = expect_err(one_tensor(&[1 << 40], 0, 0, 32));
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e}");
    let e = expect_err(one_tensor(&[1, 1, 1, 1, 1], 0, 0, 32));
    assert!(
        matches!(
            e,
            GgufError::TooManyDims {
                n_dims: 5,
                limit: 4,
                ..
            }
        ),
        "{e}"
    );
    let mut r = Raw::header(3, 1, 0);
    r.str("t").u32(u32::MAX).zeros(64);
    let e = expect_err(r.bytes());
    assert!(matches!(e, GgufError::TooManyDims { .. }), "{e}");
    // Q4_0 rows must be whole blocks of 32.
    let e = expect_err(one_tensor(&[16, 2], 2, 0, 64));
    assert!(
        matches!(
            e,
            GgufError::NotBlockMultiple {
                dim0: 16,
                block_size: 32,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn duplicate_tensor_names_rejected() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .pad(32)
        .zeros(64);
    let e = expect_err(r.bytes());
    assert!(
        matches!(
            e,
            GgufError::DuplicateTensor {
                first: 0,
                second: 1,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_alignment_rejected() {
    for a in [0u32, 3, 48, u32::MAX] {
        let mut r = Raw::header(3, 0, 1);
        r.kv_u32("general.alignment", a);
        let e = expect_err(r.bytes());
        assert!(matches!(e, GgufError::BadAlignment { .. }), "{a}: {e}");
    }
    let mut r = Raw::header(3, 0, 1);
    r.str("general.alignment").u32(8).str("32");
    let e = expect_err(r.bytes());
    assert!(matches!(e, GgufError::WrongMetaType { .. }), "{e}");
    // Another integer type is accepted.
    let mut r = Raw::header(3, 0, 1);
    r.str("general.alignment").u32(10).u64(64);
    assert_eq!(GgufFile::from_bytes(r.bytes()).unwrap().alignment(), 64);
}

#[test]
fn bad_magic_rejected() {
    for b in [&b""[..], b"G", b"GGU", b"GGML\x03\0\0\0", b"\0\0\0\0"] {
        let e = expect_err(b.to_vec());
        assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
    }
}

/// Bytes up to the end of the last tensor's data: any shorter prefix must be an error, and
/// any longer one (only trailing padding cut) is still valid.
fn required_len(bytes: &[u8]) -> usize {
    let f = GgufFile::from_bytes(bytes.to_vec()).unwrap();
    f.tensors()
        .iter()
        .map(|t| (f.data_offset() + t.offset + t.n_bytes) as usize)
        .max()
        .unwrap_or(0)
}

#[test]
fn every_truncation_is_an_error() {
    let full = sample_bytes();
    let need = required_len(&full);
    assert!(need > 0 && need <= full.len());
    for n in 0..full.len() {
        let prefix = full[..n].to_vec();
        let (r, largest) = parse_measured(prefix);
        assert!(largest <= 16 * n + 4096, "prefix {n}: allocated {largest}");
        match r {
            Ok(f) => {
                assert!(n >= need, "prefix of {n} bytes (< {need}) accepted");
                touch_everything(&f);
            }
            Err(e) => {
                assert!(n < need, "prefix of {n} bytes (>= {need}) rejected: {e}");
            }
        }
    }
}

fn check_no_panic(bytes: Vec<u8>) {
    let len = bytes.len();
    let (r, largest) = parse_measured(bytes);
    assert!(
        largest <= 16 * len + 4096,
        "allocated {largest} for {len} bytes"
    );
    if let Ok(f) = r {
        touch_everything(&f);
    } else if let Err(e) = r {
        let _ = e.to_string();
    }
}

#[test]
fn every_single_byte_flip_never_panics() {
    let full = sample_bytes();
    let header_len = GgufFile::from_bytes(full.clone()).unwrap().data_offset() as usize;
    for i in 0..header_len {
        for v in [0x00, 0xff, 0x80, 0x01, full[i] ^ 0x01, full[i] ^ 0x40] {
            let mut b = full.clone();
            b[i] = v;
            check_no_panic(b);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_byte_flips_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut b = sample_bytes();
        for (i, v) in flips {
            let i = i.index(b.len());
            b[i] = v;
        }
        if do_cut {
            b.truncate(cut.index(b.len() + 1));
        }
        check_no_panic(b);
    }

    #[test]
    fn random_bytes_never_panic(
        tail in prop::collection::vec(any::<u8>(), 0..512),
        version in 0u32..5,
    ) {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&tail);
        check_no_panic(b);
    }

    #[test]
    fn small_counts_with_random_body_never_panic(
        n_tensors in 0u64..4,
        n_kv in 0u64..6,
        body in prop::collection::vec(prop_oneof![Just(0u8), Just(1), Just(8), Just(9), any::<u8>()], 0..400),
    ) {
        let mut r = Raw::header(3, n_tensors, n_kv);
        r.0.extend_from_slice(&body);
        check_no_panic(r.bytes());
    }
}
