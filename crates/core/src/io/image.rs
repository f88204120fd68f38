//! Image preprocessing equal to transformers' PIL `CLIPImageProcessor` (what LLaVA uses): RGB
//! conversion, shortest-edge bicubic resize (Pillow's exact fixed-point resampler), center crop,
//! rescale, normalize — plus LLaVA-1.5's pad-to-square.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::io::config::{read_json_object, Fields};

/// Images larger than this many pixels are refused (a decompression bomb, not a photo).
pub const MAX_PIXELS: u64 = 64 << 20;

/// How LLaVA fits a non-square image (`image_aspect_ratio`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AspectMode {
    /// Resize the shortest edge, then center-crop (LLaVA-v1.3, llava-hf).
    #[default]
    Crop,
    /// Pad to a square filled with the mean color first (LLaVA-1.5's `pad`).
    Pad,
}

/// `preprocessor_config.json` of a CLIPImageProcessor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub shortest_edge: u32,
    pub do_center_crop: bool,
    pub crop_height: u32,
    pub crop_width: u32,
    #[serde(flatten)]
    pub scaling: PixelScaling,
    pub aspect: AspectMode,
}

/// The rescale and normalize steps every image processor config has (CLIP's and Qwen2-VL's):
/// `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`, with CLIP's mean
/// and standard deviation by default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PixelScaling {
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl PixelScaling {
    /// CLIP's: ×1/255, then OpenAI CLIP's mean and standard deviation.
    pub const CLIP: PixelScaling = PixelScaling {
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        image_mean: OPENAI_CLIP_MEAN,
        image_std: OPENAI_CLIP_STD,
    };

    /// The steps of the preprocessor config `root` (read from `path`), transformers' defaults for
    /// absent keys. Also refuses a `resample` other than bicubic (3), the one filter the shared
    /// resampler reproduces. Errors name the file and the key.
    pub(crate) fn from_config(
        path: &Path,
        root: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        let f = Fields::new(path, "", root);
        if let Ok(name) = f.string("resample", None) {
            return Err(Error::config(
                path,
                "resample",
                format!("expected an integer, found `{name}`"),
            ));
        }
        let resample = f.int("resample", Some(3))?;
        if resample != 3 {
            return Err(Error::config(
                path,
                "resample",
                format!("only bicubic (3) is supported, found {resample}"),
            ));
        }
        let image_std = per_channel(path, root, "image_std", OPENAI_CLIP_STD)?;
        if image_std.iter().any(|&s| s <= 0.0) {
            return Err(Error::config(path, "image_std", "must be positive"));
        }
        Ok(Self {
            do_rescale: f.boolean("do_rescale", true)?,
            rescale_factor: f.float("rescale_factor", 1.0 / 255.0)?,
            do_normalize: f.boolean("do_normalize", true)?,
            image_mean: per_channel(path, root, "image_mean", OPENAI_CLIP_MEAN)?,
            image_std,
        })
    }
}

pub(crate) const OPENAI_CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub(crate) const OPENAI_CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl ImageProcessorConfig {
    /// CLIP's defaults at a given resolution.
    pub fn clip_default(size: u32) -> Self {
        Self {
            do_resize: true,
            shortest_edge: size,
            do_center_crop: true,
            crop_height: size,
            crop_width: size,
            scaling: PixelScaling::CLIP,
            aspect: AspectMode::Crop,
        }
    }

    pub fn from_json(path: &Path) -> Result<Self> {
        let root = read_json_object(path)?;
        let f = Fields::new(path, "", &root);
        let scaling = PixelScaling::from_config(path, &root)?;
        let shortest_edge = match f.object("size")? {
            Some(m) => Fields::new(path, "size.", m).positive("shortest_edge", None)?,
            None => f.positive("size", Some(224))?,
        } as u32;
        let (crop_height, crop_width) = match f.object("crop_size")? {
            Some(m) => {
                let c = Fields::new(path, "crop_size.", m);
                (c.positive("height", None)? as u32, c.positive("width", None)? as u32)
            }
            None => {
                let s = f.positive("crop_size", Some(i64::from(shortest_edge)))? as u32;
                (s, s)
            }
        };
        let aspect = match f.string("image_aspect_ratio", Some("crop"))?.as_str() {
            "pad" => AspectMode::Pad,
            "crop" | "square" | "original" => AspectMode::Crop,
            other => {
                return Err(Error::config(
                    path,
                    "image_aspect_ratio",
                    format!("unknown `{other}` (pad, crop)"),
                ))
            }
        };
        Ok(Self {
            do_resize: f.boolean("do_resize", true)?,
            shortest_edge,
            do_center_crop: f.boolean("do_center_crop", true)?,
            crop_height,
            crop_width,
            scaling,
            aspect,
        })
    }
}

