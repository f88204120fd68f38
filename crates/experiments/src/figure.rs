//! Figures (plotters, PNG and SVG), drawn only from tables.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Figures a config can ask for.
pub const FIGURES: [&str; 6] = [
    "accuracy_by_method",
    "accuracy_vs_sweep",
    "cost_scaling",
    "ded_vs_entropy",
    "depth_tradeoff",
    "sensitivity_heatmap",
];

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws one figure twice, as `path`.png and `path`.svg: `$draw` is an expression over
/// `$root`, a drawing area of either backend (the two backend types differ, hence a macro).
macro_rules! png_and_svg {
    ($path:expr, $size:expr, |$root:ident| $draw:expr) => {{
        let size = $size;
        // Appended, not `with_extension`: model names have dots (`llava-1.5-7b`; issue #21 item 4).
        let with = |ext: &str| {
            let mut p = $path.as_os_str().to_owned();
            p.push(ext);
            std::path::PathBuf::from(p)
        };
        let (png, svg) = (with(".png"), with(".svg"));
        {
            let $root = BitMapBackend::new(&png, size).into_drawing_area();
            $draw?;
            $root.present().map_err(err)?;
        }
        let $root = SVGBackend::new(&svg, size).into_drawing_area();
        $draw?;
        $root.present().map_err(err)?;
        Ok(())
    }};
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// A horizontal black reference line at `y` over `x0..x1` (e.g. the float model's accuracy),
/// named in the legend.
fn draw_reference<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    label: &str,
    (x0, x1): (f64, f64),
    y: f64,
) -> Result<()> {
    chart
        .draw_series(LineSeries::new([(x0, y), (x1, y)], BLACK.stroke_width(2)))
        .map_err(err)?
        .label(label)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(2)));
    Ok(())
}

/// The series legend every figure draws: a framed, lightly opaque box at `position`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(err)
}

/// One series of grouped bars: its name, a value per group, and optionally a ± error per group
/// (drawn as a whisker; e.g. the standard deviation over seeds).
pub type BarSeries = (String, Vec<Option<f64>>, Vec<Option<f64>>);

