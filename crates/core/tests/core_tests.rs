//! The core crate's one integration-test binary (each binary links libtorch, so there is one).

mod core;