/// A per-channel triple (`image_mean`, `image_std`) of a preprocessor config, `default` when
/// absent; an error naming `path` and `key` otherwise.
pub(crate) fn per_channel(
    path: &Path,
    root: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    default: [f64; 3],
) -> Result<[f64; 3]> {
    match root.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::Array(v)) if v.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, x) in out.iter_mut().zip(v) {
                *o = x.as_f64().ok_or_else(|| {
                    Error::config(path, key, format!("expected numbers, found {x}"))
                })?;
            }
            Ok(out)
        }
        Some(other) => Err(Error::config(path, key, format!("expected 3 numbers, found {other}"))),
    }
}

/// An 8-bit RGB image, row-major, 3 bytes a pixel.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl Rgb8 {
    /// Decodes a PNG/JPEG file; grayscale and RGBA become RGB as `PIL.Image.convert("RGB")`
    /// does (gray replicated, alpha dropped).
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Image { file: path.to_path_buf(), reason };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if bytes.is_empty() {
            return Err(bad("the file is empty".into()));
        }
        let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        if reader.format().is_none() {
            return Err(bad("not a PNG or JPEG image".into()));
        }
        let (w, h) = reader.into_dimensions().map_err(|e| bad(format!("cannot decode: {e}")))?;
        if u64::from(w) * u64::from(h) > MAX_PIXELS {
            return Err(bad(format!("{w}×{h} is larger than the {MAX_PIXELS}-pixel limit")));
        }
        let decoded =
            image::load_from_memory(&bytes).map_err(|e| bad(format!("cannot decode: {e}")))?;
        if decoded.width() == 0 || decoded.height() == 0 {
            return Err(bad("the image has no pixels".into()));
        }
        let rgb = decoded.to_rgb8();
        Ok(Self { width: rgb.width(), height: rgb.height(), data: rgb.into_raw() })
    }

    fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = 3 * (y as usize * self.width as usize + x as usize);
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// LLaVA's `expand2square`: paste centered on a square of `fill`.
    pub fn pad_to_square(&self, fill: [u8; 3]) -> Rgb8 {
        let side = self.width.max(self.height);
        let (ox, oy) = ((side - self.width) / 2, (side - self.height) / 2);
        let mut data: Vec<u8> =
            std::iter::repeat_n(fill, (side * side) as usize).flatten().collect();
        for y in 0..self.height {
            for x in 0..self.width {
                let i = 3 * (((y + oy) * side + x + ox) as usize);
                data[i..i + 3].copy_from_slice(&self.pixel(x, y));
            }
        }
        Rgb8 { width: side, height: side, data }
    }

    /// Pillow's `Image.resize(size, BICUBIC)` for 8-bit RGB, bit for bit.
    pub fn resize_bicubic(&self, width: u32, height: u32) -> Rgb8 {
        resample::resize(self, width, height)
    }

    /// `crop` as transformers' `center_crop` on an image at least as large as the crop.
    pub fn center_crop(&self, width: u32, height: u32) -> Rgb8 {
        // transformers: top = (h - crop_h) // 2, left = (w - crop_w) // 2; pads with zeros when
        // the crop is larger than the image.
        let top = (i64::from(self.height) - i64::from(height)) / 2;
        let left = (i64::from(self.width) - i64::from(width)) / 2;
        let mut data = vec![0u8; (width * height * 3) as usize];
        for y in 0..height as i64 {
            for x in 0..width as i64 {
                let (sx, sy) = (x + left, y + top);
                if sx >= 0 && sy >= 0 && sx < i64::from(self.width) && sy < i64::from(self.height) {
                    let i = 3 * (y as usize * width as usize + x as usize);
                    data[i..i + 3].copy_from_slice(&self.pixel(sx as u32, sy as u32));
                }
            }
        }
        Rgb8 { width, height, data }
    }
}

