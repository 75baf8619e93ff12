//! The JSON summary: one line on stdout per run, optionally appended to `--json-out FILE`.

use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// Writes `report` as one JSON line to stdout and, when given, appends it to `json_out`.
pub fn emit<T: Serialize>(report: &T, json_out: Option<&Path>) -> std::io::Result<()> {
    let line = serde_json::to_string(report).map_err(std::io::Error::other)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    if let Some(path) = json_out {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
