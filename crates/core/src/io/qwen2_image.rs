//! Qwen2-VL's image preprocessing, equal to transformers' `Qwen2VLImageProcessorPil`
//! (`models/qwen2_vl/image_processing_pil_qwen2_vl.py`, transformers 5.24): the image resized
//! (Pillow's bicubic, [`Rgb8::resize_bicubic`]) to `smart_resize`'s size — both sides multiples of
//! `patch_size · merge_size`, the pixel count within `[min_pixels, max_pixels]`, the aspect ratio
//! kept as closely as that allows — then rescaled and normalized, and cut into
//! `patch_size × patch_size` patches ordered merge block by merge block, each patch repeated
//! `temporal_patch_size` times (a still image is a clip of identical frames), flattened to
//! `[patches, channels · temporal · patch²]`. The number of patches follows the image's size.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::config::{read_json_object, Fields};
use crate::io::image::{PixelScaling, Rgb8};

/// One image's (or video's) patch grid: temporal, height and width patches (transformers'
/// `image_grid_thw` row).
pub type GridThw = [i64; 3];

/// `preprocessor_config.json` of a Qwen2-VL image processor.
#[derive(Clone, Debug, PartialEq)]
pub struct Qwen2ImageConfig {
    pub patch_size: i64,
    pub merge_size: i64,
    pub temporal_patch_size: i64,
    /// `size.shortest_edge` (older files: `min_pixels`): the fewest pixels after resizing.
    pub min_pixels: i64,
    /// `size.longest_edge` (older files: `max_pixels`): the most pixels after resizing.
    pub max_pixels: i64,
    pub do_resize: bool,
    pub scaling: PixelScaling,
}

impl Qwen2ImageConfig {
    /// With transformers' defaults; errors name the file and the key.
    pub fn from_json(path: &Path) -> Result<Self> {
        let root = read_json_object(path)?;
        let f = Fields::new(path, "", &root);
        let scaling = PixelScaling::from_config(path, &root)?;
        let (min_pixels, max_pixels) = match f.object("size")? {
            Some(m) => {
                let s = Fields::new(path, "size.", m);
                (s.positive("shortest_edge", None)?, s.positive("longest_edge", None)?)
            }
            None => (
                f.positive("min_pixels", Some(56 * 56))?,
                f.positive("max_pixels", Some(28 * 28 * 1280))?,
            ),
        };
        if min_pixels > max_pixels {
            return Err(Error::config(
                path,
                "size",
                format!("shortest_edge {min_pixels} is above longest_edge {max_pixels}"),
            ));
        }
        Ok(Self {
            patch_size: f.positive("patch_size", Some(14))?,
            merge_size: f.positive("merge_size", Some(2))?,
            temporal_patch_size: f.positive("temporal_patch_size", Some(2))?,
            min_pixels,
            max_pixels,
            do_resize: f.boolean("do_resize", true)?,
            scaling,
        })
    }
}

