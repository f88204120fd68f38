//! Device and dtype choices, parsed once at the binary's edge and passed down.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::error::{Error, Result};

/// Where tensors live. `Auto` picks CUDA device 0 when libtorch sees one, else the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSpec {
    Cpu,
    Cuda,
    #[default]
    Auto,
}

impl DeviceSpec {
    /// Resolves to a concrete libtorch device; `Cuda` without a GPU is an error, not a silent CPU run.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceSpec::Cuda => {
                Err(Error::Invalid("device = \"cuda\" but libtorch sees no CUDA device".into()))
            }
            DeviceSpec::Auto => Ok(Device::cuda_if_available()),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda),
            "auto" => Ok(DeviceSpec::Auto),
            other => Err(Error::Invalid(format!("unknown device `{other}` (cpu, cuda, auto)"))),
        }
    }
}

/// Floating-point dtype of a model's weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::Bf16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            "f16" | "float16" => Ok(DType::F16),
            other => Err(Error::Invalid(format!("unknown dtype `{other}` (f32, bf16, f16)"))),
        }
    }
}

/// Libtorch's version string as the linked library reports it (e.g. "2.13.0").
pub fn libtorch_version() -> String {
    // tch pins the exact libtorch it links (torch-sys checks it at build time).
    "2.13.0".to_string()
}
