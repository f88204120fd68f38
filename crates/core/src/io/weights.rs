//! Strict weight loading in the style of candle's `VarBuilder`: modules ask for tensors by their
//! canonical name and exact shape under a scoped prefix; a [`Naming`] maps canonical names to the
//! keys a checkpoint layout stores; afterwards every stored tensor that no module asked for is an
//! error, so missing, extra and wrongly shaped tensors are all reported by name.
//!
//! A second backend creates freshly initialised trainable variables instead (for training the
//! embedded tiny LLaVA), so there is one model definition for loading and for training.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::rc::Rc;

use tch::{Device, Kind, Tensor};

use crate::quant::packed::PackedWeight;

use crate::error::{Error, Result};
use crate::io::compressed::{module_names, read_layer, CompressedConfig};
use crate::io::naming::Naming;
use crate::io::shards::ShardSet;

/// How a freshly created variable is initialised (ignored when loading a checkpoint).
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal { std: f64 },
    Ones,
    Zeros,
}

/// Where weights come from.
enum Backend {
    /// Stored checkpoints (one or more shard sets, e.g. original LLaVA + its CLIP directory).
    /// `compressed`: a compressed-tensors checkpoint's `quantization_config` and the
    /// `config.json` it came from; the linears it covers load packed.
    Checkpoint {
        stores: Vec<ShardSet>,
        naming: Naming,
        used: RefCell<BTreeSet<(usize, String)>>,
        compressed: Option<Box<(CompressedConfig, PathBuf)>>,
    },
    /// Fresh trainable variables (seeded by libtorch's generator), kept in creation order.
    Init { created: RefCell<Vec<(String, Tensor)>> },
}

struct Shared {
    backend: Backend,
    device: Device,
    kind: Kind,
}

/// Scoped access to named weights (`vb.pp("layers").pp(3).get(..)`).
#[derive(Clone)]
pub struct VarBuilder {
    shared: Rc<Shared>,
    prefix: Vec<String>,
}

impl std::fmt::Debug for VarBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VarBuilder({})", self.prefix.join("."))
    }
}

impl VarBuilder {
    /// Weights read from checkpoint stores through `naming`, cast to `kind` on `device`.
    pub fn from_checkpoint(
        stores: Vec<ShardSet>,
        naming: Naming,
        device: Device,
        kind: Kind,
    ) -> Self {
        Self::from_compressed_checkpoint(stores, naming, None, device, kind)
    }

    /// As [`VarBuilder::from_checkpoint`], for a checkpoint whose linears may be stored in
    /// compressed-tensors form (`compressed`: its `quantization_config` and `config.json` path):
    /// [`VarBuilder::compressed_linear`] reads those.
    pub fn from_compressed_checkpoint(
        stores: Vec<ShardSet>,
        naming: Naming,
        compressed: Option<(CompressedConfig, PathBuf)>,
        device: Device,
        kind: Kind,
    ) -> Self {
        let used = RefCell::new(BTreeSet::new());
        let compressed = compressed.map(Box::new);
        let backend = Backend::Checkpoint { stores, naming, used, compressed };
        Self { shared: Rc::new(Shared { backend, device, kind }), prefix: vec![] }
    }

    /// The packed weight `[out, in]` of the linear at this scope when the checkpoint is a
    /// compressed-tensors one and a config group quantizes it (its tensors are then marked
    /// used); `None` for a float linear. `layer` names it in errors.
    pub fn compressed_linear(
        &self,
        out: i64,
        inp: i64,
        layer: &str,
    ) -> Result<Option<PackedWeight>> {
        let Backend::Checkpoint { stores, naming, used, compressed: Some(compressed) } =
            &self.shared.backend
        else {
            return Ok(None);
        };
        let (cfg, config_file) = &**compressed;
        let canonical = self.path();
        let Some(group) = cfg.group_of(&module_names(&canonical), config_file)? else {
            return Ok(None);
        };
        let format = cfg.group_format(&group, config_file)?;
        let (store, weight_key) = naming.stored_key(&format!("{canonical}.weight"));
        let set = stores.get(store).ok_or_else(|| {
            Error::Invalid(format!("naming maps `{canonical}` to missing store {store}"))
        })?;
        let file = set.file_of(&weight_key);
        let mut read = |suffix: &str| -> Result<Option<Tensor>> {
            let key = naming.stored_key(&format!("{canonical}.{suffix}")).1;
            if !set.contains(&key) {
                return Ok(None);
            }
            let t = set.read(&key)?;
            used.borrow_mut().insert((store, key));
            Ok(Some(t))
        };
        let packed = read_layer(
            format,
            out,
            inp,
            &mut read,
            self.shared.kind,
            self.shared.device,
            layer,
            &file,
        )?;
        Ok(Some(packed))
    }