/// transformers' `smart_resize(height, width, factor, min_pixels, max_pixels)`: `(height, width)`
/// after resizing, both multiples of `factor`. Python's `round` (half to even), `floor` and
/// `ceil` on f64, as there. An error for an aspect ratio above 200, as there.
pub fn smart_resize(
    height: i64,
    width: i64,
    factor: i64,
    min_pixels: i64,
    max_pixels: i64,
) -> Result<(i64, i64)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if height <= 0 || width <= 0 || h.max(w) / h.min(w) > 200.0 {
        return Err(Error::Invalid(format!(
            "image {width}×{height}: the aspect ratio must be below 200 (transformers' smart_resize)"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() as i64 * factor;
    let mut w_bar = (w / f).round_ties_even() as i64 * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as i64 * factor);
        w_bar = factor.max((w / beta / f).floor() as i64 * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() as i64 * factor;
        w_bar = (w * beta / f).ceil() as i64 * factor;
    }
    Ok((h_bar, w_bar))
}

#[derive(Clone, Debug)]
pub struct Qwen2ImageProcessor {
    pub cfg: Qwen2ImageConfig,
}

impl Qwen2ImageProcessor {
    pub fn new(cfg: Qwen2ImageConfig) -> Self {
        Self { cfg }
    }

    /// One image's patches `[patches, 3 · temporal · patch²]` (f32) and its grid `(1, h, w)` in
    /// patches.
    pub fn preprocess(&self, image: &Rgb8) -> Result<(Tensor, GridThw)> {
        let c = &self.cfg;
        let factor = c.patch_size * c.merge_size;
        let img = if c.do_resize {
            let (h, w) = smart_resize(
                i64::from(image.height),
                i64::from(image.width),
                factor,
                c.min_pixels,
                c.max_pixels,
            )?;
            image.resize_bicubic(w as u32, h as u32)
        } else {
            image.clone()
        };
        let (h, w) = (i64::from(img.height), i64::from(img.width));
        if h % factor != 0 || w % factor != 0 {
            return Err(Error::Invalid(format!(
                "image {w}×{h} (not resized): both sides must be multiples of patch_size · merge_size = {factor}"
            )));
        }
        // In f64 and then f32, as the PIL backend's numpy arithmetic runs.
        let mut x =
            Tensor::from_slice(&img.data).view([h, w, 3]).permute([2, 0, 1]).to_kind(Kind::Double);
        let sc = &c.scaling;
        if sc.do_rescale {
            x *= sc.rescale_factor;
        }
        if sc.do_normalize {
            let mean = Tensor::from_slice(&sc.image_mean).view([3, 1, 1]);
            let std = Tensor::from_slice(&sc.image_std).view([3, 1, 1]);
            x = (x - mean) / std;
        }
        let x = x.to_kind(Kind::Float);
        let (p, m, t) = (c.patch_size, c.merge_size, c.temporal_patch_size);
        let (gh, gw) = (h / p, w / p);
        // [C, gh/m, m, p, gw/m, m, p] → [gh/m, gw/m, m, m, C, p, p], the frame repeated t times.
        let patches = x
            .view([3, gh / m, m, p, gw / m, m, p].as_slice())
            .permute([1, 4, 2, 5, 0, 3, 6])
            .unsqueeze(5)
            .expand([gh / m, gw / m, m, m, 3, t, p, p].as_slice(), false)
            .reshape([gh * gw, 3 * t * p * p]);
        Ok((patches, [1, gh, gw]))
    }

    /// Several images: their patches one after the other and their grids.
    pub fn preprocess_all(&self, images: &[Rgb8]) -> Result<(Tensor, Vec<GridThw>)> {
        let mut patches = Vec::with_capacity(images.len());
        let mut grids = Vec::with_capacity(images.len());
        for image in images {
            let (p, g) = self.preprocess(image)?;
            patches.push(p);
            grids.push(g);
        }
        Ok((Tensor::cat(&patches, 0), grids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_transformers_on_hand_checked_cases() {
        // round(60/28) = 2, round(70/28) = round(2.5) = 2 (half to even): 56 × 56 = 3136 ≥ min.
        assert_eq!(smart_resize(60, 70, 28, 3136, 50176).ok(), Some((56, 56)));
        // 90/28 = 3.2 → 84, 130/28 = 4.6 → 140.
        assert_eq!(smart_resize(90, 130, 28, 3136, 50176).ok(), Some((84, 140)));
        // Too small: beta = sqrt(3136 / 400) = 2.8, ceil(20 · 2.8 / 28) = 2 → 56 × 56.
        assert_eq!(smart_resize(20, 20, 28, 3136, 50176).ok(), Some((56, 56)));
        // Too large: 1000 × 1000 over 50176 pixels: beta = sqrt(1e6 / 50176) ≈ 4.464,
        // floor(1000 / 4.464 / 28) = 8 → 224 × 224.
        assert_eq!(smart_resize(1000, 1000, 28, 3136, 50176).ok(), Some((224, 224)));
        assert!(smart_resize(1, 201, 28, 3136, 50176).is_err());
    }
}
