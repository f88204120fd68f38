//! Writing and reading whole models, above the model definition: a quantized model in this
//! crate's packed format ([`packed`]) and a float model as a llava-hf directory that transformers
//! loads ([`llava_hf`]). Both walk the model through [`crate::model::llava::Llava::named_tensors`],
//! the names the loaders gave every tensor.

pub mod compressed;
pub mod llava_hf;
pub mod packed;
