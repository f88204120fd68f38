//! The experiments crate's one integration-test binary (each binary links libtorch).

mod experiments;
