//! Quantizers: the reference fake-quant, uniform grids, activation quantizers (static ranges from
//! the searches, or dynamic), weight quantizers (RTN, NF4, AWQ), packed storage and real low-bit
//! kernels.

pub mod activation;
pub mod bf16_own;
pub mod int4_avx512;
pub mod int4_pairs;
pub mod int4_vnni;
pub mod nf4;
pub mod packed;
pub mod reference;
pub mod spec;
pub mod team;
pub mod uniform;
pub mod weight;