    /// Fresh trainable variables, initialised as each module asks (for training from scratch).
    /// Call `tch::manual_seed` first for a reproducible initialisation.
    pub fn fresh(device: Device, kind: Kind) -> Self {
        let backend = Backend::Init { created: RefCell::new(Vec::new()) };
        Self { shared: Rc::new(Shared { backend, device, kind }), prefix: vec![] }
    }

    /// The variables a `fresh` builder created, by canonical name, in creation order.
    pub fn created_variables(&self) -> Vec<(String, Tensor)> {
        match &self.shared.backend {
            Backend::Init { created } => {
                created.borrow().iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
            }
            Backend::Checkpoint { .. } => vec![],
        }
    }

    /// A builder one level deeper.
    pub fn pp(&self, segment: impl ToString) -> Self {
        let mut prefix = self.prefix.clone();
        prefix.push(segment.to_string());
        Self { shared: self.shared.clone(), prefix }
    }

    pub fn device(&self) -> Device {
        self.shared.device
    }

    pub fn kind(&self) -> Kind {
        self.shared.kind
    }

    /// The canonical name of this scope (`language_model.layers.3.self_attn.q_proj`): modules
    /// keep it, so that naming and saving reuse the names loading asked for.
    pub fn path(&self) -> String {
        self.prefix.join(".")
    }

    fn canonical(&self, name: &str) -> String {
        let mut parts = self.prefix.clone();
        parts.push(name.to_string());
        parts.join(".")
    }

    /// The tensor `name` under this prefix, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[i64], init: Init) -> Result<Tensor> {
        let canonical = self.canonical(name);
        match &self.shared.backend {
            Backend::Checkpoint { stores, naming, used, .. } => {
                let (store, key) = naming.stored_key(&canonical);
                let set = stores.get(store).ok_or_else(|| {
                    Error::Invalid(format!("naming maps `{canonical}` to missing store {store}"))
                })?;
                let file = set.file_of(&key);
                let Some(found) = set.shape(&key) else {
                    return Err(Error::MissingTensor { name: key, file, expected: shape.to_vec() });
                };
                if found != shape {
                    return Err(Error::ShapeMismatch {
                        name: key,
                        file,
                        expected: shape.to_vec(),
                        found,
                    });
                }
                let tensor = set.read(&key)?;
                used.borrow_mut().insert((store, key));
                Ok(tensor.to_kind(self.shared.kind).to_device(self.shared.device))
            }
            Backend::Init { created } => {
                let options = (self.shared.kind, self.shared.device);
                let value = match init {
                    Init::Normal { std } => Tensor::f_randn(shape, options)? * std,
                    Init::Ones => Tensor::f_ones(shape, options)?,
                    Init::Zeros => Tensor::f_zeros(shape, options)?,
                };
                let var = value.set_requires_grad(true);
                created.borrow_mut().push((canonical, var.shallow_clone()));
                Ok(var)
            }
        }
    }

    /// Whether the checkpoint stores `name` under this prefix (always false for fresh variables).
    pub fn contains(&self, name: &str) -> bool {
        let canonical = self.canonical(name);
        match &self.shared.backend {
            Backend::Checkpoint { stores, naming, .. } => {
                let (store, key) = naming.stored_key(&canonical);
                stores.get(store).is_some_and(|s| s.contains(&key))
            }
            Backend::Init { .. } => false,
        }
    }

    /// After the model is built: every stored tensor must have been used, except keys the naming
    /// declares as ignorable (derived buffers, CLIP's text tower in a CLIPModel checkpoint).
    pub fn finish(&self) -> Result<()> {
        let Backend::Checkpoint { stores, naming, used, .. } = &self.shared.backend else {
            return Ok(());
        };
        let used = used.borrow();
        for (i, set) in stores.iter().enumerate() {
            let unused: Vec<&str> = set
                .keys()
                .filter(|k| !used.contains(&(i, k.to_string())) && !naming.ignorable(i, k))
                .collect();
            if !unused.is_empty() {
                let shown: Vec<&str> = unused.iter().take(20).copied().collect();
                let more = if unused.len() > 20 {
                    format!(" … and {} more", unused.len() - 20)
                } else {
                    String::new()
                };
                return Err(Error::UnusedTensors {
                    file: set.file_of(unused[0]),
                    count: unused.len(),
                    names: format!("{}{more}", shown.join(", ")),
                });
            }
        }
        Ok(())
    }
}
