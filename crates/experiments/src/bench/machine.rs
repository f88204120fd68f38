//! The machine a bench ran on (CPU model, cores, threads, RAM, libtorch), its process memory
//! (`VmRSS` from `/proc/self/status`) and its memory bandwidth: the roof (a pure streaming read
//! on the kernels' thread team), and two secondary references (a large tensor copy, an f32 GEMV).

use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// What a reader needs to place the numbers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub cpu_model: String,
    /// Logical CPUs the process may use.
    pub cores: usize,
    /// libtorch intra-op threads during the run.
    pub threads: i32,
    pub ram_bytes: u64,
    /// The ISA extensions that decide the CPU kernels' paths (present ones only).
    pub isa: Vec<String>,
    pub libtorch: String,
    pub device: String,
    /// The memory roof at the start of the run: best streaming-read rate (bytes read per second
    /// by a vectorised sum on the kernels' thread team, [`read_roof`]). Each row also measures it
    /// before and after itself; the row's `% of roof` uses those.
    pub roof_bytes_per_s: f64,
    /// Best copy bandwidth (bytes read + written per second; STREAM's convention). Secondary: a
    /// copy also reads each target line before writing it, so it moves more bytes than it is
    /// credited with, and a decode can exceed it.
    pub copy_bytes_per_s: f64,
    /// Best rate of an f32 GEMV (libtorch `linear` of one vector) over the same bytes. Secondary:
    /// compute-bound on some CPUs (19.0 GB/s against a 31.5 GB/s read roof on an AMD EPYC).
    pub gemv_bytes_per_s: f64,
    /// Size of the measured buffers.
    pub bandwidth_tensor_bytes: i64,
}

/// What [`bandwidth`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bandwidth {
    /// Bytes read per second by a streaming read ([`read_roof`]).
    pub roof: f64,
    /// Bytes read + written per second by a copy.
    pub copy: f64,
    /// Bytes read per second by an f32 GEMV over the same tensor.
    pub gemv: f64,
    pub tensor_bytes: i64,
}

impl Machine {
    /// One line for tables and logs.
    pub fn describe(&self) -> String {
        format!(
            "{} — {} cores, {} libtorch threads, {:.1} GiB RAM, ISA [{}], libtorch {}, device {}; memory roof {:.1} GB/s (streaming read of {} MiB at the start; each row measures it again before and after itself); secondary: {:.1} GB/s by copy (read + written), {:.1} GB/s by an f32 GEMV",
            self.cpu_model,
            self.cores,
            self.threads,
            self.ram_bytes as f64 / GIB,
            self.isa.join(" "),
            self.libtorch,
            self.device,
            self.roof_bytes_per_s / 1e9,
            self.bandwidth_tensor_bytes >> 20,
            self.copy_bytes_per_s / 1e9,
            self.gemv_bytes_per_s / 1e9,
        )
    }
}

/// Columns of the matrix the read bandwidth multiplies (LLaMA-7B's hidden size).
const GEMV_COLS: i64 = 4096;

pub const GIB: f64 = (1u64 << 30) as f64;

/// ISA flags of `/proc/cpuinfo` worth recording: they pick libtorch's bf16/int8 CPU paths.
const ISA_FLAGS: [&str; 9] = [
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
];

/// Describes this machine; the bandwidth is measured by [`bandwidth`] and passed in.
pub fn describe(device: Device, bandwidth: Bandwidth) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let flags: Vec<&str> = flags.split_whitespace().collect();
    Machine {
        cpu_model: field("model name").unwrap_or_else(|| "unknown CPU".into()),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        threads: tch::get_num_threads(),
        ram_bytes: meminfo("MemTotal").unwrap_or(0),
        isa: ISA_FLAGS.iter().filter(|f| flags.contains(f)).map(|f| f.to_string()).collect(),
        libtorch: qvlm_core::device::libtorch_version(),
        device: format!("{device:?}"),
        roof_bytes_per_s: bandwidth.roof,
        copy_bytes_per_s: bandwidth.copy,
        gemv_bytes_per_s: bandwidth.gemv,
        bandwidth_tensor_bytes: bandwidth.tensor_bytes,
    }
}

