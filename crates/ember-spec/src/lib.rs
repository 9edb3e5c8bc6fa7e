#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod adaptive;
pub mod drafter;
pub mod lookup;
pub mod verify;
pub mod vocab;