/// The CLIP preprocessing pipeline.
#[derive(Clone, Debug)]
pub struct ImageProcessor {
    pub cfg: ImageProcessorConfig,
}

impl ImageProcessor {
    pub fn new(cfg: ImageProcessorConfig) -> Self {
        Self { cfg }
    }

    /// Output size of a shortest-edge resize (transformers' `get_resize_output_image_size` with
    /// `default_to_square=False`: the long side is truncated, not rounded).
    fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        let s = self.cfg.shortest_edge;
        if w <= h {
            (s, (u64::from(s) * u64::from(h) / u64::from(w)) as u32)
        } else {
            ((u64::from(s) * u64::from(w) / u64::from(h)) as u32, s)
        }
    }

    /// The processed image as bytes before rescale/normalize (for parity tests).
    pub fn prepare_rgb(&self, image: &Rgb8) -> Rgb8 {
        let mut img = image.clone();
        if self.cfg.aspect == AspectMode::Pad {
            let fill = self.cfg.scaling.image_mean.map(|m| (m * 255.0) as u8);
            img = img.pad_to_square(fill);
        }
        if self.cfg.do_resize {
            let (w, h) = self.resized_size(img.width, img.height);
            img = img.resize_bicubic(w, h);
        }
        if self.cfg.do_center_crop {
            img = img.center_crop(self.cfg.crop_width, self.cfg.crop_height);
        }
        img
    }

    /// `[3, H, W]` f32 pixel values.
    pub fn preprocess(&self, image: &Rgb8) -> Tensor {
        let img = self.prepare_rgb(image);
        let (w, h) = (img.width as i64, img.height as i64);
        let mut x =
            Tensor::from_slice(&img.data).view([h, w, 3]).permute([2, 0, 1]).to_kind(Kind::Float);
        let c = &self.cfg.scaling;
        if c.do_rescale {
            x *= c.rescale_factor;
        }
        if c.do_normalize {
            let mean = Tensor::from_slice(&c.image_mean).to_kind(Kind::Float).view([3, 1, 1]);
            let std = Tensor::from_slice(&c.image_std).to_kind(Kind::Float).view([3, 1, 1]);
            x = (x - mean) / std;
        }
        x
    }

    pub fn preprocess_file(&self, path: &Path) -> Result<Tensor> {
        Ok(self.preprocess(&Rgb8::open(path)?))
    }
}

/// The path a dataset entry names, resolved against its root, for error messages.
pub fn resolve(root: &Path, rel: &str) -> PathBuf {
    root.join(rel)
}

/// Pillow's two-pass convolution resampler (`libImaging/Resample.c`, 8 bits per channel,
/// `PRECISION_BITS = 22`), bicubic filter with a = -0.5.
/// <https://github.com/python-pillow/Pillow/blob/10.4.0/src/libImaging/Resample.c>
mod resample {
    use super::Rgb8;

    const PRECISION_BITS: u32 = 32 - 8 - 2;
    const SUPPORT: f64 = 2.0;

    fn bicubic(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }

