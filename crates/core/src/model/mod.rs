pub mod clip;
pub mod fused;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod norm;
pub mod outliers;
pub mod projector;
pub mod qwen2_vl;
pub mod rotation;

use tch::{Device, Tensor};

/// SHA-256 over every tensor (canonical name, dtype, shape, then its bytes), in name order: the
/// identity of a model's weights, whatever file layout they came from.
pub fn weights_sha256(mut named: Vec<(String, Tensor)>) -> crate::error::Result<String> {
    use sha2::{Digest, Sha256};
    let _guard = tch::no_grad_guard();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hasher = Sha256::new();
    for (name, t) in named {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        hasher.update(format!("{name}|{:?}|{:?}\n", t.kind(), t.size()).as_bytes());
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let mut buf = vec![0u8; bytes];
        t.f_copy_data_u8(&mut buf, t.numel())?;
        hasher.update(&buf);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