/// Grouped bars: `groups` along x, one bar per series in each group. The value axis starts at 0
/// (no truncated axis).
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[BarSeries],
    reference: Option<(String, f64)>,
) -> Result<()> {
    let size = (160 + 110 * groups.len() as u32, 520);
    png_and_svg!(path, size, |root| draw_bars(
        &root,
        title,
        y_label,
        groups,
        series,
        reference.as_ref()
    ))
}

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[BarSeries],
    reference: Option<&(String, f64)>,
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let max = series
        .iter()
        .flat_map(|(_, v, e)| {
            v.iter()
                .zip(e.iter().chain(std::iter::repeat(&None)))
                .filter_map(|(v, e)| v.map(|v| v + e.unwrap_or(0.0)))
        })
        .chain(reference.map(|r| r.1))
        .fold(0.0f64, f64::max);
    let lo = 0.0;
    // Headroom above the tallest bar for the legend.
    let hi = max + 0.3 * max.max(1.0);
    let n = groups.len().max(1);
    let k = series.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Ticks every half unit; group names at the group centres (x = i + 0.5).
        .x_labels(2 * n + 1)
        .x_label_formatter(&|x| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 {
                groups.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(err)?;
    let width = 0.8 / k as f64;
    for (si, (name, values, errors)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        let x_of = |gi: usize| gi as f64 + 0.1 + width * si as f64;
        let bars = values.iter().enumerate().filter_map(|(gi, v)| {
            v.map(|v| {
                Rectangle::new([(x_of(gi), lo), (x_of(gi) + width * 0.95, v)], color.filled())
            })
        });
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        let whiskers = values.iter().zip(errors).enumerate().filter_map(|(gi, (v, e))| {
            let (v, e) = ((*v)?, (*e)?);
            let x = x_of(gi) + width * 0.475;
            Some(PathElement::new(vec![(x, v - e), (x, v + e)], BLACK.stroke_width(2)))
        });
        chart.draw_series(whiskers).map_err(err)?;
    }
    if let Some((label, v)) = reference {
        draw_reference(&mut chart, label, (0.0, n as f64), *v)?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

/// A heatmap: `rows` × `cols` cells coloured by value (white → blue), values printed inside
/// with their spread (`stds`, same shape: ± the standard deviation over seeds) where there is one.
pub fn heatmap(
    path: &Path,
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
    stds: &[Vec<Option<f64>>],
) -> Result<()> {
    let size = (220 + 150 * cols.len() as u32, 120 + 44 * rows.len() as u32);
    png_and_svg!(path, size, |root| draw_heatmap(&root, title, rows, cols, values, stds))
}

fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
    stds: &[Vec<Option<f64>>],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let (nr, nc) = (rows.len().max(1), cols.len().max(1));
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..nc as f64, 0f64..nr as f64)
        .map_err(err)?;
    // The axes without ticks; every column and row is labelled at its centre below (plotters'
    // own ticks fall on round values, which left most cells unlabelled).
    chart.configure_mesh().disable_mesh().x_labels(0).y_labels(0).draw().map_err(err)?;
    let label = |h: HPos, v: VPos| ("sans-serif", 13).into_font().color(&BLACK).pos(Pos::new(h, v));
    for (c, name) in cols.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(c as f64 + 0.5, 0.0));
        root.draw(&Text::new(name.clone(), (x, y + 6), label(HPos::Center, VPos::Top)))
            .map_err(err)?;
    }
    for (r, name) in rows.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(0.0, (nr - 1 - r) as f64 + 0.5));
        root.draw(&Text::new(name.clone(), (x - 6, y), label(HPos::Right, VPos::Center)))
            .map_err(err)?;
    }
    let flat: Vec<f64> = values.iter().flatten().flatten().copied().collect();
    let (lo, hi) = (
        flat.iter().copied().fold(f64::INFINITY, f64::min),
        flat.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    for (r, row) in values.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let y = (nr - 1 - r) as f64;
            let (x0, x1) = (c as f64 + 0.02, c as f64 + 0.98);
            let color = match v {
                Some(v) => {
                    let t = if hi > lo { (v - lo) / (hi - lo) } else { 1.0 };
                    RGBColor((255.0 - 200.0 * t) as u8, (255.0 - 140.0 * t) as u8, 255)
                }
                None => RGBColor(230, 230, 230),
            };
            chart
                .draw_series([Rectangle::new([(x0, y + 0.04), (x1, y + 0.96)], color.filled())])
                .map_err(err)?;
            let spread = stds.get(r).and_then(|row| row.get(c)).copied().flatten();
            let text = match (v, spread) {
                (Some(v), Some(sd)) => format!("{v:.1} ± {sd:.1}"),
                (Some(v), None) => format!("{v:.1}"),
                (None, _) => "–".to_string(),
            };
            chart
                .draw_series([Text::new(
                    text,
                    (c as f64 + 0.25, y + 0.4),
                    ("sans-serif", 15).into_font(),
                )])
                .map_err(err)?;
        }
    }
    Ok(())
}

/// A scatter plot with a least-squares line.
pub fn scatter(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
) -> Result<()> {
    png_and_svg!(path, (720, 520), |root| draw_scatter(&root, title, x_label, y_label, points))
}

fn bounds(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = v.clone().fold(f64::INFINITY, f64::min);
    let hi = v.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = 0.05 * (hi - lo).max(1e-9);
    (lo - pad, hi + pad)
}

fn draw_scatter<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    points: &[(f64, f64)],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let (x0, x1) = bounds(points.iter().map(|p| p.0));
    let (y0, y1) = bounds(points.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(85)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(err)?;
    chart
        .draw_series(
            points.iter().map(|&(x, y)| Circle::new((x, y), 3, COLORS[0].mix(0.7).filled())),
        )
        .map_err(err)?
        .label("sample")
        .legend(|(x, y)| Circle::new((x + 5, y), 3, COLORS[0].filled()));
    if let Some((a, b)) = least_squares(points) {
        chart
            .draw_series(LineSeries::new(
                [(x0, a + b * x0), (x1, a + b * x1)],
                COLORS[3].stroke_width(2),
            ))
            .map_err(err)?
            .label("least squares")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], COLORS[3].stroke_width(2)));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