    /// Per output pixel: first input index, count, fixed-point weights (`precompute_coeffs` +
    /// `normalize_coeffs_8bpc`).
    fn coefficients(in_size: u32, out_size: u32) -> (usize, Vec<(usize, usize)>, Vec<i32>) {
        let scale = f64::from(in_size) / f64::from(out_size);
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size as usize);
        let mut weights = vec![0i32; ksize * out_size as usize];
        for xx in 0..out_size as usize {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size)) as usize - xmin;
            let mut k: Vec<f64> =
                (0..xmax).map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            for (x, w) in k.iter().enumerate() {
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                weights[xx * ksize + x] =
                    if *w < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
            }
            bounds.push((xmin, xmax));
        }
        (ksize, bounds, weights)
    }

    fn clip8(v: i64) -> u8 {
        (v >> PRECISION_BITS).clamp(0, 255) as u8
    }

    /// Pillow's order of the two passes (observed on Pillow 13.0 against every mix of growing
    /// and shrinking sides, python/gen_qwen2vl_fixtures.py's 130×90 → 140×84 among them): when
    /// the width grows and the height shrinks, the vertical pass runs first; otherwise the
    /// horizontal one does, as `ImagingResampleInner` reads. Each pass rounds to 8 bits, so the
    /// order changes pixels (by up to 17 levels on that image).
    pub(super) fn resize(img: &Rgb8, width: u32, height: u32) -> Rgb8 {
        if width > img.width && height < img.height {
            return horizontal_then_vertical(
                &horizontal_then_vertical(img, img.width, height),
                width,
                height,
            );
        }
        horizontal_then_vertical(img, width, height)
    }

    fn horizontal_then_vertical(img: &Rgb8, width: u32, height: u32) -> Rgb8 {
        let need_h = width != img.width;
        let need_v = height != img.height;
        let (kh, bh, wh) = coefficients(img.width, width);
        let (kv, mut bv, wv) = coefficients(img.height, height);
        let mut cur = img.clone();
        if need_h {
            // Only the rows the vertical pass reads are resampled horizontally.
            let first = bv[0].0;
            let last = bv[bv.len() - 1].0 + bv[bv.len() - 1].1;
            for b in bv.iter_mut() {
                b.0 -= first;
            }
            let rows = last - first;
            let mut out = vec![0u8; rows * width as usize * 3];
            for y in 0..rows {
                for (xx, &(xmin, xmax)) in bh.iter().enumerate() {
                    let k = &wh[xx * kh..xx * kh + xmax];
                    let mut ss = [1i64 << (PRECISION_BITS - 1); 3];
                    for (x, &w) in k.iter().enumerate() {
                        let p = cur.pixel((x + xmin) as u32, (y + first) as u32);
                        for c in 0..3 {
                            ss[c] += i64::from(p[c]) * i64::from(w);
                        }
                    }
                    let o = 3 * (y * width as usize + xx);
                    for c in 0..3 {
                        out[o + c] = clip8(ss[c]);
                    }
                }
            }
            cur = Rgb8 { width, height: rows as u32, data: out };
        }
        if need_v {
            let mut out = vec![0u8; height as usize * cur.width as usize * 3];
            for (yy, &(ymin, ymax)) in bv.iter().enumerate() {
                let k = &wv[yy * kv..yy * kv + ymax];
                for x in 0..cur.width as usize {
                    let mut ss = [1i64 << (PRECISION_BITS - 1); 3];
                    for (y, &w) in k.iter().enumerate() {
                        let p = cur.pixel(x as u32, (y + ymin) as u32);
                        for c in 0..3 {
                            ss[c] += i64::from(p[c]) * i64::from(w);
                        }
                    }
                    let o = 3 * (yy * cur.width as usize + x);
                    for c in 0..3 {
                        out[o + c] = clip8(ss[c]);
                    }
                }
            }
            cur = Rgb8 { width: cur.width, height, data: out };
        }
        cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_to_same_size_is_identity() {
        let img = Rgb8 { width: 3, height: 2, data: (0..18).map(|v| v as u8 * 10).collect() };
        assert_eq!(img.resize_bicubic(3, 2), img);
    }

    #[test]
    fn constant_image_stays_constant_after_resize() {
        let img = Rgb8 { width: 17, height: 9, data: [12u8, 200, 77].repeat(17 * 9) };
        let out = img.resize_bicubic(5, 31);
        assert_eq!(out.data, [12u8, 200, 77].repeat(5 * 31));
    }

    #[test]
    fn pad_to_square_centers_the_image() {
        let img = Rgb8 { width: 1, height: 3, data: [9u8; 9].to_vec() };
        let sq = img.pad_to_square([1, 2, 3]);
        assert_eq!((sq.width, sq.height), (3, 3));
        assert_eq!(sq.pixel(1, 0), [9, 9, 9]);
        assert_eq!(sq.pixel(0, 0), [1, 2, 3]);
    }
}
