//! Events as JSON for other tools: `carrel-audit export --jsonl` (one record per line with
//! its leaf hash) and `carrel-audit show --json`.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;

use serde_json::{json, Value};
use thiserror::Error;

use crate::codec::to_hex;
use crate::event::{Event, Outcome};
use crate::layout::Layout;
use crate::reader::{for_each_event, ReadError, ReadSummary};
use crate::tree::Hash;

/// Errors of exporting.
#[derive(Debug, Error)]
pub enum ExportError {
    #[error("cannot read the log")]
    ReadLog(#[source] ReadError),
    #[error("cannot write the export")]
    WriteExport(#[source] std::io::Error),
}

/// A Unix time in nanoseconds as RFC 3339 UTC, e.g. `2024-05-01T12:00:00.123456789Z`.
pub fn format_time(unix_nanos: u64) -> String {
    let seconds = unix_nanos / 1_000_000_000;
    let nanos = unix_nanos % 1_000_000_000;
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    // Civil date from days since 1970-01-01, counting in 400-year eras from 0000-03-01 so
    // that leap days fall at the end of each year of the era.
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// An event (and its leaf hash) as a JSON object.
pub fn event_json(event: &Event, leaf: &Hash) -> Value {
    let hash = |hash: &Option<[u8; 32]>| hash.as_ref().map(|h| to_hex(h));
    let (result, error) = match &event.outcome {
        Outcome::Ok => ("ok", None),
        Outcome::Error(message) => ("error", Some(message.clone())),
    };
    json!({
        "seq": event.seq,
        "time_unix_nanos": event.time_unix_nanos,
        "time": format_time(event.time_unix_nanos),
        "actor": event.actor.map(|a| json!({"pid": a.pid, "uid": a.uid, "gid": a.gid})),
        "vm": event.vm,
        "action": event.action,
        "params": event.params.iter().map(|p| json!({"key": p.key, "value": p.value})).collect::<Vec<_>>(),
        "result": result,
        "error": error,
        "screenshot_before": hash(&event.screenshot_before),
        "screenshot_after": hash(&event.screenshot_after),
        "leaf_hash": to_hex(leaf),
    })
}

/// Writes every event of the log in `dir` as one JSON line; returns how many.
pub fn export_jsonl(dir: &Path, out: &mut dyn Write) -> Result<ReadSummary, ExportError> {
    let mut write_error = None;
    let summary = for_each_event(&Layout::new(dir).log(), 0, |event, leaf| {
        let line = event_json(event, leaf).to_string();
        match writeln!(out, "{line}") {
            Ok(()) => ControlFlow::Continue(()),
            Err(error) => {
                write_error = Some(error);
                ControlFlow::Break(())
            }
        }
    })
    .map_err(ExportError::ReadLog)?;
    if let Some(error) = write_error {
        return Err(ExportError::WriteExport(error));
    }
    out.flush().map_err(ExportError::WriteExport)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_time_of_known_instants_matches_calendar() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(format_time(951_782_400_000_000_001), "2000-02-29T00:00:00.000000001Z");
        assert_eq!(format_time(1_709_251_199_500_000_000), "2024-02-29T23:59:59.500000000Z");
        assert_eq!(format_time(4_102_444_800_000_000_000), "2100-01-01T00:00:00.000000000Z");
    }
}