/// `y = a + b·x` by least squares: `(a, b)` (`None` for fewer than two distinct x).
pub(crate) fn least_squares(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if n < 2.0 {
        return None;
    }
    let (mx, my) =
        (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| (my - sxy / sxx * mx, sxy / sxx))
}

/// Lines over a numeric x, one per series (e.g. accuracy vs the clipping percentile p), with an
/// optional horizontal reference line (the float model).
/// Points `(x, y, ± error)` (the error drawn as a whisker when present).
pub type Points3 = Vec<(f64, f64, Option<f64>)>;
/// One line: its name and points.
pub type LineSeries3 = (String, Points3);

/// Lines with whiskers; the value axis starts at 0 (no truncated axis).
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[LineSeries3],
    reference: Option<(String, f64)>,
) -> Result<()> {
    // Wide enough for a model label and a sweep axis in the title.
    png_and_svg!(path, (920, 560), |root| draw_lines(
        &root, title, x_label, y_label, series, &reference
    ))
}

fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[LineSeries3],
    reference: &Option<(String, f64)>,
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let points = || series.iter().flat_map(|(_, p)| p.iter());
    let (x0, x1) = bounds(points().map(|p| p.0));
    let (_, y1) =
        bounds(points().map(|p| p.1 + p.2.unwrap_or(0.0)).chain(reference.iter().map(|r| r.1)));
    let y0 = 0.0;
    // Headroom above for the legend.
    let y1 = y1 + 0.25 * (y1 - y0);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(
                LineSeries::new(pts.iter().map(|p| (p.0, p.1)), color.stroke_width(2))
                    .point_size(4),
            )
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], color.stroke_width(2)));
        let whiskers = pts.iter().filter_map(|&(x, y, e)| {
            let e = e?;
            Some(PathElement::new(vec![(x, y - e), (x, y + e)], color.stroke_width(2)))
        });
        chart.draw_series(whiskers).map_err(err)?;
    }
    if let Some((name, v)) = reference {
        draw_reference(&mut chart, name, (x0, x1), *v)?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

/// Two y-series over a shared numeric x (e.g. accuracy and search cost vs maximum depth): the
/// left one with whiskers (± its spread, e.g. the std over seeds), the right one on a secondary
/// axis. Both value axes start at 0 (no truncated axis).
pub fn dual_line(
    path: &Path,
    title: &str,
    x_label: &str,
    left: (&str, &Points3),
    right: (&str, &[(f64, f64)]),
) -> Result<()> {
    png_and_svg!(path, (720, 520), |root| draw_dual(&root, title, x_label, left, right))
}

fn draw_dual<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    left: (&str, &Points3),
    right: (&str, &[(f64, f64)]),
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let (x0, x1) = bounds(left.1.iter().map(|p| p.0).chain(right.1.iter().map(|p| p.0)));
    // From 0, with headroom above for the legend.
    let (_, l1) = bounds(left.1.iter().map(|p| p.1 + p.2.unwrap_or(0.0)));
    let (_, r1) = bounds(right.1.iter().map(|p| p.1));
    let (l1, r1) = (1.25 * l1, 1.25 * r1);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .right_y_label_area_size(80)
        .build_cartesian_2d(x0..x1, 0.0..l1)
        .map_err(err)?
        .set_secondary_coord(x0..x1, 0.0..r1);
    chart.configure_mesh().x_desc(x_label).y_desc(left.0).draw().map_err(err)?;
    chart.configure_secondary_axes().y_desc(right.0).draw().map_err(err)?;
    chart
        .draw_series(
            LineSeries::new(left.1.iter().map(|p| (p.0, p.1)), COLORS[0].stroke_width(2))
                .point_size(4),
        )
        .map_err(err)?
        .label(left.0)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], COLORS[0].stroke_width(2)));
    let whiskers = left.1.iter().filter_map(|&(x, y, e)| {
        let e = e?;
        Some(PathElement::new(vec![(x, y - e), (x, y + e)], COLORS[0].stroke_width(2)))
    });
    chart.draw_series(whiskers).map_err(err)?;
    chart
        .draw_secondary_series(
            LineSeries::new(right.1.iter().copied(), COLORS[1].stroke_width(2)).point_size(4),
        )
        .map_err(err)?
        .label(right.0)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], COLORS[1].stroke_width(2)));
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

