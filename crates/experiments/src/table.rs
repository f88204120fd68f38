//! Tables: polars DataFrames built only from the cells' metric files, written as CSV and
//! Markdown.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use polars::prelude::{
    Column, CsvReadOptions, CsvWriter, DataFrame, DataType, Field, Schema, SerReader, SerWriter,
};

/// The schema of a cell's `metrics.csv` (ids stay strings even when all digits).
fn metrics_schema() -> Arc<Schema> {
    let text = ["cell", "model", "bits", "method", "metric"]
        .map(|n| Field::new(n.into(), DataType::String));
    Arc::new(Schema::from_iter(
        text.into_iter().chain([Field::new("value".into(), DataType::Float64)]),
    ))
}

/// All metric rows of the given cell folders (long format: cell, model, bits, method, metric,
/// value), in the order given.
pub fn load_metrics(files: &[std::path::PathBuf]) -> Result<DataFrame> {
    let mut out: Option<DataFrame> = None;
    for f in files {
        let df = CsvReadOptions::default()
            .with_has_header(true)
            .with_schema(Some(metrics_schema()))
            .try_into_reader_with_file_path(Some(f.clone()))
            .and_then(|r| r.finish())
            .with_context(|| format!("reading {}", f.display()))?;
        out = Some(match out {
            None => df,
            Some(acc) => acc.vstack(&df).with_context(|| format!("stacking {}", f.display()))?,
        });
    }
    match out {
        Some(df) => Ok(df),
        None => Ok(DataFrame::new_infer_height(vec![
            Column::new("cell".into(), Vec::<String>::new()),
            Column::new("model".into(), Vec::<String>::new()),
            Column::new("bits".into(), Vec::<String>::new()),
            Column::new("method".into(), Vec::<String>::new()),
            Column::new("metric".into(), Vec::<String>::new()),
            Column::new("value".into(), Vec::<f64>::new()),
        ])?),
    }
}

/// A column as strings (nulls as "").
pub fn strings(df: &DataFrame, name: &str) -> Result<Vec<String>> {
    let col = df.column(name)?.cast(&DataType::String)?;
    Ok(col.str()?.iter().map(|v| v.unwrap_or_default().to_string()).collect())
}

/// A column as optional f64.
pub fn floats(df: &DataFrame, name: &str) -> Result<Vec<Option<f64>>> {
    let col = df.column(name)?.cast(&DataType::Float64)?;
    Ok(col.f64()?.iter().collect())
}

/// Wide table: one row per (model, bits, method) in first-appearance order, one column per
/// requested metric (null where a cell lacks it).
pub fn wide(long: &DataFrame, metrics: &[&str]) -> Result<DataFrame> {
    let (models, bits, methods, names) = (
        strings(long, "model")?,
        strings(long, "bits")?,
        strings(long, "method")?,
        strings(long, "metric")?,
    );
    let values = floats(long, "value")?;
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for i in 0..models.len() {
        let k = (models[i].clone(), bits[i].clone(), methods[i].clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut cols: Vec<Column> = vec![
        Column::new("model".into(), keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>()),
        Column::new("bits".into(), keys.iter().map(|k| k.1.clone()).collect::<Vec<_>>()),
        Column::new("method".into(), keys.iter().map(|k| k.2.clone()).collect::<Vec<_>>()),
    ];
    for m in metrics {
        let v: Vec<Option<f64>> = keys
            .iter()
            .map(|k| {
                (0..models.len())
                    .find(|&i| {
                        models[i] == k.0 && bits[i] == k.1 && methods[i] == k.2 && names[i] == *m
                    })
                    .and_then(|i| values[i])
            })
            .collect();
        cols.push(Column::new((*m).into(), v));
    }
    Ok(DataFrame::new_infer_height(cols)?)
}

/// Writes `df` as CSV and as a Markdown table.
pub fn write(df: &mut DataFrame, csv: &Path, md: &Path, title: &str, note: &str) -> Result<()> {
    let mut f =
        std::fs::File::create(csv).with_context(|| format!("creating {}", csv.display()))?;
    CsvWriter::new(&mut f)
        .include_header(true)
        .finish(df)
        .with_context(|| format!("writing {}", csv.display()))?;
    std::fs::write(md, markdown(df, title, note)?)
        .with_context(|| format!("writing {}", md.display()))
}

/// A Markdown rendering of a DataFrame (floats with 2 decimals, big counts as integers).
pub fn markdown(df: &DataFrame, title: &str, note: &str) -> Result<String> {
    let names: Vec<String> = df.get_column_names().iter().map(|n| n.to_string()).collect();
    let mut s = format!("### {title}\n\n");
    if !note.is_empty() {
        s.push_str(note);
        s.push_str("\n\n");
    }
    s.push_str(&format!("| {} |\n", names.join(" | ")));
    s.push_str(&format!("|{}\n", names.iter().map(|_| "---|").collect::<String>()));
    for row in 0..df.height() {
        let cells: Vec<String> = names
            .iter()
            .map(|n| -> Result<String> {
                let c = df.column(n)?;
                Ok(match c.dtype() {
                    DataType::String => c.str()?.get(row).unwrap_or("").to_string(),
                    _ => match c.cast(&DataType::Float64)?.f64()?.get(row) {
                        None => "–".into(),
                        Some(v) if v.abs() >= 1e4 => format!("{v:.0}"),
                        Some(v) => format!("{v:.2}"),
                    },
                })
            })
            .collect::<Result<_>>()?;
        s.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    Ok(s)
}

/// Reads a CSV of `paper/`.
pub fn read_csv(path: &Path) -> Result<DataFrame> {
    CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish())
        .with_context(|| format!("reading {}", path.display()))
}
