//! The search crate's one integration-test binary (each binary links libtorch).

mod search;
