//! Output formats shared by the commands: aligned tables for people, JSON and YAML for scripts.

use std::io::Write;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table (the default).
    Table,
    /// A table with more columns.
    Wide,
    Json,
    Yaml,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("encoding YAML: {0}")]
    Yaml(String),
}

/// Writes `value` as JSON or YAML (for `Format::Json` / `Format::Yaml`).
pub fn structured<T: Serialize>(
    out: &mut dyn Write,
    format: Format,
    value: &T,
) -> Result<(), OutputError> {
    match format {
        Format::Yaml => {
            let text =
                serde_saphyr::to_string(value).map_err(|e| OutputError::Yaml(e.to_string()))?;
            out.write_all(text.as_bytes())?;
        }
        _ => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

/// Rows padded to their widest cell, two spaces apart, like kubectl.
pub fn table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == n {
                    c.to_owned()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["NAME", "PHASE"],
            &[
                vec!["a-long-name".into(), "Bound".into()],
                vec!["b".into(), "Pending".into()],
            ],
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "NAME         PHASE\na-long-name  Bound\nb            Pending\n"
        );
    }
}