/// One configuration on the roofline.
#[derive(Debug, Clone, PartialEq)]
pub struct RooflinePoint {
    /// The scheme (one colour each).
    pub scheme: String,
    /// The model (one marker shape each).
    pub model: String,
    /// Weight GB read per decode token.
    pub gb_per_token: f64,
    pub tokens_per_s: f64,
}

/// The decode roofline: tokens per second against the weight bytes one decode step reads, one
/// point per configuration (colour: scheme; marker: model, and a text label when there is one
/// model), under the bound `tokens/s = bandwidth / bytes` that a purely memory-bound decode would
/// reach at the measured bandwidth.
pub fn roofline(
    path: &Path,
    title: &str,
    bandwidth_gbs: f64,
    points: &[RooflinePoint],
) -> Result<()> {
    png_and_svg!(path, (820, 560), |root| draw_roofline(&root, title, bandwidth_gbs, points))
}

/// `items` without repeats, in first-seen order.
fn distinct<'a>(items: impl Iterator<Item = &'a String>) -> Vec<&'a String> {
    let mut seen = Vec::new();
    for item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen
}

/// A filled marker of shape `index` (circle, triangle, square, …) centred at `at`.
fn marker<DB: DrawingBackend>(
    index: usize,
    at: (i32, i32),
    size: i32,
    color: RGBColor,
) -> DynElement<'static, DB, (i32, i32)> {
    let style = color.filled();
    match index % 3 {
        0 => Circle::new(at, size, style).into_dyn(),
        1 => TriangleMarker::new(at, size + 1, style).into_dyn(),
        _ => Rectangle::new([(at.0 - size, at.1 - size), (at.0 + size, at.1 + size)], style)
            .into_dyn(),
    }
}

fn draw_roofline<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    bandwidth_gbs: f64,
    points: &[RooflinePoint],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let xs = || points.iter().map(|p| p.gb_per_token);
    let x_max = xs().fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let x_min = xs().fold(f64::INFINITY, f64::min).min(x_max) * 0.8;
    let bound = |x: f64| bandwidth_gbs / x;
    let y_max =
        points.iter().map(|p| p.tokens_per_s).chain([bound(x_min)]).fold(0.0f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max.max(1e-9))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("weight GB read per decode token")
        .y_desc("decode tokens / s")
        .draw()
        .map_err(err)?;
    let curve: Vec<(f64, f64)> = (0..=200)
        .map(|i| x_min + (x_max - x_min) * i as f64 / 200.0)
        .map(|x| (x, bound(x)))
        .collect();
    chart
        .draw_series(LineSeries::new(curve, BLACK.stroke_width(2)))
        .map_err(err)?
        .label(format!("bandwidth bound at the start of the run ({bandwidth_gbs:.1} GB/s; each row's own roof: table)"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(2)));
    let schemes = distinct(points.iter().map(|p| &p.scheme));
    let models = distinct(points.iter().map(|p| &p.model));
    let color_of = |p: &RooflinePoint| {
        COLORS[schemes.iter().position(|s| **s == p.scheme).unwrap_or(0) % COLORS.len()]
    };
    let shape_of = |p: &RooflinePoint| models.iter().position(|m| **m == p.model).unwrap_or(0);
    for p in points {
        let (color, shape) = (color_of(p), shape_of(p));
        chart
            .draw_series([EmptyElement::at((p.gb_per_token, p.tokens_per_s))
                + marker::<DB>(shape, (0, 0), 5, color)])
            .map_err(err)?;
        if models.len() == 1 {
            chart
                .draw_series([Text::new(
                    p.scheme.clone(),
                    (p.gb_per_token, p.tokens_per_s + 0.03 * y_max),
                    ("sans-serif", 13).into_font(),
                )])
                .map_err(err)?;
        }
    }
    // Legend: a colour per scheme, then (several models) a grey marker per model.
    for (i, scheme) in schemes.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
            .map_err(err)?
            .label(scheme.to_string())
            .legend(move |(x, y)| Circle::new((x + 5, y), 4, color.filled()));
    }
    if models.len() > 1 {
        for (i, model) in models.iter().enumerate() {
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(err)?
                .label(model.to_string())
                .legend(move |(x, y)| marker::<DB>(i, (x + 5, y), 4, RGBColor(90, 90, 90)));
        }
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}