/// A `/proc/meminfo` field in bytes (`MemTotal`, `MemAvailable`).
pub fn meminfo(key: &str) -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

/// This process's resident memory (`VmRSS`) in bytes.
pub fn rss_bytes() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, "VmRSS")
}

/// This process's peak resident memory (`VmHWM`) in bytes, since it started or since the last
/// [`reset_peak_rss`].
pub fn peak_rss_bytes() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, "VmHWM")
}

/// Resets `VmHWM` to the current `VmRSS` (Linux ≥ 4.0: writing `5` to `/proc/self/clear_refs`),
/// so that the next [`peak_rss_bytes`] is the peak of what runs in between. An error where the
/// kernel refuses it: a peak that silently included earlier work would be a wrong number.
pub fn reset_peak_rss() -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::write("/proc/self/clear_refs", "5")
        .context("resetting the peak resident memory (writing 5 to /proc/self/clear_refs)")
}

/// `Key:   123 kB` → 123 · 1024.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Waits for queued device work (CUDA runs asynchronously; the CPU does not).
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The memory roof: the best of `repeats` streaming reads of `bytes` (after one untimed pass). On
/// the CPU a vectorised sum on the kernels' own thread team
/// ([`qvlm_core::quant::team::read_bandwidth`]); on CUDA a `sum` of a device tensor.
pub fn read_roof(device: Device, bytes: i64, repeats: usize) -> Result<f64> {
    if device == Device::Cpu {
        let bytes = usize::try_from(bytes).context("roof buffer size")?;
        return Ok(qvlm_core::quant::team::read_bandwidth(bytes, repeats));
    }
    let _guard = tch::no_grad_guard();
    let n = (bytes / 4).max(1);
    let t = Tensor::f_ones([n], (Kind::Float, device)).context("allocating the roof buffer")?;
    let _ = t.f_sum(Kind::Float).context("summing")?;
    sync(device);
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let _ = t.f_sum(Kind::Float).context("summing")?;
        sync(device);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok((n * 4) as f64 / best)
}

/// Memory bandwidth: the roof ([`read_roof`]), then the best of `repeats` copies of a `bytes`-sized f32 tensor into another
/// (one untimed copy first touches the pages), counted as bytes read + bytes written per second
/// (STREAM's copy convention); and the best of `repeats` products of the same bytes, viewed as an
/// f32 `[rows, 4096]` matrix, with one vector (bytes read: a decode step at the memory bound).
pub fn bandwidth(device: Device, bytes: i64, repeats: usize) -> Result<Bandwidth> {
    let _guard = tch::no_grad_guard();
    let n = (bytes / 4 / GEMV_COLS).max(1) * GEMV_COLS;
    let src = Tensor::f_ones([n], (Kind::Float, device)).context("allocating the source")?;
    let mut dst = Tensor::f_zeros([n], (Kind::Float, device)).context("allocating the target")?;
    dst.f_copy_(&src).context("copying")?;
    sync(device);
    let best = |op: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let t = Instant::now();
            op()?;
            sync(device);
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let copy = best(&mut || dst.f_copy_(&src).map(|_| ()).context("copying"))?;
    let matrix = src.view([n / GEMV_COLS, GEMV_COLS]);
    let x = Tensor::f_ones([1, GEMV_COLS], (Kind::Float, device)).context("allocating")?;
    let gemv = best(&mut || x.f_linear(&matrix, None::<Tensor>).map(|_| ()).context("GEMV"))?;
    drop((src, dst));
    let tensor_bytes = n * 4;
    Ok(Bandwidth {
        roof: read_roof(device, tensor_bytes, repeats)?,
        copy: 2.0 * tensor_bytes as f64 / copy,
        gemv: tensor_bytes as f64 / gemv,
        tensor_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_fields_parse() {
        let text = "Name:\tx\nVmRSS:\t  2048 kB\nVmHWM:\t 4096 kB\n";
        assert_eq!(kib_field(text, "VmRSS"), Some(2 * 1024 * 1024));
        assert_eq!(kib_field(text, "VmSwap"), None);
    }
}