/// One strategy of a log-log cost figure: its measured `(x, y)` points and the line
/// `y = overhead + per_unit · x` fitted to them.
pub struct FitSeries {
    pub name: String,
    pub measured: Vec<(f64, f64)>,
    pub overhead: f64,
    pub per_unit: f64,
}

/// Log-log axes: each series' measured points (filled) and its fit drawn from the smallest point
/// to the largest `target` x, with hollow markers at the targets (extrapolated values, named at
/// the top) — the scaling figure of issue #21.
pub fn loglog_fits(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[FitSeries],
    targets: &[(String, f64)],
) -> Result<()> {
    png_and_svg!(path, (960, 600), |root| draw_loglog_fits(
        &root, title, x_label, y_label, series, targets
    ))
}

fn draw_loglog_fits<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[FitSeries],
    targets: &[(String, f64)],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    // Where the fit goes non-positive (overhead-bound points) it is not drawn.
    let predict = |s: &FitSeries, x: f64| s.overhead + s.per_unit * x;
    let xs = || {
        series
            .iter()
            .flat_map(|s| s.measured.iter().map(|p| p.0))
            .chain(targets.iter().map(|t| t.1))
    };
    let ys = || {
        series.iter().flat_map(|s| {
            s.measured
                .iter()
                .map(|p| p.1)
                .chain(targets.iter().map(move |t| predict(s, t.1)).filter(|&y| y > 0.0))
        })
    };
    let (x0, x1) = (xs().fold(f64::INFINITY, f64::min), xs().fold(0.0, f64::max));
    let (y0, y1) = (ys().fold(f64::INFINITY, f64::min), ys().fold(0.0, f64::max));
    if !(x0 > 0.0 && y0 > 0.0 && x1.is_finite() && y1.is_finite()) {
        return Err(anyhow!("plotting: a log-log figure needs positive finite values"));
    }
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d((x0 / 2.0..x1 * 2.0).log_scale(), (y0 / 2.0..y1 * 4.0).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0e}"))
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let lo = s.measured.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let line: Vec<(f64, f64)> = (0..=40)
            .map(|k| {
                let x = (lo.ln() + (x1.ln() - lo.ln()) * k as f64 / 40.0).exp();
                (x, predict(s, x))
            })
            .filter(|p| p.1 > 0.0)
            .collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(1)))
            .map_err(err)?
            .label(format!("{} ({:.1} s/TFLOP)", s.name, s.per_unit * 1e12))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], color.stroke_width(2)));
        chart
            .draw_series(s.measured.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled())))
            .map_err(err)?;
        chart
            .draw_series(
                targets
                    .iter()
                    .map(|t| Circle::new((t.1, predict(s, t.1)), 5, color.stroke_width(2))),
            )
            .map_err(err)?;
    }
    // Names staggered downwards, right-aligned-ish left of their x (the targets sit close).
    for (i, t) in targets.iter().enumerate() {
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{} (extrapolated)", t.0),
                (t.1 / 40.0, y1 * 2.5 / 2.5f64.powi(i as i32)),
                ("sans-serif", 13),
            )))
            .map_err(err)?;
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heatmap_labels_every_row_and_column() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("qvlm-heatmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let rows: Vec<String> = ["W6A6", "W4A4", "W3A3"].map(String::from).to_vec();
        let cols: Vec<String> =
            ["static_tensor", "static_channel_token", "dynamic_token", "dynamic_tensor"]
                .map(String::from)
                .to_vec();
        let values = vec![vec![Some(68.3), Some(66.7), None, Some(68.0)]; rows.len()];
        let stds = vec![vec![Some(0.6), None, None, Some(0.0)]; rows.len()];
        let path = dir.join("map");
        heatmap(&path, "title", &rows, &cols, &values, &stds)?;
        // The SVG backend writes each text's content on a line of its own.
        let svg = std::fs::read_to_string(dir.join("map.svg"))?;
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        let count = |t: &str| texts.iter().filter(|&&l| l == t).count();
        for name in rows.iter().chain(&cols) {
            assert_eq!(count(name), 1, "label {name} in {svg}");
        }
        assert_eq!((count("68.3 ± 0.6"), count("66.7"), count("–")), (3, 3, 3), "{svg}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
